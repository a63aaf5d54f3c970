"""The evaluation path (`s3jax.evaluation`, `python -m s3jax.evaluate`): identity metrics on
the real clip, SSIM/MS-SSIM against scikit-image, and a resumable sweep with all of its
outputs."""

import json
import pathlib
import subprocess
import sys

import cv2
import jax
import ml_collections
import numpy as np
import pytest
from scipy.ndimage import correlate1d
from skimage import data, transform
from skimage.metrics import structural_similarity

import configs
from data_prep import sample
from s3jax import alignment, images, loading, optim, video
from s3jax.checkpointing import Checkpointer
from s3jax.evaluation import cells, report, sweep
from s3jax.models.autoencoder import make_dva

from train_helpers import TINY_UNET, random_s3editor

REPO = pathlib.Path(__file__).resolve().parents[1]
N_FRAMES = 8


# ------------------------------------------------------------------ real clip: TL-ID / TG-ID
@pytest.fixture(scope="module")
def office(office_clip_dir):
  """8 frames of the office clip at 480 px wide, STIT-aligned 256 px crops."""
  frames, _ = video.read_frames(office_clip_dir, max_frames=N_FRAMES, resize_width=480)
  res = alignment.align_video(frames, size=256)
  assert res.has_face.all()
  return res.crops


def _jitter(crops, seed=0, max_shift=20, max_deg=12):
  """Random shifts and rotations of each crop (what an unsmoothed aligner does)."""
  rng = np.random.default_rng(seed)
  out = []
  for i, c in enumerate(crops):
    s = c.shape[0]
    deg = rng.uniform(-max_deg, max_deg) * (1 if i % 2 else -1)
    m = cv2.getRotationMatrix2D((s / 2, s / 2), deg, 1.0)
    m[:, 2] += rng.uniform(-max_shift, max_shift, 2)
    out.append(cv2.warpAffine(c, m, (s, s), borderMode=cv2.BORDER_REFLECT))
  return np.stack(out)


def _other_face():
  """skimage's astronaut, aligned the same way (a different identity)."""
  res = alignment.align_video(data.astronaut()[None], size=256)
  return res.crops[0]


def test_tl_tg_id_are_one_for_the_original(office):
  e = cells.identity_embeddings(office)
  m = cells.identity_metrics(e, e)
  assert m["tl_id"] == 1.0 and m["tg_id"] == 1.0
  assert m["id_preservation"] == pytest.approx(1.0, abs=1e-6)
  assert 0.8 < m["tg_id_input"] <= m["tl_id_input"] + 1e-3 < 1.001  # one person throughout


def test_tl_tg_id_drop_with_jitter(office):
  e = cells.identity_embeddings(office)
  e_j = cells.identity_embeddings(_jitter(office))
  m = cells.identity_metrics(e, e_j)
  assert m["tl_id"] < 0.995, m
  assert m["tg_id"] < 0.995, m
  assert m["id_preservation"] < 0.999, m


def test_tl_tg_id_drop_with_identity_drift(office):
  other = _other_face().astype(np.float32)
  alpha = np.linspace(0.0, 0.7, len(office))[:, None, None, None]
  drift = np.clip((1 - alpha) * office.astype(np.float32) + alpha * other, 0, 255)
  e = cells.identity_embeddings(office)
  e_d = cells.identity_embeddings(np.round(drift).astype(np.uint8))
  m = cells.identity_metrics(e, e_d)
  assert m["tl_id"] < 0.997, m  # a slow drift changes neighbours little (0.993 here) ...
  assert m["tg_id"] < 0.97, m  # ... global consistency suffers most from a slow drift
  assert m["tg_id"] < m["tl_id"], m
  assert m["id_preservation"] < 0.97, m


