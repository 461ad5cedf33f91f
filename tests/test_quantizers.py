"""Tests for trquant._src.quantizers: grids, codes, STE/LSQ gradients, scale init, validation.

Property tests draw a bit configuration, a positive step size and an array whose
values ``x / scale`` straddle the grid (so both the clipped and the unclipped
regimes are exercised), then compare each quantizer against an independent
NumPy reference of the conventions in the module docstring of
``trquant/quantizers.py``:

* ``codes = clip(round_half_even(x / scale), lo, hi)``; binary codes are
  ``sign(x)`` with ``sign(0) = +1``;
* the STE passes the gradient w.r.t. ``x`` where ``lo <= x / scale <= hi``;
* the LSQ step-size gradient is ``lo`` below, ``hi`` above and
  ``codes - x / scale`` inside the range.

XLA's float32 ``x / scale`` is not always the correctly rounded quotient that
NumPy computes (it may be off by an ulp), so points where the reference is
discontinuous (``x / scale`` within a relative 1e-6 of a clipping bound or of a
rounding tie) are masked out of those comparisons, and gradient tolerances
allow an ulp-level error in ``x / scale`` per element.
"""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import trquant
from trquant._src import quantizers as q

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# (bits, signed, narrow) configurations drawn by the property tests. (2, True, True) is
# the ternary grid, whose (lo, hi) = (-1, 1) equals the binary grid's; it also has
# dedicated tests below (``test_narrow_two_bit_*``).
CONFIGS = (
    (1, True, False),  # binary
    (1, False, False),
    (2, True, False),
    (2, True, True),  # ternary
    (2, False, False),
    (3, True, True),
    (4, True, False),
    (4, True, True),
    (4, False, False),
    (8, True, False),
    (8, True, True),
    (8, False, False),
    (16, True, False),
    (16, False, False),
)

REL_TOL = 1e-6  # relative distance to a bound / tie below which a point is ambiguous


# --------------------------------------------------------------------------------------
# NumPy reference implementation and helpers
# --------------------------------------------------------------------------------------


def _is_binary(bits, signed):
  # Not decidable from (lo, hi): the ternary grid (bits=2, narrow) is also (-1, 1).
  return bits == 1 and signed


def _ref_codes(v, lo, hi, binary):
  """Reference codes of scaled values ``v = x / scale``."""
  if binary:
    return np.where(v >= 0, 1.0, -1.0)
  return np.clip(np.round(v), lo, hi)  # np.round is round-half-to-even too


def _ref_scale_grad_terms(v, lo, hi, binary):
  """Per-element d(scale * codes)/d scale: lo below, hi above, codes - v inside."""
  return np.where(v < lo, lo, np.where(v > hi, hi, _ref_codes(v, lo, hi, binary) - v))


def _near(v, target):
  return np.abs(v - target) <= REL_TOL * np.maximum(np.abs(target), 1.0)


def _near_bound(v, lo, hi):
  return _near(v, lo) | _near(v, hi)


def _near_tie(v, binary):
  """Near a point where the codes jump: half-integers (uniform) or zero (binary)."""
  if binary:
    # The sign of x / scale is exact, except that XLA on CPU flushes subnormal inputs
    # and quotients to zero, whose code is +1.
    return np.abs(v) < 1e-30
  return _near(v, np.floor(v) + 0.5)


def _scaled(x, scale):
  """``x / scale`` in float32 (XLA's quotient may differ from this by an ulp)."""
  return np.asarray(x, np.float32) / np.asarray(scale, np.float32)


def _unambiguous(case):
  """Mask of points away from clipping bounds and rounding ties of ``x / scale``."""
  v = _scaled(case["x"], case["scale"]).astype(np.float64)
  lo, hi = case["lo"], case["hi"]
  return ~(_near_bound(v, lo, hi) | _near_tie(v, case["binary"]))


def _grad_x(fn, x):
  return jax.grad(lambda x: jnp.sum(fn(x)))(x)


def _mse(x, scale, bits, **kw):
  x_q = trquant.dequantize(trquant.quantize(x, scale, bits=bits, **kw), scale)
  return float(jnp.mean(jnp.square(x_q - x)))


def _gamma(bits, signed):
  if bits == 1 and signed:
    return 1
  return 2 ** (bits - 1) if signed else 2**bits


def _normal(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------------------

# A few fixed shapes: the values are what is under test, and reusing shapes lets JAX
# reuse compiled kernels, which keeps the property tests fast.
PER_TENSOR_SHAPES = ((), (1,), (7,), (2, 3), (5, 4))
PER_CHANNEL_SHAPES = ((1, 1), (4, 1), (3, 4), (8, 3))

finite_scales = st.floats(min_value=2.0**-7, max_value=2.0**7, width=32)


@st.composite
def quant_cases(draw, per_channel=None):
  """A dict: x (float32 ndarray), scale, bits, signed, narrow, lo, hi, binary, weights.

  ``scale`` is a Python float (per-tensor) or a float32 array of shape (1, out)
  for an (in, out) ``x`` (per-channel). ``x / scale`` lies in [lo - 4, hi + 4].
  """
  bits, signed, narrow = draw(st.sampled_from(CONFIGS))
  lo, hi = trquant.quant_range(bits, signed=signed, narrow=narrow)
  if per_channel is None:
    per_channel = draw(st.booleans())
  if per_channel:
    shape = draw(st.sampled_from(PER_CHANNEL_SHAPES))
    scale = draw(hnp.arrays(np.float32, (1, shape[1]), elements=finite_scales))
  else:
    shape = draw(st.sampled_from(PER_TENSOR_SHAPES))
    scale = draw(finite_scales)
  unit = draw(
      hnp.arrays(
          np.float32,
          shape,
          elements=st.floats(lo - 4, hi + 4, width=32, allow_subnormal=False),
      )
  )
  x = (unit * np.asarray(scale, np.float32)).astype(np.float32)
  weights = draw(
      hnp.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32, allow_subnormal=False))
  )
  return dict(
      x=x,
      scale=scale,
      bits=bits,
      signed=signed,
      narrow=narrow,
      lo=lo,
      hi=hi,
      binary=_is_binary(bits, signed),
      weights=weights,
  )


def _kw(case):
  return dict(bits=case["bits"], signed=case["signed"], narrow=case["narrow"])


# --------------------------------------------------------------------------------------
# quant_range
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, signed, narrow, expected",
    [
        (1, True, False, (-1, 1)),
        (1, False, False, (0, 1)),
        (2, True, False, (-2, 1)),
        (2, True, True, (-1, 1)),
        (2, False, False, (0, 3)),
        (4, True, False, (-8, 7)),
        (4, True, True, (-7, 7)),
        (4, False, False, (0, 15)),
        (8, True, False, (-128, 127)),
        (8, True, True, (-127, 127)),
        (8, False, False, (0, 255)),
        (16, True, False, (-32768, 32767)),
        (16, False, False, (0, 65535)),
    ],
)
def test_quant_range_table(bits, signed, narrow, expected):
  got = trquant.quant_range(bits, signed=signed, narrow=narrow)
  assert got == expected
  assert all(type(b) is int for b in got)


