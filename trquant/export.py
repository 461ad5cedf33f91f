"""Integer export of quantized weights: packed codes, scales and bit widths.

A trained quantized model is deployed as integer codes plus step sizes, not as
latent float weights. :func:`to_integer` turns each quantized weight into an
:class:`IntegerTensor` (codes packed eight 1-bit, four 2-bit or two 4-bit codes
per byte; one code per ``int8``/``uint8`` byte up to 8 bits, 16-bit above), and
:func:`from_integer` turns it back into exactly the values the forward pass
used (``fake_quant``'s output, bit for bit). :func:`save_integer` and
:func:`read_integer` write and read an exported tree as one ``.npz`` file, and
:func:`load_integer` puts an exported NNX model back into a model of the same
architecture: kernels, weight scales and every other parameter, exactly.

    >>> import jax.numpy as jnp, trquant
    >>> w = jnp.array([[0.31, -0.52], [0.05, 0.9]])
    >>> exported = trquant.export.to_integer({"w": w}, {"w": 0.25}, bits=2)
    >>> exported["w"].data.dtype, exported["w"].data.size   # four codes in one byte
    (dtype('uint8'), 1)
    >>> trquant.export.from_integer(exported)["w"]
    Array([[ 0.25, -0.5 ],
           [ 0.  ,  0.25]], dtype=float32)
"""

from trquant._src.export import IntegerTensor
from trquant._src.export import from_integer
from trquant._src.export import load_integer
from trquant._src.export import nbytes
from trquant._src.export import packed_model
from trquant._src.export import read_integer
from trquant._src.export import save_integer
from trquant._src.export import to_integer
from trquant._src.nnx.layers import PackedWeight

__all__ = [
    "IntegerTensor",
    "PackedWeight",
    "from_integer",
    "load_integer",
    "nbytes",
    "packed_model",
    "read_integer",
    "save_integer",
    "to_integer",
]
