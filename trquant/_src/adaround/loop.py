"""How a reconstruction loop runs: one fused ``lax.scan``, or one jitted step per iteration.

Both run the same pure ``step(carry, t)`` for ``t = 0 .. iters - 1`` (the mini-batch of
step ``t`` comes from ``fold_in(key, t)``), so they give the same result up to float
summation order. The fused scan has no Python per iteration and is the fastest form on
accelerators and for matmul-only layers. On CPU, XLA runs a convolution inside a
``lax.scan``/``while`` body far slower than the same convolution in a top-level program
(its kernel gradient ~30x, see ``benchmarks/RESULTS.md`` §5), so there a loop whose
function contains a convolution calls a jitted step once per iteration instead.

* ``"scan"``: one jitted ``lax.scan`` over the iterations.
* ``"steps"``: a Python loop over one jitted step (compiled once per problem).
* ``"auto"`` (default): ``"steps"`` on CPU when the reconstructed function contains a
  convolution, ``"scan"`` otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["LOOPS", "check_loop", "finish", "has_convolution", "resolve_loop", "run_steps"]

LOOPS = ("auto", "scan", "steps")

_CONVOLUTIONS = ("conv_general_dilated",)


def check_loop(loop) -> str:
  """Validates a ``loop`` argument: one of :data:`LOOPS`."""
  if not isinstance(loop, str) or loop not in LOOPS:
    raise ValueError(f"`loop` must be one of {LOOPS}, got {loop!r}.")
  return loop


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _jaxpr_has_convolution(jaxpr) -> bool:
  for equation in jaxpr.eqns:
    if equation.primitive.name in _CONVOLUTIONS:
      return True
    for value in equation.params.values():
      if any(_jaxpr_has_convolution(sub) for sub in _sub_jaxprs(value)):
        return True
  return False


def has_convolution(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` computes a convolution (traced abstractly: nothing runs).

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> conv = lambda w, x: jax.lax.conv(x, w, (1, 1), "SAME")
    >>> trquant.adaround.has_convolution(conv, jnp.ones((2, 1, 3, 3)), jnp.ones((1, 1, 8, 8)))
    True
    >>> trquant.adaround.has_convolution(lambda w, x: x @ w, jnp.ones((3, 2)), jnp.ones((4, 3)))
    False
  """
  return _jaxpr_has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def resolve_loop(loop: str, fn: Callable, *example_args) -> str:
  """``loop`` with ``"auto"`` replaced by ``"steps"`` or ``"scan"`` (see the module doc)."""
  check_loop(loop)
  if loop != "auto":
    return loop
  if jax.default_backend() == "cpu" and has_convolution(fn, *example_args):
    return "steps"
  return "scan"


def run_steps(problem, arrays):
  """The ``"steps"`` loop of a reconstruction problem; returns ``(carry, records)``.

  ``problem`` (hashable: it is a static argument) has ``iters``, ``init(arrays)`` and a
  pure ``step(carry, t, arrays) -> (carry, record)``. Each iteration calls one jitted,
  state-donating step, compiled once per problem, which writes its record into row ``t``
  of ``(iters, ...)`` device buffers (nothing leaves the device per iteration); the
  records come back as ``lax.scan`` stacks them.
  """
  state = _init_steps(problem, arrays)
  for t in range(problem.iters):
    state = _step(problem, state, jnp.int32(t), arrays)
  return state


@functools.partial(jax.jit, static_argnums=0)
def finish(problem, *args):
  """``problem.finish(*args)`` as one program (its eager ops would each compile on first use)."""
  return problem.finish(*args)


@functools.partial(jax.jit, static_argnums=0)
def _init_steps(problem, arrays):
  carry = problem.init(arrays)
  record = jax.eval_shape(problem.step, carry, jnp.int32(0), arrays)[1]
  buffers = jax.tree.map(lambda r: jnp.zeros((problem.iters,) + r.shape, r.dtype), record)
  return carry, buffers


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _step(problem, state, t, arrays):
  carry, buffers = state
  carry, record = problem.step(carry, t, arrays)
  return carry, jax.tree.map(lambda buffer, value: buffer.at[t].set(value), buffers, record)
