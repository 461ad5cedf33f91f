"""Integer export of quantized weights (public as :mod:`trquant.export`)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, TypeGuard, Union

import jax
import jax.numpy as jnp
import numpy as np

from trquant._src import checks
from trquant._src import quantizers

if TYPE_CHECKING:  # the NNX layers are optional for plain pytrees
  from flax import nnx

PyTree = Any

__all__ = ["IntegerTensor", "from_integer", "load_integer", "nbytes", "read_integer",
           "packed_model", "save_integer", "to_integer"]

# Bit widths whose codes are packed several to a byte.
_PACKED_BITS = (1, 2, 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntegerTensor:
  """A quantized tensor as stored: ``value = scale * (unpack(data) - zero_point)``.

  Attributes:
    data: the stored codes: ``uint8`` with ``8 // bits`` codes per byte for 1, 2
      and 4 bits (offset by ``zero_point`` so they are non-negative; binary codes
      ``{-1, +1}`` are stored as bits ``{0, 1}``), else one ``int8``/``uint8``
      (``int16``/``uint16`` above 8 bits) per code.
    scale: the step size, scalar or keep-dims per-channel array, in its own dtype.
    bits, signed, narrow: the integer grid (see :func:`trquant.quant_range`).
    shape: the tensor's shape.
    dtype: name of the floating dtype :func:`from_integer` returns.
    zero_point: integer added to each code before packing (0 when unpacked).
    group_size, group_axis: per-group scales (one per ``group_size`` entries along
      ``group_axis``, see :func:`trquant.quantize`); None for per-tensor / per-channel.
  """

  data: jax.Array
  scale: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))
  narrow: bool = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(metadata=dict(static=True))
  zero_point: int = dataclasses.field(metadata=dict(static=True))
  group_size: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
  group_axis: int = dataclasses.field(default=-2, metadata=dict(static=True))

  @property
  def codes(self) -> jax.Array:
    """The integer codes, unpacked, as ``int32`` of :attr:`shape`."""
    data = jnp.asarray(self.data)
    if self.bits in _PACKED_BITS:
      per_byte = 8 // self.bits
      shifts = jnp.arange(per_byte, dtype=jnp.uint8) * self.bits
      mask = jnp.uint8(2**self.bits - 1)
      stored = ((data[:, None] >> shifts) & mask).reshape(-1)[:_size(self.shape)]
      codes = stored.astype(jnp.int32)
      codes = 2 * codes - 1 if _is_binary(self) else codes - self.zero_point
    else:
      codes = data.astype(jnp.int32)
    return codes.reshape(self.shape)

  def dequantize(self) -> jax.Array:
    """``scale * codes`` in :attr:`dtype`, computed as ``fake_quant`` computes it."""
    dtype = jnp.dtype(self.dtype)
    compute = jnp.promote_types(dtype, jnp.result_type(self.scale))
    if self.group_size is not None:
      return quantizers.dequantize(self.codes.astype(compute), jnp.asarray(self.scale, compute),
                                   group_size=self.group_size,
                                   group_axis=self.group_axis).astype(dtype)
    return (jnp.asarray(self.scale, compute) * self.codes.astype(compute)).astype(dtype)


def _host(value) -> np.ndarray:
  """A concrete value as a numpy array on this host: an array sharded across processes is
  gathered from every process first (a collective: every process must call)."""
  if checks.spans_processes(value):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(value)


def _is_distributed(value) -> bool:
  """Whether a concrete jax array lies on more than one device (sharded or replicated)."""
  return (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
          and len(value.sharding.device_set) > 1)


def _put_like(value, like):
  """``value`` as an array of ``like``'s dtype, on ``like``'s sharding when it has one
  (a model's variable keeps its sharding, across processes too)."""
  dtype = np.dtype(jnp.result_type(like))
  if not isinstance(like, jax.Array) or isinstance(like, jax.core.Tracer):
    return jnp.asarray(value, dtype)
  if not _is_distributed(like) and not _is_distributed(value):
    return jax.device_put(jnp.asarray(value, dtype), like.sharding)
  values = _host(value).astype(dtype)
  return jax.make_array_from_callback(values.shape, like.sharding, lambda index: values[index])


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _is_binary(tensor: IntegerTensor) -> bool:
  return tensor.signed and tensor.bits == 1


def _storage_dtype(bits: int, signed: bool):
  if bits <= 8:
    return jnp.int8 if signed else jnp.uint8
  return jnp.int16 if signed else jnp.uint16


def _pack(codes, bits: int, lo: int, binary: bool):
  """Packs integer codes (any shape) into a flat uint8 array, ``8 // bits`` per byte."""
  stored = (codes + 1) // 2 if binary else codes - lo
  stored = stored.reshape(-1).astype(jnp.uint8)
  per_byte = 8 // bits
  stored = jnp.pad(stored, (0, -stored.size % per_byte)).reshape(-1, per_byte)
  shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
  # The shifted fields do not overlap, so their sum is their bitwise or.
  return jnp.sum(stored << shifts, axis=1, dtype=jnp.uint8)


def quantize_to_integer(x, scale, *, bits: int, signed: bool = True,
                        narrow: bool = False, group_size: Optional[int] = None,
                        group_axis: int = -2) -> IntegerTensor:
  """One tensor's :class:`IntegerTensor`, with the codes of :func:`trquant.quantize`.

  Args:
    x: the latent (float) weight.
    scale: its positive step size (scalar or keep-dims per-channel array).
    bits: bit width in ``[1, 16]``.
    signed, narrow: the grid, as in :func:`trquant.quantize`.
    group_size, group_axis: per-group scales, as in :func:`trquant.quantize`.

  Returns:
    The :class:`IntegerTensor`.
  """
  # The export is a host artifact: a weight sharded over devices (across processes, or
  # over explicit mesh axes, which a flat packing cannot reshape) is brought here whole.
  if _is_distributed(x):
    x = jnp.asarray(_host(x))
  if _is_distributed(scale):
    scale = jnp.asarray(_host(scale))
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"only floating weights can be exported, got dtype {x.dtype}.")
  lo, _ = quantizers.quant_range(bits, signed=signed, narrow=narrow)
  group = {} if group_size is None else {"group_size": checks.check_group_size(group_size),
                                         "group_axis": int(group_axis)}
  if not isinstance(scale, jax.core.Tracer):  # a concrete scale can be checked here, once
    if group:
      checks.check_scale_values(np.asarray(scale))
      quantizers.group_scale_shape(x.shape, group["group_size"], group_axis=group_axis,
                                   channel_axis=None)
    else:
      checks.check_scale(x, np.asarray(scale))
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    scale = scale.astype(x.dtype)
  # Codes in float32 at least: bfloat16 holds integers exactly only up to 256.
  codes = quantizers.quantize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), scale,
                              bits=bits, signed=signed, narrow=narrow, **group).astype(jnp.int32)
  binary = signed and bits == 1
  if bits in _PACKED_BITS:
    data, zero_point = _pack(codes, bits, lo, binary), (0 if binary else -lo)
  else:
    data, zero_point = codes.astype(_storage_dtype(bits, signed)), 0
  return IntegerTensor(data=data, scale=scale, bits=bits, signed=signed, narrow=narrow,
                       shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, zero_point=zero_point,
                       group_size=group.get("group_size"), group_axis=group.get("group_axis", -2))


