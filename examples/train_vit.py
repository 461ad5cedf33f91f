"""A small ViT in plain Flax NNX, quantized with trquant.nnx.quantize_model: AdamW vs AdamW + TR scheduling.

The model is written with NNX layers only (no trquant in it): a linear patch
embedding of ``p x p`` patches, a class token and learned position embeddings,
pre-norm blocks of ``nnx.MultiHeadAttention`` and a GELU MLP, a final LayerNorm
and a linear head. The pipeline:

1. **FP training**: AdamW with a cosine LR and label smoothing (``--fp-steps``); the
   weights can be saved to and reloaded from ``--fp-checkpoint`` (an ``.npz``), so
   that later runs share one FP model.
2. **Surgery**: for each bit width ``b`` in ``--bits`` (weights and activations, WbAb),
   ``trquant.nnx.quantize_model`` replaces, in a copy of the FP model,

   * the first and the last layer the forward pass calls (the patch embedding and
     the head) by full-precision trquant layers: ``trquant.nnx.first_last_rule``;
   * every other layer with weights (the query/key/value/out projections of each
     attention module, ``nnx.LinearGeneral``, and the two MLP layers) by a
     ``b``-bit layer: frozen per-tensor MSE weight scales, ``b``-bit signed LSQ
     inputs (LayerNorm, attention and GELU outputs are signed).

   The attention matmuls (``q @ k^T``, ``softmax @ v``) and the softmax have no
   weights: no rule matches them and they stay in full precision, as do the
   LayerNorms, the class token and the position embeddings.
3. **QAT**: from the quantized model, ``--steps`` steps per run (same data, same
   budget) for each method in ``--methods``:

   * ``adamw``: AdamW with a cosine LR on every parameter;
   * ``adamw-tr``: the quantized kernels get AdamW (the LR is the TALR's U_0)
     followed by ``trquant.tr_schedule`` with a cosine target from ``R_0``, which
     is measured from AdamW's own rate over a warm-up (``trquant.measured_target``,
     ``--target-tr auto``) or given (``--target-tr 2e-3``); every other parameter
     gets the AdamW + cosine LR of the baseline.

   for each seed in ``--seeds`` (the seed sets the order of the batches).
4. **AdaRound** (``--adaround``): post-training ``--adaround-bits``-bit weights
   (activations in full precision, first and last layer at 8 bits) of the FP model
   by AdaRound vs round-to-nearest, from ``--calibration`` training images; the
   AdaRound model is exported to integers (``trquant.export``), written to an
   ``.npz``, read back into a new model and checked to give identical logits.

It prints a results table and writes ``<tag>.json`` and ``<tag>.png`` (``--tag``,
default ``vit_qat``: test accuracy over the QAT steps per setting, running
transition rate against the target, AdaRound's per-layer errors) to ``--out``.
On 2 CPU cores a QAT step of the default ViT (dim 64, 4 blocks, 17 tokens, batch
128) takes roughly 0.1 s, so ``--steps 6000`` with 3 seeds is about 30 minutes per
setting (bits, method); with ``--fp-checkpoint`` the FP model is trained once and
settings can run as separate processes (one ``--tag`` each).

    # the full setting on Fashion-MNIST: W4A4 and W2A2, AdamW vs AdamW + TR, 3 seeds
    python examples/train_vit.py --data-dir DIR --fp-steps 6000 --fp-checkpoint outputs/vit/fp.npz \\
        --steps 6000 --bits 4,2 --methods adamw,adamw-tr --seeds 0,1,2 --adaround --out outputs/vit
    # a quick run of the whole pipeline on scikit-learn's digits (well under a minute)
    python examples/train_vit.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import trquant
from trquant_examples import datasets
from trquant_examples.vit import ViT
from trquant.nnx import QuantRule

METHODS = ("adamw", "adamw-tr")


def _int_list(text):
  return [int(item) for item in str(text).split(",") if item.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="fashion-mnist", choices=datasets.DATASET_NAMES)
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--quick", action="store_true",
                      help="the whole pipeline in seconds: digits, a tiny ViT, a few steps")
  parser.add_argument("--patch", type=int, default=None, help="patch size (default: 7, 4 for digits)")
  parser.add_argument("--dim", type=int, default=64, help="token width")
  parser.add_argument("--depth", type=int, default=4, help="number of blocks")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--mlp-dim", type=int, default=128)
  parser.add_argument("--fp-steps", type=int, default=6000, help="full-precision training steps")
  parser.add_argument("--fp-lr", type=float, default=1e-3)
  parser.add_argument("--fp-checkpoint", default=None,
                      help=".npz of the FP weights: loaded if it exists, else written after FP training")
  parser.add_argument("--steps", type=int, default=6000, help="QAT steps per run")
  parser.add_argument("--bits", type=_int_list, default=[4, 2], help="weight = activation bits, e.g. 4,2")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of {', '.join(METHODS)}")
  parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="e.g. 0,1,2")
  parser.add_argument("--lr", type=float, default=3e-4, help="AdamW LR of QAT (U_0 for TR)")
  parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay of the kernels")
  parser.add_argument("--target-tr", default="auto",
                      help="'auto' (R_0 measured over a warm-up: trquant.measured_target) or R_0")
  parser.add_argument("--per-channel", action="store_true", help="per-output-feature weight scales")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--label-smoothing", type=float, default=0.1)
  parser.add_argument("--eval-every", type=int, default=500, help="QAT steps between test evaluations")
  parser.add_argument("--log-every", type=int, default=10, help="QAT steps between logged TR records")
  parser.add_argument("--adaround", action="store_true", help="also AdaRound PTQ and integer export")
  parser.add_argument("--adaround-bits", type=int, default=4)
  parser.add_argument("--adaround-iters", type=int, default=5000, help="AdaRound iterations per layer")
  parser.add_argument("--calibration", type=int, default=1024, help="AdaRound calibration images")
  parser.add_argument("--out", default="outputs/vit", help="directory for the JSON, the plot and the export")
  parser.add_argument("--tag", default="vit_qat", help="name of the JSON and plot files (<tag>.json)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)
  if args.quick:
    args.dataset, args.dim, args.depth, args.heads, args.mlp_dim = "digits", 32, 1, 2, 64
    args.fp_steps, args.steps, args.bits, args.seeds = 200, 30, [4], [0]
    args.batch_size, args.eval_every, args.lr = 64, 15, 1e-3
    args.adaround, args.adaround_iters, args.calibration = True, 20, 128
  args.methods = [method.strip() for method in args.methods.split(",") if method.strip()]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown or not args.methods:
    parser.error(f"--methods must be a subset of {', '.join(METHODS)}; got {unknown or 'none'}")
  if args.target_tr != "auto":
    try:
      args.target_tr = float(args.target_tr)
    except ValueError:
      parser.error(f"--target-tr must be 'auto' or a number, got {args.target_tr!r}")
  for name in ("fp_steps", "steps", "eval_every", "log_every", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive")
  return args


# ---------------------------------------------------------------------------------------
# The model (trquant_examples.vit, plain Flax NNX) at the flags' sizes
# ---------------------------------------------------------------------------------------


def build_vit(args, dataset, seed):
  """The ViT at the sizes of ``args`` (parse_args) for the dataset's images."""
  patch = args.patch or (4 if dataset.image_shape[0] % 7 else 7)
  return ViT(image_shape=dataset.image_shape, patch=patch, dim=args.dim, depth=args.depth,
             heads=args.heads, mlp_dim=args.mlp_dim, num_classes=dataset.num_classes,
             rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------


@nnx.jit
def _correct(model, x, y):
  return jnp.sum(jnp.argmax(model(x), -1) == y)


def evaluate(model, images, labels, batch_size=1000):
  total = 0
  for start in range(0, len(images), batch_size):
    total += int(_correct(model, jnp.asarray(images[start:start + batch_size]),
                          jnp.asarray(labels[start:start + batch_size])))
  return total / len(images)


def _kernel_mask(params):
  """Weight decay on kernels (2-D and more) only: not on biases, norms, embeddings' scales."""
  return jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, params)


