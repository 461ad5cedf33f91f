"""One quantized NNX program, run as 2 processes x 4 CPU devices or as 1 process x 8.

``integration_tests/test_multihost.py`` runs it both ways on the same global mesh and
compares what process 0 writes. The program is what a user with several hosts runs:
``jax.distributed.initialize``, a (2, 4) mesh whose first axis spans the processes,
kernels sharded FSDP-style and tensor-parallel (per-channel weight scales split across
processes), global batches, then

1. frozen weight scales from the sharded kernels, activation calibration;
2. QAT with ``tr_schedule`` and ``freeze_oscillations`` under ``optax.partition`` and
   ``nnx.Optimizer``, the weight scales passed to the transforms as arguments;
3. an orbax checkpoint of (model, optimizer), restored into a new model and optimizer,
   and one more step from both;
4. integer export: ``to_integer``, ``nbytes``, ``save_integer`` (written by process 0),
   ``read_integer`` and ``load_integer`` into a new model (shardings restored);
5. post-training quantization of a float copy: ``round_to_nearest`` and
   AdaRound (``reconstruct_model(granularity="layer")``) on global batches;
6. the errors a multi-process user meets: a process-local batch, a negative sharded
   scale, a ``codes_fn`` that returns weights.

    python integration_tests/multihost_program.py --processes 2 --process-id 0 --port 12355 \
        --axes auto --out /tmp/run2 & python ... --process-id 1 ...
    python integration_tests/multihost_program.py --processes 1 --axes auto --out /tmp/run1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

STEPS = 12
BATCH, FEATURES, CLASSES = 64, 16, 4


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--axes", choices=("auto", "explicit"), default="auto")
  parser.add_argument("--out", required=True)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8 // args.processes)
  if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from flax import nnx
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import trquant

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  explicit = args.axes == "explicit"
  axis_type = AxisType.Explicit if explicit else AxisType.Auto
  # Axis "hosts" spans the processes (each process holds one row of the mesh).
  mesh = jax.make_mesh((2, 4), ("hosts", "local"), axis_types=(axis_type, axis_type))
  assert {d.process_index for d in mesh.devices[0]} == {0}, mesh.devices
  batch_spec = P(("hosts", "local"))

  class Net(nnx.Module):
    def __init__(self, bits, rngs, act_bits=None):
      part = lambda spec: nnx.with_partitioning(nnx.initializers.lecun_normal(), spec)
      common = dict(act_bits=act_bits, rngs=rngs)
      # Tensor parallel: output channels (and their scales) split across the processes.
      self.fc1 = trquant.nnx.QuantLinear(FEATURES, 32, weight_bits=bits, per_channel=True,
                                         kernel_init=part(P(None, "hosts")), signed_act=True,
                                         **common)
      # FSDP: the input axis split across the processes.
      self.fc2 = trquant.nnx.QuantLinear(32, 32, weight_bits=bits, per_channel=True,
                                         kernel_init=part(P("hosts", "local")), **common)
      self.head = trquant.nnx.QuantLinear(32, CLASSES, weight_bits=8 if bits else None,
                                          kernel_init=part(P("hosts", None)), **common)

    def __call__(self, x):
      rows = P(("hosts", "local"), None) if explicit else None
      h = jax.nn.relu(self.fc1(x, out_sharding=rows))
      h = jax.nn.relu(self.fc2(h, out_sharding=rows))
      return self.head(h, out_sharding=rows)

  def create(bits, seed, act_bits=None):
    @nnx.jit
    def build():
      model = Net(bits, nnx.Rngs(seed), act_bits)
      state = nnx.state(model)
      nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return model

    with jax.set_mesh(mesh):
      return build()

  def global_batch(values, spec):
    values = np.asarray(values)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])

  start = time.time()

  def stage(name):
    print(f"process {jax.process_index()}: {name} at {time.time() - start:.1f} s", flush=True)

  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(FEATURES, CLASSES))
  xs = rng.normal(size=(STEPS + 4, BATCH, FEATURES)).astype(np.float32)
  ys = np.argmax(xs @ teacher, -1).astype(np.int32)
  batches = [(global_batch(x, batch_spec), global_batch(y, batch_spec)) for x, y in zip(xs, ys)]
  results, errors = {}, {}

  def host(x):
    """A value on this host: the whole array, gathered from every process if need be."""
    from jax.experimental import multihost_utils
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def make_optimizer(model):
    codes_fn = trquant.nnx.codes_fn(model, max_bits=4)
    scale_fn = trquant.nnx.scale_fn(model, max_bits=4)
    quant = optax.chain(
        optax.adam(2e-2),
        trquant.tr_schedule(optax.cosine_decay_schedule(2e-2, STEPS), codes_fn=codes_fn),
        trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn, total_steps=STEPS,
                                    decay=0.7, warmup_steps=2, threshold=0.05))
    tx = optax.partition({"quant": quant, "float": optax.adam(1e-2)},
                         trquant.nnx.param_labels(model, max_bits=4))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    # The scales reach the transforms as arguments of the step, never as constants.
    optimizer.update(model, grads, weight_scales=trquant.nnx.weight_scales(model))
    return loss

  with jax.set_mesh(mesh):
    # 1. scales and calibration on global arrays. Training is weight-only: quantized
    # inputs would make trajectories differ between layouts (an all-reduce's summation
    # order moves an input by an ulp, which can flip its code).
    calibrated = create(4, 5, act_bits=8)
    trquant.nnx.calibrate_activations(calibrated, batches[-1][0])
    results["act_scale_fc1"] = host(calibrated.fc1.act_scale.get_value())
    model = create(4, 0)
    trquant.nnx.init_weight_scales(model)
    assert not model.fc1.weight_scale.get_value().is_fully_addressable or args.processes == 1
    results["weight_scale_fc1"] = host(model.fc1.weight_scale.get_value())

    stage("scales")
    # 2. QAT
    optimizer = make_optimizer(model)
    model.train()
    losses = [float(train_step(model, optimizer, x, y)) for x, y in batches[:STEPS - 2]]
    results["losses"] = np.asarray(losses)
    for name in ("fc1", "fc2", "head"):
      results[f"kernel_{name}"] = host(getattr(model, name).kernel.get_value())
    stats = trquant.nnx.transition_stats(optimizer, max_bits=4)
    for field in ("measured_transition_rate", "running_transition_rate", "talr_multiplier"):
      results[f"tr_{field}"] = host(stats[field])
    osc = trquant.nnx.oscillation_stats(optimizer, max_bits=4)
    results["frozen_fraction"] = host(osc["frozen_fraction"])
    results["oscillation_count"] = host(osc["oscillation_count"])

    stage("qat")
    # 3. orbax: save, restore into a new model and optimizer, one more step from both
    directory = out / "checkpoint"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, nnx.to_pure_dict(nnx.state((model, optimizer))), force=True)
    checkpointer.wait_until_finished()
    restored_model = create(4, 1)
    trquant.nnx.init_weight_scales(restored_model)
    restored_optimizer = make_optimizer(restored_model)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            nnx.to_pure_dict(nnx.state((restored_model, restored_optimizer))))
    nnx.update((restored_model, restored_optimizer), checkpointer.restore(directory, abstract))
    x, y = batches[STEPS - 2]
    loss_a, loss_b = float(train_step(model, optimizer, x, y)), float(
        train_step(restored_model, restored_optimizer, x, y))
    assert loss_a == loss_b, (loss_a, loss_b)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored_model))):
      np.testing.assert_array_equal(host(a), host(b))
    results["resumed_loss"] = np.asarray(loss_b)

    stage("orbax")
    # 4. integer export
    model.eval()
    exported = trquant.export.to_integer(model)
    results["export_nbytes"] = np.asarray(trquant.export.nbytes(exported))
    path = out / "model.npz"
    trquant.export.save_integer(path, exported)
    assert path.exists()  # every process sees the file process 0 wrote (one machine here)
    reread = trquant.export.read_integer(path)
    for name in ("fc1", "fc2", "head"):
      results[f"codes_{name}"] = np.asarray(reread[name]["kernel"].codes)
    loaded = create(4, 2)
    trquant.nnx.init_weight_scales(loaded)  # scales sharded like the exported model's
    shardings = [v.sharding for v in jax.tree.leaves(nnx.state(loaded))]
    trquant.export.load_integer(loaded, reread)
    for value, sharding in zip(jax.tree.leaves(nnx.state(loaded)), shardings):
      assert value.sharding.is_equivalent_to(sharding, value.ndim), (value.sharding, sharding)
    assert not loaded.fc1.weight_scale.get_value().sharding.is_fully_replicated
    loaded.eval()
    x = batches[-2][0]
    np.testing.assert_array_equal(host(loaded(x)), host(model(x)))
    results["logits"] = host(model(x))

    stage("export")
    # 5. PTQ of a float model on global batches
    float_model = create(None, 3)
    calibration = [b[0] for b in batches[:2]]
    ruled = trquant.nnx.quantize_model(float_model,
                                       trquant.nnx.QuantRule(weight_bits=4, per_channel=True))
    rtn, _ = trquant.adaround.round_to_nearest(ruled, calibration[0])
    results["rtn_codes_fc1"] = host(rtn.fc1.weight_codes())
    ada, _ = trquant.adaround.reconstruct_model(
        ruled, calibration, granularity="layer", progress=False,
        config=trquant.adaround.AdaRoundConfig(iters=20, batch_size=16), key=jax.random.key(0))
    results["adaround_codes_fc2"] = host(ada.fc2.weight_codes())

    stage("ptq")
    # 6. errors, named
    local_rows = np.asarray(xs[0][:8])
    try:
      trquant.nnx.calibrate_activations(calibrated, local_rows)
      if args.processes > 1:
        raise AssertionError("a process-local batch was accepted")
    except ValueError as error:
      errors["process_local_batch"] = str(error)
    negative = create(4, 4)
    negative.fc1.weight_scale.set_value(-model.fc1.weight_scale.get_value())
    try:
      trquant.export.to_integer(negative)
      raise AssertionError("a negative sharded scale was accepted")
    except ValueError as error:
      errors["negative_scale"] = str(error)
    weights_fn = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p if "kernel" in jax.tree_util.keystr(path) else None, params)
    try:
      trquant.tr_schedule(1e-2, codes_fn=weights_fn).init(
          trquant.nnx.values(nnx.state(model, nnx.Param)))
      raise AssertionError("codes_fn returning weights was accepted")
    except ValueError as error:
      errors["weights_as_codes"] = str(error)

  if jax.process_index() == 0:
    np.savez(out / "results.npz", **{k: np.asarray(v) for k, v in results.items()})
    (out / "errors.json").write_text(json.dumps(errors, indent=1))
  print(f"process {jax.process_index()}: done", flush=True)


if __name__ == "__main__":
  main()
