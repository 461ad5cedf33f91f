"""Shared by the benchmarks: one training run per call (trquant_examples.training.train),
the FP checkpoint, writing a summary table with its results, and the code and machine a
run records."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess

import numpy as np

from trquant_examples import training
from trquant_examples.config import TrainConfig, run_name

# Fields whose None is a setting (full precision), not "keep the default".
_NONE_IS_A_VALUE = ("weight_bits", "act_bits")


def train_config(args, out, **overrides) -> TrainConfig:
  """The TrainConfig of one benchmark run.

  Args:
    args: the benchmark's settings: ``model``, ``dataset``, ``data_dir``, ``epochs``,
      ``batch_size``, ``max_steps_per_epoch`` (0 or None: full epochs) and, if present
      and not None, ``bn_reestimate``.
    out: the folder of the run's results JSON (the config's ``out``).
    **overrides: further TrainConfig fields; a None or False value keeps the default,
      except ``weight_bits=None`` / ``act_bits=None``: full precision.

  Returns:
    The config, without progress bar or plot.
  """
  settings = dict(model=args.model, dataset=args.dataset, epochs=args.epochs,
                  batch_size=args.batch_size, out=out, no_progress=True, no_plot=True)
  if getattr(args, "bn_reestimate", None) is not None:
    settings["bn_reestimate"] = args.bn_reestimate
  if args.data_dir:
    settings["data_dir"] = args.data_dir
  if args.max_steps_per_epoch:
    settings["max_steps_per_epoch"] = args.max_steps_per_epoch
  settings.update({key: value for key, value in overrides.items()
                   if (value is not None and value is not False) or key in _NONE_IS_A_VALUE})
  return TrainConfig(**settings)


def train(args, out, *, resume=False, **overrides):
  """Trains one run of :func:`train_config` and writes its results to ``out/<run name>.json``.

  Args:
    args: the benchmark's shared settings (see :func:`train_config`).
    out: the folder of the run's JSON.
    resume: read a run whose JSON is already in ``out`` back instead of training it again.
    **overrides: further TrainConfig fields (see :func:`train_config`).

  Returns:
    The run's results (:func:`trquant_examples.training.train`); the JSON holds them with
    the TR curves subsampled (:func:`subsampled`).
  """
  config = train_config(args, out, **overrides)
  path = os.path.join(out, f"{run_name(config)}.json")
  if resume and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  results = training.train(config)
  with open(path, "w") as f:
    json.dump(subsampled(results), f)
  return results


def subsampled(results, max_points=500):
  """`results` with its per-step TR curves cut to at most `max_points` evenly spaced steps
  (the last kept), so that a long run's JSON stays small."""
  transitions = results.get("transitions")
  if not transitions:
    return results
  steps = len(next(iter(transitions.values())))
  keep = np.unique(np.linspace(0, steps - 1, min(steps, max_points)).round().astype(int))
  curves = {key: [values[i] for i in keep] for key, values in transitions.items()}
  return {**results, "transitions": {**curves, "step": keep.tolist()}}


def fp_checkpoint(args):
  """Trains the full-precision model all QAT runs start from; returns (path, accuracy).

  With ``args.reuse_fp`` an FP checkpoint and its run JSON already in ``args.out``
  are used as they are (a benchmark re-run with other QAT settings).
  """
  checkpoint = os.path.join(args.out, f"fp_{args.model}_{args.dataset}.npz")
  record = os.path.join(args.out, f"fp-{args.model}.json")
  if getattr(args, "reuse_fp", False) and os.path.exists(checkpoint) and os.path.exists(record):
    with open(record) as f:
      accuracy = json.load(f)["final_test_accuracy"]
    print(f"FP {args.model} on {args.dataset}: {accuracy:.4f} (reused {checkpoint})", flush=True)
    return checkpoint, accuracy
  fp = train(args, args.out, weight_bits=None, act_bits=None, optimizer="adam",
             epochs=args.fp_epochs, save=checkpoint, tag=f"fp-{args.model}")
  print(f"FP {args.model} on {args.dataset}: {fp['final_test_accuracy']:.4f}", flush=True)
  return checkpoint, fp["final_test_accuracy"]


def mean_std(values):
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std())


def write_summary(out, lines, results, stem="summary"):
  """Writes ``lines`` to ``out/<stem>.md`` and ``results`` to ``out/<stem>.json``, prints the
  table and returns it."""
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + text)
  return text


def git_state() -> dict:
  """``{"commit", "dirty"}`` of the checkout these benchmarks run from (None outside git).

  ``dirty``: tracked changes under trquant/, benchmarks/ or examples/; a sweep's own
  untracked result files do not count."""
  root = pathlib.Path(__file__).resolve().parent.parent

  def git(*command):
    try:
      return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None

  changes = git("status", "--porcelain", "--untracked-files=no", "--", "trquant", "benchmarks",
                "examples")
  return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changes)}


def cpu_model() -> str | None:
  """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return platform.processor() or None


def machine_provenance() -> dict:
  """The code (commit, dirty), versions and machine a single-process benchmark ran on."""
  import flax
  import jax
  return {**git_state(), "jax": jax.__version__, "flax": flax.__version__,
          "device": str(jax.devices()[0].device_kind), "cpu": cpu_model(),
          "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def add_serving_lm_arguments(parser) -> None:
  """The size flags of the example LM that the serving and PTQ-memory benchmarks build
  (12.8M parameters by default) and its weight group size."""
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=1536)
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--group-size", type=int, default=32)


def rss_mib(field: str) -> float:
  """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in MiB."""
  with open("/proc/self/status") as status:
    return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def reset_peak_rss() -> None:
  """Resets VmHWM to the current RSS (Linux >= 4.0): the peak that follows is what runs
  after this call, not the imports' and the set-up's."""
  with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