def test_quant_range_accepts_numpy_integer_bits():
  assert trquant.quant_range(np.int64(4)) == (-8, 7)


# --------------------------------------------------------------------------------------
# quantize / dequantize: properties
# --------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(quant_cases())
def test_quantize_codes_are_integers_in_range_with_x_dtype(case):
  codes = trquant.quantize(case["x"], case["scale"], **_kw(case))
  assert codes.dtype == case["x"].dtype
  assert codes.shape == case["x"].shape
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes, np.round(codes))
  assert np.all(codes >= case["lo"]) and np.all(codes <= case["hi"])
  if case["binary"]:
    assert set(np.unique(codes)) <= {-1.0, 1.0}


@PROPERTY_SETTINGS
@given(quant_cases())
def test_quantize_matches_reference_codes(case):
  v = _scaled(case["x"], case["scale"])
  codes = np.asarray(trquant.quantize(case["x"], case["scale"], **_kw(case)))
  expected = _ref_codes(v, case["lo"], case["hi"], case["binary"])
  keep = _unambiguous(case)
  np.testing.assert_array_equal(codes[keep], expected[keep])


@PROPERTY_SETTINGS
@given(quant_cases())
def test_quantize_of_dequantized_codes_is_identity(case):
  codes = trquant.quantize(case["x"], case["scale"], **_kw(case))
  again = trquant.quantize(trquant.dequantize(codes, case["scale"]), case["scale"], **_kw(case))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(codes))


@PROPERTY_SETTINGS
@given(quant_cases())
def test_quantize_rounding_error_at_most_half_inside_range(case):
  lo, hi = case["lo"], case["hi"]
  if case["binary"]:
    return  # sign codes: the half-step bound does not apply
  v = case["x"].astype(np.float64) / np.asarray(case["scale"], np.float64)
  codes = np.asarray(trquant.quantize(case["x"], case["scale"], **_kw(case)), np.float64)
  inside = (v >= lo) & (v <= hi)
  err = np.abs(v - codes)[inside]
  assert np.all(err <= 0.5 + REL_TOL * np.maximum(np.abs(v[inside]), 1.0))


@PROPERTY_SETTINGS
@given(quant_cases())
def test_quantize_has_zero_gradient(case):
  grad = _grad_x(lambda x: trquant.quantize(x, case["scale"], **_kw(case)), jnp.asarray(case["x"]))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


# --------------------------------------------------------------------------------------
# fake_quant: properties
# --------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(quant_cases())
def test_fake_quant_forward_equals_dequantize_of_quantize(case):
  x, scale = case["x"], case["scale"]
  got = trquant.fake_quant(x, scale, **_kw(case))
  expected = trquant.dequantize(trquant.quantize(x, scale, **_kw(case)), scale)
  assert got.dtype == x.dtype
  keep = _unambiguous(case)
  np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(expected)[keep])


@PROPERTY_SETTINGS
@given(quant_cases())
def test_fake_quant_is_idempotent(case):
  once = trquant.fake_quant(case["x"], case["scale"], **_kw(case))
  twice = trquant.fake_quant(once, case["scale"], **_kw(case))
  np.testing.assert_allclose(np.asarray(twice), np.asarray(once), rtol=1e-6, atol=0)


@PROPERTY_SETTINGS
@given(quant_cases())
def test_fake_quant_ste_gradient_is_clipping_mask(case):
  x, scale, lo, hi = case["x"], case["scale"], case["lo"], case["hi"]
  grad = np.asarray(_grad_x(lambda x: trquant.fake_quant(x, scale, **_kw(case)), jnp.asarray(x)))
  v = x.astype(np.float64) / np.asarray(scale, np.float64)
  expected = ((v >= lo) & (v <= hi)).astype(np.float32)
  keep = ~_near_bound(v, lo, hi)
  np.testing.assert_array_equal(grad[keep], expected[keep])


def _scale_grad(fn, x, scale, weights):
  """d/d scale of sum(weights * fn(x, scale)), with scale as a float32 JAX array."""
  return jax.grad(lambda s: jnp.sum(weights * fn(x, s)))(jnp.asarray(scale, jnp.float32))


def _expected_scale_grad(case, weights):
  """Closed-form LSQ gradient summed over the elements sharing each scale entry.

  Returns ``(expected, tolerance)``: the tolerance covers float32 summation
  (relative 1e-5 of ``sum |w * term|``) and an ulp-level error in XLA's
  ``x / scale`` (1e-6 of ``sum |w * v|``), far below the error of a wrong term.
  """
  v = _scaled(case["x"], case["scale"]).astype(np.float64)
  w = weights.astype(np.float64)
  terms = w * _ref_scale_grad_terms(v, case["lo"], case["hi"], case["binary"])
  slack = 1e-5 * np.abs(terms) + 1e-6 * np.abs(w * v)
  if np.shape(case["scale"]) == ():
    return terms.sum(), slack.sum() + 1e-6
  return terms.sum(axis=0, keepdims=True), slack.sum(axis=0, keepdims=True) + 1e-6


def _masked_weights(case):
  """Weights with ambiguous points (near a bound or a rounding tie) zeroed."""
  return np.where(_unambiguous(case), case["weights"], 0.0).astype(np.float32)


def _assert_scale_grad_close(got, expected, tolerance):
  got = np.asarray(got, np.float64)
  assert got.shape == np.shape(expected)
  assert np.all(np.abs(got - expected) <= tolerance), (got, expected, tolerance)


@PROPERTY_SETTINGS
@given(quant_cases())
def test_fake_quant_scale_gradient_matches_lsq_closed_form(case):
  weights = _masked_weights(case)
  fn = functools.partial(trquant.fake_quant, **_kw(case))
  got = _scale_grad(fn, case["x"], case["scale"], weights)
  expected, tolerance = _expected_scale_grad(case, weights)
  _assert_scale_grad_close(got, expected, tolerance)


@PROPERTY_SETTINGS
@given(quant_cases(), st.one_of(st.none(), st.floats(2.0**-10, 8.0, width=32)))
def test_lsq_scale_gradient_is_closed_form_times_grad_scale(case, grad_scale):
  weights = _masked_weights(case)
  fn = functools.partial(trquant.lsq, grad_scale=grad_scale, **_kw(case))
  got = _scale_grad(fn, case["x"], case["scale"], weights)
  expected, tolerance = _expected_scale_grad(case, weights)
  if grad_scale is None:  # LSQ default: N = elements sharing one step size
    shares = case["x"].size // np.size(case["scale"])
    grad_scale = 1.0 / math.sqrt(shares * case["hi"])
  _assert_scale_grad_close(got, grad_scale * expected, grad_scale * tolerance)


