"""Golden-vector checks of the reference's classifier edit of a video (``golden/edit``).

``check(golden_dir, backend='jax')`` returns one dict per check: ``name``, ``ok``, the measured
errors (``rel_err``, ``max_abs_err``, ``mean_abs_err`` or ``mask_diff``) and their tolerances
(``tol``, or ``tol_mean``/``tol_max``), as ``golden/edit/README.md`` sets them. Every setting
(image size, UNet, attribute, scale, T, alignment) comes from ``edit_io.npz['config']`` and the
array shapes.

Set A, alignment (``align_io.npz``; the clip's frames, found from the config's frame path):
the library's reference-exact path in ``s3jax.alignment``: dlib landmarks, ``ffhq_quad``,
``smooth_quads``, ``perspective_coeffs``, ``reference_resize``, ``reference_crop`` (with and
without the JPEG step) and ``reference_paste``. Later stages start from the golden landmarks
and quads.

Set B, edit (``edit_io.npz``, ``dva_state_dict.npz``, ``classifier_state_dict.npz``), stage by
stage from golden inputs: the frozen encoders and the BiSeNet video mask on ``imgs``; the edit
math (``editing.average_identity``, ``loading.Classifier.edit`` of the classifier that
``porting.classifier`` imports, i.e. ``models.editor.classifier_edit``, and the
``encoder.linear`` fusion) from the golden ``cond`` and ``lnd_feats``; one UNet call; DDIM
inversion and renders per T through ``editing.DDIMRunner`` (``diffusion.ddim_scan``) from the
golden ``imgs`` / ``avg_xT``; the hard paste. Then, as a loose smoke test, the whole chain from
``imgs`` alone at the smallest T. When torch is installed, the two Lightning checkpoints, read
as the importers read them, must equal the npz state dicts.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import pathlib
import re
import time

import dlib
import jax
import numpy as np
from PIL import Image

from s3jax import alignment, diffusion, editing, images
from s3jax.models.autoencoder import DVA, FaceFusion
from s3jax.models.editor import l2_normalize
from s3jax.models.unet import UNetConfig
from s3jax.parity.encoders import mask_diff, run_jax
from s3jax.parity.unet import rel_row
from s3jax.porting.classifier import classifier_from_state, read_classifier_state
from s3jax.porting.dva_checkpoint import split_state_dict
from s3jax.porting.state_dict import load_state_dict
from s3jax.porting.unet_keys import unet_params_from_torch

ALIGN_FILE = "align_io.npz"
EDIT_FILE = "edit_io.npz"
DVA_SD_FILE = "dva_state_dict.npz"
CLASSIFIER_SD_FILE = "classifier_state_dict.npz"


def _read_classifier(path) -> dict:
  return read_classifier_state(path)[0]


def _read_dva(path) -> dict:
  return load_state_dict(path, which="ema")


# Lightning-style copies of the state dicts (read with torch, an optional extra): each .ckpt,
# read as the importer reads it, must equal its npz.
CHECKPOINTS = {
    "dva_ema_unet.ckpt": (DVA_SD_FILE, _read_dva),
    "classifier.ckpt": (CLASSIFIER_SD_FILE, _read_classifier),
}

# golden/edit/README.md, "Tolerances".
TOL = {
    "landmarks": 0.0,  # px
    "transform": 1e-9,
    "inverse_coeffs": 1e-6,  # px between mapped corners
    "resize": (0.15, 1.0),  # (mean, max) grey levels
    "crop_jpeg": (0.25, 2.0),  # truncating warp, JPEG step
    "crop_nojpeg": (0.5, 3.0),
    "paste_final": (0.5, 1.0),
    "encoders": 1e-5,
    "mask": 1e-3,  # fraction of pixels
    "edit_math": 1e-6,
    "unet": 2e-5,
    "ddim_invert": 2e-3,
    "ddim_render": 5e-4,
    "paste_bg": 0.0,
    "end_to_end": 5e-2,
    "checkpoint": 0.0,
}
EDIT_MATH = ("avg_cond", "avg_cond_norm", "direction", "avg_cond2", "avg_latent", "avg_latent2")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ rows
def abs_row(name, out, ref, tols) -> dict:
  """Mean and max absolute difference (grey levels or pixels) against (tol_mean, tol_max)."""
  if np.shape(out) != np.shape(ref):
    return dict(name=name, ok=False, error=f"shape {np.shape(out)} != {np.shape(ref)}")
  d = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
  mean, mx = float(d.mean()), float(d.max())
  tol_mean, tol_max = tols
  ok = mean <= tol_mean and mx <= tol_max
  return dict(
      name=name, mean_abs_err=mean, max_abs_err=mx, tol_mean=tol_mean, tol_max=tol_max, ok=ok
  )


def max_row(name, out, ref, tol) -> dict:
  if np.shape(out) != np.shape(ref):
    return dict(name=name, ok=False, tol=tol, error=f"shape {np.shape(out)} != {np.shape(ref)}")
  e = float(np.max(np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))))
  return dict(name=name, max_abs_err=e, tol=tol, ok=bool(e <= tol))


def error_row(name, msg) -> dict:
  return dict(name=name, ok=False, error=msg)


# --------------------------------------------------------------------------------- inputs
def resolve_edit_dir(golden_dir) -> pathlib.Path:
  """The directory holding ``edit_io.npz``: ``golden_dir`` itself or its ``edit/``."""
  d = pathlib.Path(golden_dir)
  if not (d / EDIT_FILE).exists() and (d / "edit" / EDIT_FILE).exists():
    d = d / "edit"
  return d


def load_npz(path) -> dict:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def frames_dir(golden_dir, config: dict) -> pathlib.Path | None:
  """The clip folder the config names (``frames.path``), relative to an ancestor of the
  golden directory (``shared/data/office_clip`` from ``shared/golden/edit``)."""
  rel = pathlib.PurePosixPath(config["frames"]["path"])
  d = pathlib.Path(golden_dir).resolve()
  for base in (d, *d.parents):
    for cand in (base / rel, base / "data" / rel.name):
      if cand.is_dir():
        return cand
  return None


def pil_rgb(path_or_bytes) -> np.ndarray:
  """A JPEG decoded by PIL (libjpeg-turbo), as the reference's crop step reads frames."""
  src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with Image.open(src) as im:
    return np.asarray(im.convert("RGB"))


