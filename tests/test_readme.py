"""The README's usage example executes (the examples' tests are in integration_tests/)."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