@PROPERTY_SETTINGS
@given(quant_cases(per_channel=False))
def test_lsq_default_grad_scale_per_tensor_is_inverse_sqrt_size_times_hi(case):
  weights = _masked_weights(case)
  x, scale = case["x"], case["scale"]
  lsq_grad = _scale_grad(functools.partial(trquant.lsq, **_kw(case)), x, scale, weights)
  fq_grad = _scale_grad(functools.partial(trquant.fake_quant, **_kw(case)), x, scale, weights)
  factor = 1.0 / math.sqrt(x.size * case["hi"])
  _, tolerance = _expected_scale_grad(case, weights)
  _assert_scale_grad_close(lsq_grad, factor * np.asarray(fq_grad, np.float64), factor * tolerance)


@PROPERTY_SETTINGS
@given(quant_cases(per_channel=True))
def test_per_channel_scale_gradient_has_scale_shape_and_column_sums(case):
  weights = _masked_weights(case)
  x, scale = case["x"], case["scale"]
  got = _scale_grad(functools.partial(trquant.fake_quant, **_kw(case)), x, scale, weights)
  assert got.shape == scale.shape == (1, x.shape[1])
  assert got.dtype == jnp.float32
  expected, tolerance = _expected_scale_grad(case, weights)
  _assert_scale_grad_close(got, expected, tolerance)
  # Each column's gradient equals the per-tensor gradient of that column alone.
  for j in range(x.shape[1]):
    column = _scale_grad(
        functools.partial(trquant.fake_quant, **_kw(case)), x[:, j], scale[0, j], weights[:, j]
    )
    assert abs(float(got[0, j]) - float(column)) <= tolerance[0, j]


@PROPERTY_SETTINGS
@given(quant_cases())
def test_lsq_forward_matches_fake_quant_away_from_ties(case):
  # lsq feeds fake_quant the value s * g + stop_gradient(s - s * g), which can differ
  # from s by an ulp; compare with a relative tolerance and skip rounding ties.
  x, scale = case["x"], case["scale"]
  got = np.asarray(trquant.lsq(x, scale, **_kw(case)))
  expected = np.asarray(trquant.fake_quant(x, scale, **_kw(case)))
  keep = _unambiguous(case)
  np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------
# round_ste and binarize: properties
# --------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    hnp.arrays(
        np.float32,
        st.sampled_from(PER_TENSOR_SHAPES),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
    )
)
def test_round_ste_rounds_forward_and_passes_gradient(x):
  np.testing.assert_array_equal(np.asarray(trquant.round_ste(x)), np.asarray(jnp.round(x)))
  np.testing.assert_array_equal(np.asarray(trquant.round_ste(x)), np.round(x))
  grad = _grad_x(trquant.round_ste, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(grad), 1.0)


binary_arrays = hnp.arrays(
    np.float32,
    st.sampled_from(PER_TENSOR_SHAPES),
    elements=st.floats(-4, 4, width=32, allow_subnormal=False),
)


@PROPERTY_SETTINGS
@given(binary_arrays, st.one_of(st.none(), st.floats(2.0**-4, 3.0, width=32)))
def test_binarize_values_are_signed_scale(x, scale):
  out = np.asarray(trquant.binarize(x, scale))
  s = np.float32(1.0 if scale is None else scale)
  expected = s * np.where(x >= 0, 1.0, -1.0).astype(np.float32)
  keep = ~_near_tie(x / s, binary=True)  # XLA flushes subnormal x / scale to zero
  np.testing.assert_array_equal(out[keep], expected[keep])
  np.testing.assert_array_equal(out, np.asarray(trquant.fake_quant(x, s, bits=1)))


@PROPERTY_SETTINGS
@given(binary_arrays, st.one_of(st.none(), st.floats(2.0**-4, 3.0, width=32)))
def test_binarize_gradient_mask_is_abs_x_at_most_scale(x, scale):
  s = 1.0 if scale is None else float(np.float32(scale))
  grad = np.asarray(_grad_x(lambda x: trquant.binarize(x, scale), jnp.asarray(x)))
  keep = ~_near(np.abs(x.astype(np.float64)), s)
  expected = (np.abs(x) <= s).astype(np.float32)
  np.testing.assert_array_equal(grad[keep], expected[keep])


def test_binarize_treats_zero_and_negative_zero_as_positive():
  out = trquant.binarize(jnp.array([0.0, -0.0, -1e-30, 1e-30]), 0.5)
  np.testing.assert_array_equal(np.asarray(out), [0.5, 0.5, -0.5, 0.5])


# --------------------------------------------------------------------------------------
# Deterministic behaviour: doc examples and special grids
# --------------------------------------------------------------------------------------


def test_doc_examples():
  assert trquant.quant_range(4) == (-8, 7)
  assert trquant.quant_range(4, signed=False) == (0, 15)
  np.testing.assert_array_equal(
      trquant.quantize(jnp.array([-1.0, 0.26, 0.9, 5.0]), 0.5, bits=2), [-2.0, 1.0, 1.0, 1.0]
  )
  np.testing.assert_array_equal(trquant.dequantize(jnp.array([-2.0, 1.0]), 0.5), [-1.0, 0.5])
  rate = trquant.transition_rate(jnp.array([0.0, 1.0, 1.0, -1.0]), jnp.array([0.0, 1.0, 0.0, -1.0]))
  assert rate.dtype == jnp.float32 and float(rate) == 0.25
  assert float(jax.grad(trquant.round_ste)(0.3)) == 1.0
  x = jnp.array([-0.7, 0.2, 3.0])
  np.testing.assert_array_equal(trquant.fake_quant(x, 0.5, bits=2), [-0.5, 0.0, 0.5])
  np.testing.assert_array_equal(
      jax.grad(lambda x: trquant.fake_quant(x, 0.5, bits=2).sum())(x), [1.0, 1.0, 0.0]
  )
  w = jnp.linspace(-1.0, 1.0, 16)
  s = trquant.init_scale(w, bits=4, method="lsq")
  assert jax.grad(lambda s: trquant.lsq(w, s, bits=4).sum())(s).shape == ()
  np.testing.assert_array_equal(trquant.binarize(jnp.array([-0.3, 0.0, 2.0])), [-1.0, 1.0, 1.0])
  np.testing.assert_array_equal(
      trquant.fake_quant_unscaled(jnp.array([-1.0, 0.3, 5.0]), 0.25, bits=2), [-1.0, 0.5, 0.5]
  )
  w = jax.random.normal(jax.random.key(0), (64, 8))
  assert trquant.init_scale(w, bits=4, method="mse", axis=-1).shape == (1, 8)


