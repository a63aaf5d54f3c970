"""The residual paste-back (``--blend residual``): frame + feathered (edit - reconstruction).

Synthetic tests call ``editing.residual_paste_back`` on known arrays with a 1:1 quad, where
the warp is an integer shift and the added change can be written down. The editor tests
reuse tests/test_edit.py's tiny 32 px DVA and office-clip fixtures (and, marked slow,
tests/test_edit_official.py's tiny official-path DVA with BiSeNet masks).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from s3jax import edit_job, editing, loading, video

import test_edit
import test_edit_official
from train_helpers import REPO

# The tiny DVA, its classifier and the office clip, as tests/test_edit.py builds them.
tiny_checkpoint = test_edit.tiny_checkpoint
office_frames = test_edit.office_frames
editor = test_edit.editor
STEPS = test_edit.STEPS
# The official path's tiny DVA with random frozen encoders (BiSeNet video masks).
enc_variables = test_edit_official.enc_variables
official_workdir = test_edit_official.workdir  # takes enc_variables

S = 32  # crop size
OFFSET = np.array([30.0, 20.0])  # (x, y) of the crop's top-left pixel in the frame
FRAME_SHAPE = (72, 96, 3)
SMALL = {"dilate": 4.0, "blur": 1.0}  # the support stays inside the crop


def shift_quad(offset=OFFSET, size=S, scale=1.0):
  """A quad (TL, BL, BR, TR) whose crop pixel (i, j) is frame pixel offset + scale*(j, i)."""
  corners = np.array([[0, 0], [0, size], [size, size], [size, 0]], np.float64)
  return corners * scale + offset - 0.5


def disc_mask(radius, size=S, center=(16, 16)):
  yy, xx = np.mgrid[:size, :size]
  return ((xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2).astype(np.uint8)


@pytest.fixture
def synthetic():
  r = np.random.default_rng(0)
  frame = r.integers(40, 216, FRAME_SHAPE).astype(np.uint8)
  recon = r.integers(50, 206, (S, S, 3)).astype(np.uint8)
  yy, xx = np.mgrid[:S, :S]
  delta = np.rint(30 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * [1, -1, 0.5])
  edited = (recon + delta).astype(np.uint8)
  return frame, recon, edited, delta.astype(np.int64)


def test_added_change_is_alpha_times_edit_minus_reconstruction(synthetic):
  frame, recon, edited, delta = synthetic
  mask = disc_mask(7)
  out, alpha, support = editing.residual_paste_back(
      frame, edited, recon, shift_quad(), mask, return_mask=True, **SMALL
  )
  x0, y0 = OFFSET.astype(int)
  window = (slice(y0, y0 + S), slice(x0, x0 + S))
  assert support.any() and not support[window].all() and support[window].sum() == support.sum()
  added = out.astype(np.int64) - frame.astype(np.int64)
  # The warp is an integer shift: the residual lands on the frame as it is in the crop.
  a = alpha[window][..., None]
  np.testing.assert_array_equal(added[window], np.rint(a * delta))
  core = alpha[window] >= 0.99  # deep inside the mask: the whole change (|delta| <= 30)
  assert core.sum() > 20
  np.testing.assert_array_equal(added[window][core], delta[core])
  # Feather instead replaces the face with the decode: the frame's own pixels are gone.
  feather = video.paste_back(frame, edited, shift_quad(), mask, blend="feather", **SMALL)
  assert np.abs(feather[window][core].astype(int) - edited[core]).max() <= 1
  assert np.abs(feather[window][core].astype(int) - frame[window][core]).mean() > 20


def test_outside_the_support_is_untouched_and_clipped_inside(synthetic):
  frame, recon, edited, _ = synthetic
  frame = frame.copy()
  frame[..., 0] = 250  # a bright channel: +delta saturates at 255
  quad = shift_quad(offset=np.array([10.0, 6.0]), scale=1.7)  # a scaled, off-centre warp
  out, alpha, support = editing.residual_paste_back(
      frame, edited, recon, quad, disc_mask(9), return_mask=True
  )
  assert support.any() and not support.all()
  np.testing.assert_array_equal(out[~support], frame[~support])
  assert not alpha[~support].any()
  assert out[..., 0][support].max() == 255 and (out[..., 0][support] < 250).any()
  # The support and alpha are feather's, so both blends share their seam.
  _, alpha_f, support_f = video.paste_back(
      frame, edited, quad, disc_mask(9), blend="feather", return_mask=True
  )
  np.testing.assert_array_equal(support, support_f)
  np.testing.assert_array_equal(alpha, alpha_f)
  # No change at all: the frame comes back bit for bit.
  np.testing.assert_array_equal(
      editing.residual_paste_back(frame, recon, recon, quad, disc_mask(9)), frame
  )
  with pytest.raises(ValueError, match="uint8 of one shape"):
    editing.residual_paste_back(frame, edited[:16], recon, quad, disc_mask(9))


def test_residual_option_validation():
  assert "residual" in editing.BLENDS
  assert editing.resolve_options(blend="residual").blend == "residual"
  with pytest.raises(ValueError, match="blend must be one of"):
    editing.resolve_options(blend="bogus")


@pytest.fixture(scope="module")
def clf(tiny_checkpoint):
  return loading.load_classifier(tiny_checkpoint / "classifier")


def test_strength_zero_returns_the_original_frame(editor, office_frames, clf):
  _, frames = office_frames
  out, report, crops = editor.edit_video(
      frames,
      "Eyeglasses",
      0.0,
      blend="residual",
      classifier=clf,
      compute_metrics=False,
      return_crops=True,
  )
  # edit == reconstruction up to the float rounding of the strength-0 edit of z_id.
  assert np.abs(out.astype(int) - frames.astype(int)).max() <= 1
  code = editor.encode(frames)
  recon = editor.reconstruct(code)
  assert np.abs(crops.astype(int) - recon.astype(int)).max() <= 1
  exact = editor.paste(frames, code, recon, "residual", reconstruction=recon)
  np.testing.assert_array_equal(exact, frames)
  # Feather puts the (tiny random DVA's) reconstruction itself in place of the face.
  feather = editor.paste(frames, code, recon, "feather")
  for j, i in enumerate(code.frame_indices):
    _, _, support = video.paste_back(
        frames[i],
        recon[j],
        code.quads[i],
        code.masks[j],
        blend="feather",
        return_mask=True,
        **editor.blend_params("feather"),
    )
    diff = np.abs(feather[i][support].astype(int) - frames[i][support])
    assert (diff > 1).mean() > 0.5, diff.mean()
  rep = report["residual"]
  assert rep["reconstruction_source"] in ("decoded", "memory", "disk")
  assert report["blend"] == "residual" and report["options"]["blend"] == "residual"


def test_edit_adds_the_change_and_leaves_the_rest(editor, office_frames, clf):
  _, frames = office_frames
  code = editor.encode(frames)
  recon = editor.reconstruct(code)
  crops = editor.decode(code, clf.edit(code.z_id, "Smiling", 2.0))
  assert np.abs(crops.astype(int) - recon.astype(int)).max() > 1
  out = editor.paste(frames, code, crops, "residual")  # reconstruction from the cache
  changed = 0
  for j, i in enumerate(code.frame_indices):
    expect, _, support = editing.residual_paste_back(
        frames[i],
        crops[j],
        recon[j],
        code.quads[i],
        code.masks[j],
        return_mask=True,
        **editor.blend_params("residual"),
    )
    np.testing.assert_array_equal(out[i], expect)
    assert support.any() and not support.all()
    np.testing.assert_array_equal(out[i][~support], frames[i][~support])
    changed += int((out[i] != frames[i]).any(-1).sum())
  assert changed > 0
  # Composited in the crop: the residual is masked there, the frame outside the quad kept.
  out_crop = editor.paste(frames, code, crops, "residual", paste_space="crop")
  assert (out_crop != frames).any()
  np.testing.assert_array_equal(
      editor.paste(frames, code, recon, "residual", paste_space="crop", reconstruction=recon),
      frames,
  )


def test_reconstruction_is_decoded_once_and_cached(editor, office_frames, tiny_checkpoint):
  _, frames = office_frames
  code = editor.encode(frames)
  t = {}
  first, source = editor.reconstruction(code, t)
  assert source in ("decoded", "memory")  # an earlier test may have decoded it
  again, source = editor.reconstruction(code, t)
  assert source == "memory"
  np.testing.assert_array_equal(again, first)
  again[:] = 0  # a copy: the cache keeps its own
  np.testing.assert_array_equal(editor.reconstruct(code), first)
  # A new editor on the same model reads the file written beside the cached encoding.
  fresh = editing.VideoEditor(
      tiny_checkpoint, steps=STEPS, model=(editor.model, editor.params, editor.config)
  )
  t = {}
  from_disk, source = fresh.reconstruction(fresh.encode(frames), t)
  assert source == "disk" and "reconstruction_load" in t and "decode_reconstruction" not in t
  np.testing.assert_array_equal(from_disk, first)


def test_run_edit_reports_the_extra_decode(editor, tiny_checkpoint, office_frames, tmp_path):
  folder, frames = office_frames
  # A fresh editor without a cache: the reconstruction is decoded in this call.
  fresh = editing.VideoEditor(
      tiny_checkpoint,
      steps=STEPS,
      cache=False,
      model=(editor.model, editor.params, editor.config),
  )
  out = tmp_path / "residual.mp4"
  report = edit_job.run_edit(
      tiny_checkpoint,
      str(folder),
      "Smiling",
      1.0,
      str(out),
      blend="residual",
      metrics=False,
      video_editor=fresh,
  )
  rep = json.loads(edit_job.report_path(out).read_text())
  assert rep["blend"] == "residual" == report["blend"]
  assert rep["residual"]["extra_decode"] is True
  assert rep["residual"]["reconstruction_source"] == "decoded"
  assert rep["residual"]["unet_calls_per_frame"] == STEPS
  assert rep["residual"]["decode_reconstruction_s"] > 0
  assert rep["timings_s"]["decode_reconstruction"] > 0
  written, _ = video.read_frames(out)
  assert written.shape == frames.shape


def test_cli_accepts_blend_residual(tmp_path):
  """The flag parses (the run then stops at the missing checkpoint); a bad value does not."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  common = ["--input", str(tmp_path), "--attribute", "Smiling", "--out", str(tmp_path / "x.mp4")]

  def cli(blend):
    return subprocess.run(
        [sys.executable, "-m", "s3jax.edit", "--checkpoint", str(tmp_path / "absent")]
        + common
        + ["--blend", blend],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )

  proc = cli("residual")
  assert proc.returncode == 1, proc.stderr
  assert "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
  proc = cli("bogus")
  assert proc.returncode != 0 and "residual" in proc.stderr  # absl lists the valid values