def _nhwc(a):
  return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def _nchw(a):
  return np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2)))


# ---------------------------------------------------------------------------- set A: align
def _map_points(coeffs, pts) -> np.ndarray:
  a, b, c, d, e, f, g, h = coeffs
  x, y = pts[:, 0], pts[:, 1]
  den = g * x + h * y + 1.0
  return np.stack([(a * x + b * y + c) / den, (d * x + e * y + f) / den], axis=1)


def check_alignment(a: dict, config: dict, clip: pathlib.Path | None) -> list[dict]:
  """Set A rows from ``align_io.npz`` arrays ``a``; ``clip`` is the folder of its frames."""
  acfg = config.get("alignment", {})
  size = int(config["unet"]["image_size"])
  names = [str(n) for n in a["frames_paths"]]
  rows = []

  # Landmarks from dlib's own decode of each frame (quirk 1), with the reference's detector.
  if clip is None:
    rows.append(error_row("edit/align/landmarks", f"frames {config['frames']['path']} not found"))
  else:
    lms = [
        alignment.detect_landmarks(dlib.load_rgb_image(str(clip / n)), **alignment.REFERENCE_DETECT)
        for n in names
    ]
    if any(lm is None for lm in lms):
      missing = [n for n, lm in zip(names, lms) if lm is None]
      rows.append(error_row("edit/align/landmarks", f"no face found in {missing}"))
    else:
      rows.append(max_row("edit/align/landmarks", np.stack(lms), a["landmarks"], TOL["landmarks"]))

  # Transform and smoothing from the golden landmarks.
  raw = np.stack(
      [alignment.ffhq_quad(lm, scale=float(acfg.get("scale", 1.0))) for lm in a["landmarks"]]
  )
  smooth = alignment.smooth_quads(
      raw, sigma_center=float(acfg.get("sigma_c", 1.0)), sigma_xy=float(acfg.get("sigma_xy", 3.0))
  )
  for tag, quads in (("raw", raw), ("smooth", smooth)):
    for key, v in zip("cxy", alignment.quad_to_cxy(quads)):
      rows.append(rel_row(f"edit/align/{key}_{tag}", v, a[f"{key}_{tag}"], TOL["transform"]))
  rows.append(rel_row("edit/align/quads", smooth, a["quads"], TOL["transform"]))

  # Inverse coefficients, compared through the corners they map (g, h are pure rounding).
  quads = a["quads"]
  err = 0.0
  for q, ref in zip(quads, a["inverse_coeffs"]):
    ours = alignment.perspective_coeffs(q, size)
    err = max(err, float(np.abs(_map_points(ours, q + 0.5) - _map_points(ref, q + 0.5)).max()))
  tol = TOL["inverse_coeffs"]
  rows.append(dict(name="edit/align/inverse_coeffs", max_abs_err=err, tol=tol, ok=err <= tol))

  # Resize of the reference's own 1024 JPEG crops.
  o = a["crop1024_jpeg_offsets"]
  jpegs = [a["crop1024_jpeg"][o[i] : o[i + 1]].tobytes() for i in range(len(o) - 1)]
  resized = np.stack([alignment.reference_resize(pil_rgb(j), size) for j in jpegs])
  rows.append(abs_row("edit/align/resize_256", resized, a["crops_256"], TOL["resize"]))

  if clip is None:
    for name in ("crops_256", "crops_256_nojpeg"):
      rows.append(error_row(f"edit/align/{name}", "frames not found"))
    return rows
  decoded = [pil_rgb(clip / n) for n in names]
  crop_size = int(acfg.get("crop_size", 1024))
  for key, quality, tols in (
      ("crops_256", 75, TOL["crop_jpeg"]),
      ("crops_256_nojpeg", None, TOL["crop_nojpeg"]),
  ):
    crops = np.stack(
        [
            alignment.reference_crop(f, q, size, crop_size, jpeg_quality=quality)
            for f, q in zip(decoded, quads)
        ]
    )
    rows.append(abs_row(f"edit/align/{key}", crops, a[key], tols))
  return rows


