"""The reference's classifier edit of a video against its golden vectors (``golden/edit``).

The full check (``python -m s3jax.convert parity --golden ../shared/golden/edit``) runs about
a hundred 256 px UNet calls per frame; here the DDIM stages run on frame 0 at the smallest T,
once per module, and every other stage in full.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from s3jax import alignment, convert
from s3jax.parity import edit as parity_edit
from s3jax.porting.classifier import classifier_from_state, read_classifier_state
from s3jax.porting.state_dict import load_state_dict

DDIM_FRAMES = (0,)


@pytest.fixture(scope="module")
def edit_dir(golden_dir):
  d = golden_dir.parent / "edit"
  if not (d / parity_edit.EDIT_FILE).exists():
    pytest.skip(f"golden edit vectors not found at {d}")
  return d


@pytest.fixture(scope="module")
def golden(edit_dir):
  e = parity_edit.load_npz(edit_dir / parity_edit.EDIT_FILE)
  config = json.loads(str(e["config"]))
  a = parity_edit.load_npz(edit_dir / parity_edit.ALIGN_FILE)
  clf_sd = read_classifier_state(edit_dir / parity_edit.CLASSIFIER_SD_FILE)[0]
  sd = load_state_dict(edit_dir / parity_edit.DVA_SD_FILE)
  linear = {"weight": sd["encoder.linear.weight"], "bias": sd["encoder.linear.bias"]}
  return dict(e=e, config=config, a=a, clf_sd=clf_sd, linear=linear, dir=edit_dir)


def _edit_math_rows(golden, edit_weights="classifier", renormalize=False):
  e, cfg = golden["e"], golden["config"]
  clf = classifier_from_state(golden["clf_sd"], edit_weights=edit_weights)
  out = parity_edit.edit_math(
      e["cond"],
      e["lnd_feats"],
      clf,
      cfg["attribute"],
      cfg["scale"],
      golden["linear"],
      renormalize=renormalize,
  )
  return {r["name"].rpartition("/")[2]: r for r in parity_edit.compare_edit_math(out, e)}


def _failing(rows):
  return sorted(k for k, r in rows.items() if not r["ok"])


# --------------------------------------------------------------------------- fast stages
def test_edit_math_matches_the_reference(golden):
  rows = _edit_math_rows(golden)
  assert _failing(rows) == [], rows
  assert set(rows) == set(parity_edit.EDIT_MATH)


def test_ema_classifier_row_trips_the_edit_math(golden):
  """Quirk 8: the edit reads classifier.weight; the EMA row moves the direction and z'."""
  rows = _edit_math_rows(golden, edit_weights="ema")
  assert _failing(rows) == ["avg_cond2", "avg_latent2", "direction"], rows


def test_renormalised_average_trips_the_edit_math(golden):
  """Quirk 7: the average is not re-normalised; doing so moves avg_latent by ~6e-5."""
  rows = _edit_math_rows(golden, renormalize=True)
  assert {"avg_cond", "avg_latent", "avg_latent2"} <= set(_failing(rows)), rows
  assert rows["avg_latent"]["rel_err"] < 1e-3  # small: why the bound is 1e-6


def test_alignment_matches_the_reference(golden):
  a, e, cfg = golden["a"], golden["e"], golden["config"]
  clip = parity_edit.frames_dir(golden["dir"], cfg)
  if clip is None:
    pytest.skip(f"frames {cfg['frames']['path']} not found")
  rows = parity_edit.check_alignment(a, cfg, clip) + parity_edit.check_paste_final(e, a, clip)
  assert [r["name"] for r in rows if not r["ok"]] == [], rows
  names = {r["name"].rpartition("/")[2] for r in rows}
  assert {"landmarks", "quads", "inverse_coeffs", "resize_256", "crops_256"} <= names
  assert {"crops_256_nojpeg", "paste_final_T20"} <= names


def test_fast_crop_fails_the_reference_bound(golden):
  """``crop_from_quad`` (cv2 warp, INTER_AREA) is not the reference's crop: the check sees it."""
  a, cfg = golden["a"], golden["config"]
  clip = parity_edit.frames_dir(golden["dir"], cfg)
  if clip is None:
    pytest.skip(f"frames {cfg['frames']['path']} not found")
  frame = parity_edit.pil_rgb(clip / str(a["frames_paths"][0]))
  crop = alignment.crop_from_quad(frame, a["quads"][0], 256, border="constant")
  row = parity_edit.abs_row("crop", crop, a["crops_256_nojpeg"][0], parity_edit.TOL["crop_nojpeg"])
  assert not row["ok"], row


def test_registered_in_convert():
  assert (parity_edit, "edit_io.npz") in convert.PARITY_CHECKS


def test_torch_backend_is_refused(edit_dir):
  with pytest.raises(ValueError, match="JAX implementation only"):
    parity_edit.check(edit_dir, backend="torch")


def test_cli_reports_missing_files(tmp_path, edit_dir):
  """The CLI runs the edit check on a golden dir with ``edit_io.npz``; a missing state dict
  is one failing JSON row and exit status 1."""
  (tmp_path / parity_edit.EDIT_FILE).symlink_to(edit_dir / parity_edit.EDIT_FILE)
  r = subprocess.run(
      [sys.executable, "-m", "s3jax.convert", "parity", "--golden", str(tmp_path)],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 1, r.stderr
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert len(rows) == 1 and not rows[0]["ok"], r.stdout
  assert rows[0]["name"] == "jax/s3jax.parity.edit"
  assert parity_edit.DVA_SD_FILE in rows[0]["error"]


# ----------------------------------------------------------------------- the model stages
@pytest.fixture(scope="module")
def rows(edit_dir, golden):
  t_min = min(golden["config"]["T_values"])
  return parity_edit.check(edit_dir, ddim_frames=DDIM_FRAMES, t_values=(t_min,))


@pytest.mark.slow
def test_every_row_is_ok(rows):
  bad = [r for r in rows if not r["ok"]]
  assert bad == [], json.dumps(bad, indent=1)


@pytest.mark.slow
def test_rows_cover_every_stage(rows, golden):
  t = min(golden["config"]["T_values"])
  names = {r["name"] for r in rows}
  for stage in (
      "edit/align/landmarks",
      "edit/align/crops_256",
      "edit/align/paste_final_T20",
      "edit/encoders/cond",
      "edit/encoders/lnd_feats",
      "edit/encoders/mask",
      "edit/math/avg_cond2",
      "edit/unet/eps",
      f"edit/ddim/avg_xT_T{t}",
      f"edit/ddim/avg_img_recon_T{t}",
      f"edit/ddim/avg_img_T{t}",
      f"edit/paste/paste_bg_T{t}",
      f"edit/end_to_end/avg_img_T{t}",
      f"edit/end_to_end/paste_bg_T{t}",
  ):
    assert stage in names, stage
  for r in rows:
    if r["name"].startswith(("edit/ddim/avg_", "edit/end_to_end/")):
      assert r["frames"] == list(DDIM_FRAMES), r
  # Every measured error is reported next to its tolerance.
  for r in rows:
    assert "error" not in r, r
    assert any(k in r for k in ("rel_err", "max_abs_err", "mask_diff")), r
    assert any(k.startswith("tol") for k in r), r
  assert np.isfinite([r.get("rel_err", 0.0) for r in rows]).all()
