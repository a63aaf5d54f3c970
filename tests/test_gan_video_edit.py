"""`python -m s3jax.edit --backbone stylegan2`: STIT's edit of 8 office-clip frames end to end
with tiny random weights (a 64 px generator with 512-wide W+, paired with the golden tiny e4e),
and its user errors."""

import json
import pathlib

import numpy as np
import pytest

from s3jax import video
from s3jax.models import stylegan2
from s3jax.porting import stylegan2_keys
from train_helpers import REPO, random_generator_state_dict, run_module

STIT = REPO.parent / "shared" / "golden" / "stit"
CLIP = REPO.parent / "shared" / "data" / "office_clip"
E4E = STIT / "e4e_tiny_state_dict.npz"  # stylegan_size 64: 10 styles of 512

pytestmark = pytest.mark.skipif(not E4E.exists(), reason="needs ../shared/golden/stit")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("gan_edit")
  config = stylegan2.GeneratorConfig(
      z_dim=64,
      c_dim=0,
      w_dim=512,
      img_resolution=64,
      img_channels=3,
      mapping_num_layers=2,
      channel_base=1024,
      channel_max=64,
      conv_clamp=256,
  )
  assert config.num_ws == 10
  sd = random_generator_state_dict(config, seed=1)
  generator = stylegan2_keys.save_generator(
      config, stylegan2_keys.variables_from_state_dict(sd, config), d / "G.safetensors"
  )
  row = np.random.default_rng(2).standard_normal(512)
  direction = d / "smile.npy"
  np.save(direction, np.tile(row / np.linalg.norm(row), (18, 1)))  # STIT's (18, 512) layout
  return dict(dir=d, generator=generator, direction=direction)


def gan_edit(inputs, *extra, out="edited.mp4"):
  return run_module(
      "s3jax.edit",
      "--backbone=stylegan2",
      f"--generator={inputs['generator']}",
      f"--encoder={E4E}",
      f"--direction={inputs['direction']}",
      "--strength=4",
      f"--input={CLIP}",
      "--max-frames=8",
      "--pti-epochs=2",
      "--stitch-steps=3",
      "--noprogress",
      f"--out={inputs['dir'] / out}",
      *extra,
  )


@pytest.mark.slow
def test_edit_writes_video_and_report(inputs):
  res = gan_edit(inputs, "--side-by-side")
  assert res.returncode == 0, res.stderr[-3000:]
  out = inputs["dir"] / "edited.mp4"
  frames, _ = video.read_frames(out)
  source, _ = video.read_frames(CLIP, max_frames=8)
  assert frames.shape == source.shape  # the input's size, every frame
  assert (inputs["dir"] / "edited.side_by_side.mp4").exists()
  report = json.loads((inputs["dir"] / "edited.report.json").read_text())
  assert report["backbone"] == "stylegan2" and report["num_ws"] == 10
  assert report["pti_epochs"] == 2 and report["stitch_steps"] == 3
  assert report["num_frames"] == 8 and report["passthrough"] == []
  assert 0.0 < report["identity"]["tl_id"] <= 1.5 and 0.0 < report["identity"]["tg_id"] <= 1.5
  first, last = report["stitching_border_loss_first_last"]
  assert last < first  # stitching tuning pulls each frame's border toward the original
  assert np.isfinite(report["pti_loss_first_last"]).all()
  # The paste changes only the face region: the corners of the frame are the input's.
  diff = np.abs(frames.astype(np.int16) - source.astype(np.int16)).mean(-1)
  assert diff[:, :20, :20].mean() < 2 and diff.mean() > 0.05  # (H.264 moves a pixel by a few)


def test_user_errors(inputs, tmp_path):
  missing = run_module(
      "s3jax.edit",
      "--backbone=stylegan2",
      f"--generator={tmp_path / 'nope.pkl'}",
      f"--encoder={E4E}",
      f"--direction={inputs['direction']}",
      f"--input={CLIP}",
      f"--out={tmp_path / 'o.mp4'}",
  )
  assert missing.returncode == 1 and "--generator" in missing.stderr
  assert "Traceback" not in missing.stderr
  # The golden tiny generator reads W+ of (10, 64); the e4e gives (10, 512): not a pair.
  mismatch = run_module(
      "s3jax.edit",
      "--backbone=stylegan2",
      f"--generator={STIT / 'stylegan2_ada_tiny.pkl'}",
      f"--encoder={E4E}",
      f"--direction={inputs['direction']}",
      f"--input={CLIP}",
      "--max-frames=2",
      f"--out={tmp_path / 'o.mp4'}",
  )
  assert mismatch.returncode == 1 and "not a pair" in mismatch.stderr, mismatch.stderr[-2000:]
  no_direction = run_module(
      "s3jax.edit",
      "--backbone=stylegan2",
      f"--generator={inputs['generator']}",
      f"--encoder={E4E}",
      f"--direction={tmp_path / 'none.npy'}",
      f"--input={CLIP}",
      f"--out={tmp_path / 'o.mp4'}",
  )
  assert no_direction.returncode == 1 and "none.npy" in no_direction.stderr
  assert not (tmp_path / "o.mp4").exists()
