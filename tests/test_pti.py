"""STIT's Pivotal Tuning on the tiny golden generator: defaults, loss falls, padding, meshes."""

import os
import pathlib

import jax
import numpy as np
import pytest

from s3jax import metrics
from s3jax.gan import pti
from s3jax.models import stylegan2
from s3jax.parity import stitching as parity
from train_helpers import start_with_fake_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 3
LR = 3e-4  # 10x STIT's, so that 3 epochs show a clear fall


@pytest.fixture(scope="module")
def stit_dir(golden_dir):
  path = golden_dir.parent / "stit"
  if not path.is_dir():
    pytest.skip(f"STIT golden vectors not found at {path}")
  try:
    metrics.lpips_weights_path("alex")
  except metrics.LpipsWeightsError as e:
    pytest.skip(str(e))
  return path


def frames(stit_dir, n=4):
  """n pivots and target frames that the generator does not reproduce exactly (NHWC)."""
  config, variables = parity.load_golden_generator(stit_dir)
  with np.load(stit_dir / "latent_edit_io.npz") as z:
    w = z["w_pivots"].astype(np.float32)
  w = np.concatenate([w, w[:1] + 0.2])[:n]
  r = np.random.default_rng(0)
  other = w + 0.3 * r.standard_normal(w.shape).astype(np.float32)
  # The random-weight generator's images have std ~1.6; bring the targets into [-1, 1].
  targets = np.clip(np.asarray(stylegan2.synthesis(config, variables, other)) / 3, -1, 1)
  return config, variables, w, targets


@pytest.fixture(scope="module")
def tuner2(stit_dir):
  config, variables, _, _ = frames(stit_dir)
  return pti.PivotalTuner(config, variables, epochs=EPOCHS, lr=LR, frames_per_step=2)


def test_stit_defaults():
  # rotemtzaban/STIT train.py's click defaults (they override configs/hyperparameters.py).
  assert pti.PTI_LR == 3e-5
  assert pti.PTI_EPOCHS == 300
  assert pti.PTI_L2_LAMBDA == 10.0
  assert pti.PTI_LPIPS_LAMBDA == 1.0
  assert (pti.PTI_ADAM_B1, pti.PTI_ADAM_B2) == (0.9, 0.999)
  assert pti.LPIPS_NET == "alex"
  assert pti.FRAMES_PER_STEP == 1


def test_loss_falls_one_frame_per_step(stit_dir):
  config, variables, w, targets = frames(stit_dir)
  res = pti.pivotal_tuning(config, variables, w, targets, epochs=EPOCHS, lr=LR, progress=False)
  loss = res["losses"]["loss"]
  assert loss.shape == (EPOCHS, 4)
  assert np.all(np.isfinite(loss))
  assert np.all(loss[-1] < loss[0])  # every frame
  l2, lp = res["losses"]["l2"], res["losses"]["lpips"]
  np.testing.assert_allclose(loss, pti.PTI_L2_LAMBDA * l2 + lp, rtol=1e-5)
  # Only synthesis moves; mapping and buffers come back as given.
  tuned = res["variables"]
  same = jax.tree.map(np.array_equal, tuned["params"]["mapping"], variables["params"]["mapping"])
  assert all(jax.tree.leaves(same))
  assert tuned["buffers"] is variables["buffers"]
  moved = jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != b)),
      tuned["params"]["synthesis"],
      variables["params"]["synthesis"],
  )
  assert all(jax.tree.leaves(moved))
  # The tuned generator reproduces the targets better than the original.
  before = np.asarray(stylegan2.synthesis(config, variables, w, fused_modconv=False))
  after = np.asarray(stylegan2.synthesis(config, tuned, w, fused_modconv=False))
  assert np.mean((after - targets) ** 2) < np.mean((before - targets) ** 2)


def test_padded_minibatch_has_no_weight(stit_dir, tuner2):
  # 3 frames in minibatches of 2: [f0 f1] [f2 pad]. The pad has weight 0, so this equals
  # tuning [f0 f1 f2 f2], whose second minibatch is the mean of f2's loss with itself.
  _, _, w, targets = frames(stit_dir)
  padded = tuner2.tune(w[:3], targets[:3], progress=False)
  doubled = tuner2.tune(w[[0, 1, 2, 2]], targets[[0, 1, 2, 2]], progress=False)
  assert padded["losses"]["loss"].shape == (EPOCHS, 3)
  a = jax.tree.leaves(padded["variables"]["params"]["synthesis"])
  b = jax.tree.leaves(doubled["variables"]["params"]["synthesis"])
  assert all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))
  np.testing.assert_allclose(padded["losses"]["loss"], doubled["losses"]["loss"][:, :3], rtol=1e-6)


def two_device_main(out_path):
  """With 2 fake CPU devices: 4 frames, 2 per step, each step's minibatch split 2 ways."""
  stit = pathlib.Path(os.environ["S3JAX_STIT_DIR"])
  config, variables, w, targets = frames(stit)
  tuner = pti.PivotalTuner(config, variables, epochs=EPOCHS, lr=LR, frames_per_step=2)
  res = tuner.tune(w, targets, progress=False)
  np.savez(
      out_path,
      devices=tuner.mesh.size,
      loss=res["losses"]["loss"],
      **{
          f"p{i}": np.asarray(x)
          for i, x in enumerate(jax.tree.leaves(res["variables"]["params"]["synthesis"]))
      },
  )


@pytest.mark.slow
def test_two_device_mesh_matches_one_device(stit_dir, tuner2, tmp_path):
  out = tmp_path / "two_devices.npz"
  proc = start_with_fake_devices("test_pti", "two_device_main", out, S3JAX_STIT_DIR=stit_dir)
  try:
    _, _, w, targets = frames(stit_dir)
    one = tuner2.tune(w, targets, progress=False)
    _, err = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  leaves = jax.tree.leaves(one["variables"]["params"]["synthesis"])
  with np.load(out) as z:
    assert int(z["devices"]) == 2
    np.testing.assert_allclose(z["loss"], one["losses"]["loss"], rtol=1e-5)
    for i, x in enumerate(leaves):
      np.testing.assert_allclose(z[f"p{i}"], x, rtol=1e-4, atol=1e-6)
