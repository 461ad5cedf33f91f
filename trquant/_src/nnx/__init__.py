"""Flax NNX layers, model surgery, calibration and the glue to the optax transforms."""
