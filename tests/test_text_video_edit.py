"""`python -m s3jax.edit --method ipfacediff`: IP-FaceDiff's text edit of 8 office-clip frames
end to end with the golden tiny Stable Diffusion (32 px), and its user errors."""

import json

import numpy as np
import pytest

from s3jax import video
from train_helpers import REPO, run_module

SD = REPO.parent / "shared" / "golden" / "ipfacediff"
CLIP = REPO.parent / "shared" / "data" / "office_clip"

pytestmark = pytest.mark.skipif(not (SD / "io.npz").exists(), reason="needs ../shared/golden")


def text_edit(out, *extra):
  return run_module(
      "s3jax.edit",
      "--method=ipfacediff",
      f"--sd={SD}",
      "--prompt=a man with blonde hair",
      "--source-prompt=a man talking",
      f"--input={CLIP}",
      "--max-frames=8",
      # The golden run's schedule: inversion 20 steps saves every edit step of 10.
      "--inversion-steps=20",
      "--steps=10",
      "--tokenflow-batch=4",
      "--noprogress",
      f"--out={out}",
      *extra,
  )


@pytest.mark.slow
def test_edit_writes_video_and_report(tmp_path):
  res = text_edit(tmp_path / "edited.mp4", "--side-by-side")
  assert res.returncode == 0, res.stderr[-3000:]
  frames, _ = video.read_frames(tmp_path / "edited.mp4")
  source, _ = video.read_frames(CLIP, max_frames=8)
  assert frames.shape == source.shape  # the input's size, every frame
  assert (tmp_path / "edited.side_by_side.mp4").exists()
  report = json.loads((tmp_path / "edited.report.json").read_text())
  assert report["method"] == "ipfacediff" and report["resolution"] == 32
  assert report["prompt"] == "a man with blonde hair"
  assert report["n_timesteps"] == 10 and report["n_inversion_steps"] == 20
  assert report["num_frames"] == 8 and report["passthrough"] == []
  assert 0.0 < report["identity"]["tl_id"] <= 1.5 and 0.0 < report["identity"]["tg_id"] <= 1.5
  # The paste changes only the face region: the corners of the frame are the input's.
  diff = np.abs(frames.astype(np.int16) - source.astype(np.int16)).mean(-1)
  assert diff[:, :20, :20].mean() < 2 and diff.mean() > 0.05  # (H.264 moves a pixel by a few)


def test_user_errors(tmp_path):
  missing = text_edit(tmp_path / "o.mp4", f"--sd={tmp_path / 'no_sd'}")
  assert missing.returncode == 1 and "--sd" in missing.stderr
  assert "Traceback" not in missing.stderr
  no_prompt = text_edit(tmp_path / "o.mp4", "--prompt=")
  assert no_prompt.returncode == 1 and "--prompt" in no_prompt.stderr
  broken = tmp_path / "broken_sd"
  broken.mkdir()
  (broken / "unet").mkdir()
  bad = text_edit(tmp_path / "o.mp4", f"--sd={broken}")
  assert bad.returncode == 1 and "cannot load Stable Diffusion" in bad.stderr, bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "o.mp4").exists()


def test_blend_band_scales_with_the_crop_size():
  from s3jax.sd.video_edit import pad_to_multiple, to_uint8_floor

  assert video.blend_band("feather", 256) == video.BLEND_DEFAULTS["feather"]
  assert video.blend_band("feather", 32) == {"dilate": 1.5, "blur": 0.375}
  padded = pad_to_multiple(np.arange(5)[:, None], 4)
  assert padded[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
  assert to_uint8_floor(np.array([0.0, 0.999, 1.0, 1.5])).tolist() == [0, 254, 255, 255]


@pytest.mark.slow
def test_whole_frame_mode_edits_every_pixel_at_the_input_size():
  from s3jax.sd import video_edit

  frames, _ = video.read_frames(CLIP, max_frames=4, resize_width=96)
  settings = video_edit.TextEditSettings(
      n_inversion_steps=20, n_timesteps=10, batch_size=4, whole_frame=True
  )
  editor = video_edit.TextVideoEditor(SD, settings)
  res = editor.edit(list(frames), "a man with blonde hair", "a man talking")
  out = np.stack(res["frames"])
  assert out.shape == frames.shape and out.dtype == np.uint8
  assert res["aligned"] is None and res["crops"].shape == (4, 32, 32, 3)
  # The whole frame comes from the model: the corners change too.
  assert np.abs(out.astype(np.int16) - frames.astype(np.int16))[:, :8, :8].mean() > 1
  assert editor.identity_report(frames, out, None, [0, 1, 2, 3])["tl_id"] is None