def test_quantize_rounds_half_to_even():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
  np.testing.assert_array_equal(trquant.quantize(x, 1.0, bits=4), [-2, -2, 0, 0, 2, 2, 4])


def test_clipping_bound_is_last_grid_point():
  # 2-bit signed, scale 1: grid [-2, 1]; x = 1.4 rounds to 1, x = 1.6 clips to 1 and its
  # gradient is zero because 1.6 > hi * scale (not (hi + 0.5) * scale).
  x = jnp.array([1.0, 1.4, 1.6, -2.0, -2.4])
  np.testing.assert_array_equal(trquant.fake_quant(x, 1.0, bits=2), [1, 1, 1, -2, -2])
  grad = _grad_x(lambda x: trquant.fake_quant(x, 1.0, bits=2), x)
  np.testing.assert_array_equal(grad, [1, 0, 0, 1, 0])


def test_one_bit_signed_gives_binary_codes():
  x = jnp.array([-3.0, -0.1, 0.0, 0.1, 3.0])
  codes = trquant.quantize(x, 0.5, bits=1)
  np.testing.assert_array_equal(codes, [-1, -1, 1, 1, 1])  # 0.1 / 0.5 = 0.2 -> +1, not 0
  np.testing.assert_array_equal(trquant.fake_quant(x, 0.5, bits=1), [-0.5, -0.5, 0.5, 0.5, 0.5])


def test_one_bit_unsigned_gives_zero_one_codes():
  x = jnp.array([-3.0, 0.2, 0.4, 0.6, 3.0])
  np.testing.assert_array_equal(trquant.quantize(x, 1.0, bits=1, signed=False), [0, 0, 0, 1, 1])


@pytest.mark.parametrize("fn", ["quantize", "fake_quant", "lsq"])
def test_narrow_two_bit_grid_is_ternary(fn):
  # quant_range(2, narrow=True) == (-1, 1) is the ternary grid {-1, 0, 1}; small values
  # must map to 0 (not to sign(x) as on the binary grid, which has the same (lo, hi)).
  x = jnp.array([-0.9, -0.6, -0.1, 0.0, 0.1, 0.6, 0.9, 5.0])
  expected = np.array([-1, -1, 0, 0, 0, 1, 1, 1], np.float32)
  out = getattr(trquant, fn)(x, 1.0, bits=2, narrow=True)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_narrow_two_bit_scale_gradient_is_uniform_lsq():
  # Inside the ternary range the LSQ term is round(v) - v (0 - 0.1 for v = 0.1), not
  # sign(v) - v as for binary.
  grad = jax.grad(lambda s: trquant.fake_quant(jnp.array([0.1]), s, bits=2, narrow=True).sum())(
      jnp.float32(1.0)
  )
  np.testing.assert_allclose(float(grad), -0.1, rtol=1e-6)


def test_narrow_two_bit_init_scale_is_not_binary():
  # hi = 1: "lsq" is 2 * mean|x| / sqrt(1) and "absmax" is max|x| / 1, not mean|x|.
  x = _normal((256,))
  lsq = trquant.init_scale(x, bits=2, narrow=True, method="lsq")
  absmax = trquant.init_scale(x, bits=2, narrow=True, method="absmax")
  np.testing.assert_allclose(float(lsq), 2 * np.mean(np.abs(x)), rtol=1e-5)
  np.testing.assert_allclose(float(absmax), np.max(np.abs(x)), rtol=1e-6)


@pytest.mark.parametrize("bits, hi", [(1, 1), (2, 3), (4, 15), (8, 255)])
def test_unsigned_grid_clips_negatives_to_zero_and_top_to_hi(bits, hi):
  x = jnp.array([-5.0, -0.4, 0.0, 0.6, 1e6])
  codes = trquant.quantize(x, 1.0, bits=bits, signed=False)
  np.testing.assert_array_equal(codes, [0, 0, 0, 1, hi])
  grad = _grad_x(lambda x: trquant.fake_quant(x, 1.0, bits=bits, signed=False), x)
  np.testing.assert_array_equal(grad, [0, 0, 1, 1, 0])


