"""trquant's implementation; the public API is ``trquant``, ``trquant.nnx``,
``trquant.adaround`` and ``trquant.export``."""
