"""How much of post-training quantization's loss does QAT recover on a byte LM?

The example LM (``trquant_examples.lm``: Llama/Qwen-style GQA + SwiGLU + RMSNorm, plain
Flax NNX) trained in full precision once (its checkpoint reused, its sha256 recorded),
then quantized by rules (``trquant.nnx.quantize_model``) in each setting:
  w4g32  4-bit weights, one scale per group of 32 input features (per output channel);
  w4a8   w4g32 and 8-bit inputs, per-token dynamic absmax (``act_quantizer="dynamic"``);
  w3g32, w2g32  3- / 2-bit weights, groups of 32.
Everywhere the embedding stays in float (a table lookup) and the head is W8 per channel
(A8 dynamic in w4a8); every attention and MLP projection takes the setting.

Rows, at one budget (``--steps``, batch and data order fixed per seed):
  PTQ   round-to-nearest (the QAT starting point), AdaRound (layer by layer) and BRECQ
        (block by block), ``trquant.adaround.reconstruct_model`` on ``--calibration``
        training windows; ``qwix-gptq`` and ``qwix-awq`` (``qwix.contrib``, the same
        rules and windows);
  QAT   ``adamw`` (AdamW, cosine LR), ``adamw-kd`` (the same, the loss the KL divergence
        to the FP model's next-byte distribution: distillation, as ModelOpt's QAD),
        ``adamw-tr`` (AdamW then ``trquant.tr_schedule(measured_target)`` on the low-bit
        kernels, cosine LR on the rest), ``qwix`` (qwix QAT with the same rules:
        ``tile_size`` = the group size; when qwix is installed, ``pip install
        qwix==0.1.8``, and has the bit width: it has no int3);
        each for every seed in ``--seeds``;
  FP'   the FP model trained for the same extra steps with the same optimizer (per seed):
        a small LM is not converged, so QAT gains from the extra steps too.
Reported: held-out nats/byte (fixed windows of the held-out files), per seed and
mean +- std, and recovery = (L_RTN - L_QAT) / (L_RTN - L_FP'), also against the best PTQ
row; the oscillating fraction of trquant's QAT runs at the end; a plot of loss vs bits.
Every run writes a JSON (provenance: commit, versions, CPU, FP checkpoint hash).

    python benchmarks/lm_qat.py                      # the full protocol: hours on 2 cores
    python benchmarks/lm_qat.py --settings w4g32 --seeds 0 --methods adamw,adamw-kd
    python benchmarks/lm_qat.py --quick              # the whole pipeline on a tiny LM
    python benchmarks/lm_qat.py --summary-only       # tables and plot from the run JSONs
A run already in ``--out`` from the same clean commit, checkpoint and recipe is skipped,
so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant.nnx import QuantRule
from trquant_examples.lm import (LM, adamw, eval_windows, lm_loss, load_corpus, qat_optimizer,
                                 train_batches)

SETTINGS = {"w4g32": (4, False), "w4a8": (4, True), "w3g32": (3, False), "w2g32": (2, False)}
PTQ_METHODS = ("rtn", "adaround", "brecq", "qwix-gptq", "qwix-awq")
QAT_METHODS = ("adamw", "adamw-kd", "adamw-tr", "qwix")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--mlp-width", type=int, default=768)
  p.add_argument("--context", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--fp-steps", type=int, default=4000)
  p.add_argument("--fp-lr", type=float, default=2e-3)
  p.add_argument("--steps", type=int, default=500, help="QAT (and FP') steps per run")
  p.add_argument("--lr", type=float, default=3e-4, help="QAT AdamW peak LR (TR: the TALR's U_0)")
  p.add_argument("--weight-decay", type=float, default=0.05)
  p.add_argument("--group-size", type=int, default=32)
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--methods", default=",".join(PTQ_METHODS + QAT_METHODS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--ptq-iters", type=int, default=1000, help="AdaRound / BRECQ iterations per unit")
  p.add_argument("--calibration", type=int, default=128, help="training windows for PTQ")
  p.add_argument("--eval-windows", type=int, default=512)
  p.add_argument("--max-files", type=int, default=None)
  p.add_argument("--out", default="benchmarks/results/lm_qat")
  p.add_argument("--summary-only", action="store_true")
  p.add_argument("--quick", action="store_true", help="a tiny LM and a few steps")
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.width, args.heads, args.kv_heads, args.mlp_width = 1, 32, 2, 1, 64
    args.context, args.batch_size, args.fp_steps, args.steps = 32, 8, 40, 20
    args.group_size, args.ptq_iters, args.calibration, args.eval_windows = 8, 10, 16, 32
    args.max_files, args.seeds, args.settings = 40, "0", "w4a8"
  args.settings = [s for s in args.settings.split(",") if s]
  args.methods = [m for m in args.methods.split(",") if m]
  args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
  for name, values, valid in (("settings", args.settings, SETTINGS),
                              ("methods", args.methods, PTQ_METHODS + QAT_METHODS)):
    if set(values) - set(valid):
      p.error(f"--{name} must be a subset of {','.join(valid)}")
  if args.width % args.heads or (args.width // args.heads) % args.group_size:
    p.error("--group-size must divide the head size (--width / --heads): the output"
            " projection's input axis")
  return args


def rules(setting, group_size):
  bits, act8 = SETTINGS[setting]
  act = dict(act_bits=8, act_quantizer="dynamic", signed_act=True) if act8 else {}
  return [QuantRule("embed", skip=True),
          QuantRule("lm_head", weight_bits=8, per_channel=True, **act),
          QuantRule(weight_bits=bits, group_size=group_size, **act)]


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------


@nnx.jit
def _eval_loss(model, batch):
  return lm_loss(model, batch)


def evaluate(model, windows, batch_size=64):
  total = sum(float(_eval_loss(model, jnp.asarray(windows[i:i + batch_size])))
              * len(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size))
  return total / len(windows)


def kd_loss(model, teacher_logits, batch):
  """KL(teacher || student) of the next-byte distributions, mean over tokens."""
  student = jax.nn.log_softmax(model(batch[:, :-1]).astype(jnp.float32))
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))


def train(model, tx, data, *, args, steps, seed, teacher=None, stats_fn=None):
  """Trains ``model`` in place on ``steps`` batches of data-order ``seed``."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, teacher, batch):
    if teacher is None:
      loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
    else:
      targets = jax.lax.stop_gradient(teacher(batch[:, :-1]))
      loss, grads = nnx.value_and_grad(kd_loss)(model, targets, batch)
    optimizer.update(model, grads)
    return loss

  batches = train_batches(data, args.batch_size, args.context, seed)
  losses = [float(step(model, optimizer, teacher, jnp.asarray(next(batches))))
            for _ in range(steps)]
  curve = [float(np.mean(losses[i:i + 10])) for i in range(0, steps, 10)]
  return curve, (stats_fn(optimizer) if stats_fn else {})