def _is_exported(x) -> TypeGuard[IntegerTensor]:
  return isinstance(x, IntegerTensor)


def to_integer(params: Union[PyTree, nnx.Module], scales: Optional[PyTree] = None, *,
               bits: Optional[Union[int, PyTree]] = None, signed: bool = True,
               narrow: bool = False, group_size: Optional[int] = None,
               group_axis: int = -2) -> PyTree:
  """Exports quantized weights as :class:`IntegerTensor` leaves.

  Args:
    params: a pytree of float weights, or an NNX model built from
      :mod:`trquant.nnx` layers (then ``scales`` and ``bits`` come from the model:
      its ``nnx.Param`` and ``nnx.BatchStat`` values are exported as a nested dict
      with each quantized kernel an :class:`IntegerTensor`).
    scales: a tree with ``params``' structure (a prefix is fine) holding each
      quantized leaf's step size and ``None`` for leaves kept in float.
    bits: an int for every quantized leaf, or a tree like ``scales``.
    signed, narrow: the weight grid (see :func:`trquant.quantize`).
    group_size, group_axis: per-group scales (see :func:`trquant.quantize`) for every
      quantized leaf of a pytree; each scale then has the shape
      :func:`trquant.group_scale_shape` gives.

  Returns:
    ``params``' tree with every quantized leaf replaced by its
    :class:`IntegerTensor`; other leaves are returned unchanged.

  Raises:
    ValueError: if ``scales`` does not match ``params``' structure (the message
      names the path), ``bits`` is missing or invalid, a scale is not positive, or
      an NNX model has no trquant layer with quantized weights (nothing would be
      exported as integers: build it from :mod:`trquant.nnx` layers).
  """
  from flax import nnx  # the NNX layers are optional for plain pytrees

  if isinstance(params, nnx.Module):
    if scales is not None or bits is not None or group_size is not None:
      raise ValueError("for an NNX model, scales, bits and group sizes come from its layers;"
                       " pass none of them.")
    return _model_to_integer(params)
  if scales is None or bits is None:
    raise ValueError("`scales` and `bits` are required for a pytree of weights (a tree of"
                     " step sizes, None where a leaf stays float, and the bit width).")
  try:
    scale_leaves = jax.tree.broadcast(scales, params, is_leaf=lambda s: s is None)
  except ValueError as error:
    raise ValueError(f"`scales` must have the structure of `params` (or a prefix): {error}")
  if isinstance(bits, numbers.Integral):
    bit_leaves = jax.tree.map(lambda _: bits, params)
  else:
    try:
      bit_leaves = jax.tree.broadcast(bits, params, is_leaf=lambda b: b is None)
    except ValueError as error:
      raise ValueError(f"`bits` must be an int or a tree like `scales`: {error}")

  def export_leaf(path, leaf, scale, leaf_bits):
    if scale is None:
      return leaf
    try:
      return quantize_to_integer(leaf, scale, bits=leaf_bits, signed=signed, narrow=narrow,
                                 group_size=group_size, group_axis=group_axis)
    except ValueError as error:
      hint = ("" if group_size is not None or np.ndim(scale) == 0 else
              " (per-group scales: pass `group_size`)")
      raise ValueError(f"{jax.tree_util.keystr(path)}: {error}{hint}") from None

  return jax.tree_util.tree_map_with_path(export_leaf, params, scale_leaves, bit_leaves,
                                          is_leaf=lambda s: s is None)