def test_per_channel_quantize_uses_each_column_scale():
  x = jnp.array([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
  scale = np.array([[1.0, 0.5, 4.0]], np.float32)
  np.testing.assert_array_equal(trquant.quantize(x, scale, bits=4), [[1, 2, 0], [-2, -4, -0]])


# --------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8])
def test_dequantize_integer_codes_gives_float32(dtype):
  codes = jnp.array([0, 1, 3, 7], dtype)
  out = trquant.dequantize(codes, 0.25)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, [0.0, 0.25, 0.75, 1.75])


def test_dequantize_signed_integer_codes_and_per_channel_scale():
  codes = jnp.array([[-8, 7], [1, -1]], jnp.int32)
  out = trquant.dequantize(codes, np.array([[0.5, 2.0]], np.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, [[-4.0, 14.0], [0.5, -2.0]])


# --------------------------------------------------------------------------------------
# transition_rate
# --------------------------------------------------------------------------------------


def test_transition_rate_on_arrays():
  before = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  assert float(trquant.transition_rate(before, before)) == 0.0
  assert float(trquant.transition_rate(before, before + 1)) == 1.0
  after = before.at[0, 1].set(3.0)
  rate = trquant.transition_rate(before, after)
  assert rate.shape == () and rate.dtype == jnp.float32 and float(rate) == 0.25


def test_transition_rate_on_pytrees_returns_per_leaf_rates():
  before = {"a": jnp.zeros(4), "b": [jnp.ones((2, 5)), jnp.arange(3.0)]}
  after = {
      "a": jnp.array([0.0, 1.0, 0.0, 0.0]),
      "b": [jnp.ones((2, 5)), jnp.array([0.0, 5.0, 6.0])],
  }
  rates = trquant.transition_rate(before, after)
  assert jax.tree.structure(rates) == jax.tree.structure(before)
  assert float(rates["a"]) == 0.25
  assert float(rates["b"][0]) == 0.0
  np.testing.assert_allclose(float(rates["b"][1]), 2 / 3, rtol=1e-6)


def test_transition_rate_works_under_jit():
  rate = jax.jit(trquant.transition_rate)(jnp.arange(8.0), jnp.arange(8.0).at[:2].set(-1.0))
  assert float(rate) == 0.25


@pytest.mark.parametrize(
    "before, after",
    [
        ({"a": jnp.zeros(3)}, {"b": jnp.zeros(3)}),
        ([jnp.zeros(3)], [jnp.zeros(3), jnp.zeros(3)]),
        ({"a": jnp.zeros(3)}, jnp.zeros(3)),
    ],
)
def test_transition_rate_rejects_mismatched_structure(before, after):
  with pytest.raises(ValueError, match="structure"):
    trquant.transition_rate(before, after)


@pytest.mark.parametrize(
    "before, after",
    [(jnp.zeros(3), jnp.zeros(4)), ({"w": jnp.zeros((2, 3))}, {"w": jnp.zeros((3, 2))})],
)
def test_transition_rate_rejects_mismatched_shapes(before, after):
  with pytest.raises(ValueError, match="shape"):
    trquant.transition_rate(before, after)


# --------------------------------------------------------------------------------------
# fake_quant_unscaled
# --------------------------------------------------------------------------------------

UNSCALED_CONFIGS = [(1, True), (1, False), (2, True), (2, False), (4, True), (4, False), (8, True)]


def _unscaled_inputs(bits, signed, scale):
  """x / scale spread over [lo - 3, hi + 3], away from bounds and rounding ties."""
  lo, hi = trquant.quant_range(bits, signed=signed)
  v = np.linspace(lo - 3, hi + 3, 97) + 0.1234
  v = v[~_near_bound(v, lo, hi) & ~_near(v, np.floor(v) + 0.5)]
  return jnp.asarray(v * scale, jnp.float32), lo, hi


@pytest.mark.parametrize("bits, signed", UNSCALED_CONFIGS)
def test_fake_quant_unscaled_is_codes_over_gamma(bits, signed):
  scale = 0.3
  x, _, _ = _unscaled_inputs(bits, signed, scale)
  gamma = _gamma(bits, signed)
  out = trquant.fake_quant_unscaled(x, scale, bits=bits, signed=signed)
  assert out.dtype == x.dtype
  expected = trquant.quantize(x, scale, bits=bits, signed=signed) / gamma
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("bits, signed", UNSCALED_CONFIGS)
def test_fake_quant_unscaled_gradients(bits, signed):
  scale = 0.3
  x, lo, hi = _unscaled_inputs(bits, signed, scale)
  gamma = _gamma(bits, signed)
  v = np.asarray(x, np.float64) / scale
  inside = (v > lo) & (v < hi)
  assert inside.any() and (~inside).any()
  grad_x = _grad_x(lambda x: trquant.fake_quant_unscaled(x, scale, bits=bits, signed=signed), x)
  expected_x = np.where(inside, 1 / (gamma * scale), 0.0)
  np.testing.assert_allclose(np.asarray(grad_x), expected_x, rtol=1e-5)
  grad_s = jax.grad(
      lambda s: jnp.sum(trquant.fake_quant_unscaled(x, s, bits=bits, signed=signed))
  )(jnp.float32(scale))
  expected_s = np.sum(np.where(inside, -np.asarray(x, np.float64) / (gamma * scale**2), 0.0))
  np.testing.assert_allclose(float(grad_s), expected_s, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# init_scale
# --------------------------------------------------------------------------------------

INIT_CONFIGS = [
    (2, True, False),
    (3, True, True),
    (4, True, False),
    (4, False, False),
    (8, True, False),
]


def _reference_init(x, method, bits, signed, narrow):
  """Closed-form reference for the non-search methods on a flat float64 array."""
  _, hi = trquant.quant_range(bits, signed=signed, narrow=narrow)
  x = np.asarray(x, np.float64)
  if method == "lsq":
    return 2 * np.mean(np.abs(x)) / math.sqrt(hi)
  if method == "std3":
    return 3 * np.std(x) / _gamma(bits, signed)
  if method == "absmax":
    return np.max(np.abs(x)) / hi
  raise AssertionError(method)


@pytest.mark.parametrize("method", ["lsq", "std3", "absmax"])
@pytest.mark.parametrize("bits, signed, narrow", INIT_CONFIGS)
def test_init_scale_closed_form_methods(method, bits, signed, narrow):
  x = _normal((64, 8), seed=bits) + 0.3
  got = trquant.init_scale(x, bits=bits, method=method, signed=signed, narrow=narrow)
  assert got.shape == () and got.dtype == jnp.float32
  expected = _reference_init(x, method, bits, signed, narrow)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_init_scale_binary_std3_is_a_three_sigma_window():
  # The TR paper's binary weights: sign(w) with a straight-through window |w| <= 3 std(w).
  x = _normal((64, 8), seed=3) + 0.2
  std3 = trquant.init_scale(x, bits=1, method="std3")
  np.testing.assert_allclose(float(std3), 3 * np.std(np.asarray(x, np.float64)), rtol=1e-5)
  per_channel = trquant.init_scale(x, bits=1, method="std3", axis=-1)
  np.testing.assert_allclose(np.asarray(per_channel)[0], 3 * np.std(np.asarray(x), axis=0), rtol=1e-5)


@pytest.mark.parametrize("bits, signed, narrow", INIT_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_init_scale_mse_error_not_worse_than_absmax_or_lsq(bits, signed, narrow, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(np.concatenate([rng.normal(size=500), rng.laplace(size=500) * 3]), jnp.float32)
  kw = dict(bits=bits, signed=signed, narrow=narrow)
  mse = trquant.init_scale(x, method="mse", **kw)
  absmax = trquant.init_scale(x, method="absmax", **kw)
  lsq = trquant.init_scale(x, method="lsq", **kw)
  assert 0 < float(mse) <= float(absmax) * (1 + 1e-6)  # candidates are c * absmax, c in (0, 1]
  err = _mse(x, mse, **kw)
  assert err <= _mse(x, absmax, **kw) * (1 + 1e-6)
  assert err <= _mse(x, lsq, **kw) * (1 + 1e-6)


def test_init_scale_mse_is_best_of_its_candidates():
  x = jnp.asarray(_normal((300,), seed=3))
  best = trquant.init_scale(x, bits=3, method="mse", num_candidates=20)
  absmax = float(jnp.max(jnp.abs(x)))
  _, hi = trquant.quant_range(3)
  errors = [_mse(x, c / 20 * absmax / hi, bits=3) for c in range(1, 21)]
  np.testing.assert_allclose(float(best), (np.argmin(errors) + 1) / 20 * absmax / hi, rtol=1e-6)


@pytest.mark.parametrize("method", q.INIT_METHODS)
def test_init_scale_per_channel_matches_each_column_alone(method):
  x = _normal((48, 5), seed=7) * np.array([0.1, 1.0, 3.0, 0.5, 10.0], np.float32)
  scales = trquant.init_scale(x, bits=4, method=method, axis=-1)
  assert scales.shape == (1, 5) and scales.dtype == jnp.float32
  for j in range(x.shape[1]):
    alone = trquant.init_scale(x[:, j], bits=4, method=method)
    np.testing.assert_allclose(float(scales[0, j]), float(alone), rtol=1e-5)
  # And it is usable as a per-channel scale.
  assert trquant.fake_quant(x, scales, bits=4).shape == x.shape


def test_init_scale_axis_zero_and_tuple_axes_keep_dims():
  x = _normal((6, 4, 3))
  assert trquant.init_scale(x, bits=4, axis=0).shape == (6, 1, 1)
  assert trquant.init_scale(x, bits=4, axis=(0, -1)).shape == (6, 1, 3)
  np.testing.assert_allclose(
      np.asarray(trquant.init_scale(x, bits=4, method="absmax", axis=(0, 2)))[:, 0, :],
      np.max(np.abs(x), axis=1) / 7,
      rtol=1e-6,
  )


@pytest.mark.parametrize("method", [m for m in q.INIT_METHODS if m != "std3"])
def test_init_scale_binary_is_mean_abs(method):
  x = _normal((32, 4), seed=2)
  np.testing.assert_allclose(
      float(trquant.init_scale(x, bits=1, method=method)), np.mean(np.abs(x)), rtol=1e-5
  )
  per_channel = trquant.init_scale(x, bits=1, method=method, axis=-1)
  expected = np.mean(np.abs(x), axis=0, keepdims=True)
  np.testing.assert_allclose(np.asarray(per_channel), expected, rtol=1e-5)


@pytest.mark.parametrize("method", q.INIT_METHODS)
def test_init_scale_of_zero_tensor_is_tiny_positive(method):
  scale = trquant.init_scale(jnp.zeros((4, 3)), bits=4, method=method, axis=-1)
  assert np.all(np.asarray(scale) > 0) and np.all(np.isfinite(np.asarray(scale)))
  # ... and it is accepted by the quantizers.
  np.testing.assert_array_equal(trquant.fake_quant(jnp.zeros((4, 3)), scale, bits=4), 0.0)


def test_init_scale_returns_float32_for_bfloat16_input():
  x = jnp.asarray(_normal((16, 4)), jnp.bfloat16)
  assert trquant.init_scale(x, bits=4).dtype == jnp.float32


# --------------------------------------------------------------------------------------
# dtypes, jit and vmap
# --------------------------------------------------------------------------------------

DTYPES = [jnp.float32, jnp.bfloat16]
FORWARD_FNS = {
    "quantize": lambda x, s: trquant.quantize(x, s, bits=4),
    "fake_quant": lambda x, s: trquant.fake_quant(x, s, bits=4),
    "lsq": lambda x, s: trquant.lsq(x, s, bits=4),
    "binarize": lambda x, s: trquant.binarize(x, s),
    "fake_quant_unscaled": lambda x, s: trquant.fake_quant_unscaled(x, s, bits=4),
}
DIFFERENTIABLE = ["fake_quant", "lsq", "binarize", "fake_quant_unscaled"]


def _scale_variants(dtype):
  return [0.25, jnp.float32(0.25), jnp.asarray(0.25, dtype), np.float32(0.25)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(FORWARD_FNS))
def test_output_keeps_x_dtype(name, dtype):
  x = jnp.asarray(_normal((5, 3)), dtype)
  for scale in _scale_variants(dtype):
    out = FORWARD_FNS[name](x, scale)
    assert out.dtype == dtype, (name, scale)
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradient_keeps_x_and_scale_dtypes(name, dtype):
  x = jnp.asarray(_normal((5, 3)), dtype)
  fn = FORWARD_FNS[name]
  for scale in [jnp.float32(0.25), jnp.asarray(0.25, dtype)]:
    gx, gs = jax.grad(lambda x, s: jnp.sum(fn(x, s).astype(jnp.float32)), argnums=(0, 1))(x, scale)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert gs.dtype == scale.dtype and gs.shape == ()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bfloat16_fake_quant_matches_float32_computation(bits):
  x = jnp.asarray(_normal((64,)), jnp.bfloat16)
  scale = 0.1
  got = trquant.fake_quant(x, scale, bits=bits)
  expected = trquant.fake_quant(x.astype(jnp.float32), scale, bits=bits).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
  codes = trquant.quantize(x, scale, bits=bits)
  codes_f32 = trquant.quantize(x.astype(jnp.float32), scale, bits=bits)
  np.testing.assert_array_equal(np.asarray(codes, np.float32), np.asarray(codes_f32))


@pytest.mark.parametrize("name", sorted(FORWARD_FNS))
def test_jit_matches_eager_with_traced_scale(name):
  fn = FORWARD_FNS[name]
  x = jnp.asarray(_normal((6, 4)))
  scale = jnp.asarray([[0.2, 0.3, 0.5, 1.0]], jnp.float32)
  np.testing.assert_allclose(jax.jit(fn)(x, scale), fn(x, scale), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_jit_of_grad_matches_eager_grad(name):
  fn = FORWARD_FNS[name]
  x = jnp.asarray(_normal((6, 4)))
  scale = jnp.float32(0.3)
  grad = jax.grad(lambda x, s: jnp.sum(jnp.sin(fn(x, s))), argnums=(0, 1))
  eager, jitted = grad(x, scale), jax.jit(grad)(x, scale)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FORWARD_FNS))
def test_vmap_with_per_example_scale_matches_broadcast(name):
  fn = FORWARD_FNS[name]
  x = jnp.asarray(_normal((5, 7)))
  scales = jnp.asarray([0.1, 0.2, 0.4, 0.8, 1.6], jnp.float32)
  batched = jax.vmap(fn)(x, scales)
  np.testing.assert_allclose(batched, fn(x, scales[:, None]), rtol=1e-6, atol=0)
  shared = jax.vmap(fn, in_axes=(0, None))(x, 0.3)
  np.testing.assert_allclose(shared, fn(x, 0.3), rtol=1e-6, atol=0)


def test_vmap_of_grad_matches_per_row_grad():
  x = jnp.asarray(_normal((5, 7)))
  scales = jnp.asarray([0.1, 0.2, 0.4, 0.8, 1.6], jnp.float32)
  grad = jax.grad(lambda s, x: jnp.sum(trquant.fake_quant(x, s, bits=3)))
  batched = jax.vmap(grad)(scales, x)
  rows = jnp.stack([grad(scales[i], x[i]) for i in range(5)])
  np.testing.assert_allclose(batched, rows, rtol=1e-6)


def test_init_scale_under_jit():
  x = jnp.asarray(_normal((32, 4)))
  for method in q.INIT_METHODS:
    fn = jax.jit(functools.partial(trquant.init_scale, bits=4, method=method, axis=-1))
    np.testing.assert_allclose(
        fn(x), trquant.init_scale(x, bits=4, method=method, axis=-1), rtol=1e-6
    )


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------

BAD_BITS = [0, 17, -1, 2.5, 4.0, True, False, np.bool_(True), "4", None]

BITS_CALLS = {
    "quant_range": lambda bits: trquant.quant_range(bits),
    "quantize": lambda bits: trquant.quantize(jnp.ones(3), 0.5, bits=bits),
    "fake_quant": lambda bits: trquant.fake_quant(jnp.ones(3), 0.5, bits=bits),
    "lsq": lambda bits: trquant.lsq(jnp.ones(3), 0.5, bits=bits),
    "fake_quant_unscaled": lambda bits: trquant.fake_quant_unscaled(jnp.ones(3), 0.5, bits=bits),
    "init_scale": lambda bits: trquant.init_scale(jnp.ones(3), bits=bits),
}


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
@pytest.mark.parametrize("name", sorted(BITS_CALLS))
def test_bad_bits_raise_value_error_naming_bits(name, bits):
  with pytest.raises(ValueError, match="`bits`"):
    BITS_CALLS[name](bits)


BAD_SCALES = [
    0,
    0.0,
    -1.0,
    float("nan"),
    float("inf"),
    np.float32(0.0),
    np.array(0.0),
    np.array(-1.0),
    np.array([float("nan")]),
    np.array([[0.5, 0.0, 1.0]], np.float32),
    np.array([[0.5, np.inf, 1.0]], np.float32),
    True,
]

SCALE_CALLS = {
    "quantize": lambda s: trquant.quantize(jnp.ones((2, 3)), s, bits=4),
    "dequantize": lambda s: trquant.dequantize(jnp.ones((2, 3)), s),
    "fake_quant": lambda s: trquant.fake_quant(jnp.ones((2, 3)), s, bits=4),
    "lsq": lambda s: trquant.lsq(jnp.ones((2, 3)), s, bits=4),
    "binarize": lambda s: trquant.binarize(jnp.ones((2, 3)), s),
    "fake_quant_unscaled": lambda s: trquant.fake_quant_unscaled(jnp.ones((2, 3)), s, bits=4),
}


@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("name", sorted(SCALE_CALLS))
def test_bad_scale_values_raise_value_error_naming_scale(name, scale):
  with pytest.raises(ValueError, match="`scale`"):
    SCALE_CALLS[name](scale)


BAD_JAX_SCALES = {
    "negative": jnp.float32(-0.1),
    "zero": jnp.zeros(()),
    "nan": jnp.float32(jnp.nan),
    "per_channel_zero": jnp.array([[0.5, 0.0, 0.5]]),
    "bfloat16_negative": jnp.array(-0.5, jnp.bfloat16),
}


@pytest.mark.parametrize("scale", sorted(BAD_JAX_SCALES))
@pytest.mark.parametrize("name", sorted(SCALE_CALLS))
def test_bad_concrete_jax_array_scales_raise(name, scale):
  # init_scale returns jax arrays: concrete ones are checked like numbers and numpy arrays.
  with pytest.raises(ValueError, match="`scale` must be positive and finite"):
    SCALE_CALLS[name](BAD_JAX_SCALES[scale])
  # A traced scale cannot be checked (it has no value yet): no error inside jit.
  jax.jit(SCALE_CALLS[name])(BAD_JAX_SCALES[scale])


def test_bad_scale_of_an_nnx_layer_raises_in_an_eager_forward_pass():
  from flax import nnx

  layer = trquant.nnx.QuantLinear(3, 2, weight_bits=4, rngs=nnx.Rngs(0))
  layer.weight_scale.set_value(-layer.weight_scale.get_value())
  with pytest.raises(ValueError, match="`scale` must be positive"):
    layer(jnp.ones((1, 3)))


@pytest.mark.parametrize(
    "x_shape, scale_shape",
    [((4, 3), (4,)), ((4, 3), (2, 3)), ((3,), (2, 3)), ((4, 3), (1, 1, 3)), ((), (1,))],
)
@pytest.mark.parametrize("name", sorted(SCALE_CALLS))
def test_scale_shape_that_does_not_broadcast_to_x_raises(name, x_shape, scale_shape):
  x = jnp.ones(x_shape)
  scale = np.full(scale_shape, 0.5, np.float32)
  call = {
      "quantize": lambda: trquant.quantize(x, scale, bits=4),
      "dequantize": lambda: trquant.dequantize(x, scale),
      "fake_quant": lambda: trquant.fake_quant(x, scale, bits=4),
      "lsq": lambda: trquant.lsq(x, scale, bits=4),
      "binarize": lambda: trquant.binarize(x, scale),
      "fake_quant_unscaled": lambda: trquant.fake_quant_unscaled(x, scale, bits=4),
  }[name]
  with pytest.raises(ValueError, match="`scale`"):
    call()


@pytest.mark.parametrize(
    "scale_shape", [(), (1,), (3,), (1, 3), (4, 1), (4, 3)], ids=str
)
def test_broadcastable_scale_shapes_are_accepted(scale_shape):
  x = jnp.asarray(_normal((4, 3)))
  out = trquant.fake_quant(x, np.full(scale_shape, 0.5, np.float32), bits=4)
  np.testing.assert_array_equal(out, trquant.fake_quant(x, 0.5, bits=4))


@pytest.mark.parametrize(
    "call",
    [
        lambda: trquant.quant_range(4, signed=False, narrow=True),
        lambda: trquant.quantize(jnp.ones(3), 0.5, bits=4, signed=False, narrow=True),
        lambda: trquant.fake_quant(jnp.ones(3), 0.5, bits=4, signed=False, narrow=True),
        lambda: trquant.lsq(jnp.ones(3), 0.5, bits=4, signed=False, narrow=True),
        lambda: trquant.init_scale(jnp.ones(3), bits=4, signed=False, narrow=True),
        lambda: trquant.quant_range(1, narrow=True),
    ],
    ids=["quant_range", "quantize", "fake_quant", "lsq", "init_scale", "binary"],
)
def test_narrow_without_signed_multibit_grid_raises(call):
  with pytest.raises(ValueError, match="narrow"):
    call()


@pytest.mark.parametrize(
    "kwargs, x, argument",
    [
        (dict(method="minmax"), np.ones(4), "`method`"),
        (dict(method="LSQ"), np.ones(4), "`method`"),
        (dict(), np.zeros((0,)), "`x`"),
        (dict(axis=-1), np.zeros((3, 0)), "`x`"),
        (dict(axis=2), np.ones((4, 3)), "`axis`"),
        (dict(axis=-3), np.ones((4, 3)), "`axis`"),
        (dict(axis=(0, 5)), np.ones((4, 3)), "`axis`"),
        (dict(num_candidates=0, method="mse"), np.ones(4), "`num_candidates`"),
        (dict(num_candidates=2.5, method="mse"), np.ones(4), "`num_candidates`"),
    ],
)
def test_init_scale_bad_arguments_raise(kwargs, x, argument):
  with pytest.raises(ValueError, match=argument):
    trquant.init_scale(x, bits=4, **kwargs)


@pytest.mark.parametrize("grad_scale", [0.0, -1.0, float("nan")])
def test_lsq_rejects_non_positive_grad_scale(grad_scale):
  with pytest.raises(ValueError, match="`grad_scale`"):
    trquant.lsq(jnp.ones(3), 0.5, bits=4, grad_scale=grad_scale)


def test_fake_quant_rejects_integer_x():
  with pytest.raises(ValueError, match="`x`"):
    trquant.fake_quant(jnp.arange(3), 0.5, bits=4)


# ---------------------------------------------------------------------------------------
# Per-group (sub-channel) scales
# ---------------------------------------------------------------------------------------

_group_shapes = st.sampled_from([(8, 3), (16, 4), (32, 2), (2, 2, 16, 3)])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_group_shapes, seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]),
       method=st.sampled_from(list(q.INIT_METHODS)))
def test_group_size_equal_to_the_axis_is_per_channel(shape, seed, bits, method):
  x = jax.random.normal(jax.random.key(seed), shape)
  n = shape[-2]
  per_channel = trquant.init_scale(x, bits=bits, method=method, axis=-1)
  grouped = trquant.init_scale(x, bits=bits, method=method, group_size=n)
  np.testing.assert_array_equal(grouped, per_channel)
  np.testing.assert_array_equal(trquant.quantize(x, grouped, bits=bits, group_size=n),
                                trquant.quantize(x, per_channel, bits=bits))
  np.testing.assert_array_equal(trquant.fake_quant(x, grouped, bits=bits, group_size=n),
                                trquant.fake_quant(x, per_channel, bits=bits))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_group_shapes, seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]),
       group=st.sampled_from([2, 4, 8]), outliers=st.booleans())
