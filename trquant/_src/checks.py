"""Argument checks shared by trquant's modules: bit widths, scales, step counts, EMA decays.

Each raises a ``ValueError`` that names the argument, what it got and what it must be.
Values are checked only when they are concrete (numbers, numpy arrays, jax arrays that
are not traced and live on this host): a traced value can only be checked where it is
computed.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

MAX_BITS = 16

__all__ = [
    "MAX_BITS",
    "check_bits",
    "check_bool",
    "check_callable",
    "check_decay",
    "check_first_last",
    "check_fraction",
    "check_int",
    "check_positive",
    "check_scale",
    "check_scale_values",
    "check_signed_act",
    "check_warmup_steps",
    "concrete_values",
    "is_number",
]


def is_number(value) -> bool:
  """Whether `value` is a real Python/numpy number (bools are not)."""
  return isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_))


def check_positive(name: str, value, *, allow_zero: bool = False):
  """``value`` as a finite positive (or, with ``allow_zero``, non-negative) float, or a
  ValueError naming ``name``.

  A jax array (e.g. a hyper-parameter injected by ``optax.inject_hyperparams``) is
  returned unchecked: it may be traced."""
  if isinstance(value, jax.Array):
    return value
  if not is_number(value) or not math.isfinite(float(value)):
    raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
  if float(value) < 0 or (float(value) == 0 and not allow_zero):
    kind = "non-negative" if allow_zero else "positive"
    raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
  return float(value)



def check_fraction(name: str, value) -> None:
  """Raises a ValueError unless a number `value` is in (0, 1]; a jax array may be traced
  (e.g. under ``optax.inject_hyperparams``) and is not checked."""
  if isinstance(value, jax.Array):
    return
  if not is_number(value):
    raise ValueError(f"`{name}` must be a number, got {value!r}.")
  if not 0.0 < float(value) <= 1.0:
    raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")


def check_decay(value, name: str = "decay") -> None:
  """Raises a ValueError unless `value` is an EMA decay in [0, 1): the weight of the old
  value, as in ``optax.ema`` (``new = decay * old + (1 - decay) * x``). A jax array may be
  traced and is not checked."""
  if isinstance(value, jax.Array):
    return
  if not is_number(value) or not 0.0 <= float(value) < 1.0:
    raise ValueError(
        f"`{name}` must be a number in [0, 1), the weight of the old value in the EMA"
        f" (as in optax.ema; e.g. 0.999 averages over about 1000 steps), got {value!r}.")


def check_int(name: str, value, minimum: int = 1) -> int:
  """`value` as an int, or a ValueError unless it is an int >= `minimum`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_count(name: str, value, minimum: int = 1):
  """A step count: a Python int checked as :func:`check_int` does, or a jax integer scalar
  (a hyper-parameter injected by ``optax.inject_hyperparams``), checked where it is
  concrete and returned as an int, returned as it is where it is traced."""
  if isinstance(value, jax.core.Tracer):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"`{name}` must be an int >= {minimum}, got a traced {value.dtype}"
                       f"{list(value.shape)}.")
    return value
  if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and (
      jnp.issubdtype(value.dtype, jnp.integer)):
    value = int(value)
  return check_int(name, value, minimum)


def check_warmup_steps(warmup_steps, total_steps, *, default_fraction: float,
                       total_name: str = "total_steps") -> Union[int, jax.Array]:
  """The warm-up in steps: `warmup_steps` checked to be an int in [0, total_steps), or,
  when None, ``ceil(default_fraction * total_steps)``. Traced counts (injected by
  ``optax.inject_hyperparams`` and traced by ``jax.jit``) give a traced int32."""
  if warmup_steps is None:
    if isinstance(total_steps, jax.core.Tracer):
      return jnp.ceil(default_fraction * total_steps.astype(jnp.float32)).astype(jnp.int32)
    return math.ceil(default_fraction * total_steps)
  warmup_steps = check_count("warmup_steps", warmup_steps, 0)
  if isinstance(warmup_steps, jax.core.Tracer) or isinstance(total_steps, jax.core.Tracer):
    return warmup_steps  # checked where the values are concrete (init outside jit)
  if warmup_steps >= total_steps:
    raise ValueError(f"`warmup_steps` ({warmup_steps}) must be below `{total_name}`"
                     f" ({total_steps}): the schedule starts after the warm-up.")
  return warmup_steps


def check_callable(name: str, value, what: str = "a callable params -> tree") -> None:
  """Raises a ValueError unless `value` is callable."""
  if not callable(value):
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def check_forward_fn(forward_fn: Optional[Callable]) -> Callable:
  """``forward_fn``, a ``(model, batch) -> output`` that runs a model, checked; None gives
  ``model(batch)``."""
  if forward_fn is None:
    return lambda model, batch: model(batch)
  check_callable("forward_fn", forward_fn,
                 "a callable (model, batch) -> output, e.g. lambda m, x: m(x, rngs=None)")
  return forward_fn


def check_bool(name: str, value) -> None:
  """Raises a ValueError unless `value` is a bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a bool, got {value!r}.")


def check_signed_act(value, name: str = "signed_act") -> Union[bool, str]:
  """An input grid's signedness: True, False, or ``"auto"`` (decided from the data by
  the calibration pass); a ValueError naming ``name`` otherwise."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value == "auto":
    return value
  raise ValueError(f"`{name}` must be True, False or \"auto\" (signed if the calibration data"
                   f" has negative values), got {value!r}.")


FIRST_LAST_POLICIES = ("fp", "same")