# ------------------------------------------------------------------ SSIM / MS-SSIM vs skimage
def _ref_ssim_terms(x, y, data_range=2.0):
  """Per-channel (ssim, cs) means on the valid region: independent numpy reference
  (Wang et al. 2004; the mean SSIM equals skimage's with gaussian_weights=True)."""
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
  g /= g.sum()

  def filt(a):
    a = correlate1d(correlate1d(a, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return a[5:-5, 5:-5]

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  ss, cs = [], []
  for ch in range(x.shape[-1]):
    a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
    mx, my = filt(a), filt(b)
    vx, vy, cxy = filt(a * a) - mx**2, filt(b * b) - my**2, filt(a * b) - mx * my
    csm = (2 * cxy + c2) / (vx + vy + c2)
    ss.append(np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1) * csm))
    cs.append(np.mean(csm))
  return np.array(ss), np.array(cs)


def _ref_ms_ssim(x, y, weights):
  w = np.asarray(weights, np.float64)
  vals = []
  for level in range(len(w)):
    s, cs = _ref_ssim_terms(x, y)
    if level < len(w) - 1:
      vals.append(np.maximum(cs, 0))
      x, y = (np.asarray(evaluate_pool(a)) for a in (x, y))
    else:
      vals.append(np.maximum(s, 0))
  return float(np.mean(np.prod(np.stack(vals) ** w[:, None], axis=0)))


def evaluate_pool(a):
  h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2  # even sizes only in these tests
  return a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("size", [64, 192])