def test_group_mse_error_is_at_most_per_channel(shape, seed, bits, group, outliers):
  x = jax.random.normal(jax.random.key(seed), shape)
  if outliers:  # rows of very different magnitude: where groups pay most
    x = x * jnp.exp(2 * jax.random.normal(jax.random.key(seed + 1), shape[:-1] + (1,)))
  channel = trquant.init_scale(x, bits=bits, method="mse", axis=-1)
  grouped = trquant.init_scale(x, bits=bits, method="mse", group_size=group)
  assert grouped.shape == trquant.group_scale_shape(shape, group)
  error = lambda q: float(jnp.sum(jnp.square(q - x)))
  grouped_error = error(trquant.fake_quant(x, grouped, bits=bits, group_size=group))
  channel_error = error(trquant.fake_quant(x, channel, bits=bits))
  assert grouped_error <= channel_error * (1 + 1e-6) + 1e-12


def test_group_quantizers_match_the_expanded_scale():
  x = jax.random.normal(jax.random.key(0), (3, 3, 16, 4))
  scale = trquant.init_scale(x, bits=4, method="mse", group_size=8)
  assert scale.shape == (1, 1, 2, 4)
  expanded = trquant.expand_group_scale(scale, 8)
  assert expanded.shape == (1, 1, 16, 4)
  np.testing.assert_array_equal(trquant.fake_quant(x, scale, bits=4, group_size=8),
                                trquant.fake_quant(x, expanded, bits=4))
  codes = trquant.quantize(x, scale, bits=4, group_size=8)
  np.testing.assert_array_equal(codes, trquant.quantize(x, expanded, bits=4))
  np.testing.assert_array_equal(trquant.dequantize(codes, scale, group_size=8),
                                trquant.dequantize(codes, expanded))


