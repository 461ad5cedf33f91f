"""A small decoder-only LM in plain Flax NNX, quantized with trquant.nnx.quantize_model.

The model (``trquant_examples.lm.LM``) is written the way Llama/Qwen-style models
are written in NNX, with no trquant in it: a byte embedding (``nnx.Embed``,
vocabulary 256), pre-norm blocks of grouped-query attention (``nnx.Einsum`` projections, e.g. 4 query heads sharing 2
key/value heads, rotary position embeddings, a causal mask) and a SwiGLU MLP
(``nnx.Linear``), ``nnx.RMSNorm``, and an untied ``nnx.Linear`` head.

Data: the Python standard library's own ``.py`` files (``sysconfig``'s ``stdlib``
folder, ``site-packages`` left out), sorted by path, read as bytes: one token per
byte. Every 10th file is held out; the loss on fixed windows of the held-out files
is reported in nats per byte (and bits per byte). Nothing is downloaded.

The pipeline:

1. **FP training**: AdamW, warm-up + cosine LR (``--fp-steps``).
2. **Surgery** for each ``b`` in ``--bits``: ``trquant.nnx.quantize_model(model, rules)`` with
   the embedding skipped (a table lookup), the head at W8A8 and every other layer
   (the attention and MLP projections) at ``b``-bit weights and 8-bit inputs (WbA8).
3. **QAT**, ``--steps`` per run, from that model: ``adamw`` (AdamW + cosine LR on
   everything) vs ``adamw-tr`` (AdamW then ``trquant.tr_schedule`` with
   ``trquant.measured_target`` for the b-bit kernels; ``max_bits=4`` leaves the 8-bit
   head to the cosine LR of every other parameter). Both track oscillations
   (``trquant.track_oscillations``). With ``--qwix`` (if qwix is installed), a qwix
   QAT run of the same rules (int``b`` weights, int8 activations, head int8) at the
   same budget. The reference is the FP model trained for the same extra steps with
   the same optimizer ("FP +N steps"): a small LM is not converged, so QAT runs gain
   from the extra steps too.
4. **PTQ** of the FP model at ``--ptq-bits`` weights (activations FP; the first and
   the last layer called, ``layers/0/attn/q_proj`` and the head, at 8 bits):
   round-to-nearest, AdaRound (layer by layer) and BRECQ (block by block,
   ``trquant.adaround.reconstruct_model``).
5. **Integer export** of each quantized model (``trquant.export``): written to an
   ``.npz``, read back into a freshly built model, logits checked bit-identical.

It prints a results table (held-out nats/byte, bits/byte, train and eval tokens/s,
export size) and writes ``lm.json`` and ``lm.png`` (loss curves) to ``--out``.

    python examples/train_lm.py --qwix           # the default configuration: ~26 min on
                                                 # one busy CPU core (benchmarks/RESULTS.md §9)
    python examples/train_lm.py --quick          # the whole pipeline in about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import trquant
from trquant.nnx import QuantRule
from trquant_examples.lm import (LM, adamw, eval_windows, lm_loss, load_corpus, qat_optimizer,
                                 train_batches)

METHODS = ("adamw", "adamw-tr")


def _int_list(text):
  return [int(item) for item in str(text).split(",") if item.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model, few steps, small corpus subset")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--width", type=int, default=128, help="d_model")
  p.add_argument("--heads", type=int, default=4, help="query heads")
  p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
  p.add_argument("--mlp-width", type=int, default=None, help="SwiGLU hidden width (default 3 x width)")
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--fp-steps", type=int, default=1000)
  p.add_argument("--fp-lr", type=float, default=3e-3)
  p.add_argument("--steps", type=int, default=250, help="QAT steps per run")
  p.add_argument("--lr", type=float, default=5e-4, help="QAT AdamW LR (TR: the TALR's U_0)")
  p.add_argument("--weight-decay", type=float, default=0.05)
  p.add_argument("--bits", type=_int_list, default=[4, 2], help="QAT weight bits, e.g. 4,2 (inputs 8-bit)")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=_int_list, default=[0], help="QAT seeds (batch order)")
  p.add_argument("--qwix", action="store_true", help="also a qwix QAT run per bit width")
  p.add_argument("--ptq-bits", type=int, default=4)
  p.add_argument("--ptq-iters", type=int, default=400, help="AdaRound / BRECQ iterations per unit")
  p.add_argument("--calibration", type=int, default=64, help="training windows for activation scales and PTQ")
  p.add_argument("--no-ptq", action="store_true")
  p.add_argument("--max-files", type=int, default=None, help="use only the first N files")
  p.add_argument("--eval-windows", type=int, default=512, help="held-out windows of the final evaluation")
  p.add_argument("--eval-every", type=int, default=125, help="steps between held-out losses (128 windows)")
  p.add_argument("--out", default="outputs/lm")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.width, args.heads, args.kv_heads, args.context = 1, 32, 2, 1, 32
    args.fp_steps, args.steps, args.bits, args.seeds, args.max_files = 60, 40, [4], [0], 60
    args.batch_size, args.eval_every, args.eval_windows = 8, 10, 64
    args.ptq_iters, args.calibration = 20, 16
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not args.methods or set(args.methods) - set(METHODS):
    p.error(f"--methods must be a subset of {', '.join(METHODS)}")
  if args.width % args.heads or args.heads % args.kv_heads or (args.width // args.heads) % 2:
    p.error("--width must split into --heads heads of even size, --heads into --kv-heads groups")
  args.mlp_width = args.mlp_width or 3 * args.width
  return args


# ---------------------------------------------------------------------------------------
# The model (trquant_examples.lm, plain Flax NNX) at the flags' sizes, and its rules
# ---------------------------------------------------------------------------------------


def build_lm(args, seed=0):
  """The LM at the sizes of ``args`` (parse_args), initialised from ``seed``."""
  return LM(dim=args.width, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
            hidden=args.mlp_width, rngs=nnx.Rngs(seed))


def lm_rules(bits):
  """Embedding a plain nnx.Embed, head W8A8, every other layer W{bits}A8."""
  return [QuantRule("embed", skip=True),
          QuantRule("lm_head", weight_bits=8, act_bits=8, signed_act=True),
          QuantRule(weight_bits=bits, act_bits=8, signed_act=True)]


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------


@nnx.jit
def _eval_loss(model, batch):
  return lm_loss(model, batch)


def evaluate(model, windows, batch_size=64):
  """Mean held-out loss (nats/byte) and forward tokens/s (compilation excluded)."""
  batches = [jnp.asarray(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
  jax.block_until_ready(_eval_loss(model, batches[0]))  # compiles, untimed
  start = time.perf_counter()
  total = sum(float(_eval_loss(model, batch)) * len(batch) for batch in batches)
  seconds = time.perf_counter() - start
  return total / len(windows), sum(batch[:, 1:].size for batch in batches) / seconds


def train(model, tx, data, *, args, steps, seed, desc, curve_windows, stats_fn=None):
  """Trains ``model`` in place; returns the loss history and training tokens/s."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
    optimizer.update(model, grads)
    return loss, (stats_fn(optimizer) if stats_fn else {})

  history = {"step": [], "train_loss": [], "eval_step": [0], "held_loss": [], "stats": []}
  history["held_loss"].append(evaluate(model, curve_windows)[0])
  batches = train_batches(data, args.batch_size, args.context, seed)
  bar = tqdm(total=steps, desc=desc, leave=False, disable=args.no_progress)
  losses, start, wall = [], None, time.perf_counter()
  for t in range(1, steps + 1):
    loss, stats = step(model, optimizer, jnp.asarray(next(batches)))
    losses.append(loss)
    if t == 1:
      jax.block_until_ready(loss)
      start, train_seconds = time.perf_counter(), 0.0
    if t % 10 == 0 or t == steps:
      history["step"].append(t)
      history["train_loss"].append(float(np.mean(jax.device_get(losses))))
      losses = []
      if stats_fn:
        history["stats"].append({"step": t, **jax.tree.map(lambda a: np.asarray(a).tolist(),
                                                           jax.device_get(stats))})
    if t % args.eval_every == 0 or t == steps:
      train_seconds += time.perf_counter() - start
      history["eval_step"].append(t)
      history["held_loss"].append(evaluate(model, curve_windows)[0])
      bar.set_postfix(held=f"{history['held_loss'][-1]:.3f}")
      start = time.perf_counter()
    bar.update()
  bar.close()
  history["train_tokens_per_s"] = (steps - 1) * args.batch_size * args.context / train_seconds
  history["seconds"] = time.perf_counter() - wall
  return history


