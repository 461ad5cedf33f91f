"""TALR controllers: how the multiplier ``u`` follows the target transition rate.

Each is ``(u, R_t, K_{t-1}, eta, R_{t-1}) -> new u`` on float32 arrays (``u`` and ``K``
have one entry per group, ``R`` and ``eta`` are scalars); :func:`tr_schedule` picks one
by name or takes a callable of this form.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["CONTROLLERS", "Controller", "DEFAULT_ETA", "additive_controller", "log_controller",
           "momentum_controller"]

# (multiplier u, target R_t, running TR K_{t-1}, gain eta, previous target R_{t-1}) -> new u
Controller = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def additive_controller(u, target, running, eta, previous_target):
  del previous_target
  # TR paper Eq. 11 in units of the initial LR: U/U_0 += (eta_abs/U_0) * (R - K).
  return jnp.maximum(u + eta * (target - running), 0.0)


def momentum_controller(u, target, running, eta, previous_target):
  del previous_target
  # Public reference code: u = m*u + (1-m)*u*R/K with m = 1 - eta. K = 0 (nothing
  # moves) would divide by zero; the ratio is capped instead, see max_multiplier.
  ratio = target / jnp.maximum(running, jnp.finfo(jnp.float32).tiny)
  return u * (1.0 - eta) + eta * u * jnp.minimum(ratio, 1e6)


def log_controller(u, target, running, eta, previous_target):
  # Scale-free: the relative error moves log(u) by at most eta per step. With a
  # zero target every transition counts as the full error -1.
  safe_target = jnp.where(target > 0, target, 1.0)
  rel_error = jnp.where(target > 0, (target - running) / safe_target, -(running > 0).astype(jnp.float32))
  # Feed-forward: the rate scales about linearly with the step size, so a target
  # that moves by a factor moves u by the same factor (bounded per step).
  ratio = jnp.where(previous_target > 0, target / jnp.where(previous_target > 0, previous_target, 1.0), 1.0)
  return u * jnp.clip(ratio, 0.5, 2.0) * jnp.exp(eta * jnp.clip(rel_error, -1.0, 1.0))


CONTROLLERS = {"log": log_controller, "additive": additive_controller,
               "momentum": momentum_controller}
DEFAULT_ETA = {"log": 0.005, "additive": 1.0, "momentum": 0.01}
