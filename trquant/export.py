"""Integer export of quantized weights: packed codes, scales and bit widths.

A trained quantized model is deployed as integer codes plus step sizes, not as
latent float weights. :func:`to_integer` turns each quantized weight into an
:class:`IntegerTensor` (codes packed eight 1-bit, four 2-bit or two 4-bit codes
per byte; one code per ``int8``/``uint8`` byte up to 8 bits, 16-bit above), and
:func:`from_integer` turns it back into exactly the values the forward pass
used (``fake_quant``'s output, bit for bit).

    >>> import jax.numpy as jnp, trquant
    >>> w = jnp.array([[0.31, -0.52], [0.05, 0.9]])
    >>> exported = trquant.export.to_integer({"w": w}, {"w": 0.25}, bits=2)
    >>> exported["w"].data.dtype, exported["w"].data.size   # four codes in one byte
    (dtype('uint8'), 1)
    >>> trquant.export.from_integer(exported)["w"]
    Array([[ 0.25, -0.5 ],
           [ 0.  ,  0.25]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from trquant import quantizers

__all__ = ["IntegerTensor", "from_integer", "nbytes", "to_integer"]

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
  """

  data: jax.Array
  scale: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))
  narrow: bool = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(metadata=dict(static=True))
  zero_point: int = dataclasses.field(metadata=dict(static=True))

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
    return (jnp.asarray(self.scale, compute) * self.codes.astype(compute)).astype(dtype)


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
                        narrow: bool = False) -> IntegerTensor:
  """One tensor's :class:`IntegerTensor`, with the codes of :func:`trquant.quantize`.

  Args:
    x: the latent (float) weight.
    scale: its positive step size (scalar or keep-dims per-channel array).
    bits: bit width in ``[1, 16]``.
    signed, narrow: the grid, as in :func:`trquant.quantize`.

  Returns:
    The :class:`IntegerTensor`.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"only floating weights can be exported, got dtype {x.dtype}.")
  lo, _ = quantizers.quant_range(bits, signed=signed, narrow=narrow)
  if not isinstance(scale, jax.core.Tracer):  # a concrete scale can be checked here, once
    quantizers._check_scale(x, np.asarray(scale))
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    scale = scale.astype(x.dtype)
  # Codes in float32 at least: bfloat16 holds integers exactly only up to 256.
  codes = quantizers.quantize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), scale,
                              bits=bits, signed=signed, narrow=narrow).astype(jnp.int32)
  binary = signed and bits == 1
  if bits in _PACKED_BITS:
    data, zero_point = _pack(codes, bits, lo, binary), (0 if binary else -lo)
  else:
    data, zero_point = codes.astype(_storage_dtype(bits, signed)), 0
  return IntegerTensor(data=data, scale=scale, bits=bits, signed=signed, narrow=narrow,
                       shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, zero_point=zero_point)


def _is_exported(x) -> bool:
  return isinstance(x, IntegerTensor)


def to_integer(params, scales=None, *, bits=None, signed: bool = True, narrow: bool = False):
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

  Returns:
    ``params``' tree with every quantized leaf replaced by its
    :class:`IntegerTensor`; other leaves are returned unchanged.

  Raises:
    ValueError: if ``scales`` does not match ``params``' structure (the message
      names the path), ``bits`` is missing or invalid, or a scale is not positive.
  """
  from flax import nnx  # the NNX layers are optional for plain pytrees

  if isinstance(params, nnx.Module):
    if scales is not None or bits is not None:
      raise ValueError("for an NNX model, scales and bits come from its layers; pass neither.")
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
      return quantize_to_integer(leaf, scale, bits=leaf_bits, signed=signed, narrow=narrow)
    except ValueError as error:
      raise ValueError(f"{jax.tree_util.keystr(path)}: {error}") from None

  return jax.tree_util.tree_map_with_path(export_leaf, params, scale_leaves, bit_leaves,
                                          is_leaf=lambda s: s is None)


def _model_to_integer(model):
  from flax import nnx

  from trquant import nnx as tq_nnx

  state = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  for path, layer in tq_nnx._quant_layers(model):
    if layer.kernel.bits is None:
      continue
    node = state
    for key in path:
      node = node[key]
    node["kernel"] = quantize_to_integer(
        layer.kernel.get_value(), layer.weight_scale.get_value(), bits=layer.kernel.bits,
        signed=layer.kernel.signed, narrow=layer.kernel.narrow)
    node.pop("weight_scale", None)  # carried by the IntegerTensor
  return state


def from_integer(tree):
  """Float weights of an exported tree: every :class:`IntegerTensor` dequantized.

  The values equal the quantized model's forward-pass weights (``fake_quant``
  of the latent weights) exactly. Load them into an NNX model with
  ``nnx.update(model, from_integer(exported))`` (a nested dict updates values only).

  Args:
    tree: the output of :func:`to_integer` (or any tree with IntegerTensor leaves).

  Returns:
    The same tree with float arrays in place of the IntegerTensors.
  """
  return jax.tree.map(lambda x: x.dequantize() if _is_exported(x) else x, tree,
                      is_leaf=_is_exported)


def nbytes(tree) -> int:
  """Bytes of the arrays in a (possibly exported) tree: codes, scales and float leaves."""
  return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))