def stats_fn_for(method):
  def stats(optimizer):
    out = {"oscillating_fraction": trquant.nnx.oscillation_stats(optimizer)["oscillating_fraction"]}
    if method == "adamw-tr":
      tr = trquant.nnx.transition_stats(optimizer)
      out.update(running_transition_rate=tr["running_transition_rate"],
                 target_transition_rate=tr["target_transition_rate"],
                 talr_multiplier=tr["talr_multiplier"])
    return out
  return stats


def export_check(model, make_fresh, windows, path):
  """Integer export to ``path``, reload into ``make_fresh()``, compare logits bit for bit."""
  trquant.export.save_integer(path, trquant.export.to_integer(model))
  fresh = make_fresh()
  trquant.export.load_integer(fresh, trquant.export.read_integer(path))
  x = jnp.asarray(windows[:8, :-1])
  return {"file_bytes": os.path.getsize(path), "reloaded_identical": bool(jnp.all(fresh(x) == model(x)))}


def run_qwix(args, fp, bits, data, curve_windows, final_windows, example):
  import qwix

  # qwix matches the ops called inside a module: "layers/.*" would also quantize the
  # attention's q.k and softmax.v einsums (of module "layers/i/attn"), which trquant leaves
  # in full precision, so the rule names the projections.
  rules = [qwix.QtRule(module_path="lm_head", weight_qtype=jnp.int8, act_qtype=jnp.int8),
           qwix.QtRule(module_path="layers/.*_proj", weight_qtype=getattr(jnp, f"int{bits}"),
                       act_qtype=jnp.int8)]
  model = qwix.quantize_model(nnx.clone(fp), qwix.QtProvider(rules), jnp.asarray(example))
  start_loss = evaluate(model, final_windows)[0]
  tx = adamw(optax.cosine_decay_schedule(args.lr, args.steps), args.weight_decay)
  history = train(model, tx, data, args=args, steps=args.steps, seed=args.seeds[0],
                  desc=f"qwix W{bits}A8", curve_windows=curve_windows)
  loss, tokens_per_s = evaluate(model, final_windows)
  return {"name": f"W{bits}A8 qwix", "bits": bits, "method": "qwix", "seed": args.seeds[0],
          "start_loss": start_loss, "held_loss": loss, "eval_tokens_per_s": tokens_per_s,
          "history": history}