def check_paste_final(e: dict, a: dict, clip: pathlib.Path | None) -> list[dict]:
  """``paste_final_T*``: ``paste_bg_T*[f]`` pasted back into frame f (f = 0.. of the array)."""
  rows = []
  names = [str(n) for n in a["frames_paths"]]
  for key in sorted(k for k in e if re.fullmatch(r"paste_final_T\d+", k)):
    name = f"edit/align/{key}"
    if clip is None:
      rows.append(error_row(name, "frames not found"))
      continue
    t = key.rpartition("_T")[2]
    x0, y0, x1, y1 = (int(v) for v in e[f"{key}_box"])
    outs, outside = [], 0
    for f in range(len(e[key])):
      frame = pil_rgb(clip / names[f])
      # tensor2pil(paste_bg * 2 - 1): rint((t + 1) * 127.5), as images.to_uint8 rounds.
      crop = images.to_uint8(np.transpose(e[f"paste_bg_T{t}"][f], (1, 2, 0)) * 2.0 - 1.0)
      pasted = alignment.reference_paste(frame, crop, a["quads"][f])
      outs.append(pasted[y0:y1, x0:x1])
      keep = np.ones(frame.shape[:2], bool)
      keep[y0:y1, x0:x1] = False
      outside += int(np.count_nonzero(pasted[keep] != frame[keep]))
    row = abs_row(name, np.stack(outs), e[key], TOL["paste_final"])
    row["changed_outside_box"] = outside
    row["ok"] = bool(row["ok"] and outside == 0)
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------- set B: edit
def fuse(linear: dict, z_id, z_lnd) -> np.ndarray:
  """The DVA's ``encoder.linear``: Linear(cat(z_id, z_lnd)) with reference weights."""
  params = {"linear": {"kernel": np.asarray(linear["weight"]).T, "bias": linear["bias"]}}
  out = FaceFusion(np.shape(linear["weight"])[0]).apply({"params": params}, z_id, z_lnd)
  return np.asarray(out)


def edit_math(
    cond, lnd_feats, classifier, attribute: str, scale: float, linear: dict, renormalize=False
) -> dict:
  """The reference's identity average and classifier edit, through the library's functions.

  ``renormalize=False`` is the reference's average (quirk 7: only the edited code is
  L2-normalised); ``classifier`` edits with the weights it names (quirk 8: ``classifier.*``).
  """
  n = len(cond)
  avg = editing.average_identity(cond, renormalize=renormalize)[None]
  avg2 = classifier.edit(avg, attribute, scale)
  return {
      "avg_cond": avg,
      "avg_cond_norm": (avg - classifier.mean) / classifier.std,
      "direction": l2_normalize(classifier.direction(attribute))[None],
      "avg_cond2": avg2,
      "avg_latent": fuse(linear, np.repeat(avg, n, 0), lnd_feats),
      "avg_latent2": fuse(linear, np.repeat(avg2, n, 0), lnd_feats),
  }


def compare_edit_math(out: dict, e: dict) -> list[dict]:
  return [rel_row(f"edit/math/{k}", out[k], e[k], TOL["edit_math"]) for k in EDIT_MATH]