def _batches(dataset, batch_size, rng):
  while True:
    yield from datasets.batches(dataset.train_images, dataset.train_labels, batch_size, rng=rng)


def train(model, tx, dataset, *, steps, batch_size, seed, label_smoothing, desc, progress,
          eval_every=None, eval_images=None, eval_labels=None, log_every=10, tr_stats=False):
  """Trains ``model`` in place; returns the history (loss, periodic accuracy, TR records)."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    stats = {}
    if tr_stats:
      stats = trquant.nnx.transition_stats(optimizer)
      stats["initial_target_rate"] = optax.tree.get(trquant.nnx.values(optimizer.opt_state),
                                                    "initial_target_rate")
    return loss, stats

  history = {"step": [], "test_accuracy": [], "loss_step": [], "train_loss": [], "tr": []}
  rng = np.random.default_rng(seed)
  batches = _batches(dataset, batch_size, rng)
  losses = []
  bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress)
  for t in range(1, steps + 1):
    x, y = next(batches)
    loss, stats = step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
    losses.append(loss)
    if tr_stats and (t % log_every == 0 or t == 1):
      history["tr"].append({"step": t, **jax.tree.map(lambda a: np.asarray(a).tolist(),
                                                       jax.device_get(stats))})
    if t % log_every == 0 or t == steps:
      history["loss_step"].append(t)
      history["train_loss"].append(float(np.mean(jax.device_get(losses))))
      losses = []
    if eval_every and (t % eval_every == 0 or t == steps):
      history["step"].append(t)
      history["test_accuracy"].append(evaluate(model, eval_images, eval_labels))
      bar.set_postfix(acc=f"{history['test_accuracy'][-1]:.4f}")
    bar.update()
  bar.close()
  return history


def fp_model(args, dataset):
  """The FP ViT: loaded from --fp-checkpoint if it exists, else trained (and saved there)."""
  model = build_vit(args, dataset, seed=0)
  checkpoint = args.fp_checkpoint
  if checkpoint and os.path.exists(checkpoint):
    with np.load(checkpoint) as saved:
      trquant.nnx.load_float_weights(model, dict(saved))
    return model, {"loaded_from": checkpoint}
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.fp_lr, max(args.fp_steps // 20, 1),
                                                args.fp_steps)
  tx = optax.adamw(schedule, weight_decay=args.weight_decay, mask=_kernel_mask)
  start = time.perf_counter()
  history = train(model, tx, dataset, steps=args.fp_steps, batch_size=args.batch_size, seed=0,
                  label_smoothing=args.label_smoothing, desc="FP", progress=not args.no_progress,
                  log_every=args.log_every)
  info = {"seconds": time.perf_counter() - start, "train_loss": history["train_loss"][-1]}
  if checkpoint:
    os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
    arrays = {"/".join(map(str, path)): np.asarray(value) for path, value in
              nnx.to_flat_state(trquant.nnx.values(nnx.state(model, nnx.Param)))}
    np.savez(checkpoint, **arrays)
  return model, info


# ---------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------


def quantize_vit(model, bits, dataset, *, per_channel=False):
  """The FP ViT at WbAb by surgery: first and last layer FP, the rest b-bit; calibrated."""
  example = jnp.asarray(dataset.train_images[:1])
  rules = [trquant.nnx.first_last_rule(model, example),
           QuantRule(weight_bits=bits, act_bits=bits, signed_act=True, per_channel=per_channel)]
  q = trquant.nnx.quantize_model(model, rules)
  trquant.nnx.calibrate_activations(q, jnp.asarray(dataset.train_images[:256]))
  return q, rules


def make_transform(args, model, method):
  cosine = optax.cosine_decay_schedule(args.lr, args.steps)
  adamw = lambda lr: optax.adamw(lr, weight_decay=args.weight_decay, mask=_kernel_mask)
  if method == "adamw":
    return adamw(cosine)
  if args.target_tr == "auto":
    target = trquant.measured_target(args.steps)
  else:
    target = optax.cosine_decay_schedule(args.target_tr, args.steps)
  quant = optax.chain(adamw(args.lr), trquant.tr_schedule(target, codes_fn=trquant.nnx.codes_fn(model)))
  return optax.partition({"quant": quant, "float": adamw(cosine)}, trquant.nnx.param_labels(model))


def run_qat(args, fp, dataset):
  runs = []
  for bits in args.bits:
    base, rules = quantize_vit(fp, bits, dataset, per_channel=args.per_channel)
    quantized = [name for name, layer in trquant.nnx.quant_layers(base) if layer.weight_bits]
    start_accuracy = evaluate(base, dataset.test_images, dataset.test_labels)
    tqdm.write(f"W{bits}A{bits}: {len(quantized)} quantized layers, first/last rule"
               f" {rules[0].path!r}; accuracy before QAT {start_accuracy:.4f}")
    for method in args.methods:
      for seed in args.seeds:
        model = nnx.clone(base)
        name = f"W{bits}A{bits}-{method}-s{seed}"
        start = time.perf_counter()
        history = train(model, make_transform(args, model, method), dataset, steps=args.steps,
                        batch_size=args.batch_size, seed=seed,
                        label_smoothing=args.label_smoothing, desc=name,
                        progress=not args.no_progress, eval_every=args.eval_every,
                        eval_images=dataset.test_images, eval_labels=dataset.test_labels,
                        log_every=args.log_every, tr_stats=method == "adamw-tr")
        seconds = time.perf_counter() - start
        accuracy = history["test_accuracy"][-1]
        line = f"{name}: test accuracy {accuracy:.4f} ({seconds:.0f} s)"
        if history["tr"]:
          last = history["tr"][-1]
          line += (f", R_0 {last['initial_target_rate']:.2e}, running TR"
                   f" {np.mean(last['running_transition_rate']):.2e}")
        tqdm.write(line)
        runs.append({"bits": bits, "method": method, "seed": seed, "name": name,
                     "start_accuracy": start_accuracy, "final_test_accuracy": accuracy,
                     "seconds": seconds, "history": history})
  return runs


def summarize(runs):
  summary = {}
  for run in runs:
    entry = summary.setdefault(f"W{run['bits']}A{run['bits']}", {}).setdefault(
        run["method"], {"accuracies": [], "seeds": [], "seconds": []})
    entry["accuracies"].append(run["final_test_accuracy"])
    entry["seeds"].append(run["seed"])
    entry["seconds"].append(run["seconds"])
  for methods in summary.values():
    for entry in methods.values():
      entry["mean"] = float(np.mean(entry["accuracies"]))
      entry["std"] = float(np.std(entry["accuracies"]))
  return summary


def run_adaround(args, fp, dataset, out_dir):
  """AdaRound vs round-to-nearest (weights only), and an integer export of the AdaRound model."""
  rng = np.random.default_rng(0)
  index = np.sort(rng.choice(len(dataset.train_images), args.calibration, replace=False))
  images = dataset.train_images[index]
  calibration = [images[i:i + 256] for i in range(0, len(images), 256)]
  # The first and last layer called at 8 bits, the rest at --adaround-bits (weights only).
  ruled = trquant.nnx.quantize_model(fp, [
      trquant.nnx.first_last_rule(fp, calibration[0][:1], weight_bits=8,
                                  per_channel=args.per_channel),
      QuantRule(weight_bits=args.adaround_bits, per_channel=args.per_channel)])
  start = time.perf_counter()
  nearest = trquant.adaround.round_to_nearest(ruled).model
  ada, reports = trquant.adaround.reconstruct_model(
      ruled, calibration, granularity="layer", fallback_to_nearest=False,
      config=trquant.adaround.AdaRoundConfig(iters=args.adaround_iters),
      key=jax.random.key(0), progress=not args.no_progress)
  seconds = time.perf_counter() - start
  accuracy = {"fp": evaluate(fp, dataset.test_images, dataset.test_labels),
              "nearest": evaluate(nearest, dataset.test_images, dataset.test_labels),
              "adaround": evaluate(ada, dataset.test_images, dataset.test_labels)}
  # Integer export, written and read back into another model of the same layers and bit
  # widths (here the round-to-nearest one, whose kernels and scales it replaces).
  path = os.path.join(out_dir, f"vit_w{args.adaround_bits}_adaround.npz")
  trquant.export.save_integer(path, trquant.export.to_integer(ada))
  fresh = nnx.clone(nearest)
  trquant.export.load_integer(fresh, trquant.export.read_integer(path))
  x = jnp.asarray(dataset.test_images[:256])
  identical = bool(jnp.all(fresh(x) == ada(x)))
  float_bytes = sum(int(np.asarray(v).nbytes) for v in
                    jax.tree.leaves(trquant.nnx.values(nnx.state(fp, nnx.Param))))
  result = {"bits": args.adaround_bits, "iters": args.adaround_iters,
            "calibration": args.calibration, "seconds": seconds, "accuracy": accuracy,
            "export": {"path": path, "file_bytes": os.path.getsize(path),
                       "float32_bytes": float_bytes, "reloaded_identical": identical},
            "layers": [report._asdict() for report in reports]}
  tqdm.write(f"AdaRound W{args.adaround_bits} (weights only, first/last 8-bit): FP"
             f" {accuracy['fp']:.4f}, nearest {accuracy['nearest']:.4f}, AdaRound"
             f" {accuracy['adaround']:.4f} ({seconds:.0f} s); export {os.path.getsize(path)}"
             f" bytes vs {float_bytes} float32, reloaded identical: {identical}")
  return result


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def table(results):
  lines = [f"FP ViT: test accuracy {results['fp']['test_accuracy']:.4f}", "",
           "| bits | method | test accuracy (mean ± std) | per seed | seconds per run |",
           "|---|---|---|---|---|"]
  for bits, methods in results["summary"].items():
    for method, entry in methods.items():
      per_seed = ", ".join(f"{a:.4f}" for a in entry["accuracies"])
      lines.append(f"| {bits} | {method} | {entry['mean']:.4f} ± {entry['std']:.4f} | {per_seed} |"
                   f" {np.mean(entry['seconds']):.0f} |")
  if "adaround" in results:
    ada = results["adaround"]
    lines += ["", f"AdaRound W{ada['bits']}A32 (first/last 8-bit): nearest"
                  f" {ada['accuracy']['nearest']:.4f}, AdaRound {ada['accuracy']['adaround']:.4f},"
                  f" FP {ada['accuracy']['fp']:.4f}"]
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = 2 + ("adaround" in results)
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
  axes = axes[0]
  for (bits, method), runs in _group(results["runs"]).items():
    steps = [0] + runs[0]["history"]["step"]
    mean = np.mean([[run["start_accuracy"]] + run["history"]["test_accuracy"] for run in runs],
                   axis=0)
    axes[0].plot(steps, mean, marker="o", ms=3, label=f"W{bits}A{bits} {method}")
  axes[0].axhline(results["fp"]["test_accuracy"], color="k", ls=":", label="FP")
  axes[0].set(xlabel="QAT step", ylabel="test accuracy (mean over seeds)", title="ViT QAT")
  axes[0].legend(fontsize=7)
  for run in results["runs"]:
    if run["history"]["tr"] and run["seed"] == results["runs"][0]["seed"]:
      records = run["history"]["tr"]
      steps = [r["step"] for r in records]
      axes[1].plot(steps, [np.mean(r["running_transition_rate"]) for r in records],
                   label=f"W{run['bits']} running (mean over layers)")
      # The target is 0 until measured_target has measured R_0 (its warm-up): not drawn.
      target = [r["target_transition_rate"] or np.nan for r in records]
      axes[1].plot(steps, target, "--", label=f"W{run['bits']} target")
  axes[1].set(xlabel="QAT step", ylabel="transition rate", title="TR scheduling", yscale="log")
  if axes[1].has_data():
    axes[1].legend(fontsize=7)
  if "adaround" in results:
    layers = results["adaround"]["layers"]
    index = np.arange(len(layers))
    axes[2].bar(index - 0.2, [r["nearest_error"] for r in layers], 0.4, label="nearest")
    axes[2].bar(index + 0.2, [r["reconstructed_error"] for r in layers], 0.4, label="AdaRound")
    axes[2].set(xlabel="layer (call order)", ylabel="output reconstruction error",
                title=f"AdaRound W{results['adaround']['bits']}", yscale="log")
    axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _group(runs):
  groups = {}
  for run in runs:
    groups.setdefault((run["bits"], run["method"]), []).append(run)
  return groups


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  dataset = datasets.normalize(datasets.load_dataset(args.dataset, args.data_dir))
  fp, fp_info = fp_model(args, dataset)
  fp_info["test_accuracy"] = evaluate(fp, dataset.test_images, dataset.test_labels)
  tqdm.write(f"FP ViT: test accuracy {fp_info['test_accuracy']:.4f}")
  runs = run_qat(args, fp, dataset)
  results = {"args": {key: value for key, value in vars(args).items()}, "fp": fp_info,
             "runs": runs, "summary": summarize(runs)}
  if args.adaround:
    results["adaround"] = run_adaround(args, fp, dataset, args.out)
  with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
    json.dump(results, f)
  if not args.no_plot:
    plot(results, os.path.join(args.out, f"{args.tag}.png"))
  print(table(results))
  return results


if __name__ == "__main__":
  main()
