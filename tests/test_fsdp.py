"""FSDP on 4 fake CPU devices: fsdp=2 and fsdp=4 split the parameters and give one device's losses."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from s3jax.models.autoencoder import LND_DIM, id_dim
from s3jax.training import state as state_lib
from s3jax.training.dva import DVATask

from train_helpers import REPO, tiny_dva_config  # puts the checkout (`configs`) on sys.path

import configs

STEPS = 3
# Same batches and rng on every mesh; only the order of the cross-device reductions differs
# (the tolerance of test_train's four-vs-one-device check).
LOSS_RTOL = 2e-5
# output_blocks.0.0's first conv reads the 64+64 skip concat: 3*3*128*64 >= 2**16 elements.
BIG = ("unet", "output_blocks_0_0", "in_layers_2", "kernel")
# input_blocks.1.0's first conv: 3*3*64*64, under param_sharding's size threshold.
SMALL = ("unet", "input_blocks_1_0", "in_layers_2", "kernel")


def tiny_step_config(workdir, **model):
  """The tiny DVA of these tests: 16 px, one level, no attention, dropout 0.1.

  The DVA train step is the costly compile here (~40 s of CPU per mesh on a 2-core machine,
  twice that for test_train's two levels). test_precision's f32 run is this module's
  one-device program, so the persistent compilation cache compiles it once per session.
  """
  config = tiny_dva_config(workdir, total_steps=STEPS)
  config.model.unet.update(
      dict(image_size=16, channel_mult=(2,), attention_resolutions=(), dropout=0.1)
  )
  config.data.image_size = 16
  config.model.update(model)
  return config


def synthetic_batches(config, steps, seed=0):
  """Fixed synthetic batches of input_pipeline's shapes."""
  rng = np.random.default_rng(seed)
  b, k, s = config.data.batch_size, config.data.frames_per_item, config.data.image_size
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  return [
      dict(
          image=f32(rng.uniform(-1, 1, (b, k, s, s, 3))),
          mask=f32(rng.uniform(size=(b, k, s, s, 1)) > 0.3),
          z_id=f32(rng.standard_normal((b, k, id_dim(config.model)))),
          z_lnd=f32(rng.uniform(size=(b, k, LND_DIM))),
      )
      for _ in range(steps)
  ]


def train_synthetic(config, mesh, steps=STEPS):
  """`steps` of DVATask's train step, compiled once, on `synthetic_batches`.

  No data pipeline, checkpoints or TensorBoard: only the sharded init and step are exercised.
  Returns (task, final state, [per-step metrics as floats], the compiled step, the state
  after the first step on the host).
  """
  task = DVATask(config, mesh, config.data.data_dir, data_iterator=iter([]))
  state = task.init_state()
  batches = [task.global_batch(b) for b in synthetic_batches(config, steps)]
  step = task.train_step.lower(state, batches[0]).compile()
  history, first = [], None
  for batch in batches:
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
    first = jax.device_get(state) if first is None else first  # before the next step donates it
  return task, state, history, step, first


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _spec(sharding):
  return [None if a is None else str(a) for a in sharding.spec]


def _bytes_per_device(tree):
  """Largest number of bytes any device holds of `tree`'s arrays (their addressable shards)."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def _expected_bytes_per_device(tree, fsdp):
  """The same from the specs alone: a leaf split on 'fsdp' holds 1/fsdp of its bytes."""
  return sum(
      x.nbytes // (fsdp if "fsdp" in _spec(x.sharding) else 1) for x in jax.tree.leaves(tree)
  )


def _abstract_bytes_per_device(abstract_tree):
  """Bytes per device of ShapeDtypeStructs with shardings (nothing is allocated)."""
  return sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
      for x in jax.tree.leaves(abstract_tree)
  )


def _abstract_bytes(abstract_tree):
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def fsdp_main(workdir):
  """The 4-device half, run in a subprocess: prints `RESULT <json>`."""
  runs = {}
  for fsdp in (2, 4):
    config = tiny_step_config(f"{workdir}/fsdp{fsdp}")
    config.mesh.fsdp = fsdp
    mesh = state_lib.make_mesh(config.mesh)
    task, state, history, _, _ = train_synthetic(config, mesh)
    big = _get(state.params, BIG)
    probe = lambda shape: _spec(  # noqa: E731
        state_lib.param_sharding(mesh, jax.ShapeDtypeStruct(shape, jnp.float32))
    )
    # The paper's model on the same mesh, abstractly (nothing compiled or allocated).
    paper = DVATask(configs.get("voxceleb"), mesh, workdir, data_iterator=iter([]))
    runs[fsdp] = dict(
        devices=jax.device_count(),
        mesh=dict(mesh.shape),
        big_shape=list(big.shape),
        big_spec=_spec(big.sharding),
        abstract_big_spec=_spec(_get(task.abstract_state.params, BIG).sharding),
        big_shards=sorted({str(tuple(s.data.shape)) for s in big.addressable_shards}),
        small_spec=_spec(_get(state.params, SMALL).sharding),
        probes={str(s): probe(s) for s in [(3, 3, 63, 256), (3, 3, 255, 129)]},
        losses=[m["loss"] for m in history],
        param_bytes=sum(x.nbytes for x in jax.tree.leaves(state.params)),
        param_bytes_per_device=_bytes_per_device(state.params),
        expected_param_bytes_per_device=_expected_bytes_per_device(state.params, fsdp),
        state_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
        state_bytes_per_device=_bytes_per_device(state),
        paper_param_bytes=_abstract_bytes(paper.abstract_state.params),
        paper_param_bytes_per_device=_abstract_bytes_per_device(paper.abstract_state.params),
        paper_state_bytes=_abstract_bytes(paper.abstract_state),
        paper_state_bytes_per_device=_abstract_bytes_per_device(paper.abstract_state),
    )
  print("RESULT " + json.dumps(runs), flush=True)


@pytest.mark.slow
def test_fsdp2_and_fsdp4_shard_params_and_match_one_device(tmp_path):
  # XLA_FLAGS must be set before jax initialises its backend, hence a fresh interpreter.
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
  )
  code = "import sys, test_fsdp; test_fsdp.fsdp_main(sys.argv[1])"
  proc = subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path / "fsdp")],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    # Meanwhile the one-device reference compiles and runs here (the compiles overlap).
    config = tiny_step_config(tmp_path / "single")
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), state_lib.BATCH_AXES)
    _, _, history, _, _ = train_synthetic(config, one)
    single = [m["loss"] for m in history]
    out, err = proc.communicate(timeout=1500)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  runs = {int(k): v for k, v in json.loads(line[len("RESULT ") :]).items()}
  assert len(single) == STEPS and np.all(np.isfinite(single))

  for fsdp, res in runs.items():
    print(
        f"fsdp={fsdp}: params {res['param_bytes']} B, {res['param_bytes_per_device']} B per"
        f" device; train state {res['state_bytes']} B, {res['state_bytes_per_device']} B per"
        f" device; paper params {res['paper_param_bytes']} B,"
        f" {res['paper_param_bytes_per_device']} B per device; paper train state"
        f" {res['paper_state_bytes']} B, {res['paper_state_bytes_per_device']} B per device;"
        f" losses {res['losses']} vs one device {single}"
    )
    assert res["devices"] == 4 and res["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp}
    # The big kernel is split on its largest axis divisible by fsdp, the 128 input channels,
    # and each device holds 1/fsdp of it after init and the updates.
    assert res["big_shape"] == [3, 3, 128, 64]
    assert res["abstract_big_spec"] == res["big_spec"] == [None, None, "fsdp", None]
    assert res["big_shards"] == [f"(3, 3, {128 // fsdp}, 64)"]
    assert res["small_spec"] == []  # replicated
    # The largest axis wins when it divides; with no divisible axis the tensor stays whole.
    probes = {"(3, 3, 63, 256)": [None, None, None, "fsdp"], "(3, 3, 255, 129)": []}
    assert res["probes"] == probes
    # What the devices really hold is what the specs say, and less than a full copy.
    assert res["param_bytes_per_device"] == res["expected_param_bytes_per_device"]
    assert res["param_bytes_per_device"] < res["param_bytes"]
    assert res["state_bytes_per_device"] < res["state_bytes"]
    # At the paper's size nearly every byte is in a split tensor (measured: 1/fsdp + 0.7%).
    for what in ("param", "state"):
      total, per_device = res[f"paper_{what}_bytes"], res[f"paper_{what}_bytes_per_device"]
      assert total / fsdp <= per_device < 1.02 * total / fsdp, what
    np.testing.assert_allclose(res["losses"], single, rtol=LOSS_RTOL)
  # fsdp=4 holds less per device than fsdp=2.
  assert runs[4]["param_bytes_per_device"] < runs[2]["param_bytes_per_device"]
