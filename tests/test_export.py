"""Integer export: packing, exact round trips to the fake-quantized weights, NNX models."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import trquant
from trquant.export import (IntegerTensor, from_integer, load_integer, nbytes, read_integer,
                            save_integer, to_integer)
from trquant.nnx import QuantLinear

GRIDS = [(bits, signed, narrow) for bits in (1, 2, 3, 4, 5, 8, 9, 16) for signed in (True, False)
         for narrow in (False, True)
         if not (narrow and (not signed or bits == 1))]


def _weights(shape, seed=0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * 0.3).astype(dtype)


@pytest.mark.parametrize("bits,signed,narrow", GRIDS)
def test_round_trip_equals_fake_quant(bits, signed, narrow):
  w = _weights((7, 13))  # 91 codes: not a multiple of any packing factor
  scale = float(trquant.init_scale(w, bits=bits, method="absmax", signed=signed))
  exported = to_integer({"w": w}, {"w": scale}, bits=bits, signed=signed, narrow=narrow)["w"]
  np.testing.assert_array_equal(
      exported.codes, trquant.quantize(w, scale, bits=bits, signed=signed, narrow=narrow))
  np.testing.assert_array_equal(
      from_integer(exported), trquant.fake_quant(w, scale, bits=bits, signed=signed, narrow=narrow))


@pytest.mark.parametrize("bits,codes_per_byte", [(1, 8), (2, 4), (4, 2), (3, 1), (8, 1)])
def test_packed_sizes(bits, codes_per_byte):
  w = _weights((64, 100))
  exported = to_integer(w, 0.1, bits=bits)
  assert exported.data.nbytes == w.size // codes_per_byte
  assert exported.data.dtype == (jnp.uint8 if codes_per_byte > 1 else jnp.int8)
  # Against the float32 weights: 32 / bits times smaller when packed, 4x as int8.
  assert w.nbytes / exported.data.nbytes == 4 * codes_per_byte


def test_wide_codes_use_16_bits():
  exported = to_integer(_weights((10,)), 1e-4, bits=12)
  assert exported.data.dtype == jnp.int16
  assert to_integer(_weights((10,)), 1e-4, bits=12, signed=False).data.dtype == jnp.uint16


# Sizes of 3, 9, 15, 24 and 111 codes: every remainder of the 8, 4 and 2 codes per byte
# (each new shape compiles the export again, so they are drawn from a few).
@settings(max_examples=8, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 6]), size=st.sampled_from([1, 3, 5, 8, 37]),
       seed=st.integers(0, 2**16), per_channel=st.booleans())
def test_round_trip_property(bits, size, seed, per_channel):
  w = _weights((size, 3), seed)
  scale = trquant.init_scale(w, bits=bits, method="std3", axis=-1 if per_channel else None)
  exported = to_integer(w, scale, bits=bits)
  lo, hi = trquant.quant_range(bits)
  assert lo <= int(exported.codes.min()) and int(exported.codes.max()) <= hi
  np.testing.assert_array_equal(from_integer(exported), trquant.fake_quant(w, scale, bits=bits))


def test_bfloat16_weights_round_trip_in_bfloat16():
  w = _weights((16, 8), dtype=jnp.bfloat16)
  exported = to_integer(w, jnp.float32(0.05), bits=4)
  restored = from_integer(exported)
  assert restored.dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored, trquant.fake_quant(w, jnp.float32(0.05), bits=4))


def test_tree_with_float_leaves_and_prefix_scales():
  params = {"dense": {"kernel": _weights((4, 5)), "bias": jnp.arange(5.0)},
            "norm": {"scale": jnp.ones(5)}}
  scales = {"dense": {"kernel": 0.1, "bias": None}, "norm": None}
  exported = to_integer(params, scales, bits={"dense": {"kernel": 3, "bias": None}, "norm": None})
  assert isinstance(exported["dense"]["kernel"], IntegerTensor)
  assert exported["dense"]["kernel"].bits == 3
  assert exported["norm"]["scale"] is params["norm"]["scale"]
  restored = from_integer(exported)
  np.testing.assert_array_equal(restored["dense"]["bias"], params["dense"]["bias"])
  assert nbytes(exported) == 20 + 4 + 5 * 4 + 5 * 4  # int8 codes, one f32 scale, two f32 vectors


def test_jit_without_retracing():
  traces = []

  @jax.jit
  def restore(exported):
    traces.append(1)
    return from_integer(exported)

  for seed in range(3):
    restore(to_integer(_weights((9, 4), seed), 0.1, bits=2))
  assert len(traces) == 1
  exported = jax.jit(lambda w: to_integer(w, 0.1, bits=2))(_weights((9, 4)))
  np.testing.assert_array_equal(from_integer(exported), trquant.fake_quant(_weights((9, 4)), 0.1,
                                                                           bits=2))


def test_nnx_model_round_trip():
  model = nnx.Sequential(
      QuantLinear(12, 16, weight_bits=8, rngs=nnx.Rngs(0)), nnx.relu,
      QuantLinear(16, 16, weight_bits=2, per_channel=True, act_bits=4, rngs=nnx.Rngs(1)),
      nnx.relu, QuantLinear(16, 3, weight_bits=None, rngs=nnx.Rngs(2)))
  exported = to_integer(model)
  assert exported["layers"][2]["kernel"].bits == 2
  assert exported["layers"][2]["kernel"].data.size == 16 * 16 // 4
  assert "weight_scale" not in exported["layers"][2]  # carried by the IntegerTensor
  assert not isinstance(exported["layers"][4]["kernel"], IntegerTensor)  # FP layer stays float
  restored = from_integer(exported)
  for index in (0, 2):
    np.testing.assert_array_equal(restored["layers"][index]["kernel"],
                                  model.layers[index].quantized_kernel())
  # Loading the restored weights into the same architecture reproduces the outputs.
  x = jax.random.normal(jax.random.key(3), (5, 12))
  clone = nnx.clone(model)
  clone.layers[0].kernel.set_value(jnp.zeros((12, 16)))
  nnx.update(clone, restored)
  np.testing.assert_array_equal(clone(x), model(x))
  assert clone.layers[2].kernel.bits == 2
  fp_bytes = sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert nbytes(exported) < 0.5 * fp_bytes


def test_bad_inputs():
  w = _weights((4, 4))
  with pytest.raises(ValueError, match="`bits`"):
    to_integer(w, 0.1, bits=0)
  with pytest.raises(ValueError, match="scale"):
    to_integer(w, -0.1, bits=2)
  with pytest.raises(ValueError, match="scales.*required"):
    to_integer({"w": w})
  with pytest.raises(ValueError, match="structure"):
    to_integer({"w": w}, {"v": 0.1}, bits=2)
  with pytest.raises(ValueError, match=r"\['w'\].*floating"):
    to_integer({"w": jnp.ones(3, jnp.int32)}, {"w": 0.1}, bits=2)
  model = nnx.Sequential(QuantLinear(2, 2, weight_bits=2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="pass none of them"):
    to_integer(model, bits=2)


# ---------------------------------------------------------------------------------------
# Loading an export into a model, and files
# ---------------------------------------------------------------------------------------

# A small CNN of trquant layers (per-channel and per-tensor W4, 4-bit inputs, BatchNorm),
# defined as source so that a fresh interpreter can build the same architecture.
_CNN_SOURCE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from flax import nnx
    from trquant.nnx import QuantConv, QuantLinear

    class CNN(nnx.Module):
      def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.conv = QuantConv(1, 8, 3, weight_bits=4, per_channel=True, use_bias=False,
                              rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = QuantLinear(8, 10, weight_bits=4, act_bits=4, rngs=rngs)

      def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))

    def images(seed=0):
      return jax.random.normal(jax.random.key(seed), (6, 8, 8, 1))
""")