def oscillation_summary(optimizer):
  fractions = trquant.nnx.oscillation_stats(optimizer)["oscillating_fraction"]
  return {"oscillating_fraction_mean": float(np.mean(np.asarray(fractions)))}


def qwix_rules(rule_type, setting, group_size):
  """qwix rules for ``setting``: the same layers, bits and group size as ``rules``."""
  bits, act8 = SETTINGS[setting]
  act = jnp.int8 if act8 else None
  # qwix matches the ops inside a module: name the projections, not the attention einsums.
  # JAX has int2/int4/int8 dtypes but no int3: qwix names that grid by the string "int3".
  weight_qtype = getattr(jnp, f"int{bits}", f"int{bits}")
  return [rule_type(module_path="lm_head", weight_qtype=jnp.int8, act_qtype=act),
          rule_type(module_path="layers/.*_proj", weight_qtype=weight_qtype,
                    act_qtype=act, tile_size=group_size)]


def qwix_model(fp, setting, group_size, example):
  import qwix

  provider = qwix.QtProvider(qwix_rules(qwix.QtRule, setting, group_size))
  return qwix.quantize_model(nnx.clone(fp), provider, jnp.asarray(example))


def qwix_ptq_model(fp, setting, group_size, method, batches):
  """qwix GPTQ or AWQ: statistics from ``batches``, then the weights quantized from them.

  qwix calibrates ops with one contracting axis; the attention output projection
  (``bthk,hkd->btd``) contracts two, so qwix rounds it to nearest (its PTQ fallback).
  """
  import qwix
  from qwix._src.providers import ptq  # qwix 0.1.8 exports these two types only here
  from qwix._src.utils import flax_util
  from qwix.contrib import awq, gptq

  if method == "qwix-gptq":
    qt_rules = qwix_rules(gptq.GptqRule, setting, group_size)
    calibration, serving, quantize_params = (gptq.GptqCalibrationProvider(qt_rules),
                                             qwix.PtqProvider(qt_rules), gptq.quantize_params)
  else:
    qt_rules = qwix_rules(awq.AwqRule, setting, group_size)
    calibration, serving, quantize_params = (awq.AwqCalibrationProvider(qt_rules),
                                             awq.AwqInferenceProvider(qt_rules),
                                             awq.quantize_params)
  example = jnp.asarray(batches[0])
  calibrating = qwix.quantize_model(nnx.clone(fp), calibration, example)
  for batch in batches:
    calibrating(jnp.asarray(batch))
  model = qwix.quantize_model(nnx.clone(fp), serving, example)
  # The layers qwix quantized, and an abstract tree of their kernels: qwix 0.1.8 cannot
  # nnx.update a WithAux kernel into AWQ's WithAwqScale, so each kernel is set directly.
  layers = {path: node for path, node in nnx.iter_graph(model)
            if isinstance(getattr(node, "kernel", None), ptq.WithAux)}
  abstract = flax.traverse_util.unflatten_dict(
      {(*path, "kernel"): node.kernel for path, node in layers.items()})
  quantized = quantize_params(nnx.to_pure_dict(nnx.state(calibrating, nnx.Param)), abstract,
                              nnx.to_pure_dict(nnx.state(calibrating, flax_util.QuantStat)),
                              allow_extra_params=True)
  for path, node in layers.items():
    kernel = quantized
    for key in (*path, "kernel"):
      kernel = kernel[key]
    node.kernel = jax.tree.map(nnx.Param, kernel)
  return model