def test_pixel_metrics_match_skimage(size):
  img = transform.resize(data.astronaut()[:384, 64:448], (size, size), anti_aliasing=True)
  orig = np.round(img * 255).astype(np.uint8)
  rng = np.random.default_rng(0)
  noisy = np.clip(orig.astype(np.int32) + rng.integers(-25, 26, orig.shape), 0, 255)
  batch_o = np.stack([orig, orig])
  batch_n = np.stack([noisy.astype(np.uint8), np.roll(orig, 3, axis=1)])
  res = cells.pixel_metrics(batch_o, batch_n)
  xo, xn = images.to_model(batch_o), images.to_model(batch_n)
  ref_ssim = np.mean(
      [
          structural_similarity(
              a,
              b,
              data_range=2.0,
              channel_axis=-1,
              gaussian_weights=True,
              sigma=1.5,
              use_sample_covariance=False,
          )
          for a, b in zip(xo, xn)
      ]
  )
  assert res["ssim"] == pytest.approx(ref_ssim, abs=2e-5)
  # Our reference's SSIM term is skimage's: checks the reference itself.
  assert np.mean(_ref_ssim_terms(xo[0], xn[0])[0]) == pytest.approx(
      structural_similarity(
          xo[0],
          xn[0],
          data_range=2.0,
          channel_axis=-1,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
      ),
      abs=1e-6,
  )  # skimage keeps float32 inputs in float32
  levels = cells.ms_ssim_scales(size)
  assert levels == {64: 3, 192: 5}[size]  # 11 px window: 41 px for 3 scales, 161 for 5
  assert res["ms_ssim_scales"] == levels
  w = np.asarray((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:levels])
  w = w / w.sum()
  ref_ms = np.mean([_ref_ms_ssim(a, b, w) for a, b in zip(xo, xn)])
  assert res["ms_ssim"] == pytest.approx(ref_ms, abs=2e-5)
  mse = np.mean((xo - xn) ** 2, axis=(1, 2, 3))
  assert res["mse"] == pytest.approx(np.mean(mse), rel=1e-5)
  assert res["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse)), rel=1e-5)
  assert np.isnan(res["lpips"])  # no LPIPS weights given: not reported


# ------------------------------------------------------------------ the sweep


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
  """A fresh tiny DVA checkpoint, a 2-attribute classifier and the sample dataset."""
  root = tmp_path_factory.mktemp("sweep")
  data_dir = root / "sample"
  sample.build_sample_dataset(data_dir, size=64, frames_per_video=3)
  cfg = configs.get("voxceleb:demo")
  cfg.model.unet = ml_collections.ConfigDict(TINY_UNET)
  model = make_dva(cfg.model)
  tx = optim.make_optimizer(cfg.optim)
  state = loading.init_dva_state(model, tx, cfg, jax.random.key(0))
  # Non-zero output convs, so the decoder does not reproduce its input exactly.
  leaves, treedef = jax.tree.flatten(state.ema_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  ema = jax.tree.unflatten(
      treedef, [x + 0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )
  state = state.replace(ema_params=ema)
  ckpt = root / "dva"
  ck = Checkpointer(ckpt, async_save=False)
  ck.save(3, state, config=cfg, force=True)
  ck.close()
  clf = root / "classifier"
  rng = np.random.default_rng(0)
  loading.save_classifier(
      clf / "classifier.npz",
      ["A", "B"],
      rng.normal(size=(128, 2)),
      np.zeros(2),
      np.zeros(128),
      np.full(128, 0.1),
      np.full(2, np.nan),
  )
  return root, data_dir, ckpt, clf


def _sweep_config(data_dir, ckpt, clf):
  c = evaluate_config("demo")
  c.checkpoints = (str(ckpt),)
  c.classifier = str(clf)
  c.attributes = ("A",)
  c.strengths = (1.0,)
  c.ddim_steps = (10,)
  c.data.data_dir = str(data_dir)
  c.data.max_videos = 1
  c.data.max_frames = 3
  return c


def evaluate_config(arg):
  return configs.get("eval:" + arg)


def test_sweep_writes_outputs_and_resumes(sweep_inputs, tmp_path, monkeypatch):
  _, data_dir, ckpt, clf = sweep_inputs
  config = _sweep_config(data_dir, ckpt, clf)
  out = tmp_path / "eval"
  rows = sweep.run_sweep(config, out, progress=False)
  assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
  recon = next(r for r in rows if r["attribute"] == "none")
  edit = next(r for r in rows if r["attribute"] == "A")
  assert recon["checkpoint"] == "dva@3" and recon["frames"] == 3 and recon["steps"] == 10
  for k in (
      "ssim",
      "psnr",
      "mse",
      "ms_ssim",
      "tl_id",
      "tg_id",
      "id_preservation",
      "locality",
      "sec_per_frame",
  ):
    assert isinstance(recon[k], float), k
  assert recon["ms_ssim_scales"] == 1  # 16 px crops: one 11 px scale (= SSIM, clipped)
  assert 0.0 <= edit["attr_success"] <= 1.0 and edit["sec_per_frame"] > 0
  assert recon["lpips"] is None
  # Outputs.
  for name in ("results.csv", "results.json", "summary.md", "eval_config.json"):
    assert (out / name).is_file(), name
  csv_lines = (out / "results.csv").read_text().strip().splitlines()
  assert len(csv_lines) == 3 and csv_lines[0].startswith("checkpoint,checkpoint_step,video")
  md = (out / "summary.md").read_text()
  assert "| checkpoint | steps | edit |" in md and "reconstruction" in md and "A +1" in md
  summary = json.loads((out / "results.json").read_text())["summary"]
  assert [s["attribute"] for s in summary] == ["none", "A"]
  plots = sorted(p.name for p in (out / "plots").glob("*.png"))
  assert "attr_success_vs_strength.png" in plots and "ssim_vs_steps.png" in plots
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert len(list((out / "cells").glob("*.json"))) == 2

  # Second run: every cell is skipped (run_cell must not be called), outputs rewritten.
  stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}

  def boom(*a, **k):
    raise AssertionError("a finished cell ran again")

  monkeypatch.setattr(cells, "run_cell", boom)
  rows2 = sweep.run_sweep(config, out, progress=False)
  assert rows2 == rows
  assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps

  # Growing the sweep runs only the new cells.
  monkeypatch.undo()
  config.strengths = (1.0, -1.0)
  config.tensorboard = False
  rows3 = sweep.run_sweep(config, out, progress=False)
  assert len(rows3) == 3
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_sweep_compares_s3editor_with_the_plain_edit(sweep_inputs, tmp_path):
  """config.editors: the same codes edited plainly and by an S3Editor, each row labelled,
  both measured with locality outside the attribute's target regions."""
  root, data_dir, ckpt, clf = sweep_inputs
  s3 = random_s3editor(tmp_path / "s3ed", clf)
  config = _sweep_config(data_dir, ckpt, clf)
  config.editors = ("plain", str(s3))
  config.tensorboard = False
  rows = sweep.run_sweep(config, tmp_path / "eval", progress=False)
  assert all(r["status"] == "ok" for r in rows), rows
  by_label = {(r["checkpoint"], r["attribute"]): r for r in rows}
  assert set(by_label) == {("dva@3", "none"), ("dva@3", "A"), ("dva@3+s3ed", "A")}
  plain, s3ed = by_label[("dva@3", "A")], by_label[("dva@3+s3ed", "A")]
  assert s3ed["method"] == "s3ed" and plain["method"] == "plain"
  for r in (plain, s3ed):
    assert r["locality_targets"] > 0 and 0.0 <= r["attr_success"] <= 1.0
  assert s3ed["locality_targets"] != plain["locality_targets"]  # a different edit
  assert "dva@3+s3ed" in (tmp_path / "eval" / "summary.md").read_text()
  comp = json.loads((tmp_path / "eval" / "comparison.json").read_text())
  assert [(c["method"], c["attribute"]) for c in comp] == [("plain", "A"), ("s3ed", "A")]
  assert comp[1]["locality"] == s3ed["locality_targets"] and comp[1]["n"] == 1
  assert comp[1]["faithfulness"] == s3ed["attr_success"]
  assert (
      s3ed["locality_targets_edit"] > 0
      and comp[1]["locality_edit"] == s3ed["locality_targets_edit"]
  )
  # Seeds pool into one method with a 95% interval.
  rows2 = [dict(r, method=m) for r in rows if r["method"] == "s3ed" for m in ("s_seed0", "s_seed1")]
  rows2[1]["locality_targets"] += 0.01
  (pooled,) = report.comparison(rows2)
  assert pooled["method"] == "s" and pooled["n"] == 2 and pooled["runs"] == ["s_seed0", "s_seed1"]
  assert pooled["locality_ci95"] > 0
  # An S3Editor that does not know the sweep's attribute fails before any work.
  loading.save_classifier(
      tmp_path / "clf3" / "classifier.npz",
      ["A", "B", "C"],
      np.random.default_rng(0).normal(size=(128, 3)),
      np.zeros(3),
      np.zeros(128),
      np.full(128, 0.1),
      np.full(3, np.nan),
  )
  config.classifier = str(tmp_path / "clf3")
  config.attributes = ("C",)
  with pytest.raises(ValueError, match="cannot edit"):
    sweep.run_sweep(config, tmp_path / "eval2", progress=False)


def test_missing_dataset_names_the_command(sweep_inputs, tmp_path):
  _, _, ckpt, clf = sweep_inputs
  config = _sweep_config(tmp_path / "absent", ckpt, clf)
  with pytest.raises(FileNotFoundError, match="python -m data_prep.sample --out"):
    sweep.run_sweep(config, tmp_path / "eval", progress=False)


def test_cli_help_and_config_variants():
  for arg in ("", "demo"):
    c = configs.get("eval:" + arg)
    assert c.ddim_steps and c.strengths and c.checkpoints
    assert "build_sample_if_missing" not in c.data
  with pytest.raises(ValueError, match="unknown config variant"):
    configs.get("eval:nope")
  out = subprocess.run(
      [sys.executable, "-m", "s3jax.evaluate", "--helpfull"],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=REPO,
  )
  assert "--workdir" in out.stdout and "resumes" in out.stdout
