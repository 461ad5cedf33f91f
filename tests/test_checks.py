import numpy as np
import pytest

from trquant._src import checks


@pytest.mark.parametrize("value,expected", [("fp", "fp"), ("same", "same"), (8, 8),
                                            (np.int32(4), 4), (1, 1), (16, 16)])
def test_check_first_last_accepts_the_policy(value, expected):
  result = checks.check_first_last(value)
  assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value", ["8bit", "FP", True, 0, 17, 8.0, None, (8, 8)])
def test_check_first_last_names_the_argument_and_the_choices(value):
  with pytest.raises(ValueError, match=r'`edges` must be "fp", "same" or a bit width in \[1, 16\]'):
    checks.check_first_last(value, "edges")


def test_check_first_last_min_bits():
  assert checks.check_first_last(2, min_bits=2) == 2
  with pytest.raises(ValueError, match=r"\[2, 16\]"):
    checks.check_first_last(1, min_bits=2)


def test_check_forward_fn_defaults_to_calling_the_model_and_names_a_bad_one():
  assert checks.check_forward_fn(None)(lambda x: x + 1, 2) == 3
  forward = lambda model, batch: model(batch, rngs=None)
  assert checks.check_forward_fn(forward) is forward
  with pytest.raises(ValueError, match=r"`forward_fn` must be a callable \(model, batch\)"):
    checks.check_forward_fn("model(x)")
