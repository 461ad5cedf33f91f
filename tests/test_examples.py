"""The README's usage example executes, and the examples' helpers that need no training run
(the examples' end-to-end runs are in integration_tests/)."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

from trquant.nnx import QuantLinear

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_example(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_readme_usage_snippet_runs():
  """The README's usage example executes, and a few jitted steps of it train."""
  import re

  import jax
  import optax

  readme = (ROOT / "README.md").read_text()
  usage = readme.split("## Usage", 1)[1]
  snippet = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
  namespace = {}
  exec(compile(snippet, "README.md", "exec"), namespace)
  tx, params, loss_fn = namespace["tx"], namespace["params"], namespace["loss_fn"]
  opt_state = namespace["opt_state"]

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x = jax.random.normal(jax.random.key(1), (128, 64))
  y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
  losses = []
  for _ in range(50):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert optax.tree.get(opt_state, "running_transition_rate").shape == (1,)


def test_train_qat_checkpoint_loads_into_a_quantized_model_of_the_same_architecture(tmp_path):
  pytest.importorskip("tqdm")
  train_qat = _load_example("train_qat")
  assert train_qat.parse_args(["--target-tr", "auto"]).target_tr == "auto"
  assert train_qat.parse_args(["--target-tr", "2e-3"]).target_tr == 2e-3
  for bad in ("-1", "0", "fast"):
    with pytest.raises(SystemExit):
      train_qat.parse_args(["--target-tr", bad])

  def mlp(bits, seed, hidden=16):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(QuantLinear(8, hidden, weight_bits=bits, rngs=rngs), nnx.relu,
                          QuantLinear(hidden, 4, weight_bits=bits, act_bits=bits, rngs=rngs))

  fp = mlp(None, 0)
  train_qat.save_checkpoint(fp, tmp_path / "fp.npz")
  qat = mlp(2, 1)
  loaded = train_qat.load_checkpoint(qat, tmp_path / "fp.npz")
  assert "layers/2/kernel" in {"/".join(map(str, path)) for path in loaded}
  np.testing.assert_array_equal(qat.layers[2].kernel.get_value(), fp.layers[2].kernel.get_value())
  assert qat.layers[2].kernel.bits == 2  # the quantized model keeps its quantization
  with pytest.raises(ValueError, match="shape"):
    train_qat.load_checkpoint(mlp(2, 1, hidden=12), tmp_path / "fp.npz")
  with pytest.raises(ValueError, match="which the model lacks"):
    train_qat.load_checkpoint(nnx.Sequential(QuantLinear(8, 16, weight_bits=2, rngs=nnx.Rngs(0))),
                              tmp_path / "fp.npz")