def run_ptq(args, fp, calibration, final_windows, out):
  # The first and last layer called at 8 bits, the rest at --ptq-bits (weights only).
  ruled = trquant.nnx.quantize_model(fp, [
      QuantRule("embed", skip=True),
      trquant.nnx.first_last_rule(fp, calibration[0][:1], weight_bits=8),
      QuantRule(weight_bits=args.ptq_bits)])
  config = trquant.adaround.AdaRoundConfig(iters=args.ptq_iters)
  rows = []
  nearest = trquant.adaround.round_to_nearest(ruled).model
  t0 = time.perf_counter()
  ada, ada_info = trquant.adaround.reconstruct_model(
      ruled, calibration, granularity="layer", config=config, key=jax.random.key(0),
      progress=not args.no_progress)
  t1 = time.perf_counter()
  brecq, brecq_info = trquant.adaround.reconstruct_model(
      ruled, calibration, config=config, key=jax.random.key(0),
      progress=not args.no_progress)
  t2 = time.perf_counter()
  for name, model, seconds, info in (("nearest", nearest, 0.0, []),
                                     ("AdaRound", ada, t1 - t0, ada_info),
                                     ("BRECQ", brecq, t2 - t1, brecq_info)):
    loss, tokens_per_s = evaluate(model, final_windows)
    row = {"name": f"PTQ W{args.ptq_bits} {name}", "method": f"ptq-{name.lower()}",
           "bits": args.ptq_bits, "held_loss": loss, "eval_tokens_per_s": tokens_per_s,
           "ptq_seconds": seconds, "units": [report._asdict() for report in info]}
    row["export"] = export_check(model, lambda: nnx.clone(nearest), final_windows,
                                 os.path.join(out, f"lm_ptq_w{args.ptq_bits}_{name.lower()}.npz"))
    rows.append(row)
    tqdm.write(f"{row['name']}: held-out {loss:.4f} nats/byte ({seconds:.0f} s)")
  return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def table(results):
  lines = ["| variant | held-out nats/byte | bits/byte | train tokens/s | eval tokens/s |"
           " export bytes (float32) | reload identical |", "|---|---|---|---|---|---|---|"]
  for row in results["rows"]:
    train_tps = row.get("history", {}).get("train_tokens_per_s")
    export = row.get("export") or {}
    size = f"{export['file_bytes']} ({results['float32_bytes']})" if export else "-"
    lines.append(
        f"| {row['name']} | {row['held_loss']:.4f} | {row['held_loss'] / math.log(2):.4f} |"
        f" {f'{train_tps:.0f}' if train_tps else '-'} | {row['eval_tokens_per_s']:.0f} |"
        f" {size} | {export.get('reloaded_identical', '-')} |")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  fp = results["rows"][0]["history"]
  axes[0].plot(fp["step"], fp["train_loss"], lw=0.8, label="train")
  axes[0].plot(fp["eval_step"], fp["held_loss"], "o-", ms=3, label="held-out")
  axes[0].set(xlabel="FP step", ylabel="nats/byte", title="FP training")
  axes[0].legend(fontsize=7)
  fp_curve = fp["held_loss"][-1]  # the curves' held-out windows (the table's are more)
  curves = [fp_curve]
  for row in results["rows"][1:]:
    history = row.get("history")
    if history:
      line, = axes[1].plot(history["eval_step"], history["held_loss"], "o-", ms=4, label=row["name"])
      k = min(5, len(history["train_loss"]))
      smooth = np.convolve(history["train_loss"], np.ones(k) / k, mode="valid")
      axes[1].plot(history["step"][k - 1:], smooth, lw=0.7, alpha=0.6, color=line.get_color())
      curves += history["held_loss"] + smooth.tolist()
      records = [r for r in history["stats"] if "running_transition_rate" in r]
      if records:
        axes[2].plot([r["step"] for r in records],
                     [np.mean(r["running_transition_rate"]) for r in records],
                     color=line.get_color(), label=f"{row['name']}: running TR")
        axes[2].plot([r["step"] for r in records],
                     [r["target_transition_rate"] or np.nan for r in records], "--",
                     color=line.get_color(), label=f"{row['name']}: target")
  axes[1].axhline(fp_curve, color="k", ls=":", label="FP")
  top = min(max(curves), fp_curve * 1.6)
  axes[1].set(xlabel="QAT step", ylabel="nats/byte (held-out: dots; train, smoothed: lines)",
              title="QAT", ylim=(min(curves) - 0.05, top + 0.05))
  axes[1].legend(fontsize=7)
  axes[2].set(xlabel="QAT step", ylabel="transition rate (mean over layers)", yscale="log",
              title="TR scheduling")
  if axes[2].has_data():
    axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  corpus = load_corpus(args.max_files)
  curve_windows = eval_windows(corpus["held"], min(128, args.eval_windows), args.context)
  final_windows = eval_windows(corpus["held"], args.eval_windows, args.context)
  tqdm.write(f"corpus: {corpus['files']} files under {corpus['root']}, {len(corpus['train'])}"
             f" train / {len(corpus['held'])} held-out bytes")
  fp = build_lm(args)
  float32_bytes = sum(int(np.asarray(v).nbytes)
                      for v in jax.tree.leaves(trquant.nnx.values(nnx.state(fp, nnx.Param))))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.fp_lr, max(args.fp_steps // 20, 1),
                                                args.fp_steps)
  history = train(fp, adamw(schedule, args.weight_decay), corpus["train"], args=args,
                  steps=args.fp_steps, seed=0, desc="FP", curve_windows=curve_windows)
  loss, tokens_per_s = evaluate(fp, final_windows)
  rows = [{"name": "FP", "method": "fp", "bits": None, "held_loss": loss,
           "eval_tokens_per_s": tokens_per_s, "history": history}]
  tqdm.write(f"FP: held-out {loss:.4f} nats/byte ({loss / math.log(2):.4f} bits/byte)")
  # The reference for QAT: the FP model trained for the same extra steps, same optimizer.
  longer = nnx.clone(fp)
  history = train(longer, adamw(optax.cosine_decay_schedule(args.lr, args.steps), args.weight_decay),
                  corpus["train"], args=args, steps=args.steps, seed=args.seeds[0],
                  desc="FP continued", curve_windows=curve_windows)
  loss, tokens_per_s = evaluate(longer, final_windows)
  rows.append({"name": f"FP +{args.steps} steps", "method": "fp-continued", "bits": None,
               "start_loss": rows[0]["held_loss"], "held_loss": loss,
               "eval_tokens_per_s": tokens_per_s, "history": history})
  tqdm.write(f"{rows[-1]['name']}: held-out {loss:.4f} nats/byte")
  qwix_note = None
  calibration = eval_windows(corpus["train"], args.calibration, args.context)[:, :-1]
  for bits in args.bits:
    base = trquant.nnx.quantize_model(fp, lm_rules(bits))
    trquant.nnx.calibrate_activations(base, jnp.asarray(calibration[:32]))
    start_loss = evaluate(base, final_windows)[0]
    tqdm.write(f"W{bits}A8 before QAT: {start_loss:.4f} nats/byte")
    for method in args.methods:
      for seed in args.seeds:
        model = nnx.clone(base)
        tx = qat_optimizer(model, lr=args.lr, steps=args.steps, weight_decay=args.weight_decay,
                           tr=method == "adamw-tr")
        history = train(model, tx, corpus["train"], args=args,
                        steps=args.steps, seed=seed, desc=f"W{bits}A8 {method} s{seed}",
                        curve_windows=curve_windows, stats_fn=stats_fn_for(method))
        loss, tokens_per_s = evaluate(model, final_windows)
        row = {"name": f"W{bits}A8 {method} s{seed}", "bits": bits, "method": method,
               "seed": seed, "start_loss": start_loss, "held_loss": loss,
               "eval_tokens_per_s": tokens_per_s, "history": history}
        make_fresh = lambda: trquant.nnx.quantize_model(build_lm(args, seed=1), lm_rules(bits))
        row["export"] = export_check(model, make_fresh, final_windows,
                                     os.path.join(args.out, f"lm_w{bits}a8_{method}_s{seed}.npz"))
        last = history["stats"][-1]
        line = (f"{row['name']}: held-out {loss:.4f} nats/byte, oscillating"
                f" {np.mean(last['oscillating_fraction']):.2e}")
        if method == "adamw-tr":
          line += (f", running TR {np.mean(last['running_transition_rate']):.2e}"
                   f" (target {last['target_transition_rate']:.2e})")
        tqdm.write(line)
        rows.append(row)
    if args.qwix:
      try:
        rows.append(run_qwix(args, fp, bits, corpus["train"], curve_windows, final_windows,
                             calibration[:1]))
        tqdm.write(f"{rows[-1]['name']}: held-out {rows[-1]['held_loss']:.4f} nats/byte")
      except Exception as error:  # qwix missing, or not at this bit width: said in the results
        qwix_note = f"qwix W{bits}A8 did not run: {type(error).__name__}: {error}"
        tqdm.write(qwix_note)
  if not args.no_ptq:
    rows += run_ptq(args, fp, [calibration[i:i + 16] for i in range(0, len(calibration), 16)],
                    final_windows, args.out)
  results = {"args": vars(args), "corpus": {k: v for k, v in corpus.items() if k in ("root", "files")}
             | {"train_bytes": len(corpus["train"]), "held_bytes": len(corpus["held"])},
             "device": f"{jax.default_backend()}, {os.cpu_count()} cores visible",
             "float32_bytes": float32_bytes, "qwix_note": qwix_note, "rows": rows}
  with open(os.path.join(args.out, "lm.json"), "w") as f:
    json.dump(results, f)
  if not args.no_plot:
    plot(results, os.path.join(args.out, "lm.png"))
  print(table(results))
  return results


if __name__ == "__main__":
  main()
