"""A model's weights and BatchNorm statistics as a flat ``.npz`` file keyed by state path."""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

import trquant


def flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """The model's nnx.Param and nnx.BatchStat variables keyed by their "/"-joined state path.

  Args:
    model: an NNX model.

  Returns:
    A dict from path (e.g. ``"conv1/conv/kernel"``) to the variable.
  """
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {"/".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def save_checkpoint(model: nnx.Module, path: str | os.PathLike[str]) -> None:
  """Writes the model's weights and BatchNorm statistics to ``path`` (``np.savez``).

  Args:
    model: an NNX model.
    path: the ``.npz`` file to write.
  """
  arrays = {key: np.asarray(variable.get_value())
            for key, variable in flat_variables(model).items()}
  np.savez(path, **arrays)


def load_checkpoint(model: nnx.Module, path: str | os.PathLike[str]):
  """Loads a checkpoint's matching entries into ``model`` in place.

  A quantized model keeps its own scales and bit widths, so a full-precision
  checkpoint loads into the quantized model of the same architecture
  (:func:`trquant.nnx.load_float_weights`).

  Args:
    model: the NNX model to update.
    path: a ``.npz`` file written by :func:`save_checkpoint`.

  Returns:
    The state paths loaded.

  Raises:
    ValueError: when a saved array's shape differs from the model's, or the file holds
      weights the model lacks.
  """
  with np.load(path) as saved:
    return trquant.nnx.load_float_weights(model, dict(saved))
