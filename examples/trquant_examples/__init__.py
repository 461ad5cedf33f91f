"""The models, datasets and training loop that trquant's examples and benchmarks share.

Not part of the ``trquant`` library: ``import trquant`` loads quantization code only.
This package is installed with it (``pip install -e .`` or ``pip install .``) so that
the examples, the benchmarks and the integration tests import it by name:

* :mod:`trquant_examples.models`: image classifiers of trquant.nnx layers (a small CNN,
  ResNet-20, MobileNetV2) and :func:`~trquant_examples.models.build_model`;
* :mod:`trquant_examples.datasets`: offline loaders (digits, (Fashion-)MNIST IDX files,
  CIFAR pickles), normalization, shuffled mini-batches;
* :mod:`trquant_examples.config`: :class:`~trquant_examples.config.TrainConfig`, one
  quantization-aware training run's validated settings, and its run name;
* :mod:`trquant_examples.optimizers`: the optimizer, LR or TR schedule and oscillation
  transforms a config asks for;
* :mod:`trquant_examples.checkpoints`: a model's weights as a flat ``.npz`` file;
* :mod:`trquant_examples.training`: :func:`~trquant_examples.training.train` (one run,
  returning its results dictionary) and :func:`~trquant_examples.training.evaluate`.

    from trquant_examples import config, training
    results = training.train(config.TrainConfig(model="cnn", dataset="digits", epochs=2))
"""
