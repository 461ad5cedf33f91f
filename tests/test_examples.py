"""The README's main job runs end to end (short settings) and writes its outputs."""

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_digits_quick(tmp_path):
  train_digits = _load("train_digits")
  summary = train_digits.main([
      "--epochs", "4", "--fp-epochs", "3", "--seeds", "1", "--no-progress", "--out", str(tmp_path)
  ])
  assert (tmp_path / "digits_qat.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "digits_qat.json").read_text())
  assert saved["summary"] == summary
  assert summary["fp"]["final_mean"] > 0.9
  for run in ("lr", "tr"):
    assert summary[run]["final_mean"] > 0.8, run
    assert 0.0 <= summary[run]["tr_last_epoch"] < 0.1, run
  history = saved["per_seed"][0]["history"]["tr"]
  assert len(history["test_accuracy"]) == 4


def test_readme_usage_snippet_runs():
  """The README's usage example executes, and a few jitted steps of it train."""
  import re

  import jax
  import optax

  readme = (EXAMPLES.parent / "README.md").read_text()
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


def test_train_vit_quick(tmp_path):
  """The ViT pipeline: plain NNX ViT, FP training, quantize, AdamW vs AdamW + TR, AdaRound, export."""
  train_vit = _load("train_vit")
  results = train_vit.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  assert (tmp_path / "vit_qat.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "vit_qat.json").read_text())
  assert saved["summary"] == results["summary"]
  assert results["fp"]["test_accuracy"] > 0.75
  for method in ("adamw", "adamw-tr"):
    assert results["summary"]["W4A4"][method]["mean"] > 0.6, method
  tr_run = [run for run in saved["runs"] if run["method"] == "adamw-tr"][0]
  assert tr_run["history"]["tr"][-1]["initial_target_rate"] > 0  # R_0 was measured
  assert len(tr_run["history"]["tr"][-1]["running_transition_rate"]) == 6  # 4 projections + MLP
  adaround = results["adaround"]
  assert adaround["export"]["reloaded_identical"]
  assert adaround["export"]["file_bytes"] < adaround["export"]["float32_bytes"]
  assert [layer["name"] for layer in adaround["layers"]][:2] == ["patch_embed", "blocks/0/attn/query"]
  assert adaround["accuracy"]["adaround"] > 0.6