def test_group_lsq_gives_each_group_its_summed_gradient():
  # With the same gradient scaling, a group's step size gets the sum of its members'
  # gradients: the gradient of the expanded scale summed over each group.
  x = jax.random.normal(jax.random.key(1), (16, 3))
  scale = trquant.init_scale(x, bits=3, method="lsq", group_size=4)
  grouped = jax.grad(lambda s: jnp.sum(
      trquant.lsq(x, s, bits=3, group_size=4, grad_scale=1.0) * x))(scale)
  expanded = jax.grad(lambda s: jnp.sum(trquant.lsq(x, s, bits=3, grad_scale=1.0) * x))(
      trquant.expand_group_scale(scale, 4))
  np.testing.assert_allclose(grouped, expanded.reshape(4, 4, 3).sum(axis=1), rtol=1e-5, atol=1e-6)
  assert float(jnp.sum(jnp.abs(grouped))) > 0  # the scales really get a gradient


@pytest.mark.parametrize("group_size, message", [
    (5, "does not divide"), (0, "positive int"), (-4, "positive int"), (4.0, "positive int"),
    (True, "positive int")])
def test_bad_group_sizes_are_named(group_size, message):
  x = jnp.ones((16, 4))
  with pytest.raises(ValueError, match=message):
    trquant.init_scale(x, bits=4, group_size=group_size)
  with pytest.raises(ValueError, match=message):
    trquant.quantize(x, jnp.ones((4, 4)), bits=4, group_size=group_size)