# ---------------------------------------------------------------------------------------
# Provenance and the FP checkpoint
# ---------------------------------------------------------------------------------------


def provenance(fp_hash):
  try:
    import qwix
    qwix_version = getattr(qwix, "__version__", "installed")
  except ImportError:
    qwix_version = None
  return {**_runs.git_state(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "qwix": qwix_version, "cpu": _runs.cpu_model(), "cpu_count": os.cpu_count(),
          "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "fp_checkpoint_sha256": fp_hash}


def fp_checkpoint(args, corpus, windows):
  """The FP model, trained once and reused from ``--out`` (``fp_lm.npz``)."""
  path, record = os.path.join(args.out, "fp_lm.npz"), os.path.join(args.out, "fp_lm.json")
  sizes = {k: getattr(args, k) for k in ("layers", "width", "heads", "kv_heads", "mlp_width",
                                          "context", "batch_size", "fp_steps", "fp_lr")}
  model = LM(dim=args.width, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
             hidden=args.mlp_width, rngs=nnx.Rngs(0))
  if os.path.exists(path) and json.load(open(record)).get("sizes") == sizes:
    arrays = dict(np.load(path))
    trquant.nnx.load_float_weights(model, arrays)
  else:
    start = time.perf_counter()
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.fp_lr, max(args.fp_steps // 20, 1),
                                                  args.fp_steps)
    curve, _ = train(model, adamw(schedule, args.weight_decay), corpus["train"], args=args,
                     steps=args.fp_steps, seed=10_000)
    arrays = {"/".join(map(str, k)): np.asarray(v)
              for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(path, **arrays)
    with open(record, "w") as f:
      json.dump({"sizes": sizes, "held_loss": evaluate(model, windows), "train_curve": curve,
                 "seconds": time.perf_counter() - start}, f)
  digest = hashlib.sha256()
  for key in sorted(arrays):
    digest.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
  return model, digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------


def finished(args, name, base):
  """Whether ``name`` was already run from this commit and FP checkpoint (a resumed sweep)."""
  path = os.path.join(args.out, f"{name}.json")
  if not os.path.exists(path):
    return False
  done = json.load(open(path))
  selection = ("settings", "methods", "seeds")  # which runs, not how each one runs

  def recipe(run):
    return {k: v for k, v in run["settings"].items() if k not in selection}

  return (done["provenance"] == base["provenance"] and recipe(done) == recipe(base)
          and not done["provenance"]["dirty"])


def write_run(args, name, row):
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(row, f)
  print(f"{name}: held-out {row['held_loss']:.4f} nats/byte", flush=True)


def run_all(args):
  os.makedirs(args.out, exist_ok=True)
  corpus = load_corpus(args.max_files)
  windows = eval_windows(corpus["held"], args.eval_windows, args.context)
  fp, fp_hash = fp_checkpoint(args, corpus, windows)
  base = {"provenance": provenance(fp_hash), "settings": {k: v for k, v in vars(args).items()
                                                           if k not in ("summary_only",)}}
  fp_loss = evaluate(fp, windows)
  write_run(args, "fp", {**base, "method": "fp", "held_loss": fp_loss})
  calibration = eval_windows(corpus["train"], args.calibration, args.context)[:, :-1]
  batches = [calibration[i:i + 16] for i in range(0, len(calibration), 16)]
  for seed in args.seeds:  # FP': the same extra steps, the same optimizer
    if finished(args, f"fp-continued-s{seed}", base):
      continue
    model = nnx.clone(fp)
    curve, _ = train(model, adamw(optax.cosine_decay_schedule(args.lr, args.steps),
                                  args.weight_decay), corpus["train"], args=args,
                     steps=args.steps, seed=seed)
    write_run(args, f"fp-continued-s{seed}", {**base, "method": "fp-continued", "seed": seed,
                                              "held_loss": evaluate(model, windows),
                                              "train_curve": curve})
  for setting in args.settings:
    ruled = trquant.nnx.quantize_model(fp, rules(setting, args.group_size))
    config = trquant.adaround.AdaRoundConfig(iters=args.ptq_iters)
    for method in [m for m in PTQ_METHODS if m in args.methods]:
      if finished(args, f"{setting}-{method}", base):
        continue
      start = time.perf_counter()
      if method == "rtn":
        model = trquant.adaround.round_to_nearest(ruled).model
      elif method.startswith("qwix-"):
        try:
          model = qwix_ptq_model(fp, setting, args.group_size, method, batches)
        except Exception as error:  # qwix missing, or without this bit width: recorded
          write_run(args, f"{setting}-{method}", {
              **base, "setting": setting, "method": method, "held_loss": float("nan"),
              "error": f"{type(error).__name__}: {error}"})
          continue
      else:
        model, _ = trquant.adaround.reconstruct_model(
            ruled, batches, granularity="layer" if method == "adaround" else "block",
            config=config, key=jax.random.key(0), progress=False)
      write_run(args, f"{setting}-{method}", {
          **base, "setting": setting, "method": method, "held_loss": evaluate(model, windows),
          "seconds": time.perf_counter() - start})
    # Seed by seed, every method within a seed: an interrupted sweep leaves paired rows.
    for seed in args.seeds:
      for method in [m for m in QAT_METHODS if m in args.methods]:
        if finished(args, f"{setting}-{method}-s{seed}", base):
          continue
        start = time.perf_counter()
        row = {**base, "setting": setting, "method": method, "seed": seed}
        if method == "qwix":
          try:
            model = qwix_model(fp, setting, args.group_size, calibration[:1])
          except Exception as error:  # qwix missing, or without this bit width: recorded
            write_run(args, f"{setting}-{method}-s{seed}", {
                **row, "held_loss": float("nan"), "error": f"{type(error).__name__}: {error}"})
            continue
          row["start_loss"] = evaluate(model, windows)
          curve, stats = train(model, adamw(optax.cosine_decay_schedule(args.lr, args.steps),
                                            args.weight_decay), corpus["train"], args=args,
                               steps=args.steps, seed=seed)
        else:
          model = nnx.clone(ruled)
          row["start_loss"] = evaluate(model, windows)
          tx = qat_optimizer(model, lr=args.lr, steps=args.steps, weight_decay=args.weight_decay,
                             tr=method == "adamw-tr")
          curve, stats = train(model, tx, corpus["train"], args=args,
                               steps=args.steps, seed=seed,
                               teacher=fp if method == "adamw-kd" else None,
                               stats_fn=oscillation_summary)
        write_run(args, f"{setting}-{method}-s{seed}", {
            **row, **stats, "held_loss": evaluate(model, windows), "train_curve": curve,
            "seconds": time.perf_counter() - start})


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------


def summarize(args):
  runs = []
  for name in sorted(os.listdir(args.out)):
    if name.endswith(".json") and name not in ("fp_lm.json", "summary.json"):
      runs.append(json.load(open(os.path.join(args.out, name))))
  versions = {(r["provenance"]["commit"], r["provenance"]["fp_checkpoint_sha256"]) for r in runs}
  fp = next(r["held_loss"] for r in runs if r["method"] == "fp")
  fp_continued = [r["held_loss"] for r in runs if r["method"] == "fp-continued"]
  l_fp2 = float(np.mean(fp_continued)) if fp_continued else float("nan")
  lines = [f"FP {fp:.4f} nats/byte; FP' (+{args.steps} steps) {l_fp2:.4f}"
           f" ({', '.join(f'{v:.4f}' for v in fp_continued)}). Runs from"
           f" {len(versions)} (commit, FP checkpoint) pair(s).", "",
           "| setting | method | held-out nats/byte (per seed) | recovery vs RTN | vs best PTQ |"
           " oscillating |", "|---|---|---|---|---|---|"]
  summary = {"fp": fp, "fp_continued": fp_continued, "rows": []}
  for setting in SETTINGS:
    rows = [r for r in runs if r.get("setting") == setting]
    if not rows:
      continue
    ptq = {r["method"]: r["held_loss"] for r in rows if r["method"] in PTQ_METHODS}
    rtn, best_ptq = ptq.get("rtn"), min(ptq.values()) if ptq else None
    for method in PTQ_METHODS + QAT_METHODS:
      values = [r["held_loss"] for r in rows if r["method"] == method
                and np.isfinite(r["held_loss"])]
      if not values:
        continue
      mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

      def recovery(reference):
        if reference is None or method in PTQ_METHODS or not np.isfinite(l_fp2):
          return None
        return (reference - mean) / (reference - l_fp2)

      osc = [r["oscillating_fraction_mean"] for r in rows
             if r["method"] == method and "oscillating_fraction_mean" in r]
      rec, rec_best = recovery(rtn), recovery(best_ptq)
      summary["rows"].append({"setting": setting, "method": method, "mean": mean, "std": std,
                              "values": values, "recovery_vs_rtn": rec,
                              "recovery_vs_best_ptq": rec_best})
      per_seed = ", ".join(f"{v:.4f}" for v in values)
      lines.append(f"| {setting} | {method} | {mean:.4f} ± {std:.4f} ({per_seed}) |"
                   f" {'-' if rec is None else f'{100 * rec:.0f}%'} |"
                   f" {'-' if rec_best is None else f'{100 * rec_best:.0f}%'} |"
                   f" {f'{np.mean(osc):.2e}' if osc else '-'} |")
  failed = sorted({f"{r['setting']} {r['method']}: {r['error']}" for r in runs if "error" in r})
  if failed:
    lines += ["", "Did not run: " + "; ".join(failed) + "."]
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(args.out, "summary.png"))
  return summary


def plot(summary, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  bits_of = {s: SETTINGS[s][0] for s in SETTINGS if not SETTINGS[s][1]}
  for method in PTQ_METHODS + QAT_METHODS:
    rows = [r for r in summary["rows"] if r["method"] == method and r["setting"] in bits_of]
    if rows:
      ax.errorbar([bits_of[r["setting"]] for r in rows], [r["mean"] for r in rows],
                  yerr=[r["std"] for r in rows], marker="o", capsize=3, label=method)
  ax.axhline(summary["fp"], color="k", ls=":", label="FP")
  ax.set(xlabel="weight bits (groups of 32)", ylabel="held-out nats/byte", xticks=[2, 3, 4])
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if not args.summary_only:
    run_all(args)
  return summarize(args)


if __name__ == "__main__":
  main()