def dva_model(config: dict, sd: dict):
  """(DVA module, params) of the reference state dict, the UNet config from the golden JSON."""
  linear, unet, _ = split_state_dict(sd)
  cfg = UNetConfig.from_json(config["unet"])
  w, b = linear["encoder.linear.weight"], linear["encoder.linear.bias"]
  params = {
      "encoder": {"linear": {"kernel": np.ascontiguousarray(np.asarray(w).T), "bias": b}},
      "unet": unet_params_from_torch(unet, cfg),
  }
  return DVA(cfg), params


def check_edit(
    e: dict, config: dict, sd: dict, clf_sd: dict, ddim_frames=None, t_values=None
) -> list[dict]:
  """Set B rows, teacher-forced stage by stage, then the end-to-end smoke test.

  ``ddim_frames`` (default: all) are the frames that go through DDIM; the encoders and the
  identity average always see every frame. ``t_values`` (default: the config's) are the
  step counts checked; the end-to-end run uses the smallest.
  """
  rows = []
  imgs = e["imgs"]
  n = len(imgs)
  idx = np.arange(n) if ddim_frames is None else np.asarray(ddim_frames, np.int64).reshape(-1)
  known = [int(t) for t in config["T_values"]]
  t_values = known if t_values is None else [int(t) for t in t_values]
  if not set(t_values) <= set(known) or not t_values:
    raise ValueError(f"t_values {t_values} must be a non-empty subset of the golden {known}")
  extra = {} if ddim_frames is None else {"frames": [int(i) for i in idx]}
  enc_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
  linear = {"weight": enc_sd["linear.weight"], "bias": enc_sd["linear.bias"]}

  t0 = time.perf_counter()
  enc = run_jax(enc_sd, imgs)
  rows.append(rel_row("edit/encoders/cond", enc["id_feats"], e["cond"], TOL["encoders"]))
  rows.append(rel_row("edit/encoders/lnd_feats", enc["lnd_feats"], e["lnd_feats"], TOL["encoders"]))
  m = mask_diff(enc["face_mask_video"], e["mask"])
  rows.append(dict(name="edit/encoders/mask", mask_diff=m, tol=TOL["mask"], ok=m <= TOL["mask"]))
  logger.info("encoders: %.1f s", time.perf_counter() - t0)

  attribute, scale = config["attribute"], float(config["scale"])
  clf = classifier_from_state(clf_sd, edit_weights="classifier")
  if list(clf.names) != list(config["id_to_cls"]):
    rows.append(error_row("edit/math/id_to_cls", "the classifier's rows are not the config's"))
  elif clf.index(attribute) != int(config["attribute_id"]):
    msg = f"{attribute!r} is row {clf.index(attribute)}, the config says {config['attribute_id']}"
    rows.append(error_row("edit/math/attribute_id", msg))
  rows += compare_edit_math(edit_math(e["cond"], e["lnd_feats"], clf, attribute, scale, linear), e)

  t0 = time.perf_counter()
  model, params = dva_model(config, sd)
  eps_fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, method="denoise"))
  x, t, c = _nhwc(e["unet_check_x"]), e["unet_check_t"].astype(np.int32), e["unet_check_cond"]
  rows.append(
      rel_row("edit/unet/eps", _nchw(eps_fn(params, x, t, c)), e["unet_check_eps"], TOL["unet"])
  )
  logger.info("unet call: %.1f s", time.perf_counter() - t0)

  # Stage by stage: inversion of imgs, renders of the golden x_T, the hard paste. The runner
  # fuses the golden avg_cond(2) with lnd_feats (the edit-math rows pin that to avg_latent(2)).
  x0 = _nhwc(imgs[idx])
  avg, avg2 = (np.repeat(e[k], len(idx), 0) for k in ("avg_cond", "avg_cond2"))
  lnd = e["lnd_feats"][idx]
  runners = {}
  for t in t_values:
    t0 = time.perf_counter()
    runner = runners[t] = editing.DDIMRunner(model, params, t)
    ts = diffusion.respaced_timesteps(t)
    rows.append(max_row(f"edit/ddim/timestep_map_T{t}", ts, e[f"timestep_map_T{t}"], 0.0))
    x_t = _nchw(runner.invert(x0, avg, lnd))
    ref = e[f"avg_xT_T{t}"][idx]
    rows.append(rel_row(f"edit/ddim/avg_xT_T{t}", x_t, ref, TOL["ddim_invert"]) | extra)
    golden_xt = _nhwc(ref)
    for key, z in (("avg_img_recon", avg), ("avg_img", avg2)):
      img = (_nchw(runner.decode(golden_xt, z, lnd)) + 1.0) / 2.0
      ref = e[f"{key}_T{t}"][idx]
      rows.append(rel_row(f"edit/ddim/{key}_T{t}", img, ref, TOL["ddim_render"]) | extra)
    paste = np.where(e["mask"] > 0.5, e[f"avg_img_T{t}"], (imgs + 1.0) / 2.0)
    rows.append(max_row(f"edit/paste/paste_bg_T{t}", paste, e[f"paste_bg_T{t}"], TOL["paste_bg"]))
    logger.info("DDIM T=%d: %.1f s", t, time.perf_counter() - t0)

  # End to end from imgs alone (our encoders, average, edit, inversion, renders, mask).
  t0 = time.perf_counter()
  t = min(t_values)
  ours = edit_math(enc["id_feats"], enc["lnd_feats"], clf, attribute, scale, linear)
  avg, avg2 = (np.repeat(ours[k], len(idx), 0) for k in ("avg_cond", "avg_cond2"))
  lnd = enc["lnd_feats"][idx]
  x_t = runners[t].invert(x0, avg, lnd)
  recon = (_nchw(runners[t].decode(x_t, avg, lnd)) + 1.0) / 2.0
  edited = (_nchw(runners[t].decode(x_t, avg2, lnd)) + 1.0) / 2.0
  paste = np.where(enc["face_mask_video"][idx] > 0.5, edited, (imgs[idx] + 1.0) / 2.0)
  for key, out in (
      (f"avg_xT_T{t}", _nchw(x_t)),
      (f"avg_img_recon_T{t}", recon),
      (f"avg_img_T{t}", edited),
      (f"paste_bg_T{t}", paste),
  ):
    rows.append(rel_row(f"edit/end_to_end/{key}", out, e[key][idx], TOL["end_to_end"]) | extra)
  logger.info("end to end T=%d: %.1f s", t, time.perf_counter() - t0)
  return rows