def _cnn_namespace():
  namespace = {}
  exec(_CNN_SOURCE, namespace)
  return namespace


def _trained_cnn(namespace):
  """A CNN whose scales, BatchNorm statistics and activation scale are not the init ones."""
  model = namespace["CNN"](0)
  trquant.nnx.calibrate_activations(model, namespace["images"](1))  # BN statistics move too
  model.conv.weight_scale.set_value(model.conv.weight_scale.get_value() * 1.6)
  model.eval()
  return model


def test_load_integer_restores_kernels_and_scales_exactly():
  namespace = _cnn_namespace()
  model, x = _trained_cnn(namespace), namespace["images"]()
  exported = to_integer(model)
  fresh = namespace["CNN"](7)  # other kernels, scales and statistics
  fresh.eval()
  # The recipe from_integer's docstring used to give keeps the fresh model's scales.
  stale = nnx.clone(fresh)
  nnx.update(stale, from_integer(exported))
  assert float(jnp.max(jnp.abs(stale(x) - model(x)))) > 1e-3
  loaded = load_integer(fresh, exported)
  assert ("conv", "kernel") in loaded and ("bn", "mean") in loaded
  np.testing.assert_array_equal(fresh(x), model(x))
  for name in ("conv", "head"):
    np.testing.assert_array_equal(getattr(fresh, name).weight_scale.get_value(),
                                  getattr(model, name).weight_scale.get_value())
    np.testing.assert_array_equal(getattr(fresh, name).quantized_kernel(),
                                  getattr(model, name).quantized_kernel())
  assert fresh.conv.kernel.bits == 4  # values only: the metadata stays


