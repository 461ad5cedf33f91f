"""chain(adam, tr_schedule) on an 8-device CPU mesh: data parallel and fully sharded params.

The fully sharded run is repeated with ``freeze_oscillations`` in the chain: the
per-weight oscillation and freezing state must equal the single-device run's
exactly and keep the parameters' shardings.

Each scenario runs in a subprocess (see conftest.run_on_cpu_mesh) and is compared
with the same training run on one device: params to rtol 1e-5, and the per-layer
TR state (measured and running rate, TALR multiplier) to rtol 1e-5 as well. The
measured rates are counts of discrete events, so agreement there means no code
flipped differently under the sharded reductions.
"""

import textwrap

import pytest

# Each test trains in a fresh 8-device interpreter: integration tests.
pytestmark = pytest.mark.integration

_SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import trquant
    assert jax.device_count() == 8, jax.devices()

    SCALES = {"dense": 0.05, "head": 0.05}
    FIELDS = ("measured_transition_rate", "running_transition_rate", "talr_multiplier")

    def codes_fn(params):
      return {name: {"kernel": trquant.quantize(layer["kernel"], SCALES[name], bits=2), "bias": None}
              for name, layer in params.items()}

    def init_params():
      k1, k2 = jax.random.split(jax.random.key(0))
      return {"dense": {"kernel": jax.random.normal(k1, (32, 64)) * 0.1, "bias": jnp.zeros(64)},
              "head": {"kernel": jax.random.normal(k2, (64, 16)) * 0.1, "bias": jnp.zeros(16)}}

    tx = optax.chain(optax.adam(3e-3), trquant.tr_schedule(
        optax.cosine_decay_schedule(2e-2, 40), codes_fn=codes_fn))

    def loss_fn(params, x, y):
      h = jax.nn.relu(x @ trquant.fake_quant(params["dense"]["kernel"], SCALES["dense"], bits=2)
                      + params["dense"]["bias"])
      out = h @ trquant.fake_quant(params["head"]["kernel"], SCALES["head"], bits=2)
      return jnp.mean((out + params["head"]["bias"] - y) ** 2)

    x = jax.random.normal(jax.random.key(1), (64, 32))
    y = jax.random.normal(jax.random.key(2), (64, 16))

    def train(params, put=lambda tree: tree, put_batch=lambda a: a, donate=False, tx=tx):
      def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      params = put(params)
      # init on abstract inputs gives the state's shapes and dtypes without computing it
      abstract = jax.eval_shape(tx.init, params)
      opt_state = tx.init(params)
      assert jax.tree.structure(abstract) == jax.tree.structure(opt_state)
      for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(opt_state)):
        assert a.shape == b.shape and a.dtype == b.dtype
      jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
      for _ in range(20):
        previous = params
        params, opt_state = jitted(params, opt_state, put_batch(x), put_batch(y))
        if donate:
          assert jax.tree.leaves(previous)[0].is_deleted()
      return params, opt_state

    def compare(params, opt_state, reference, fields=FIELDS):
      ref_params, ref_state = reference
      # Params to rtol 1e-5 with an absolute floor of 1e-5: Adam divides by sqrt(v), so a
      # weight whose gradient is near 0 turns a summation-order difference (a sharded
      # layout adds the batch in another order) into a larger relative step; one machine's
      # XLA:CPU moved one of 1024 weights by 6e-6 so under explicit axes. The discrete state
      # (transition counts, frozen masks) below must still agree.
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
      for field in fields:
        np.testing.assert_allclose(optax.tree.get(opt_state, field), optax.tree.get(ref_state, field),
                                   rtol=1e-5, atol=1e-7)
      # The run moved codes, so the comparison of the TR state is not vacuous.
      assert float(np.max(optax.tree.get(ref_state, "measured_transition_rate"))) > 0

    def check_state_shardings(params, opt_state):
      adam_state = opt_state[0][0]
      for moment in (adam_state.mu, adam_state.nu):
        for m, p in zip(jax.tree.leaves(moment), jax.tree.leaves(params)):
          assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
      for leaf in jax.tree.leaves(opt_state[1]):  # per-layer vectors and scalars
        assert leaf.sharding.is_fully_replicated, leaf.sharding
