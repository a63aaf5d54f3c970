"""Video editing on the official feature path (IR-SE50 z_id, MobileNet z_lnd, BiSeNet masks)
and the reference-exact options, with random-weight encoders and a tiny 32 px DVA.

One workdir (tiny DVA built with face_features='official', so its fusion layer takes
512 + 102 inputs; frozen encoders saved as `convert import` writes them) and one
`OfficialFeatures` (its compiled programs) serve every test through module fixtures.
The edit-math test checks the reference options against ../shared/golden/edit.
"""

import json

import cv2
import jax
import numpy as np
import pytest

from s3jax import alignment, edit_job, editing, face_encoding, face_features, images, loading
from s3jax import edit_stream, optim, video
from s3jax.checkpointing import Checkpointer
from s3jax.models import face_encoders as fe
from s3jax.models.autoencoder import FaceFusion, make_dva
from s3jax.porting import dva_checkpoint

from train_helpers import random_encoder_variables, tiny_official_config

STEPS = 10
NUM_FRAMES = 4
WIDTH = 384  # the 1080p frames scaled down: dlib still finds the face, alignment is fast


def _save_tiny_dva(workdir, cfg):
  model = make_dva(cfg.model)
  state = loading.init_dva_state(model, optim.make_optimizer(cfg.optim), cfg, jax.random.key(0))
  r = np.random.default_rng(0)
  # The zero-initialised convs get small random weights so eps depends on z_face.
  params = jax.tree.map(
      lambda x: (
          (0.05 * r.standard_normal(x.shape)).astype(np.float32)
          if x.ndim == 4 and not np.asarray(x).any()
          else np.asarray(x)
      ),
      state.params,
  )
  state = state.replace(params=params, ema_params=params)
  ck = Checkpointer(workdir, async_save=False)
  ck.save(0, state, config=cfg, force=True)
  ck.close()
  d = 512  # a classifier on the 512-d ArcFace z_id
  loading.save_classifier(
      workdir / "classifier" / "classifier.npz",
      ["Smiling", "Eyeglasses"],
      r.standard_normal((d, 2)),
      np.zeros(2),
      r.uniform(-0.02, 0.02, d),
      r.uniform(0.02, 0.06, d),
      np.array([0.9, 0.8]),
  )


@pytest.fixture(scope="module")
def enc_variables():
  return random_encoder_variables(0)


@pytest.fixture(scope="module")
def bare_workdir(tmp_path_factory):
  """A tiny official DVA without frozen encoders."""
  workdir = tmp_path_factory.mktemp("official_bare")
  _save_tiny_dva(workdir, tiny_official_config())
  return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, enc_variables):
  """The tiny official DVA with its frozen encoders, as `convert import` leaves it."""
  workdir = tmp_path_factory.mktemp("official_dva")
  _save_tiny_dva(workdir, tiny_official_config())
  dva_checkpoint.save_frozen_encoders(workdir, enc_variables)
  return workdir


@pytest.fixture(scope="module")
def frames(office_clip_dir):
  out, _ = video.read_frames(office_clip_dir, max_frames=NUM_FRAMES, resize_width=WIDTH)
  return out


@pytest.fixture(scope="module")
def editor(workdir):
  """Default options; loads the DVA and the encoders from the workdir (cache in it)."""
  return editing.VideoEditor(workdir, steps=STEPS)


@pytest.fixture(scope="module")
def ref_editor(workdir, editor):
  """Reference options (but 10 steps); shares the default editor's compiled encoders."""
  return editing.VideoEditor(
      workdir,
      steps=STEPS,
      reference=True,
      model=(editor.model, editor.params, editor.config),
      encoders=editor.features,
  )


@pytest.fixture(scope="module")
def edit_default(editor, frames, workdir):
  clf = loading.load_classifier(workdir / "classifier")
  code = editor.encode(frames)
  out, report, crops = editor.edit_video(
      frames, "Smiling", 1.0, classifier=clf, return_crops=True, compute_metrics=True
  )
  return code, out, report, crops


@pytest.fixture(scope="module")
def edit_reference(ref_editor, frames, workdir):
  clf = loading.load_classifier(workdir / "classifier")
  code = ref_editor.encode(frames)
  out, report, crops = ref_editor.edit_video(
      frames, "Smiling", 1.0, classifier=clf, return_crops=True, compute_metrics=False
  )
  return code, out, report, crops