def test_save_and_read_integer_round_trip(tmp_path):
  w = _weights((7, 5))
  tree = {"dense": {"kernel": to_integer(w, trquant.init_scale(w, bits=2, axis=-1), bits=2),
                    "bias": jnp.arange(5.0)},
          "layers": {3: [to_integer(_weights((6,), dtype=jnp.bfloat16), jnp.float32(0.1), bits=5),
                         None]},
          "pair": (jnp.ones(2, jnp.bfloat16), np.int8(3))}
  save_integer(tmp_path / "weights", tree)
  assert os.path.exists(tmp_path / "weights")  # written where asked, no suffix added
  restored = read_integer(tmp_path / "weights")
  assert jax.tree.structure(restored, is_leaf=lambda x: isinstance(x, IntegerTensor)) == \
      jax.tree.structure(tree, is_leaf=lambda x: isinstance(x, IntegerTensor))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert got.dtype == jnp.asarray(want).dtype
    np.testing.assert_array_equal(got, want)
  assert restored["layers"][3][0].bits == 5 and restored["layers"][3][0].dtype == "bfloat16"
  np.testing.assert_array_equal(from_integer(restored)["layers"][3][0],
                                from_integer(tree)["layers"][3][0])
  single = to_integer(w, 0.1, bits=4)  # a lone tensor is a tree too
  save_integer(tmp_path / "single.npz", single)
  np.testing.assert_array_equal(read_integer(tmp_path / "single.npz").codes, single.codes)
  np.savez(tmp_path / "other.npz", w=np.ones(2))
  with pytest.raises(ValueError, match="not written by trquant.export.save_integer"):
    read_integer(tmp_path / "other.npz")
  with pytest.raises(ValueError, match="cannot save a"):
    save_integer(tmp_path / "bad", {"w": object()})


