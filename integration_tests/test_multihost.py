"""trquant under JAX's multi-controller runtime: 2 processes x 4 CPU devices against 1 x 8.

``multihost_program.py`` (beside this file) trains a quantized NNX model with
``tr_schedule`` + ``freeze_oscillations`` on a (2, 4) mesh whose first axis spans the
processes (FSDP kernels, per-channel scales split across processes), calibrates,
checkpoints with orbax and resumes, exports, saves and reloads, and runs
round-to-nearest and AdaRound. Run as one process on the same global mesh, it must give
the same codes, TR and oscillation state and frozen fractions exactly, and the same
floats to float-summation tolerance (an all-reduce over two processes adds in another
order than one over eight local devices).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration

PROGRAM = pathlib.Path(__file__).with_name("multihost_program.py")
EXACT = ("weight_scale_fc1", "act_scale_fc1", "tr_measured_transition_rate",
         "tr_running_transition_rate", "tr_talr_multiplier", "frozen_fraction",
         "oscillation_count", "export_nbytes", "codes_fc1", "codes_fc2", "codes_head",
         "rtn_codes_fc1", "adaround_codes_fc2")
CLOSE = ("losses", "kernel_fc1", "kernel_fc2", "kernel_head", "logits", "resumed_loss")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(out, processes: int, axes: str, timeout: int = 240):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(PROGRAM), "--processes", str(processes), "--process-id", str(i),
       "--port", str(port), "--axes", axes, "--out", str(out)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(processes)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      proc.kill()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {i} of {processes} ({axes}):\n{log[-4000:]}"
  return dict(np.load(out / "results.npz")), json.loads((out / "errors.json").read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("one_process"), 1, "auto")


@pytest.mark.parametrize("axes", ["auto", "explicit"])
def test_two_processes_match_one(tmp_path, single_process, axes):
  results, errors = _run(tmp_path, 2, axes)
  reference, _ = single_process
  # The comparison is not vacuous: codes moved, weights oscillated and some were frozen.
  assert np.all(reference["tr_measured_transition_rate"] >= 0)
  assert np.max(reference["tr_running_transition_rate"]) > 0
  assert np.max(reference["frozen_fraction"]) > 0, reference["frozen_fraction"]
  for key in EXACT:
    np.testing.assert_array_equal(results[key], reference[key], err_msg=key)
  for key in CLOSE:
    np.testing.assert_allclose(results[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # What a multi-process user gets wrong is named, with the fix.
  assert "2 processes" in errors["process_local_batch"]
  assert "make_array_from_process_local_data" in errors["process_local_batch"]
  assert "positive and finite" in errors["negative_scale"]
  assert "non-integer values" in errors["weights_as_codes"]
