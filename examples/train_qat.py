"""Quantization-aware training of NNX models with LR scheduling or TR scheduling.

Examples:

    # full-precision checkpoint, then W2A2 QAT from it with TR scheduling
    python examples/train_qat.py --model cnn --dataset fashion-mnist --data-dir DIR \
        --weight-bits fp --act-bits fp --epochs 5 --save fp_cnn.npz
    python examples/train_qat.py --model cnn --dataset fashion-mnist --data-dir DIR \
        --init-from fp_cnn.npz --weight-bits 2 --act-bits 2 --optimizer adam \
        --schedule tr --target-tr 5e-3 --epochs 5

``--schedule lr`` is the baseline: the optimizer with a cosine learning rate for
every parameter. ``--schedule tr`` gives the quantized kernels ``optimizer ->
trquant.tr_schedule`` with a cosine target transition rate (the optimizer's LR is
the TALR's U_0) and everything else (biases, BatchNorm, activation scales,
full-precision layers) the cosine LR. Weight scales are frozen in both modes
(``weight_quantizer="fixed"``), so the two schedules are compared on equal terms.

Against weight oscillations (either schedule): ``--dampening LAMBDA`` adds the
dampening loss with a weight that is 0 for the first ``--osc-warmup-fraction`` of
the steps, then ramps (cosine) to LAMBDA; ``--freeze`` appends
``trquant.freeze_oscillations`` (threshold cosine-annealed from
``--freeze-threshold-init`` to ``--freeze-threshold-end`` after the same warm-up);
``--track-oscillations`` appends ``trquant.track_oscillations`` to report the
fraction of oscillating weights per layer (implied by ``--freeze``).

After QAT, BatchNorm running statistics can lag the quantized weights (short runs,
2-bit weights): the run measures them against the final weights'
(``trquant.nnx.batchnorm_divergence``, ``final_bn_divergence`` in the results) and
re-estimates them before a second evaluation (``--bn-reestimate``, on by default);
with ``--bn-reestimate 0``, ``trquant.nnx.check_batchnorm`` warns when they are stale.

The training loop is :func:`trquant_examples.training.train`; this script turns its
flags into a :class:`trquant_examples.config.TrainConfig` (``--weight-bits`` is the
field ``weight_bits``), trains, and writes ``<out>/<run name>.json`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from trquant_examples import config as train_config
from trquant_examples import datasets
from trquant_examples import models
from trquant_examples.config import TrainConfig, run_name
from trquant_examples.optimizers import OPTIMIZER_NAMES
from trquant_examples.training import train

DEFAULTS = TrainConfig()


def _target_rate(text):
  """--target-tr: a positive float R_0, or "auto"."""
  if text == "auto":
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"R_0 must be positive, got {text!r}")
  return value


def build_parser():
  """The command line's flags: one per TrainConfig field, with its default."""
  d = DEFAULTS
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=d.model, choices=models.MODEL_NAMES)
  parser.add_argument("--dataset", default=d.dataset, choices=datasets.DATASET_NAMES)
  parser.add_argument("--data-dir", default=d.data_dir, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--weight-bits", type=train_config.parse_bits, default=d.weight_bits,
                      help='a bit width, or "fp" for full precision')
  parser.add_argument("--act-bits", type=train_config.parse_bits, default=d.act_bits,
                      help='a bit width, or "fp" for full precision')
  parser.add_argument("--first-last", type=train_config.parse_first_last, default=d.first_last,
                      help='first conv and last linear layer: "fp", "same" or a bit width (8)')
  parser.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
  parser.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZER_NAMES)
  parser.add_argument("--lr", type=float, default=d.lr, help="initial LR (U_0); default per optimizer")
  parser.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
  parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
  parser.add_argument("--schedule", default=d.schedule, choices=train_config.SCHEDULES)
  parser.add_argument("--target-tr", type=_target_rate, default=d.target_tr,
                      help="initial target transition rate R_0, or 'auto': measured over a"
                      " warm-up at the optimizer's own LR (trquant.measured_target)")
  parser.add_argument("--controller", default=d.controller, choices=train_config.CONTROLLERS)
  parser.add_argument("--eta", type=float, default=d.eta, help="controller gain (default: its own)")
  parser.add_argument("--tr-decay", type=float, default=d.tr_decay,
                      help="decay of the running TR's EMA (time constant 1/(1-decay) steps)")
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch,
                      help="truncate epochs (quick runs)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--init-from", default=d.init_from, help="FP checkpoint (.npz) to start QAT from")
  parser.add_argument("--save", default=d.save, help="write the trained model's weights here (.npz)")
  parser.add_argument("--dampening", type=float, default=d.dampening,
                      help="final weight of the oscillation-dampening loss (0: off; the paper: 0.1)")
  parser.add_argument("--freeze", action="store_true", help="iterative freezing of oscillating weights")
  parser.add_argument("--freeze-threshold-init", type=float, default=d.freeze_threshold_init,
                      help="freezing threshold at the start")
  parser.add_argument("--freeze-threshold-end", type=float, default=d.freeze_threshold_end,
                      help="freezing threshold at the end (cosine annealed)")
  parser.add_argument("--osc-warmup-fraction", type=float, default=d.osc_warmup_fraction,
                      help="fraction of the steps before dampening / freezing starts")
  parser.add_argument("--osc-decay", type=float, default=d.osc_decay,
                      help="decay of the oscillation frequency and code EMAs (default: 0.999,"
                           " lowered for short runs to 1 - 5 / warm-up steps, at least 0.95)")
  parser.add_argument("--osc-threshold", type=float, default=d.osc_threshold,
                      help="frequency above which a weight counts as oscillating (reports)")
  parser.add_argument("--track-oscillations", action="store_true",
                      help="report the fraction of oscillating weights per layer")
  parser.add_argument("--bn-reestimate", type=int, default=d.bn_reestimate,
                      help="batches for BatchNorm re-estimation before the final evaluation (0: off;"
                      " then a warning says when the running statistics lag the final weights)")
  parser.add_argument("--bn-divergence", type=int, default=d.bn_divergence,
                      help="batches for the KL divergence of BatchNorm running statistics from the"
                      " current weights' at every epoch end (0 = off)")
  parser.add_argument("--out", default=d.out, help="directory for results JSON and plots")
  parser.add_argument("--tag", default=d.tag, help="name of this run's files (default: derived)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--no-plot", action="store_true")
  return parser


