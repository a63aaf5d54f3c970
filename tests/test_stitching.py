"""STIT's stitching tuning: golden parity (JAX and the PyTorch twin), batching, chunks, meshes."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from s3jax import optim
from s3jax.gan import stitching
from s3jax.models import stylegan2
from s3jax.parity import stitching as parity
from train_helpers import start_with_fake_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5  # as the golden run: the one-frame program is then the parity check's (cached)
# Frames are independent: a batch, a chunk or a device only changes the order of float32
# sums (measured ~1e-6), never the math.
SAME_TOL = 1e-5


@pytest.fixture(scope="module")
def stit_dir(golden_dir):
  path = golden_dir.parent / "stit"
  if not path.is_dir():
    pytest.skip(f"STIT golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def generator(stit_dir):
  return parity.load_golden_generator(stit_dir)


def three_frames(stit_dir, generator):
  """Three frames with different edits, crops and face masks (NHWC)."""
  config, variables = generator
  with np.load(stit_dir / parity.IO_FILE) as z:
    crop, mask = parity.nhwc(z["crop"]), parity.nhwc(z["face_mask_half"])
  with np.load(stit_dir / "latent_edit_io.npz") as z:
    w_pivots, w_edits = z["w_pivots"], z["w_edits"][2]
  inversions = np.asarray(stylegan2.synthesis(config, variables, w_pivots.astype(np.float32)))
  crops = np.clip(0.5 * crop + 0.5 * inversions, -1, 1).astype(np.float32)
  masks = np.concatenate([mask, np.roll(mask, 3, axis=2), np.roll(mask, -2, axis=1)])
  masks[2, :6] = 1.0  # a different shape as well as a shift
  return w_edits, crops, masks


def tune(generator, frames, **kw):
  config, variables = generator
  tuner = stitching.StitchingTuner(config, variables, num_steps=STEPS, return_params=True, **kw)
  return tuner.tune(*frames)


def rel(a, b):
  return parity.rel_err(a, b)


@pytest.fixture(scope="module")
def batched(stit_dir, generator):
  return tune(generator, three_frames(stit_dir, generator), frames_per_chunk=3)


def test_parity_rows_jax(stit_dir):
  rows = parity.check(stit_dir, backend="jax")
  bad = [r for r in rows if not r["ok"]]
  assert not bad, bad
  assert len(rows) == 23


def test_parity_rows_torch_twin(stit_dir):
  pytest.importorskip("torch")
  rows = parity.check(stit_dir, backend="torch")
  bad = [r for r in rows if not r["ok"]]
  assert not bad, bad


def test_torch_twin_generator_matches_golden(stit_dir):
  torch = pytest.importorskip("torch")
  from s3jax.porting.state_dict import load_state_dict
  from s3jax.torch_twin.stylegan2 import from_state_dict

  sd = load_state_dict(stit_dir / parity.GENERATOR_STATE_DICT)
  kwargs = parity.generator_init_kwargs(stit_dir)
  g = from_state_dict(kwargs, sd)
  assert list(g.state_dict()) == list(sd)  # the reference's keys, in its order
  with np.load(stit_dir / parity.GENERATOR_IO) as z:
    io = {k: z[k] for k in z.files}
  with torch.no_grad():
    ws = g.mapping(torch.as_tensor(io["z"]), None, truncation_psi=0.5, truncation_cutoff=4)
    assert rel(ws, io["ws_psi0_5_cutoff4"]) <= 1e-6
    for name, noise_mode in (("img_mix", "const"), ("img_mix_noise_none", "none")):
      img = g.synthesis(torch.as_tensor(io["ws_mix"]), noise_mode=noise_mode)
      assert rel(img, io[name]) <= 1e-6, name
      # Train mode (non-fused modconv) differs by rounding only.
      img = g.synthesis(torch.as_tensor(io["ws_mix"]), noise_mode=noise_mode, fused_modconv=False)
      assert rel(img, io[name]) <= 1e-5, name
    clamped = from_state_dict(kwargs, sd, conv_clamp=float(io["conv_clamp_test"]))
    assert rel(clamped.synthesis(torch.as_tensor(io["ws_mix"])), io["img_mix_clamped"]) <= 1e-6


def test_batch_equals_frames_one_at_a_time(stit_dir, generator, batched):
  # frames_per_chunk=1: three chunks, each one frame tuned alone.
  single = tune(generator, three_frames(stit_dir, generator), frames_per_chunk=1)
  assert batched["images"].shape == (3, 64, 64, 3)
  assert batched["losses"]["loss"].shape == (3, STEPS)
  assert rel(batched["images"], single["images"]) <= SAME_TOL
  for k in ("border", "content", "loss"):
    assert rel(batched["losses"][k][:, 1:], single["losses"][k][:, 1:]) <= SAME_TOL, k
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax_leaves(p)])
  assert rel(flat(batched["params"]), flat(single["params"])) <= SAME_TOL
  # The frames really differ (different masks, edits and crops) and every loss falls.
  assert rel(batched["images"][0], batched["images"][1]) > 0.1
  assert np.all(np.diff(batched["losses"]["loss"], axis=1) < 0)


def test_tuning_moves_synthesis_only(generator, batched):
  config, variables = generator
  moved = jax_leaves(batched["params"])
  start = jax_leaves(variables["params"]["synthesis"])
  assert len(moved) == len(start)
  assert all(m.shape == (3,) + s.shape for m, s in zip(moved, start))
  assert all(np.any(m != s) for m, s in zip(moved, start))


def jax_leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def two_device_main(out_path):
  """In a process with 2 fake CPU devices: 3 frames, chunk 3 -> 4 (padded), split 2 ways."""
  stit = pathlib.Path(os.environ["S3JAX_STIT_DIR"])
  generator = parity.load_golden_generator(stit)
  config, variables = generator
  tuner = stitching.StitchingTuner(
      config, variables, num_steps=STEPS, frames_per_chunk=3, return_params=False
  )
  res = tuner.tune(*three_frames(stit, generator))
  np.savez(
      out_path,
      devices=jax.device_count(),
      chunk=tuner.chunk_size(3),
      images=res["images"],
      loss=res["losses"]["loss"],
  )


@pytest.mark.slow
def test_two_device_mesh_matches_one_device(stit_dir, batched, tmp_path):
  out = tmp_path / "two_devices.npz"
  proc = start_with_fake_devices("test_stitching", "two_device_main", out, S3JAX_STIT_DIR=stit_dir)
  try:
    _, err = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  with np.load(out) as z:
    assert int(z["devices"]) == 2 and int(z["chunk"]) == 4
    assert rel(z["images"], batched["images"]) <= SAME_TOL
    assert rel(z["loss"][:, 1:], batched["losses"]["loss"][:, 1:]) <= SAME_TOL


def test_masks_match_golden_and_twin_definition(stit_dir):
  with np.load(stit_dir / parity.IO_FILE) as z:
    io = {k: z[k] for k in z.files}
  config = json.loads(str(io["config"]))
  mask = parity.nhwc(io["face_mask_half"])
  for prefix in parity.MASK_SETS:
    s = parity.mask_settings(config, prefix)
    full = stitching.calc_masks(mask, image_size=64, **s)
    for name, m in zip(parity.MASKS, full):
      assert rel(parity.nchw(m), io[f"{prefix}{name}_mask"]) <= 1e-6


def test_scaled_outer_dilation():
  # 50 px at 1024 (STIT's default); the golden set's 4 at 64 px; always even.
  assert stitching.scaled_outer_dilation(1024) == 50
  assert stitching.scaled_outer_dilation(64) == 4
  assert all(stitching.scaled_outer_dilation(r) % 2 == 0 for r in (64, 128, 256, 512, 1024))


def test_masked_l2_not_divided_by_channels():
  x = np.ones((1, 4, 4, 3), np.float32)
  m = np.zeros((1, 4, 4, 1), np.float32)
  m[0, 0, 0] = 0.5
  # (0.5 * 1 - 0)^2 * 3 channels / 0.5
  assert float(stitching.masked_l2(x, 0 * x, m)) == pytest.approx(1.5)


def test_torch_adam_matches_torch():
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp
  import optax

  r = np.random.default_rng(0)
  # Small parameters, so that float32 resolves each step's delta to ~1e-7 of it.
  p0 = (1e-4 * r.standard_normal(64)).astype(np.float32)
  grads = [r.standard_normal(64).astype(np.float32) * s for s in (1.0, 1e-3, 1e-7, 5.0)]
  tp = torch.nn.Parameter(torch.as_tensor(p0.copy()))
  topt = torch.optim.Adam([tp], lr=3e-4)
  opt = optim.torch_adam(3e-4)
  p, state = jnp.asarray(p0), opt.init(jnp.asarray(p0))
  for g in grads:
    tp.grad = torch.as_tensor(g)
    topt.step()
    u, state = opt.update(jnp.asarray(g), state)
    p = optax.apply_updates(p, u)
  delta_t, delta_j = tp.detach().numpy() - p0, np.asarray(p) - p0
  # optax.adam's float32 bias correction (1 - 0.999**t) is off by 6.4e-6 here.
  assert rel(delta_j, delta_t) <= 1e-6