def _model_to_integer(model):
  from flax import nnx

  from trquant._src.nnx import traversal as nnx_traversal

  layers = nnx_traversal.require_quant_layers(model, "to_integer", quantized_weights=True)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  for path, layer in layers:
    node = state
    for key in path:
      node = node.setdefault(key, {})
    node["kernel"] = _layer_kernel_to_integer(layer)
    node.pop("weight_scale", None)  # carried by the IntegerTensor
  return state


def _layer_kernel_to_integer(layer) -> IntegerTensor:
  """A trquant layer's quantized kernel as an :class:`IntegerTensor` (a packed_model's
  layer holds it already)."""
  from trquant._src.nnx.layers import PackedWeight

  kernel = layer.kernel
  if isinstance(kernel, PackedWeight):
    return kernel.get_value()
  return quantize_to_integer(kernel.get_value(), layer.weight_scale.get_value(), bits=kernel.bits,
                             signed=kernel.signed, narrow=kernel.narrow, **layer.weight_group)


def packed_model(model: nnx.Module) -> nnx.Module:
  """A copy of a quantized NNX model for inference, its quantized kernels kept packed.

  Every trquant layer with quantized weights holds a :class:`PackedWeight` (the
  :class:`IntegerTensor` of :func:`to_integer`: two 4-bit or four 2-bit codes per
  byte, with the per-tensor, per-channel or per-group step sizes) instead of its float
  latent weight and scale, and dequantizes it inside the forward pass, so the model's
  resident state is the packed codes. The logits equal the fake-quantized model's
  (the dequantized codes are ``fake_quant``'s output bit for bit). Input quantization,
  BatchNorm statistics, biases and full-precision layers are copied as they are.

  The copy is for inference: its kernels are no ``nnx.Param`` (an optimizer has
  nothing to train) and a kernel sharded over devices is gathered, since the packing
  is flat. :func:`to_integer` / :func:`save_integer` export it as they export the
  model it came from.

  Args:
    model: an NNX model with trquant layers whose weights are quantized (not modified).

  Returns:
    The packed copy.

  Raises:
    ValueError: if the model has no trquant layer with quantized weights.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> layer = trquant.nnx.QuantLinear(64, 8, weight_bits=4, group_size=32, rngs=nnx.Rngs(0))
    >>> packed = trquant.export.packed_model(layer)
    >>> packed.kernel.get_value().data.dtype, packed.kernel.get_value().data.size  # 2 per byte
    (dtype('uint8'), 256)
    >>> x = jnp.ones((1, 64))
    >>> bool((packed(x) == layer(x)).all())
    True
  """
  from flax import nnx

  from trquant._src.nnx import traversal as nnx_traversal
  from trquant._src.nnx.layers import PackedWeight

  nnx_traversal.require_quant_layers(model, "packed_model", quantized_weights=True)
  packed = nnx.clone(model)
  for _, layer in nnx_traversal.quant_layers(packed):
    kernel = layer.kernel
    if kernel.bits is None or isinstance(kernel, PackedWeight):
      continue
    layer.kernel = PackedWeight(_layer_kernel_to_integer(layer), bits=kernel.bits,
                                signed=kernel.signed, narrow=kernel.narrow)
    layer.weight_scale = None  # carried by the IntegerTensor
  return packed