def check_first_last(value, name: str = "first_last", *, min_bits: int = 1):
  """The first/last-layer policy, checked: ``"fp"`` (full-precision weights and inputs),
  ``"same"`` (quantized like every other layer) or an int bit width for their weights and
  inputs (e.g. 8), at least ``min_bits``; a ValueError naming ``name`` otherwise."""
  if isinstance(value, str) and value in FIRST_LAST_POLICIES:
    return value
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    if min_bits <= int(value) <= MAX_BITS:
      return int(value)
  raise ValueError(f"`{name}` must be \"fp\", \"same\" or a bit width in [{min_bits},"
                   f" {MAX_BITS}] (e.g. 8), got {value!r}.")


def check_bits(bits, name: str = "bits") -> int:
  """``bits`` as an int, or a ValueError unless it is a Python int in [1, MAX_BITS]."""
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral):
    raise ValueError(f"`{name}` must be a Python int in [1, {MAX_BITS}], got {bits!r}.")
  bits = int(bits)
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"`{name}` must be in [1, {MAX_BITS}], got {bits}.")
  return bits


def concrete_values(value) -> Optional[np.ndarray]:
  """``value`` as a numpy array when it is concrete (a number, numpy or jax array that is
  not traced and whose shards are all on this host), else None: a traced value can only
  be checked where it is computed."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      return None
    return np.asarray(value)
  if isinstance(value, (numbers.Number, np.ndarray, np.generic)):
    return np.asarray(value)
  return None


def spans_processes(value) -> bool:
  """Whether `value` is a concrete jax array with shards on other processes' devices (it
  cannot be read on this host without a gather)."""
  return (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
          and not value.is_fully_addressable)


def _check_positive_across_processes(scale, name: str) -> None:
  """The positivity check of a scale sharded across processes, reduced on its devices
  (the results are replicated scalars every process can read)."""
  values = scale.astype(jnp.float32) if jnp.issubdtype(scale.dtype, jnp.number) else None
  if values is None:
    raise ValueError(f"`{name}` must be a positive number or array, got dtype {scale.dtype}.")
  bad = ~(jnp.isfinite(values) & (values > 0))
  count = int(jnp.sum(bad))
  if count:
    first = float(jnp.min(jnp.where(bad, values, jnp.inf)))
    where = "" if values.ndim == 0 else f" everywhere ({count} of {values.size} are not)"
    raise ValueError(f"`{name}` must be positive and finite{where}; got {first!r}.")


def check_scale_values(scale, name: str = "scale"):
  """Raises a ValueError unless a concrete `scale` is positive and finite everywhere
  (also where its shards lie on several processes)."""
  if isinstance(scale, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a positive number or array, got {scale!r}.")
  if spans_processes(scale):
    _check_positive_across_processes(scale, name)
    return
  values = concrete_values(scale)
  if values is not None and values.size:
    try:
      values = values.astype(np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"`{name}` must be a positive number or array, got dtype"
                       f" {values.dtype}.") from None
    bad = ~(np.isfinite(values) & (values > 0))
    if np.any(bad):
      first = values.reshape(-1)[np.argmax(bad.reshape(-1))]
      where = "" if values.ndim == 0 else f" everywhere ({int(bad.sum())} of {values.size} are not)"
      raise ValueError(f"`{name}` must be positive and finite{where}; got {float(first)!r}.")


def check_scale(x, scale, name: str = "scale"):
  """Validates `scale`: its shape always, its values when they are concrete.

  Python numbers, numpy arrays and concrete (untraced) jax arrays, such as the output
  of :func:`init_scale`, must be positive and finite everywhere. A traced scale (inside
  ``jax.jit``) cannot be checked here.
  """
  check_scale_values(scale, name)
  scale_shape = np.shape(scale)
  x_shape = np.shape(x)
  try:
    out_shape = np.broadcast_shapes(x_shape, scale_shape)
  except ValueError:
    out_shape = None
  if out_shape != tuple(x_shape):
    raise ValueError(
        f"`{name}` of shape {scale_shape} does not broadcast to x of shape {x_shape}; use a"
        " scalar for per-tensor or a keep-dims array (e.g. init_scale(..., axis=-1)) for"
        " per-channel quantization."
    )


def check_global_batch(batch, name: str = "batch") -> None:
  """In a run of several processes (``jax.distributed``), a ValueError unless every array
  of `batch` is a global ``jax.Array`` (one whose shards lie on every process's devices).

  A numpy array, a Python value or a process-local jax array would be a different batch
  on each process, so each process would calibrate (or reconstruct) its own model and the
  processes would silently disagree. One process: nothing to check.
  """
  if jax.process_count() == 1:
    return
  for leaf in jax.tree.leaves(batch):
    if isinstance(leaf, jax.core.Tracer) or spans_processes(leaf):
      continue
    kind = ("a process-local jax.Array" if isinstance(leaf, jax.Array)
            else f"a {type(leaf).__module__}.{type(leaf).__name__}")
    raise ValueError(
        f"`{name}` holds {kind}, but this run has {jax.process_count()} processes: each"
        " process would use its own rows and the processes' models would differ. Pass a"
        " global array, e.g. jax.make_array_from_process_local_data(NamedSharding(mesh,"
        " P('data')), local_rows), or the same rows on every process via"
        " jax.make_array_from_callback(shape, sharding, lambda index: rows[index]).")


def check_group_size(group_size, name: str = "group_size") -> int:
  """A group size: a positive Python int (e.g. 32, 64, 128); a ValueError otherwise."""
  if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, numbers.Integral) \
      or group_size < 1:
    raise ValueError(f"`{name}` must be a positive int (e.g. 32, 64 or 128 weights per scale),"
                     f" got {group_size!r}.")
  return int(group_size)