@pytest.mark.slow
def test_official_path_bisenet_masks(official_workdir, office_clip_dir, tmp_path):
  """The residual blend on the official feature path: BiSeNet video masks, ArcFace z_id."""
  frames, _ = video.read_frames(
      office_clip_dir, max_frames=2, resize_width=test_edit_official.WIDTH
  )
  ed = editing.VideoEditor(official_workdir, steps=STEPS)
  assert ed.face_features == "official"
  clf = loading.load_classifier(official_workdir / "classifier")
  code = ed.encode(frames, cache_dir=tmp_path)  # the edits below come from this cache
  out0, report0 = ed.edit_video(
      frames,
      "Smiling",
      0.0,
      blend="residual",
      classifier=clf,
      compute_metrics=False,
      cache_dir=tmp_path,
  )
  assert report0["residual"]["extra_decode"] is True
  assert np.abs(out0.astype(int) - frames.astype(int)).max() <= 1
  out, report = ed.edit_video(
      frames,
      "Smiling",
      2.0,
      blend="residual",
      classifier=clf,
      compute_metrics=False,
      cache_dir=tmp_path,
  )
  assert report["cache"]["hit"] and report["residual"]["reconstruction_source"] == "memory"
  for j, i in enumerate(code.frame_indices):
    _, _, support = video.paste_back(
        frames[i],
        code.crops[j],
        code.quads[i],
        code.masks[j],
        blend="feather",
        return_mask=True,
        **ed.blend_params("residual"),
    )
    assert support.any() and not support.all()
    np.testing.assert_array_equal(out[i][~support], frames[i][~support])
  assert (out != frames).any()