def from_integer(tree: PyTree) -> PyTree:
  """Float weights of an exported tree: every :class:`IntegerTensor` dequantized.

  The values equal the quantized model's forward-pass weights (``fake_quant``
  of the latent weights) exactly. The scales are not kept: to put an exported NNX
  model back into a model, use :func:`load_integer`, which restores the kernels and
  the weight scales (``nnx.update(model, from_integer(exported))`` would leave the
  model's own scales in place and quantize the kernels onto the wrong grid).

  Args:
    tree: the output of :func:`to_integer` (or any tree with IntegerTensor leaves).

  Returns:
    The same tree with float arrays in place of the IntegerTensors.
  """
  return jax.tree.map(lambda x: x.dequantize() if _is_exported(x) else x, tree,
                      is_leaf=_is_exported)


def nbytes(tree: PyTree) -> int:
  """Bytes of the arrays in a (possibly exported) tree: codes, scales and float leaves
  (each array's whole size, also where it is sharded across devices or processes)."""
  return sum(int(leaf.nbytes) if isinstance(leaf, (jax.Array, np.ndarray))
             else int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))



# ---------------------------------------------------------------------------------------
# Loading into a model, and files
# ---------------------------------------------------------------------------------------


def load_integer(model: nnx.Module, exported: PyTree) -> list[tuple]:
  """Puts an exported NNX model back into a model of the same architecture, exactly.

  For every quantized layer, the kernel becomes the dequantized codes and the
  weight scale (frozen or learned) the exported scale, so the forward pass
  quantizes each kernel onto exactly the exported grid and gives bit for bit the
  outputs of the model that was exported; every other parameter and BatchNorm
  statistic (biases, activation scales, running means) is copied as well. Values
  only: the layers keep their metadata. ``nnx.update(model, from_integer(exported))``
  is not enough: it leaves the model's own weight scales in place.

  Args:
    model: an NNX model built like the exported one (same layers, bit widths and
      per-channel settings), e.g. freshly initialised in a new process.
    exported: the output of :func:`to_integer` on such a model, or of
      :func:`read_integer`, or the path of a file written by :func:`save_integer`.

  Returns:
    The paths loaded, as tuples of keys.

  Raises:
    ValueError: if the model has no trquant layer with quantized weights, an entry
      is missing on either side, or a shape, bit width or grid differs (the message
      names the path).

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> def make(seed):
    ...   return nnx.Sequential(trquant.nnx.QuantLinear(8, 4, weight_bits=4, rngs=nnx.Rngs(seed)))
    >>> model, x = make(0), jnp.ones((2, 8))
    >>> exported = trquant.export.to_integer(model)
    >>> fresh = make(1)                       # other weights and other scales
    >>> _ = trquant.export.load_integer(fresh, exported)
    >>> bool(jnp.all(fresh(x) == model(x)))
    True
  """
  from flax import nnx

  from trquant._src.nnx import traversal as nnx_traversal

  if isinstance(exported, (str, os.PathLike)):
    exported = read_integer(exported)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  layers = nnx_traversal.require_quant_layers(model, "load_integer", quantized_weights=True)
  if not isinstance(exported, Mapping):
    raise ValueError("`exported` must be the nested dict that to_integer(model) returns (or"
                     f" read_integer reads), got {type(exported).__name__}.")
  entries = dict(_flat_entries(exported))
  targets = {tuple(path): variable for path, variable in nnx.to_flat_state(
      nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}
  name = nnx_traversal.path_name
  # The weight scales of quantized layers travel inside their IntegerTensor.
  carried = {}
  for path, layer in layers:
    kernel_path = path + ("kernel",)
    tensor = entries.get(kernel_path)
    if not _is_exported(tensor):
      found = "nothing" if tensor is None else f"a {type(tensor).__name__}"
      raise ValueError(f"{name(kernel_path)}: the model quantizes this kernel to"
                       f" {layer.kernel.bits} bits, but the export holds {found} there, not"
                       " an IntegerTensor. Was it exported (to_integer) from a model with the"
                       " same layers and bit widths?")
    kernel = layer.kernel
    grid = (kernel.bits, kernel.signed, kernel.narrow)
    if (tensor.bits, tensor.signed, tensor.narrow) != grid:
      raise ValueError(f"{name(kernel_path)}: exported with bits={tensor.bits},"
                       f" signed={tensor.signed}, narrow={tensor.narrow}; the model's layer has"
                       f" bits={grid[0]}, signed={grid[1]}, narrow={grid[2]}. Build the model"
                       " with the bit widths it was exported with.")
    group = layer.weight_group
    if (tensor.group_size, tensor.group_axis if tensor.group_size else None) != (
        group.get("group_size"), group.get("group_axis")):
      raise ValueError(f"{name(kernel_path)}: exported with group_size={tensor.group_size}; the"
                       f" model's layer has group_size={group.get('group_size')}. Build the model"
                       " with the group size it was exported with.")
    _check_shape(kernel_path, tensor.shape, kernel.get_value(), name)
    _check_shape(path + ("weight_scale",), np.shape(tensor.scale),
                 layer.weight_scale.get_value(), name, hint=" (per-channel vs per-tensor?)")
    carried[kernel_path] = (tensor, layer)
    targets.pop(path + ("weight_scale",), None)
  unknown = [name(path) for path in entries if path not in targets]
  if unknown:
    raise ValueError(f"the export has {unknown[:5]} ({len(unknown)} in all), which the model"
                     " lacks; was it exported from the same architecture?")
  missing = [name(path) for path in targets if path not in entries]
  if missing:
    raise ValueError(f"the model has {missing[:5]} ({len(missing)} in all), which the export"
                     " lacks; was it exported from the same architecture?")
  plain = [(path, value) for path, value in entries.items() if path not in carried]
  for path, value in plain:  # every check before the first change to the model
    if _is_exported(value):
      raise ValueError(f"{name(path)}: the export holds integer codes here, but the model's"
                       " layer keeps this weight in full precision (weight_bits=None).")
    _check_shape(path, np.shape(value), targets[path].get_value(), name)
  # Each value goes back onto its variable's sharding (every process's part of it).
  for path, value in plain:
    target = targets[path]
    target.set_value(_put_like(value, target.get_value()))
  for path, (tensor, layer) in carried.items():
    kernel = layer.kernel.get_value()
    layer.kernel.set_value(_put_like(tensor.dequantize().astype(kernel.dtype), kernel))
    layer.weight_scale.set_value(_put_like(tensor.scale, layer.weight_scale.get_value()))
  return list(entries)


def _check_shape(path, shape, target, name, hint: str = "") -> None:
  if tuple(shape) != tuple(np.shape(target)):
    raise ValueError(f"{name(path)}: exported shape {tuple(shape)}, model shape"
                     f" {tuple(np.shape(target))}{hint}.")


def _flat_entries(tree, prefix=()):
  """(path, leaf) pairs of a nested mapping, with IntegerTensors as leaves."""
  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, Mapping):
      yield from _flat_entries(value, path)
    else:
      yield path, value