@pytest.fixture(scope="module")
def direct_outputs(enc_variables, editor, edit_default, frames):
  """OfficialEncoders applied directly (one batch, no chunking) to the 256 px crops."""
  code = edit_default[0]
  crops = np.stack(
      [
          alignment.crop_from_quad(frames[i], code.quads[i], 256, border="reflect")
          for i in code.frame_indices
      ]
  )
  out = jax.jit(fe.OfficialEncoders().apply)(enc_variables, images.to_model(crops))
  return crops, {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
def test_encoder_batches_pad_the_tail_to_a_power_of_two(enc_variables):
  features = face_encoding.OfficialFeatures(
      enc_variables, batch_size=8, devices=jax.local_devices()[:1]
  )

  def calls(n):
    out = []
    while n > 0:
      out.append(features.batch_shape(n))
      n -= min(out[-1], n)
    return out

  assert [calls(n) for n in (1, 3, 4, 5, 8, 10, 13)] == [[1], [4], [4], [8], [8], [8, 2], [8, 8]]
  assert features.fingerprint == face_encoding.fingerprint(enc_variables)
  empty = np.zeros((0, 64, 64, 3), np.uint8)
  assert features.id_feats(empty).shape == (0, 512)
  assert features.video_masks(empty).shape == (0, 64, 64)
  assert features(empty)["mask"].shape == (0, 256, 256)
  assert features.compiled_programs() == set()  # nothing to run, nothing compiled


def test_missing_encoders_is_a_clear_error(tmp_path):
  # The check runs before the model is used: no weights needed to reach it.
  model = (None, None, tiny_official_config())
  with pytest.raises(FileNotFoundError, match=r"frozen_encoders.*python -m s3jax.convert import"):
    editing.VideoEditor(tmp_path, steps=STEPS, model=model)


@pytest.mark.slow
def test_missing_encoders_workdir_is_a_user_error(bare_workdir, tmp_path):
  images.save_png(tmp_path / "frames" / "0000.png", np.zeros((64, 64, 3), np.uint8))
  with pytest.raises(edit_job.EditError, match=r"frozen_encoders.*convert import --src"):
    edit_job.run_edit(
        bare_workdir, str(tmp_path / "frames"), "Smiling", 1.0, str(tmp_path / "x.mp4")
    )


def test_options_default_and_reference():
  assert editing.resolve_options() == editing.DEFAULT_OPTIONS
  ref = editing.resolve_options(reference=True)
  assert ref == editing.REFERENCE_OPTIONS
  assert (ref.steps, ref.renormalize_identity, ref.paste_space, ref.align_border, ref.blend) == (
      1000,
      False,
      "crop",
      "constant",
      "hard",
  )
  assert (ref.alignment, editing.DEFAULT_OPTIONS.alignment) == ("reference", "default")
  # Explicit values win over --reference.
  assert editing.resolve_options(reference=True, steps=20).steps == 20
  assert editing.resolve_options(reference=True, alignment="default").alignment == "default"
  with pytest.raises(ValueError, match="alignment"):
    editing.resolve_options(alignment="pil")
  with pytest.raises(ValueError, match="paste_space"):
    editing.resolve_options(paste_space="quad")
  with pytest.raises(ValueError, match="respace"):
    editing.resolve_options(steps=999)


@pytest.mark.slow
def test_per_frame_features_are_the_encoders(edit_default, direct_outputs):
  code = edit_default[0]
  _, direct = direct_outputs
  assert code.z_id_frames.shape == (NUM_FRAMES, 512)
  np.testing.assert_allclose(code.z_id_frames, direct["id_feats"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(code.z_lnd, direct["lnd_feats"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(code.z_id_frames, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_identity_average_default_renormalised_reference_not(edit_default, edit_reference):
  code = edit_default[0]
  mean = code.z_id_frames.astype(np.float64).mean(0)
  assert np.linalg.norm(mean) < 1 - 1e-6  # random-weight frames disagree: the mean is short
  np.testing.assert_allclose(code.z_id, mean / np.linalg.norm(mean), atol=1e-6)
  assert np.linalg.norm(code.z_id) == pytest.approx(1.0, abs=1e-6)
  ref = edit_reference[0]
  ref_mean = ref.z_id_frames.astype(np.float64).mean(0)
  np.testing.assert_allclose(ref.z_id, ref_mean, atol=1e-7)
  assert np.linalg.norm(ref.z_id) < 1 - 1e-6


@pytest.mark.slow
def test_hard_paste_uses_the_bisenet_mask(editor, edit_default, direct_outputs, frames):
  code, out, report, crops = edit_default
  _, direct = direct_outputs
  want = np.stack(
      [
          cv2.resize(m, (editor.size,) * 2, interpolation=cv2.INTER_NEAREST)
          for m in direct["face_mask_video"][..., 0].astype(np.uint8)
      ]
  )
  np.testing.assert_array_equal(code.masks, want)
  assert 0.05 < code.masks.mean() < 0.95  # a real mask, neither empty nor full
  # One network per program (the all-in-one is data_prep's), 4 crops in one batch of 4.
  assert editor.features.compiled_programs() == {("z_id", 4), ("z_lnd", 4), ("mask_video", 4)}
  assert report["options"]["paste_space"] == "frame" and report["blend"] == "hard"
  assert report["cache"]["hit"]  # the BiSeNet masks and ArcFace z_id round-trip the cache
  for j, i in enumerate(code.frame_indices):
    _, _, support = video.paste_back(
        frames[i], crops[j], code.quads[i], code.masks[j], blend="hard", return_mask=True
    )
    assert support.any()
    np.testing.assert_array_equal(out[i][~support], frames[i][~support])
    assert (out[i][support] != frames[i][support]).any()
  ident = report["identity"]
  assert "ArcFace" in ident["embedding"] and ident["num_frames"] == NUM_FRAMES
  assert np.isfinite(ident["tl_id"]) and np.isfinite(ident["tg_id"])


@pytest.mark.slow
def test_reference_mode_pastes_in_the_crop(ref_editor, edit_reference, frames):
  code, out, report, crops = edit_reference
  assert report["reference"] and report["reference_options"] is False  # 10 steps, not 1000
  assert report["options"]["paste_space"] == "crop"
  assert report["options"]["renormalize_identity"] is False
  assert report["options"]["alignment"] == "reference"
  composite = ref_editor.composite(code, crops)
  m = code.masks.astype(bool)
  np.testing.assert_array_equal(composite[m], crops[m])
  np.testing.assert_array_equal(composite[~m], code.crops[~m])
  for j, i in enumerate(code.frame_indices):
    # The reference's PIL paste-back of the crop-space composite over the whole quad.
    want = alignment.reference_paste(frames[i], composite[j], code.quads[i])
    np.testing.assert_array_equal(out[i], want)
    changed = (out[i] != frames[i]).any(-1)
    assert changed.any()
    _, _, quad = video.paste_back(
        frames[i], composite[j], code.quads[i], np.ones_like(code.masks[j]), return_mask=True
    )
    assert not (changed & ~_dilated(quad)).any()  # nothing changes outside the quad


def test_bad_option_is_a_user_error(tmp_path):
  # Checked before the checkpoint or the classifier is read.
  with pytest.raises(edit_job.EditError, match="paste_space"):
    edit_job.run_edit(
        tmp_path, str(tmp_path), "Smiling", 1.0, str(tmp_path / "x.mp4"), paste_space="quad"
    )


@pytest.mark.slow
def test_run_edit_reports_reference_options(ref_editor, edit_reference, frames, tmp_path):
  folder = tmp_path / "frames"
  for i, f in enumerate(frames):
    images.save_png(folder / f"{i:04d}.png", f)
  out = tmp_path / "ref.mp4"
  edit_job.run_edit(
      ref_editor.checkpoint_dir, str(folder), "Smiling", 1.0, str(out), video_editor=ref_editor
  )
  rep = json.loads(edit_job.report_path(out).read_text())
  assert rep["reference"] and rep["face_features"] == "official"
  assert rep["options"] == {
      "steps": STEPS,
      "renormalize_identity": False,
      "paste_space": "crop",
      "align_border": "constant",
      "blend": "hard",
      "alignment": "reference",
  }
  # Streamed: cached under the in-memory encoding's key, in <key>.stream/.
  assert rep["cache"]["key"] == ref_editor.cache_key(frames)
  assert "ArcFace" in rep["identity"]["embedding"]


@pytest.mark.slow
def test_reference_decode_shares_the_inversion(ref_editor, edit_reference, workdir):
  """Both renders start from x_T of the unedited average: the reconstruction decodes the
  cached x_T with z̄_id, the edit with the classifier's edit of the same z̄_id."""
  code, _, _, crops = edit_reference
  clf = loading.load_classifier(workdir / "classifier")
  z_new = clf.edit(code.z_id[None], "Smiling", 1.0)[0]
  np.testing.assert_array_equal(ref_editor.decode(code, z_new), crops)
  assert np.abs(ref_editor.reconstruct(code).astype(int) - crops.astype(int)).max() > 0


def _dilated(mask):
  """``mask`` grown by one pixel (PIL's and OpenCV's quad edges differ by a pixel)."""
  return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def test_alignment_option_default_path_unchanged(editor, ref_editor, frames):
  """The default editor aligns with ``align_video`` (OpenCV crop, reflect border) as before;
  the reference editor crops its quads with ``alignment.reference_crop``."""
  res = editor.align(frames, editing.FEATURE_SIZE)
  want = alignment.align_video(frames, size=editing.FEATURE_SIZE, border="reflect")
  np.testing.assert_array_equal(res.crops, want.crops)
  np.testing.assert_array_equal(res.quads, want.quads)
  ref = ref_editor.align(frames, editing.FEATURE_SIZE)
  assert ref.report["alignment"] == "reference" and ref.has_face.all()
  for f, q, c in zip(frames, ref.quads, ref.crops):
    np.testing.assert_array_equal(c, alignment.reference_crop(f, q, editing.FEATURE_SIZE))
  # Here (384 px wide, one clear face) both detections find the same face; the crops differ.
  assert (ref.crops != res.crops).any()
  assert editor.cache_key(frames) != ref_editor.cache_key(frames)
  assert ref_editor.cache_key(frames) != ref_editor.cache_key(frames, frames[::-1].copy())


# ----------------------------------------------------------------------------------------
def _golden_arrays(path, names):
  """Named tensors of a golden ``*_state_dict.npz`` (``f::`` as stored, ``q::`` x ``s::``)."""
  out = {}
  with np.load(path) as z:
    for k in names:
      if f"f::{k}" in z.files:
        out[k] = z[f"f::{k}"]
      else:
        out[k] = z[f"q::{k}"].astype(np.float32) * z[f"s::{k}"]
  return out


@pytest.fixture(scope="module")
def golden_edit(golden_dir):
  d = golden_dir.parent / "edit"
  if not (d / "edit_io.npz").exists():
    pytest.skip(f"golden edit vectors not found at {d}")
  keys = ("cond", "avg_cond", "lnd_feats", "avg_cond2", "avg_latent", "avg_latent2", "config")
  with np.load(d / "edit_io.npz") as z:
    io = {k: z[k] for k in keys}
  io["config"] = json.loads(str(io["config"]))
  sd = _golden_arrays(
      d / "classifier_state_dict.npz",
      ("conds_mean", "conds_std", "classifier.weight", "classifier.bias"),
  )
  sd.update(
      _golden_arrays(d / "dva_state_dict.npz", ("encoder.linear.weight", "encoder.linear.bias"))
  )
  return io, sd


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_reference_edit_math_matches_golden(golden_edit):
  """Teacher-forced on the golden per-frame features: the reference options' average, the
  classifier edit and the fusion layer land within 1e-6 of editing_classifier.py's."""
  io, sd = golden_edit
  cfg = io["config"]
  avg = editing.average_identity(
      io["cond"], renormalize=editing.REFERENCE_OPTIONS.renormalize_identity
  )
  assert _rel(avg, io["avg_cond"][0]) < 1e-6
  # The default's renormalised average is off by far more than the tolerance (quirk 7).
  assert _rel(editing.average_identity(io["cond"]), io["avg_cond"][0]) > 1e-5
  w = np.asarray(sd["classifier.weight"], np.float64)
  clf = loading.Classifier(
      names=list(cfg["id_to_cls"]),
      weight=w.T,
      bias=np.asarray(sd["classifier.bias"], np.float64),
      mean=np.asarray(sd["conds_mean"], np.float64)[0],
      std=np.asarray(sd["conds_std"], np.float64)[0],
      auc=np.full(len(w), np.nan),
  )
  edited = clf.edit(avg[None], cfg["attribute"], cfg["scale"])
  assert _rel(edited, io["avg_cond2"]) < 1e-6
  fusion = {"params": {"linear": {"kernel": sd["encoder.linear.weight"].T}}}
  fusion["params"]["linear"]["bias"] = sd["encoder.linear.bias"]
  n = len(io["lnd_feats"])
  for z, key in ((avg, "avg_latent"), (edited[0], "avg_latent2")):
    lat = FaceFusion(512).apply(fusion, np.repeat(z[None], n, 0), io["lnd_feats"])
    assert _rel(lat, io[key]) < 1e-6, key


# ----------------------------------------------------------------------------------------
# The reference alignment against golden/edit set A (procedure A, quirks 1-6, 13-14).
@pytest.fixture(scope="module")
def golden_align(golden_dir):
  d = golden_dir.parent / "edit"
  if not (d / "align_io.npz").exists():
    pytest.skip(f"golden alignment vectors not found at {d}")
  with np.load(d / "align_io.npz") as z:
    return {k: z[k] for k in ("frames_paths", "quads", "crops_256")}


@pytest.fixture(scope="module")
def golden_frames(golden_align, office_clip_dir):
  """The 4 golden frames at full size: as ``video.read_frames`` decodes them (OpenCV, equal
  to PIL's decode, which the reference crops) and as dlib decodes them (its landmarks)."""
  names = [str(n) for n in golden_align["frames_paths"]]
  frames, _ = video.read_frames(office_clip_dir, max_frames=len(names))
  return frames, editing.dlib_decoded_frames([office_clip_dir / n for n in names])


@pytest.mark.slow
def test_reference_alignment_matches_golden(ref_editor, golden_align, golden_frames, tmp_path):
  """The reference editor's detection, quads and 256 px crops are the reference's: the
  quads within 1e-9 (rel), the crops bit for bit (README bound: mean 0.25, max 2); encode
  keeps those quads and the crops resized to the model size."""
  frames, dlib_frames = golden_frames
  res = ref_editor.align(frames, editing.FEATURE_SIZE, detect_frames=dlib_frames)
  assert _rel(res.quads, golden_align["quads"]) <= 1e-9
  diff = np.abs(res.crops.astype(int) - golden_align["crops_256"].astype(int))
  assert diff.mean() <= 0.25 and diff.max() <= 2
  np.testing.assert_array_equal(res.crops, golden_align["crops_256"])
  code = ref_editor.encode(frames, cache_dir=tmp_path, detect_frames=dlib_frames)
  assert _rel(code.quads, golden_align["quads"]) <= 1e-9
  want = face_features.resize_crops(golden_align["crops_256"], ref_editor.size)
  np.testing.assert_array_equal(code.crops, want)


@pytest.mark.slow
def test_run_edit_detects_on_dlib_decode(
    ref_editor, golden_align, golden_frames, office_clip_dir, tmp_path
):
  """``run_edit`` in reference alignment detects on dlib's decode of the frame files: its
  streamed encoding is keyed as ``encode(..., detect_frames=dlib decode)`` keys it, with the
  golden quads."""
  frames, dlib_frames = golden_frames
  cache = tmp_path / "cache"
  edit_job.run_edit(
      ref_editor.checkpoint_dir,
      str(office_clip_dir),
      "Smiling",
      0.3,
      str(tmp_path / "out.mp4"),
      max_frames=len(frames),
      cache_dir=str(cache),
      metrics=False,
      video_editor=ref_editor,
  )
  key = ref_editor.cache_key(frames, dlib_frames)
  code = edit_stream.StreamCache(cache / f"{key}.stream").load_code()
  assert code is not None and code.align_report["detect_frames"] == "given"
  assert _rel(code.quads, golden_align["quads"]) <= 1e-9


def test_reference_paste_matches_golden(ref_editor, golden_align, golden_dir, office_clip_dir):
  """``VideoEditor.paste`` in reference mode is the reference's final frame: the golden
  crop-space composite (``paste_bg_T20[0]``) pasted over golden quad 0 is ``paste_final_T20``
  in its box and the frame outside it."""
  with np.load(golden_dir.parent / "edit" / "edit_io.npz") as z:
    bg, final, box = z["paste_bg_T20"][:1], z["paste_final_T20"], z["paste_final_T20_box"]
  frames, _ = video.read_frames(office_clip_dir, max_frames=1)
  crop = images.to_uint8(np.transpose(bg, (0, 2, 3, 1)) * 2.0 - 1.0)
  s = crop.shape[1]
  code = editing.VideoCode(
      num_frames=1,
      frame_shape=frames.shape[1:],
      frame_indices=np.arange(1),
      quads=golden_align["quads"][:1],
      crops=crop,
      masks=np.ones((1, s, s), np.uint8),
      landmarks=np.zeros((1, 68, 2), np.float32),
      z_lnd=np.zeros((1, 102), np.float32),
      z_id_frames=np.zeros((1, 512), np.float32),
      z_id=np.zeros(512, np.float32),
      x_T=np.zeros((1, s, s, 3), np.float32),
      has_face=np.ones(1, bool),
      interpolated=np.zeros(1, bool),
      passthrough=[],
      align_report={},
  )
  out = ref_editor.paste(frames, code, crop)[0]
  x0, y0, x1, y1 = (int(v) for v in box)
  np.testing.assert_array_equal(out[y0:y1, x0:x1], final[0])
  keep = np.ones(out.shape[:2], bool)
  keep[y0:y1, x0:x1] = False
  np.testing.assert_array_equal(out[keep], frames[0][keep])
