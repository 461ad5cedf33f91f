"""Matching the output of a ``codes_fn`` against the params it was given, and counting.

Shared by :func:`trquant.tr_schedule` and the oscillation transforms, which all take a
``codes_fn: params -> tree`` of integer codes with the structure of params (or a prefix
of it) and None for leaves that are not quantized, and count over weight-sized arrays:
the layout of the quantized leaves (:class:`QuantizedLayout`), per-weight state trees laid
out like the codes, the matching of a ``scale_fn``'s scales, and fused counts.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trquant._src import checks

# A params tree -> the tree of integer codes (or of saturation indicators) of its quantized
# leaves, None elsewhere: what every transform of trquant takes as `codes_fn`.
CodesFn = Callable[[Any], Any]


def is_none(x) -> bool:
  return x is None


def with_extra_args(fn, extra_args):
  """``fn`` with the update's extra arguments it declares it takes, bound.

  The functions of :mod:`trquant.nnx` (``codes_fn``, ``saturation_fn``, ``scale_fn``)
  take the model's frozen weight scales as ``weight_scales`` (an argument of the jitted
  step: ``optimizer.update(model, grads, weight_scales=trquant.nnx.weight_scales(model))``)
  and mark themselves with ``takes_weight_scales``; other functions are returned as they
  are, and unknown extra arguments are ignored, as optax's transforms ignore them.
  """
  if fn is None:
    return None
  scales = extra_args.get("weight_scales")
  if scales is not None and getattr(fn, "takes_weight_scales", False):
    return functools.partial(fn, weight_scales=scales)
  return fn


def path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def match_codes(codes, params):
  """Matches the output of codes_fn (arrays or shape structs) against params.

  Returns the treedef of the codes tree (None treated as a leaf) and, for each
  of its leaves, whether it is quantized. Raises a ValueError naming the first
  mismatching tree path.
  """
  codes_with_path, codes_def = jax.tree_util.tree_flatten_with_path(codes, is_leaf=is_none)
  param_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  quantized = []
  for path, leaf in codes_with_path:
    if leaf is None:
      quantized.append(False)
      continue
    if path not in param_leaves:
      raise ValueError(
          f"codes_fn(params) returned codes at {path_str(path)}, which is not a leaf of params."
          " Return a tree with the structure of params (or a prefix of it) and None for"
          " leaves that are not quantized."
      )
    param_shape = np.shape(param_leaves[path])
    if tuple(leaf.shape) != tuple(param_shape):
      raise ValueError(
          f"codes_fn(params) returned codes of shape {tuple(leaf.shape)} at"
          f" {path_str(path)}, but the parameter there has shape {tuple(param_shape)}."
      )
    param_dtype = jnp.result_type(param_leaves[path])
    if not jnp.issubdtype(param_dtype, jnp.floating):
      raise ValueError(
          f"the quantized parameter at {path_str(path)} has dtype {param_dtype}; latent"
          " weights must be floating point (keep integer codes out of params, or mark the"
          " leaf None in codes_fn)."
      )
    quantized.append(True)
  try:
    codes_def.flatten_up_to(params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "codes_fn(params) must return a tree with the structure of params (or a prefix of"
        f" it), with None for leaves that are not quantized: {error}"
    ) from error
  return codes_def, quantized


def flatten_like(codes_def, tree, name: str):
  try:
    return codes_def.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"`{name}` does not have the structure of params (as seen by codes_fn): {error}"
    ) from error


def is_concrete_tree(tree) -> bool:
  """Whether every leaf of `tree` holds values (not a tracer or a shape struct)."""
  return all(isinstance(leaf, (np.ndarray, np.generic, numbers.Number))
             or (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer))
             for leaf in jax.tree.leaves(tree))


def concrete_codes(codes_fn, params):
  """``codes_fn(params)`` when params hold values (so the codes can be checked), else its
  shape structure (``init`` traced, e.g. under ``jax.jit`` or ``jax.eval_shape``)."""
  if is_concrete_tree(params):
    return codes_fn(params), True
  return jax.eval_shape(codes_fn, params), False


def leaf_paths(codes_def, num_leaves: int) -> list:
  """The jax key path of each leaf of the codes treedef (None leaves included), in order."""
  return [path for path, _ in jax.tree_util.tree_flatten_with_path(
      codes_def.unflatten(list(range(num_leaves))))[0]]


def first_bad_code(codes_def, codes, quantized, is_bad):
  """``(path, value)`` of the first entry of a concrete quantized leaf of `codes` where
  ``is_bad(leaf)`` (a mask) holds, or None; traced leaves cannot be checked here."""
  paths = leaf_paths(codes_def, len(quantized))
  for path, leaf, is_quantized in zip(paths, codes_def.flatten_up_to(codes), quantized):
    if not is_quantized or isinstance(leaf, jax.core.Tracer):
      continue
    leaf = jnp.asarray(leaf)
    bad = is_bad(leaf)
    if bad is not None and bool(jnp.any(bad)):
      # An example, reduced where the leaf lies: an array sharded across processes (or
      # over explicit mesh axes) cannot be brought to this host or flattened whole.
      example = jnp.min(jnp.where(bad, leaf.astype(jnp.float32), jnp.inf))
      return path_str(path), float(example)
  return None


def _fractional(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.integer) or jnp.issubdtype(leaf.dtype, jnp.bool_):
    return None
  return jnp.isfinite(leaf) & (leaf != jnp.round(leaf))


def check_integer_codes(codes_def, codes, quantized) -> None:
  """Raises a ValueError naming the first quantized leaf of `codes` with a finite,
  non-integer value (concrete leaves only: traced ones cannot be checked here)."""
  found = first_bad_code(codes_def, codes, quantized, _fractional)
  if found is not None:
    path, example = found
    raise ValueError(
        f"codes_fn(params) returned non-integer values at {path} (e.g."
        f" {example!r}): it must return the integer codes of each quantized weight, e.g."
        " trquant.quantize(w, scale, bits=...), not the weights or their fake-quantized"
        " values (those change with every update, so every weight would count as a"
        " transition)."
    )



class QuantizedLayout(NamedTuple):
  """How ``codes_fn(params)`` sees params: the codes treedef, which of its leaves are
  quantized, and the shape of each quantized leaf (None elsewhere)."""

  codes_def: Any
  quantized: list
  shapes: list


def quantized_layout(codes, params, name: str) -> QuantizedLayout:
  """The :class:`QuantizedLayout` of `codes` (from ``codes_fn(params)``); a ValueError
  naming transform `name` when no leaf is quantized."""
  codes_def, quantized = match_codes(codes, params)
  if not any(quantized):
    raise ValueError(
        f"codes_fn(params) marks no leaf as quantized (all None): {name} has nothing to"
        " track. Return codes for the quantized weights."
    )
  shapes = [tuple(leaf.shape) if q else None
            for leaf, q in zip(codes_def.flatten_up_to(codes), quantized)]
  return QuantizedLayout(codes_def, quantized, shapes)


def per_weight_tree(layout: QuantizedLayout, arrays) -> Any:
  """The codes tree with `arrays` (one per quantized leaf, in order) and None elsewhere."""
  arrays = iter(arrays)
  return layout.codes_def.unflatten([next(arrays) if q else None for q in layout.quantized])


def quantized_only(layout: QuantizedLayout, slots) -> list:
  """The entries of `slots` (one per leaf of the codes tree) at the quantized leaves."""
  return [value for value, q in zip(slots, layout.quantized) if q]


def quantized_state_slots(layout: QuantizedLayout, tree, name: str) -> list:
  """The quantized entries of a per-weight state tree, checked against the layout."""
  slots = flatten_like(layout.codes_def, tree, name)
  out = []
  for slot, (value, q) in enumerate(zip(slots, layout.quantized)):
    if not q:
      continue
    if value is None or tuple(np.shape(value)) != layout.shapes[slot]:
      raise ValueError(
          f"the {name} state does not match codes_fn(params) (a quantized leaf has shape"
          f" {layout.shapes[slot]}, the state {None if value is None else np.shape(value)}):"
          " the quantized leaves changed since init."
      )
    out.append(value)
  return out


def match_scales(scales, layout: QuantizedLayout) -> list:
  """The scale of each quantized leaf from ``scale_fn(params)``; a ValueError naming the
  path on a structure or shape mismatch, or on a concrete scale that is not positive."""
  try:
    slots = layout.codes_def.flatten_up_to(scales)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "scale_fn(params) must return a tree with the structure of codes_fn(params): a"
        f" scale for each quantized leaf, None elsewhere: {error}"
    ) from error
  paths = leaf_paths(layout.codes_def, len(layout.quantized))
  out = []
  for path, scale, q, shape in zip(paths, slots, layout.quantized, layout.shapes):
    if not q:
      continue
    if scale is None:
      raise ValueError(f"scale_fn(params) returned None at {path_str(path)}, which codes_fn"
                       " marks as quantized.")
    scale_shape = tuple(np.shape(scale))
    try:
      ok = np.broadcast_shapes(shape, scale_shape) == shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"scale_fn(params) returned a scale of shape {scale_shape} at"
                       f" {path_str(path)}, which does not broadcast to the parameter's"
                       f" shape {shape}.")
    try:  # values can be checked where they are concrete
      checks.check_scale_values(scale, "scale")
    except ValueError as error:
      raise ValueError(f"scale_fn(params) at {path_str(path)}: {error}") from None
    out.append(scale)
  return out



# Counting over weight-sized arrays. XLA:CPU does not fuse a reduction with the
# elementwise work that feeds it: the reduced array is written out first. So the pass
# over the weights sums the flags of 16 equal blocks of the flattened array into one
# small integer per position (contiguous reads, one output per 16 weights), and only
# that sixteenth is reduced, instead of writing a float32 flag per weight. An array
# sharded over explicit mesh axes (``jax.sharding.AxisType.Explicit``) cannot be
# flattened without gathering it, so it is reduced as it is, each device over its shard.
_BLOCKS = 16


def explicit_sharding(x):
  """The sharding in `x`'s type when some axis of `x` is sharded over an explicit mesh
  axis (``jax.sharding.AxisType.Explicit``, e.g. under ``jax.set_mesh``), else None.

  Operations that change the layout of such an array (a reshape, an array created to
  combine with it) must say how their result is sharded; Auto-sharded and unsharded
  arrays give None.
  """
  typeof = getattr(jax, "typeof", None)
  if typeof is None:  # a jax without sharding in types has no explicit axes either
    return None
  sharding = getattr(typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return None
  return sharding


def _block_sums(flags):
  """The unsigned integer `flags`, flattened, summed over 16 equal blocks; and the rest.

  An explicitly sharded `flags` comes back whole (its own sums), with an empty rest.
  """
  if explicit_sharding(flags) is not None:
    return flags, jnp.zeros((0,), flags.dtype)
  flags = flags.reshape(-1)
  main = flags.shape[0] - flags.shape[0] % _BLOCKS
  blocks = flags[:main].reshape(_BLOCKS, -1)
  return sum(blocks[i] for i in range(_BLOCKS)), flags[main:]


def count_true(mask) -> jax.Array:
  """``jnp.sum(mask, dtype=jnp.int32)`` of a boolean array, with a small write-out (see above)."""
  sums, rest = _block_sums(mask.astype(jnp.uint8))  # at most 16 per position
  return jnp.sum(sums, dtype=jnp.int32) + jnp.sum(rest, dtype=jnp.int32)


def count_finite(mask, update):
  """``(jnp.sum(mask & isfinite(update)), jnp.all(isfinite(update)))`` in one pass.

  A true entry of `mask` adds 1 to its position's sum, a non-finite entry of `update`
  17, so a sum of 16 flags tells both counts apart. Returns an int32 and a bool.
  """
  finite = jnp.isfinite(update)
  flags = ((mask & finite).astype(jnp.uint16)
           + (~finite).astype(jnp.uint16) * np.uint16(_BLOCKS + 1))
  sums, rest = _block_sums(flags)
  one = np.uint16(_BLOCKS + 1)
  count = jnp.sum(sums % one, dtype=jnp.int32) + jnp.sum(rest % one, dtype=jnp.int32)
  return count, ~(jnp.any(sums >= one) | jnp.any(rest >= one))


def count_transitions(before, after, update) -> jax.Array:
  """``sum(before != after)`` as float32, or NaN where ``update`` has a non-finite entry."""
  changed, finite = count_finite(before != after, update)
  return jnp.where(finite, changed.astype(jnp.float32), jnp.nan)


def fraction_true(mask) -> jax.Array:
  """``jnp.mean(mask, dtype=jnp.float32)`` of a boolean array, with :func:`count_true`."""
  return count_true(mask).astype(jnp.float32) / np.float32(mask.size)
