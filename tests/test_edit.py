"""End-to-end video editing on the real office clip with a tiny DVA (s3jax.editing, s3jax.edit).

One tiny checkpoint (a freshly initialised 32 px DVA whose zero-initialised convs are
replaced by small random weights, so eps depends on z_face) and one VideoEditor (10 DDIM
steps) are shared by every test through session fixtures.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import skimage.data

from s3jax import diffusion, edit_job, editing, loading, optim, video
from s3jax.models import editor as E
from s3jax.checkpointing import Checkpointer
from s3jax.models.autoencoder import make_dva

from train_helpers import random_s3editor, tiny_edit_config

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
NUM_FRAMES = 5
WIDTH = 384  # 384x216: even, as H.264 yuv420p needs (odd sizes are padded by 1 px)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  cfg = tiny_edit_config()
  workdir = tmp_path_factory.mktemp("tiny_dva")
  model = make_dva(cfg.model)
  state = loading.init_dva_state(model, optim.make_optimizer(cfg.optim), cfg, jax.random.key(0))
  r = np.random.default_rng(0)
  # Random (not zero) output conv so eps, and hence the decode, depends on z_face.
  # The zero-initialised convs (ResBlock out convs and the output conv) get small random
  # weights, so eps -- and hence the decode -- depends on x_t and z_face.
  params = jax.tree.map(
      lambda x: (0.05 * r.standard_normal(x.shape)).astype(np.float32)
      if x.ndim == 4 and not np.asarray(x).any()
      else x,
      state.params,
  )
  params = jax.tree.map(np.asarray, params)
  state = state.replace(params=params, ema_params=params)
  ck = Checkpointer(workdir, async_save=False)
  ck.save(0, state, config=cfg, force=True)  # the config travels with the step
  ck.close()
  # A classifier with two random directions on the 128-d dlib z_id.
  d = 128
  loading.save_classifier(
      workdir / "classifier" / "classifier.npz",
      ["Smiling", "Eyeglasses"],
      r.standard_normal((d, 2)),
      np.zeros(2),
      np.zeros(d),
      np.full(d, 0.09),
      np.array([0.9, 0.8]),
  )
  return workdir


@pytest.fixture(scope="session")
def office_frames(office_clip_dir, tmp_path_factory):
  frames, _ = video.read_frames(office_clip_dir, max_frames=NUM_FRAMES, resize_width=WIDTH)
  out = tmp_path_factory.mktemp("office_small")

  for i, f in enumerate(frames):
    cv2.imwrite(str(out / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  frames, _ = video.read_frames(out)
  return out, frames


@pytest.fixture(scope="session")
def editor(tiny_checkpoint):
  return editing.VideoEditor(tiny_checkpoint, steps=STEPS, chunk=8)


@pytest.fixture(scope="session")
def hard_edit(editor, tiny_checkpoint, office_frames):
  _, frames = office_frames
  clf = loading.load_classifier(tiny_checkpoint / "classifier")
  out, report, crops = editor.edit_video(
      frames, "Smiling", 1.0, blend="hard", classifier=clf, return_crops=True
  )
  return frames, out, report, crops


def test_output_shape_and_edit_changes_face(hard_edit):
  frames, out, report, _ = hard_edit
  assert out.shape == frames.shape and out.dtype == np.uint8
  assert report["num_frames"] == NUM_FRAMES
  assert report["frame_size"] == [frames.shape[2], frames.shape[1]]
  assert report["edited_frames"] == NUM_FRAMES
  assert np.abs(out.astype(int) - frames.astype(int)).sum() > 0


@pytest.mark.parametrize("blend", ["hard", "feather"])
def test_outside_dilated_mask_unchanged(blend, editor, hard_edit, tiny_checkpoint):
  frames, out_hard, _, crops = hard_edit
  code = editor.encode(frames)
  assert code.cache_hit  # the second encode of the clip comes from the cache
  out = out_hard if blend == "hard" else editor.paste(frames, code, crops, blend)
  for j, i in enumerate(code.frame_indices):
    _, _, support = video.paste_back(
        frames[i],
        crops[j],
        code.quads[i],
        code.masks[j],
        blend=blend,
        return_mask=True,
        **editor.blend_params(blend),
    )
    assert support.any() and not support.all()
    np.testing.assert_array_equal(out[i][~support], frames[i][~support])


def test_strength_zero_is_ddim_reconstruction(editor, office_frames, tiny_checkpoint):
  _, frames = office_frames
  clf = loading.load_classifier(tiny_checkpoint / "classifier")
  code = editor.encode(frames)
  recon = editor.reconstruct(code)
  out0, report0, crops0 = editor.edit_video(
      frames, "Eyeglasses", 0.0, classifier=clf, compute_metrics=False, return_crops=True
  )
  assert np.abs(crops0.astype(int) - recon.astype(int)).max() <= 1
  pasted = editor.paste(frames, code, recon, "hard")
  assert np.abs(out0.astype(int) - pasted.astype(int)).max() <= 1
  assert report0["z_id_cosine_to_original"] == pytest.approx(1.0, abs=1e-6)
  # A non-zero strength does change the decoded crops.
  crops1 = editor.decode(code, clf.edit(code.z_id, "Eyeglasses", 2.0))
  assert np.abs(crops1.astype(int) - recon.astype(int)).max() > 1


def test_cli_run_writes_video_and_complete_report(editor, office_frames, tiny_checkpoint, tmp_path):
  folder, frames = office_frames
  out = tmp_path / "edited.mp4"
  png_dir = tmp_path / "png"
  report = edit_job.run_edit(
      tiny_checkpoint,
      str(folder),
      "Smiling",
      0.5,
      str(out),
      steps=STEPS,
      blend="feather",
      side_by_side=True,
      png_dir=str(png_dir),
      video_editor=editor,
  )
  written, fps = video.read_frames(out)
  assert written.shape == frames.shape
  assert fps == pytest.approx(video.DEFAULT_FOLDER_FPS, rel=1e-3)
  assert (tmp_path / "edited.side_by_side.mp4").exists()
  assert len(list(png_dir.glob("*.png"))) == NUM_FRAMES
  rpath = edit_job.report_path(out)
  assert rpath.exists() and rpath == tmp_path / "edited.report.json"
  rep = json.loads(rpath.read_text())
  for key in (
      "num_frames",
      "frame_size",
      "fps",
      "attribute",
      "strength",
      "steps",
      "blend",
      "frames_without_face",
      "interpolated",
      "passthrough",
      "cache",
      "timings_s",
      "identity",
      "input",
      "output",
      "checkpoint",
      "model_hash",
  ):
    assert key in rep, key
  for stage in ("read", "align", "features", "invert", "decode", "paste", "write", "total"):
    assert (
        stage in rep["timings_s"]
        or rep["cache"]["hit"]
        and stage in ("align", "features", "invert")
    ), stage
  # The streamed edit caches under the in-memory encoding's key (<key>.stream/).
  assert rep["cache"]["key"] == editor.encode(frames).key
  assert rep["identity"]["tl_id"] > 0 and rep["identity"]["tg_id"] > 0
  assert rep["frames_without_face"] == [] and rep["passthrough"] == []


def test_unknown_attribute_lists_valid(tiny_checkpoint, office_frames, tmp_path):
  folder, _ = office_frames
  with pytest.raises(edit_job.EditError, match="valid attributes: Smiling, Eyeglasses"):
    edit_job.run_edit(tiny_checkpoint, str(folder), "Bald", 1.0, str(tmp_path / "x.mp4"))


def test_missing_input_and_editor(tiny_checkpoint, tmp_path):
  with pytest.raises(edit_job.EditError, match="no such video"):
    edit_job.run_edit(
        tiny_checkpoint, str(tmp_path / "nope.mp4"), "Smiling", 1.0, str(tmp_path / "x.mp4")
    )
  with pytest.raises(edit_job.EditError, match="no classifier"):
    edit_job.run_edit(
        tiny_checkpoint,
        str(tmp_path),
        "Smiling",
        1.0,
        str(tmp_path / "x.mp4"),
        classifier=str(tmp_path / "absent"),
    )
  with pytest.raises(edit_job.EditError, match="S3Editor|s3editor"):
    edit_job.run_edit(
        tiny_checkpoint,
        str(tmp_path),
        "Smiling",
        1.0,
        str(tmp_path / "x.mp4"),
        editor="s3editor",
        s3editor=str(tmp_path / "absent"),
    )


def test_compare_plain_writes_input_plain_s3editor(
    editor, tiny_checkpoint, office_frames, tmp_path
):
  """--compare-plain: the S3Editor's edit, the plain edit of the same encoding, and the
  three-way comparison video (input | plain | S3Editor)."""
  folder, frames = office_frames
  s3 = random_s3editor(tmp_path / "s3editor", tiny_checkpoint / "classifier")
  out = tmp_path / "edited.mp4"
  report = edit_job.run_comparison(
      tiny_checkpoint,
      str(folder),
      "Smiling",
      1.5,
      str(out),
      s3editor=str(s3),
      video_editor=editor,
      metrics=False,
  )
  assert report["editor"] == "s3editor" and pathlib.Path(report["plain_report"]).exists()
  comp, _ = video.read_frames(report["comparison"])
  plain, _ = video.read_frames(tmp_path / "edited.plain.mp4")
  s3out, _ = video.read_frames(out)
  assert len(comp) == len(frames) and comp.shape[2] == 3 * frames.shape[2]
  w = frames.shape[2]
  # Its thirds are the plain and S3Editor videos (up to re-encoding), which differ.
  mad = lambda a, b: np.abs(a.astype(float) - b.astype(float)).mean()  # noqa: E731
  mid, right = comp[:, :, w : 2 * w], comp[:, :, 2 * w :]
  assert mad(mid, plain) < 4 and mad(right, s3out) < 4
  assert mad(mid, plain) < mad(mid, s3out) and mad(right, s3out) < mad(right, plain)
  assert mad(comp[:, :, :w], frames) < 4
  assert json.loads(edit_job.report_path(out).read_text())["comparison"] == report["comparison"]


def test_no_face_video_is_a_clear_error(editor, tiny_checkpoint, tmp_path):
  coins = skimage.data.coins()
  folder = tmp_path / "coins"
  folder.mkdir()
  for i in range(3):
    cv2.imwrite(str(folder / f"{i}.png"), np.roll(coins, 5 * i, axis=1))
  with pytest.raises(edit_job.EditError, match="no face"):
    edit_job.run_edit(
        tiny_checkpoint, str(folder), "Smiling", 1.0, str(tmp_path / "x.mp4"), video_editor=editor
    )
  # As a program: exit status 1, one line on stderr, no traceback.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "s3jax.edit",
          "--checkpoint",
          str(tiny_checkpoint),
          "--input",
          str(folder),
          "--attribute",
          "Smiling",
          "--strength",
          "1",
          "--out",
          str(tmp_path / "y.mp4"),
          "--steps",
          str(STEPS),
          "--max_frames",  # the underscore spelling of --max-frames works too
          "2",
          "--noprogress",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
      cwd=REPO,
  )
  assert proc.returncode == 1, proc.stderr
  assert "no face" in proc.stderr
  assert "Traceback" not in proc.stderr
  # --list-attributes prints one name a line.
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "s3jax.edit",
          "--checkpoint",
          str(tiny_checkpoint),
          "--list-attributes",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      env=env,
      cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["Smiling", "Eyeglasses"]


def test_long_gap_passes_through(editor, office_frames, tiny_checkpoint):
  """Blank frames in a long run pass through unedited and are listed; a short gap is filled."""
  _, frames = office_frames
  blank = np.full_like(frames[0], 128)
  # frames: F F B F B B B B B B F  -> frame 2 interpolated, 4..9 a long gap (6 > max_gap 5)
  seq = np.stack([frames[0], frames[1], blank, frames[2]] + [blank] * 6 + [frames[3]])
  clf = loading.load_classifier(tiny_checkpoint / "classifier")
  out, report = editor.edit_video(seq, "Smiling", 1.0, classifier=clf, compute_metrics=False)
  assert report["passthrough"] == list(range(4, 10))
  assert 2 in report["interpolated"]
  assert report["frames_without_face"] == [2, 4, 5, 6, 7, 8, 9]
  for i in range(4, 10):
    np.testing.assert_array_equal(out[i], seq[i])


def test_runner_matches_diffusion_and_pads_chunks(editor):
  """DDIMRunner (chunks of 2 frames, the last one padded, one program for both directions)
  equals diffusion.ddim_invert / ddim_sample of the same DVA on the whole batch."""
  runner = editing.DDIMRunner(editor.model, editor.params, STEPS, chunk=2)
  r = np.random.default_rng(3)
  m, s = 3, editor.size
  x0 = r.uniform(-1, 1, (m, s, s, 3)).astype(np.float32)
  z_id = E.l2_normalize(r.standard_normal((m, editor.id_dim))).astype(np.float32)
  z_lnd = r.uniform(0, 1, (m, 102)).astype(np.float32)
  assert runner.chunk_size(m) == -(-2 // runner.num_devices) * runner.num_devices
  t_inv, t_dec = {}, {}
  x_T = runner.invert(x0, z_id, z_lnd, t_inv)
  rec = runner.decode(x_T, z_id, z_lnd, t_dec)
  assert {"invert", "compile"} <= set(t_inv)
  assert set(t_dec) == {"decode"}  # decoding reuses the inversion's program

  model, params = editor.model, editor.params

  @functools.partial(jax.jit, static_argnums=0)
  def reference(sampler, x, z_id, z_lnd):
    z_face = model.apply({"params": params}, z_id, z_lnd, method="z_face")

    def eps_fn(x, t, c):
      return model.apply({"params": params}, x, t, c, method="denoise")

    return sampler(eps_fn, x, z_face, STEPS)

  np.testing.assert_allclose(x_T, reference(diffusion.ddim_invert, x0, z_id, z_lnd), atol=1e-4)
  # From the same x_T: decoding's first steps scale rounding by sqrt(1/abar) ~ 60.
  np.testing.assert_allclose(rec, reference(diffusion.ddim_sample, x_T, z_id, z_lnd), atol=1e-4)


def test_encode_aligned_matches_encode(editor, office_frames):
  """Already aligned crops (the encoded clip's, landmarks at the model size) give the same
  masks, averaged z_id and x_T as the full encode."""
  _, frames = office_frames
  code = editor.encode(frames)
  s = editor.size
  lnd = (code.landmarks.astype(np.float64) + 0.5) * (s / 256) - 0.5
  aligned = editor.encode_aligned(code.crops, lnd, code.z_id_frames, code.z_lnd, name="office")
  assert aligned.key == "aligned:office" and not aligned.cache_hit
  np.testing.assert_array_equal(aligned.frame_indices, np.arange(len(code.crops)))
  np.testing.assert_array_equal(aligned.crops, code.crops)
  np.testing.assert_array_equal(aligned.z_id, code.z_id)
  assert (aligned.masks != code.masks).mean() < 1e-3  # landmarks rounded through float32
  np.testing.assert_array_equal(aligned.x_T, code.x_T)  # same inputs, same program
  assert "invert" in aligned.timings
  with pytest.raises(ValueError, match="z_lnd"):
    editor.encode_aligned(code.crops, lnd, code.z_id_frames, code.z_lnd[:, :5])


@pytest.mark.slow
def test_clip_prompt_edit_runs_on_the_dva(editor, office_frames, tiny_checkpoint, tmp_path):
  """--clip-prompt: the DVA reference's CLIP edit through run_edit, with a tiny random CLIP."""
  from s3jax.porting import sd_vae_clip_keys
  from s3jax.sd import clip as clip_lib
  from sd_helpers import CLIP_CONFIG, random_params, write_byte_level_tokenizer

  clip_dir = tmp_path / "clip"
  write_byte_level_tokenizer(clip_dir)  # a CLIP folder holds its vocab.json and merges.txt
  abstract = jax.eval_shape(lambda: clip_lib.init_params(CLIP_CONFIG, jax.random.key(0)))
  sd_vae_clip_keys.save_clip_dir(clip_dir, random_params(abstract, 4), CLIP_CONFIG)
  folder, frames = office_frames
  out = tmp_path / "clip_edit.mp4"
  report = edit_job.run_edit(
      tiny_checkpoint,
      str(folder),
      None,
      1.0,
      str(out),
      video_editor=editor,
      cache_dir=str(tmp_path / "cache"),
      clip_prompt="face with a beard",
      clip_source_prompt="face",
      clip_dir=str(clip_dir),
      clip_iterations=3,
  )
  written, _ = video.read_frames(out)
  assert written.shape == frames.shape
  rep = json.loads(edit_job.report_path(out).read_text())
  assert rep["attribute"] == "clip" and rep["editor_source"] == str(clip_dir)
  assert rep["clip"]["settings"]["iterations"] == 3 and rep["clip"]["delta_norm"] > 0
  assert all(np.isfinite(v) for v in rep["clip"]["last"].values())
  with pytest.raises(edit_job.EditError, match="--clip"):
    edit_job.run_edit(
        tiny_checkpoint,
        str(folder),
        None,
        1.0,
        str(tmp_path / "x.mp4"),
        video_editor=editor,
        clip_prompt="face with a beard",
        clip_dir=str(tmp_path / "no_clip"),
    )