""")

_COMMON = _SETUP + "reference = train(init_params())\n"

_DATA_PARALLEL = _COMMON + textwrap.dedent("""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    by_batch = NamedSharding(mesh, P("data"))
    params, opt_state = train(init_params(), put=lambda t: jax.device_put(t, replicated),
                              put_batch=lambda a: jax.device_put(a, by_batch), donate=True)
    assert params["dense"]["kernel"].sharding.is_fully_replicated
    compare(params, opt_state, reference)
    check_state_shardings(params, opt_state)
    print("DATA PARALLEL OK")
""")

_FULLY_SHARDED = _COMMON + textwrap.dedent("""
    # Auto axes: the compiler all-gathers each kernel for its matmul (explicit axes would
    # ask for an out_sharding on every contraction over the sharded axis).
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def put(params):
      # FSDP: each kernel split along its first axis, biases split too; no full copy anywhere.
      return jax.tree.map(lambda p: jax.device_put(p, NamedSharding(mesh, P("fsdp"))), params)

    params, opt_state = train(init_params(), put=put, donate=True)
    assert params["dense"]["kernel"].sharding.spec == P("fsdp"), params["dense"]["kernel"].sharding
    assert params["dense"]["kernel"].addressable_shards[0].data.shape == (4, 64)
    compare(params, opt_state, reference)
    check_state_shardings(params, opt_state)
    print("FULLY SHARDED OK")
""")


_FULLY_SHARDED_OSCILLATIONS = _COMMON + textwrap.dedent("""
    # chain(adam, tr_schedule, freeze_oscillations): a fast frequency EMA and an early
    # start, so that weights oscillate and freeze within the 20 steps.
    scale_fn = lambda p: {name: {"kernel": SCALES[name], "bias": None} for name in p}
    osc_tx = optax.chain(optax.adam(3e-3), trquant.tr_schedule(
        optax.cosine_decay_schedule(2e-2, 40), codes_fn=codes_fn),
        trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn, total_steps=20, decay=0.7,
                                    warmup_steps=5, threshold=0.05))
    osc_reference = train(init_params(), tx=osc_tx)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    put = lambda params: jax.tree.map(
        lambda p: jax.device_put(p, NamedSharding(mesh, P("fsdp"))), params)
    params, opt_state = train(init_params(), put=put, donate=True, tx=osc_tx)
    compare(params, opt_state, osc_reference,
            fields=FIELDS + ("oscillation_count", "oscillating_fraction", "frozen_fraction"))
    freezer = opt_state[2]
    for name in ("code_ema", "frozen"):
      for state_leaf, ref_leaf in zip(jax.tree.leaves(getattr(freezer, name)),
                                      jax.tree.leaves(getattr(osc_reference[1][2], name))):
        np.testing.assert_array_equal(np.asarray(state_leaf), np.asarray(ref_leaf))
    # Per-weight state follows the parameter's sharding; per-layer vectors are replicated.
    for tree in (freezer.code_ema, freezer.frozen, freezer.tracker.oscillation_frequency,
                 freezer.tracker.last_direction):
      for leaf, param in zip(jax.tree.leaves(tree), [params["dense"]["kernel"], params["head"]["kernel"]]):
        assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), leaf.sharding
    assert freezer.frozen_fraction.sharding.is_fully_replicated
    # The comparison is not vacuous: weights oscillated and some were frozen.
    assert float(np.max(osc_reference[1][2].frozen_fraction)) > 0, osc_reference[1][2].frozen_fraction
    print("FULLY SHARDED OSCILLATIONS OK", np.asarray(freezer.frozen_fraction))
