"""Shared by the benchmarks: one examples/train_qat.py run per call, the FP checkpoint, and
writing a summary table with its results."""

from __future__ import annotations

import json
import os
import importlib.util
import pathlib
import sys

import numpy as np


def load_example(name):
  """examples/<name>.py as a module: the benchmarks drive the examples' own training loops."""
  path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
  module_name = f"trquant_example_{name}"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses resolve their module
    spec.loader.exec_module(module)
  return sys.modules[module_name]


train_qat = load_example("train_qat")


def train(args, out, *, resume=False, **overrides):
  """Runs train_qat with the benchmark's shared flags plus `overrides` (flag=value; True
  for a switch); writes the run's JSON to `out` and returns its results. With `resume`,
  a run whose JSON is already in `out` is read back instead of trained again."""
  argv = ["--model", args.model, "--dataset", args.dataset, "--epochs", str(args.epochs),
          "--batch-size", str(args.batch_size), "--out", out, "--no-progress", "--no-plot"]
  if getattr(args, "bn_reestimate", None) is not None:
    argv += ["--bn-reestimate", str(args.bn_reestimate)]
  if args.data_dir:
    argv += ["--data-dir", args.data_dir]
  if args.max_steps_per_epoch:
    argv += ["--max-steps-per-epoch", str(args.max_steps_per_epoch)]
  for key, value in overrides.items():
    flag = f"--{key.replace('_', '-')}"
    if value is True:
      argv.append(flag)
    elif value is not None and value is not False:
      argv += [flag, str(value)]
  run_args = train_qat.parse_args(argv)
  path = os.path.join(out, f"{train_qat.run_name(run_args)}.json")
  if resume and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  results = train_qat.run(run_args)
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
  fp = train(args, args.out, weight_bits=0, act_bits=0, optimizer="adam", epochs=args.fp_epochs,
             save=checkpoint, tag=f"fp-{args.model}")
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