_FILE_FORMAT = "trquant.export"
_FILE_VERSION = 1
_HEADER = "__trquant_export__"


def save_integer(path: Union[str, os.PathLike], exported: PyTree) -> None:
  """Writes an exported tree to one ``.npz`` file (no pickle), for :func:`read_integer`.

  Packed codes, scales and float leaves are stored as arrays; the tree's structure
  (nested dicts with string or integer keys, lists, tuples, None) and each
  :class:`IntegerTensor`'s grid, shape and dtype as a JSON header. The file is
  written at ``path`` as given. With several processes (``jax.distributed``), call it on
  every process: arrays sharded across processes are gathered (a collective), process 0
  writes the file, and every process returns once it is written.

  Args:
    path: the file to write (str or path-like).
    exported: the output of :func:`to_integer`.

  Raises:
    ValueError: if the tree holds something other than IntegerTensors, arrays,
      numbers, None, dicts, lists and tuples (the message names the path).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, trquant
    >>> exported = trquant.export.to_integer({"w": jnp.array([0.3, -0.6])}, {"w": 0.25}, bits=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "weights.npz")
    >>> trquant.export.save_integer(path, exported)
    >>> trquant.export.from_integer(trquant.export.read_integer(path))["w"]
    Array([ 0.25, -0.5 ], dtype=float32)
  """
  arrays: dict[str, np.ndarray] = {}

  def store(value) -> dict:
    value = _host(value)
    key = f"a{len(arrays)}"
    if np.dtype(value.dtype.str) != value.dtype:
      # e.g. bfloat16 (ml_dtypes): stored as its bits, with the dtype name in the header.
      arrays[key] = value.view(f"uint{8 * value.dtype.itemsize}")
    else:
      arrays[key] = value
    return {"key": key, "dtype": value.dtype.name}

  def encode(node, where):
    if _is_exported(node):
      return {"integer": {"data": store(node.data), "scale": store(node.scale),
                          "bits": node.bits, "signed": node.signed, "narrow": node.narrow,
                          "shape": list(node.shape), "dtype": node.dtype,
                          "zero_point": node.zero_point, "group_size": node.group_size,
                          "group_axis": node.group_axis}}
    if node is None:
      return {"none": True}
    if isinstance(node, Mapping):
      items = []
      for key, value in node.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
          raise ValueError(f"{where or '<root>'}: dict keys must be str or int to be saved, got"
                           f" {key!r}.")
        items.append([key, encode(value, f"{where}/{key}")])
      return {"dict": items}
    if isinstance(node, (list, tuple)):
      kind = "list" if isinstance(node, list) else "tuple"
      return {kind: [encode(value, f"{where}/{i}") for i, value in enumerate(node)]}
    if isinstance(node, (jax.Array, np.ndarray, np.generic, numbers.Number)):
      return {"array": store(node)}
    raise ValueError(f"{where or '<root>'}: cannot save a {type(node).__name__}; save_integer"
                     " stores IntegerTensors, arrays, numbers and None in dicts, lists and"
                     " tuples (the output of to_integer).")

  header = {"format": _FILE_FORMAT, "version": _FILE_VERSION, "tree": encode(exported, "")}
  arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
  if jax.process_index() == 0:  # one writer; every process took part in the gathers above
    with open(path, "wb") as f:
      np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"trquant.export.save_integer {os.fspath(path)}")