""")


def test_data_parallel_matches_single_device(run_on_cpu_mesh):
  assert "DATA PARALLEL OK" in run_on_cpu_mesh(_DATA_PARALLEL)


def test_fully_sharded_params_match_single_device(run_on_cpu_mesh):
  assert "FULLY SHARDED OK" in run_on_cpu_mesh(_FULLY_SHARDED)


def test_fully_sharded_oscillation_transforms_match_single_device(run_on_cpu_mesh):
  assert "FULLY SHARDED OSCILLATIONS OK" in run_on_cpu_mesh(_FULLY_SHARDED_OSCILLATIONS)


_EXPLICIT_SHARDING = _SETUP + textwrap.dedent("""
    # Explicit mesh axes under jax.set_mesh, the way current NNX model code shards: every
    # kernel split along an axis (a 3-D einsum kernel along its middle one), the batch
    # split over the same axis, biases replicated, and each kernel gathered for its product
    # (FSDP). The TR
    # and oscillation transforms must give the same state as the unsharded run.
    from jax.sharding import AxisType
    SCALES["proj"] = 0.05

    def init_params():
      k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      return {"dense": {"kernel": jax.random.normal(k1, (32, 64)) * 0.1, "bias": jnp.zeros(64)},
              "proj": {"kernel": jax.random.normal(k3, (64, 8, 8)) * 0.1, "bias": jnp.zeros(8)},
              "head": {"kernel": jax.random.normal(k2, (64, 16)) * 0.1, "bias": jnp.zeros(16)}}

    def gather(w):  # FSDP's all-gather, spelled out as explicit axes require
      return jax.sharding.reshard(w, P()) if any(jax.typeof(w).sharding.spec) else w

    def loss_fn(params, x, y):
      kernel = lambda name: gather(trquant.fake_quant(params[name]["kernel"], SCALES[name], bits=2))
      h = jax.nn.relu(x @ kernel("dense") + params["dense"]["bias"])
      h = jnp.einsum("bi,ihd->bhd", h, kernel("proj")) + params["proj"]["bias"]
      out = h.reshape(h.shape[0], -1) @ kernel("head")
      return jnp.mean((out + params["head"]["bias"] - y) ** 2)

    scale_fn = lambda p: {name: {"kernel": SCALES[name], "bias": None} for name in p}
    osc_tx = optax.chain(optax.adam(3e-3), trquant.tr_schedule(
        optax.cosine_decay_schedule(2e-2, 40), codes_fn=codes_fn),
        trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn, total_steps=20, decay=0.7,
                                    warmup_steps=5, threshold=0.05))
    reference = train(init_params(), tx=osc_tx)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    specs = {"dense": P("fsdp"), "proj": P(None, "fsdp"), "head": P("fsdp")}
    with jax.set_mesh(mesh):
      put = lambda params: {name: {"kernel": jax.device_put(layer["kernel"], specs[name]),
                                   "bias": jax.device_put(layer["bias"], P())}
                            for name, layer in params.items()}
      params, opt_state = train(init_params(), put=put, donate=True, tx=osc_tx,
                                put_batch=lambda a: jax.device_put(a, P("fsdp")))
      # The argument checks read sharded codes too: weights given as codes are named.
      weights_fn = lambda p: {name: {"kernel": p[name]["kernel"], "bias": None} for name in p}
      try:
        trquant.tr_schedule(1e-2, codes_fn=weights_fn).init(params)
        raise AssertionError("non-integer codes were accepted")
      except ValueError as error:
        assert "non-integer values" in str(error), error
    assert str(jax.typeof(params["proj"]["kernel"])) == "float32[64,8@fsdp,8]", jax.typeof(params["proj"]["kernel"])
    compare(params, opt_state, reference,
            fields=FIELDS + ("oscillation_count", "oscillating_fraction", "frozen_fraction"))
    freezer, ref_freezer = opt_state[2], reference[1][2]
    for tree, ref_tree in ((freezer.code_ema, ref_freezer.code_ema), (freezer.frozen, ref_freezer.frozen),
                           (freezer.tracker.oscillation_frequency, ref_freezer.tracker.oscillation_frequency),
                           (freezer.tracker.last_direction, ref_freezer.tracker.last_direction)):
      for leaf, ref_leaf, name in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), sorted(specs)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref_leaf))
        kernel = params[name]["kernel"]  # per-weight state keeps the kernel's sharding
        assert jax.typeof(leaf).sharding.spec == jax.typeof(kernel).sharding.spec, (name, jax.typeof(leaf))
    for leaf in jax.tree.leaves(opt_state[1]):  # per-layer vectors and scalars
      assert leaf.sharding.is_fully_replicated, leaf.sharding
    assert float(np.max(ref_freezer.frozen_fraction)) > 0, ref_freezer.frozen_fraction
    print("EXPLICIT SHARDING OK")
""")


def test_explicit_sharding_mesh_matches_single_device(run_on_cpu_mesh):
  """TR scheduling and oscillation freezing on params sharded over explicit mesh axes."""
  assert "EXPLICIT SHARDING OK" in run_on_cpu_mesh(_EXPLICIT_SHARDING)