@pytest.mark.integration
def test_load_integer_from_a_file_in_a_new_process(tmp_path):
  namespace = _cnn_namespace()
  model = _trained_cnn(namespace)
  save_integer(tmp_path / "cnn_w4.npz", to_integer(model))
  np.save(tmp_path / "logits.npy", np.asarray(model(namespace["images"]())))
  files = {name: str(tmp_path / name) for name in ("cnn_w4.npz", "logits.npy")}
  script = _CNN_SOURCE + textwrap.dedent(f"""
      import numpy as np, trquant
      model = CNN(123)  # a fresh model: its own random kernels and scales
      model.eval()
      trquant.export.load_integer(model, trquant.export.read_integer({files["cnn_w4.npz"]!r}))
      np.testing.assert_array_equal(model(images()), np.load({files["logits.npy"]!r}))
      print("identical")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip() == "identical"


def test_load_integer_mismatches_fail_clearly():
  model = nnx.Sequential(QuantLinear(6, 4, weight_bits=4, per_channel=True, rngs=nnx.Rngs(0)))
  exported = to_integer(model)
  with pytest.raises(ValueError, match="bits=4.*bits=2.*bit widths"):
    load_integer(nnx.Sequential(QuantLinear(6, 4, weight_bits=2, per_channel=True,
                                            rngs=nnx.Rngs(0))), exported)
  with pytest.raises(ValueError, match="weight_scale.*per-channel vs per-tensor"):
    load_integer(nnx.Sequential(QuantLinear(6, 4, weight_bits=4, rngs=nnx.Rngs(0))), exported)
  with pytest.raises(ValueError, match="kernel: exported shape"):
    load_integer(nnx.Sequential(QuantLinear(6, 5, weight_bits=4, per_channel=True,
                                            rngs=nnx.Rngs(0))), exported)
  with pytest.raises(ValueError, match="layers/0/bias.*export lacks"):
    load_integer(model, {"layers": {0: {"kernel": exported["layers"][0]["kernel"]}}})
  with pytest.raises(ValueError, match="extra.*model lacks"):
    load_integer(model, {**exported, "extra": jnp.ones(2)})
  with pytest.raises(ValueError, match="not an IntegerTensor"):
    load_integer(model, from_integer(exported))
  with pytest.raises(ValueError, match="no quantized weights"):
    load_integer(nnx.Sequential(QuantLinear(6, 4, weight_bits=None, rngs=nnx.Rngs(0))), exported)


def test_to_integer_needs_quantized_trquant_layers():
  with pytest.raises(ValueError, match="no trquant.nnx layer.*QuantLinear in place of nnx.Linear"):
    to_integer(nnx.Sequential(nnx.Linear(4, 2, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match="no quantized weights.*weight_bits"):
    to_integer(nnx.Sequential(QuantLinear(4, 2, weight_bits=None, rngs=nnx.Rngs(0))))


def test_group_scales_export_and_reload_bit_identically(tmp_path):
  def make(seed):
    return nnx.Sequential(
        trquant.nnx.QuantLinear(32, 8, weight_bits=4, group_size=8, rngs=nnx.Rngs(seed)),
        trquant.nnx.QuantEinsum("bd,dk->bk", (8, 6), weight_bits=2, group_size=4,
                                rngs=nnx.Rngs(seed + 1)))
  model, x = make(0), jax.random.normal(jax.random.key(3), (5, 32))
  exported = trquant.export.to_integer(model)
  tensor = exported["layers"][0]["kernel"]
  assert (tensor.group_size, tensor.scale.shape, tensor.data.size) == (8, (4, 8), 32 * 8 // 2)
  np.testing.assert_array_equal(trquant.export.from_integer(exported)["layers"][0]["kernel"],
                                model.layers[0].quantized_kernel())
  path = tmp_path / "grouped.npz"
  trquant.export.save_integer(path, exported)
  fresh = make(7)
  trquant.export.load_integer(fresh, path)
  np.testing.assert_array_equal(fresh(x), model(x))
  per_channel = nnx.Sequential(
      trquant.nnx.QuantLinear(32, 8, weight_bits=4, per_channel=True, rngs=nnx.Rngs(0)),
      trquant.nnx.QuantEinsum("bd,dk->bk", (8, 6), weight_bits=2, group_size=4, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match="group_size=8"):
    trquant.export.load_integer(per_channel, path)


def test_pytree_with_group_scales():
  params = {"w": _weights((32, 6)), "b": jnp.ones(6)}
  scale = trquant.init_scale(params["w"], bits=4, method="mse", group_size=8)
  exported = to_integer(params, {"w": scale, "b": None}, bits=4, group_size=8)
  assert (exported["w"].group_size, exported["w"].data.size) == (8, 32 * 6 // 2)
  np.testing.assert_array_equal(from_integer(exported)["w"],
                                trquant.fake_quant(params["w"], scale, bits=4, group_size=8))
  np.testing.assert_array_equal(exported["w"].codes,
                                trquant.quantize(params["w"], scale, bits=4, group_size=8))
  with pytest.raises(ValueError, match=r"\['w'\].*per-group scales: pass `group_size`"):
    to_integer(params, {"w": scale, "b": None}, bits=4)
  with pytest.raises(ValueError, match="group sizes come from its layers"):
    to_integer(QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)), group_size=8)


def _mixed_model(seed=0):
  """Conv (per-channel 2-bit, binary), grouped 4-bit linear, 8-bit einsum, an FP layer, a BN."""
  rngs = nnx.Rngs(seed)

  class Net(nnx.Module):
    def __init__(self):
      self.conv = trquant.nnx.QuantConv(3, 8, 3, weight_bits=2, per_channel=True, rngs=rngs)
      self.binary = trquant.nnx.QuantConv(8, 8, 3, weight_bits=1, act_bits=2, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.fc = trquant.nnx.QuantLinear(8 * 8 * 8, 32, weight_bits=4, group_size=64, rngs=rngs)
      self.mix = trquant.nnx.QuantEinsum("bd,dk->bk", (32, 16), weight_bits=8, rngs=rngs)
      self.head = trquant.nnx.QuantLinear(16, 4, rngs=rngs)  # full precision

    def __call__(self, x):
      x = nnx.relu(self.bn(self.binary(nnx.relu(self.conv(x)))))
      return self.head(self.mix(nnx.relu(self.fc(x.reshape(x.shape[0], -1)))))

  model = Net()
  images = jax.random.normal(jax.random.key(seed + 1), (4, 8, 8, 3))
  trquant.nnx.calibrate_activations(model, images)
  model.eval()
  return model, images


def test_packed_model_keeps_codes_and_gives_the_fake_quant_logits():
  model, images = _mixed_model()
  packed = trquant.export.packed_model(model)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(forward(packed, images), forward(model, images))
  kernels = {name: getattr(packed, name).kernel for name in ("conv", "binary", "fc", "mix")}
  assert all(isinstance(k, trquant.export.PackedWeight) for k in kernels.values())
  assert kernels["fc"].get_value().data.dtype == np.uint8
  assert kernels["fc"].get_value().data.size == 8 * 8 * 8 * 32 // 2  # two 4-bit codes a byte
  assert kernels["binary"].get_value().data.size == 3 * 3 * 8 * 8 // 8
  assert kernels["mix"].get_value().data.dtype == np.int8  # 8 bits: one code a byte
  assert isinstance(model.fc.kernel, trquant.nnx.QuantWeight)  # the source is untouched
  assert not isinstance(packed.head.kernel, trquant.export.PackedWeight)  # FP stays float
  assert not nnx.state(packed.fc, trquant.nnx.QuantWeight)  # no latent kernel left to train
  # Resident bytes: codes + scales instead of float latent weights + scales.
  quantized = ("conv", "binary", "fc", "mix")
  float_bytes = sum(nbytes(nnx.state(getattr(model, n), nnx.Any(nnx.Param, nnx.Variable)))
                    for n in quantized)
  packed_bytes = sum(nbytes(nnx.state(getattr(packed, n))) for n in quantized)
  assert packed_bytes < 0.2 * float_bytes
  # Exporting the packed copy gives the model's own export, and reloads.
  exported, from_packed = to_integer(model), to_integer(packed)
  assert jax.tree.structure(exported) == jax.tree.structure(from_packed)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(from_packed)):
    np.testing.assert_array_equal(a, b)
  fresh, _ = _mixed_model(seed=5)
  load_integer(fresh, from_packed)  # reloads into a model, which packs to the same codes
  for a, b in zip(jax.tree.leaves(to_integer(trquant.export.packed_model(fresh))),
                  jax.tree.leaves(from_packed)):
    np.testing.assert_array_equal(a, b)


def test_packed_model_in_bfloat16_and_errors():
  layer = trquant.nnx.QuantLinear(64, 8, weight_bits=4, group_size=32, param_dtype=jnp.bfloat16,
                                  dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
  packed = trquant.export.packed_model(layer)
  assert packed(x).dtype == jnp.bfloat16
  np.testing.assert_array_equal(packed(x), layer(x))
  with pytest.raises(ValueError, match="packed_model: the model has no quantized weights"):
    trquant.export.packed_model(QuantLinear(4, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="packed_model: the model has no trquant.nnx layer"):
    trquant.export.packed_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
