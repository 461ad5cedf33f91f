"""Matching the output of a ``codes_fn`` against the params it was given.

Shared by :func:`trquant.tr_schedule` and the oscillation transforms, which all take a
``codes_fn: params -> tree`` of integer codes with the structure of params (or a prefix
of it) and None for leaves that are not quantized.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_none(x) -> bool:
  return x is None


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


def check_integer_codes(codes_def, codes, quantized) -> None:
  """Raises a ValueError naming the first quantized leaf of `codes` with a finite,
  non-integer value (concrete leaves only: traced ones cannot be checked here)."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      codes_def.unflatten(list(range(len(quantized)))))[0]]
  for path, leaf, is_quantized in zip(paths, codes_def.flatten_up_to(codes), quantized):
    if not is_quantized or isinstance(leaf, jax.core.Tracer):
      continue
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.integer) or jnp.issubdtype(leaf.dtype, jnp.bool_):
      continue
    fractional = jnp.isfinite(leaf) & (leaf != jnp.round(leaf))
    if bool(jnp.any(fractional)):
      example = float(leaf.reshape(-1)[jnp.argmax(fractional.reshape(-1))])
      raise ValueError(
          f"codes_fn(params) returned non-integer values at {path_str(path)} (e.g."
          f" {example!r}): it must return the integer codes of each quantized weight, e.g."
          " trquant.quantize(w, scale, bits=...), not the weights or their fake-quantized"
          " values (those change with every update, so every weight would count as a"
          " transition)."
      )