def check_checkpoints(d: pathlib.Path) -> list[dict]:
  """Each Lightning .ckpt, read as an importer would (``ema_model.*``), equals its npz."""
  rows = []
  if importlib.util.find_spec("torch") is None:
    logger.info("torch is not installed: the .ckpt checks are skipped")
    return rows
  for ckpt, (npz, read) in CHECKPOINTS.items():
    if not (d / ckpt).exists():
      continue
    got, ref = read(d / ckpt), read(d / npz)
    missing = sorted(set(got) - set(ref))
    name = f"edit/checkpoint/{ckpt}"
    if missing:
      rows.append(error_row(name, f"keys not in {npz}: {missing[:5]}"))
      continue
    err = max(float(np.max(np.abs(np.asarray(got[k]) - ref[k]), initial=0.0)) for k in got)
    tol = TOL["checkpoint"]
    rows.append(dict(name=name, keys=len(got), max_abs_err=err, tol=tol, ok=err <= tol))
  return rows


BACKENDS = ("jax",)


def check(golden_dir, backend: str = "jax", *, ddim_frames=None, t_values=None) -> list[dict]:
  """Run the edit golden checks (set A, set B, checkpoints); rows as the module docstring.

  ``ddim_frames`` and ``t_values`` restrict the DDIM stages (the costly part: about a hundred
  256 px UNet calls per frame over T = 10 and 20); see ``check_edit``.
  """
  if backend != "jax":
    raise ValueError(
        f"the edit check runs the JAX implementation only (backend 'jax'), got {backend!r}; "
        "the encoder and UNet torch twins are checked by the dva golden set"
    )
  d = resolve_edit_dir(golden_dir)
  for f in (EDIT_FILE, DVA_SD_FILE, CLASSIFIER_SD_FILE):
    if not (d / f).exists():
      raise FileNotFoundError(f"golden file not found: {d / f}")
  e = load_npz(d / EDIT_FILE)
  config = json.loads(str(e["config"]))
  rows = []
  if (d / ALIGN_FILE).exists():
    a = load_npz(d / ALIGN_FILE)
    clip = frames_dir(d, config)
    t0 = time.perf_counter()
    rows += check_alignment(a, config, clip)
    rows += check_paste_final(e, a, clip)
    logger.info("alignment: %.1f s", time.perf_counter() - t0)
  sd, clf_sd = _read_dva(d / DVA_SD_FILE), _read_classifier(d / CLASSIFIER_SD_FILE)
  rows += check_edit(e, config, sd, clf_sd, ddim_frames=ddim_frames, t_values=t_values)
  rows += check_checkpoints(d)
  return rows