def parse_args(argv=None):
  """The command line as a TrainConfig; a value TrainConfig rejects exits with its message.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    The TrainConfig.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return TrainConfig(**vars(args))
  except ValueError as error:
    parser.error(str(error))


def plot(results, path):
  """Test accuracy per epoch; under TR scheduling also the running TR and TALR multiplier per step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  transitions = results.get("transitions")
  panels = 3 if transitions else 1
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
  axes = axes[0]
  history = results["history"]
  axes[-1].plot(history["epoch"], history["test_accuracy"], marker="o")
  axes[-1].set(xlabel="epoch", ylabel="test accuracy", title="Accuracy")
  if transitions:
    running = np.asarray(transitions["running_transition_rate"])
    multiplier = np.asarray(transitions["talr_multiplier"])
    axes[0].plot(transitions["target_transition_rate"], "k--", label="target R")
    for layer in range(running.shape[1]):
      axes[0].plot(running[:, layer], lw=0.8, label=f"layer {layer}")
      axes[1].plot(multiplier[:, layer], lw=0.8, label=f"layer {layer}")
    axes[0].set(xlabel="step", ylabel="running transition rate", title="Transition rate")
    axes[1].set(xlabel="step", ylabel="u (x U_0)", title="TALR multiplier", yscale="log")
    if running.shape[1] <= 12:
      axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  """Parses the flags, trains, writes ``<out>/<run name>.json`` (and ``.png``), prints a summary.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    The results dictionary of :func:`trquant_examples.training.train`.
  """
  config = parse_args(argv)
  results = train(config)
  os.makedirs(config.out, exist_ok=True)
  name = run_name(config)
  with open(os.path.join(config.out, f"{name}.json"), "w") as f:
    json.dump(results, f)
  if not config.no_plot:
    plot(results, os.path.join(config.out, f"{name}.png"))
  summary = f"{name}: final test accuracy {results['final_test_accuracy']:.4f}"
  if "final_test_accuracy_bn_reestimated" in results:
    summary += f" (BN re-estimated: {results['final_test_accuracy_bn_reestimated']:.4f})"
  if "oscillations" in results:
    summary += f", oscillating weights {results['oscillations']['oscillating_fraction_mean']:.2%}"
    if "frozen_fraction_mean" in results["oscillations"]:
      summary += f", frozen {results['oscillations']['frozen_fraction_mean']:.2%}"
  print(summary + f", {results['train_seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