def read_integer(path: Union[str, os.PathLike]) -> PyTree:
  """Reads a file written by :func:`save_integer`: the exported tree, as it was saved.

  Args:
    path: the file (str or path-like).

  Returns:
    The tree, with :class:`IntegerTensor` leaves (jax arrays inside) and jax arrays
    for the float leaves. Pass it to :func:`load_integer` (an NNX model) or
    :func:`from_integer` (float weights).

  Raises:
    ValueError: if the file was not written by :func:`save_integer`.
  """
  with np.load(path, allow_pickle=False) as data:
    if _HEADER not in data.files:
      raise ValueError(f"{os.fspath(path)} was not written by trquant.export.save_integer"
                       " (it has no trquant header).")
    header = json.loads(data[_HEADER].tobytes().decode("utf-8"))
    if header.get("format") != _FILE_FORMAT or header.get("version") != _FILE_VERSION:
      raise ValueError(f"{os.fspath(path)}: unknown format {header.get('format')!r} version"
                       f" {header.get('version')!r}.")
    arrays = {key: data[key] for key in data.files if key != _HEADER}

  def load(entry):
    value = arrays[entry["key"]]
    dtype = jnp.dtype(entry["dtype"])
    return jnp.asarray(value.view(dtype) if value.dtype != dtype else value)

  def decode(node):
    if "integer" in node:
      spec = node["integer"]
      return IntegerTensor(data=load(spec["data"]), scale=load(spec["scale"]), bits=spec["bits"],
                           signed=spec["signed"], narrow=spec["narrow"],
                           shape=tuple(spec["shape"]), dtype=spec["dtype"],
                           zero_point=spec["zero_point"], group_size=spec.get("group_size"),
                           group_axis=spec.get("group_axis", -2))
    if "none" in node:
      return None
    if "dict" in node:
      return {key: decode(value) for key, value in node["dict"]}
    if "list" in node:
      return [decode(value) for value in node["list"]]
    if "tuple" in node:
      return tuple(decode(value) for value in node["tuple"])
    return load(node["array"])

  return decode(header["tree"])
