"""FSDP on 4 fake CPU devices: the parameter split, and the same losses as on one device."""

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

from train_helpers import REPO, tiny_dva_config

STEPS = 3
# output_blocks.0.0's first conv reads the 64+64 skip concat: 3*3*128*64 >= 2**16 elements.
BIG = ("unet", "output_blocks_0_0", "in_layers_2", "kernel")
# input_blocks.1.0's first conv: 3*3*64*64, under param_sharding's size threshold.
SMALL = ("unet", "input_blocks_1_0", "in_layers_2", "kernel")


def _tiny_config(workdir):
  # One level, no attention: the DVA train step is the costly compile here (~40 s of CPU per
  # mesh on this 2-core machine for this config, twice that for test_train's two levels).
  config = tiny_dva_config(workdir, total_steps=STEPS)
  config.model.unet.update(dict(image_size=16, channel_mult=(2,), attention_resolutions=()))
  config.data.image_size = 16
  return config


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _spec(sharding):
  return [None if a is None else str(a) for a in sharding.spec]


def _train(config, mesh):
  """STEPS of DVATask's jitted train step on fixed synthetic batches (input_pipeline's shapes).

  No data pipeline, checkpoints or TensorBoard: only the sharded init and step are exercised.
  """
  task = DVATask(config, mesh, config.data.data_dir, data_iterator=iter([]))
  state = task.init_state()
  rng = np.random.default_rng(0)
  b, k, s = config.data.batch_size, config.data.frames_per_item, config.data.image_size
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  losses = []
  for _ in range(STEPS):
    batch = dict(
        image=f32(rng.uniform(-1, 1, (b, k, s, s, 3))),
        mask=f32(rng.uniform(size=(b, k, s, s, 1)) > 0.3),
        z_id=f32(rng.standard_normal((b, k, id_dim(config.model)))),
        z_lnd=f32(rng.uniform(size=(b, k, LND_DIM))),
    )
    state, metrics = task.train_step(state, task.global_batch(batch))
    losses.append(float(metrics["loss"]))
  return task, state, losses


def fsdp_main(workdir):
  """The 4-device half, run in a subprocess: prints `RESULT <json>`."""
  config = _tiny_config(workdir)
  config.mesh.fsdp = 2
  mesh = state_lib.make_mesh(config.mesh)
  task, state, losses = _train(config, mesh)
  big = _get(state.params, BIG)
  probe = lambda shape: _spec(  # noqa: E731
      state_lib.param_sharding(mesh, jax.ShapeDtypeStruct(shape, jnp.float32))
  )
  out = dict(
      devices=jax.device_count(),
      mesh=dict(mesh.shape),
      big_shape=list(big.shape),
      big_spec=_spec(big.sharding),
      abstract_big_spec=_spec(_get(task.abstract_state.params, BIG).sharding),
      big_shards=sorted({str(tuple(s.data.shape)) for s in big.addressable_shards}),
      small_spec=_spec(_get(state.params, SMALL).sharding),
      probes={str(s): probe(s) for s in [(3, 3, 63, 256), (3, 3, 255, 129)]},
      losses=losses,
  )
  print("RESULT " + json.dumps(out), flush=True)


@pytest.mark.slow
def test_fsdp2_shards_kernels_and_matches_one_device(tmp_path):
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
    config = _tiny_config(tmp_path / "single")
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), state_lib.BATCH_AXES)
    _, _, single = _train(config, one)
    out, err = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  res = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT ") :])

  assert res["devices"] == 4 and res["mesh"] == {"data": 2, "fsdp": 2}
  # The big kernel is split on its largest axis divisible by fsdp=2, the 128 input channels,
  # and each device holds half of it after init and the updates.
  assert res["big_shape"] == [3, 3, 128, 64]
  assert res["abstract_big_spec"] == res["big_spec"] == [None, None, "fsdp", None]
  assert res["big_shards"] == ["(3, 3, 64, 64)"]
  assert res["small_spec"] == []  # replicated
  # The largest axis wins when it divides; with no divisible axis the tensor stays whole.
  assert res["probes"] == {"(3, 3, 63, 256)": [None, None, None, "fsdp"], "(3, 3, 255, 129)": []}

  assert len(single) == STEPS and np.all(np.isfinite(single))
  # Same batches and rng; only the order of the cross-device reductions differs (the
  # tolerance of test_train's four-vs-one-device check).
  np.testing.assert_allclose(res["losses"], single, rtol=2e-5)