def test_group_scale_of_the_wrong_shape_is_named():
  with pytest.raises(ValueError, match="group_scale_shape"):
    trquant.fake_quant(jnp.ones((16, 4)), jnp.ones((1, 4)), bits=4, group_size=4)


# One shape (each new shape compiles every eager op again); rows of very different
# magnitudes, drawn per example.
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]))
def test_dynamic_quantization_is_per_row_absmax(seed, bits):
  rows = jnp.exp(3 * jax.random.normal(jax.random.key(seed + 1), (6, 1)))
  x = jax.random.normal(jax.random.key(seed), (6, 12)) * rows
  q = trquant.fake_quant_dynamic(x, bits=bits)
  hi = 2 ** (bits - 1) - 1
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / hi
  np.testing.assert_array_equal(q, trquant.fake_quant(x, jnp.maximum(scale, 1e-38), bits=bits))
  # Each row's largest entry is kept exactly (it defines the grid), errors within half a step.
  assert bool(jnp.all(jnp.abs(q - x) <= scale / 2 * (1 + 1e-5)))
  np.testing.assert_array_equal(jax.grad(lambda v: trquant.fake_quant_dynamic(v, bits=bits).sum())(x),
                                jnp.ones_like(x))


def test_dynamic_quantization_rejects_binary():
  with pytest.raises(ValueError, match="bits >= 2"):
    trquant.fake_quant_dynamic(jnp.ones((2, 3)), bits=1)
