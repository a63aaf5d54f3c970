"""Face features of aligned crops, on both feature paths (``config.model.face_features``).

* ``dlib`` (offline; DESIGN.md "Frozen encoders without downloadable weights"): the
  128-d dlib descriptor stands in for z_id, the 68 dlib landmarks give z_lnd, and a
  landmark hull stands in for BiSeNet parsing. Landmark inputs are in pixel-index
  coordinates of the aligned crop (as ``AlignResult.landmarks_crop``).
* ``official`` (the published reference): :class:`OfficialFeatures` runs the frozen
  encoders of ``models.face_encoders`` (IR-SE50 z_id, MobileNet z_lnd, BiSeNet masks)
  on 256 px crops, jitted and chunked over the local devices.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Optional

import cv2
import dlib
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from s3jax import alignment, images
from s3jax.models import face_encoders

__all__ = [
    "get_face_recognizer",
    "dlib_descriptor",
    "identity_embeddings",
    "z_lnd_from_landmarks",
    "flip_landmarks",
    "FLIP_PERMUTATION",
    "hull_mask",
    "Z_ID_DIM",
    "Z_LND_DIM",
    "OFFICIAL_Z_ID_DIM",
    "OFFICIAL_SIZE",
    "OfficialFeatures",
    "resize_crops",
]

Z_ID_DIM = 128
Z_LND_DIM = 102
OFFICIAL_Z_ID_DIM = 512
OFFICIAL_SIZE = 256  # the crop size the reference's encoders are defined on


@functools.lru_cache(maxsize=None)
def get_face_recognizer():
  return dlib.face_recognition_model_v1(
      alignment.model_path("dlib_face_recognition_resnet_model_v1.dat")
  )


def _as_batch(crops) -> np.ndarray:
  x = np.asarray(crops)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise ValueError(f"expected (N, H, W, 3) uint8 crops, got {x.shape} {x.dtype}")
  return x


def dlib_descriptor(crops_uint8, landmarks_crop=None, normalize: bool = True) -> np.ndarray:
  """dlib ResNet face descriptor of aligned crops: (N, 128) float32.

  Landmarks: when ``landmarks_crop`` (N, 68, 2) is given those are used;
  otherwise the 68-point predictor runs on each crop inside
  ``alignment.CANONICAL_FACE_RECT`` (where dlib's HOG box lands on
  FFHQ-aligned crops).  We do not detect again: detection can fail on a
  tight crop, the fixed box cannot, and on the office clip the predicted
  points agree with the mapped frame landmarks to ~0.6 px mean at 256 px.
  dlib then makes its own 150 px chip (padding 0.25) from the 68 points.

  ``normalize=True`` (the z_id convention) L2-normalises each row, as the
  reference does with ArcFace features.  ``normalize=False`` gives dlib's raw
  vector, whose Euclidean distance is what dlib's 0.6 same-person threshold
  refers to.
  """
  x = _as_batch(crops_uint8)
  rec = get_face_recognizer()
  out = np.zeros((len(x), Z_ID_DIM), np.float32)
  for i, img in enumerate(x):
    img = np.ascontiguousarray(img)
    if landmarks_crop is not None:
      pts = np.asarray(landmarks_crop[i], dtype=np.float64)
    else:
      pts = alignment.predict_landmarks_in_crop(img)
    h, w = img.shape[:2]
    rect = dlib.rectangle(0, 0, w - 1, h - 1)
    shape = dlib.full_object_detection(
        rect, [dlib.point(int(round(px)), int(round(py))) for px, py in pts]
    )
    out[i] = np.asarray(rec.compute_face_descriptor(img, shape), np.float32)
  if normalize:
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
  return out


def identity_embeddings(crops, landmarks_crop=None) -> np.ndarray:
  """L2-normalised identity embeddings (dlib descriptor) for the ID metrics."""
  return dlib_descriptor(crops, landmarks_crop=landmarks_crop, normalize=True)


def z_lnd_from_landmarks(landmarks_crop, size: int = 256) -> np.ndarray:
  """z_lnd (N, 102) float32 from crop landmarks (N, 68, 2).

  Reference convention: the points are expressed in [0, 1] over the
  [16:240] window of the 256 px frame (the 224 px crop the landmark network
  sees), jaw points 0..16 dropped, (x, y) interleaved, clamped to [0, 1].
  For other crop sizes points are first mapped to the 256 px frame with the
  pixel-centre convention ``p256 = (p + 0.5) * 256 / size - 0.5``.
  """
  lm = np.asarray(landmarks_crop, dtype=np.float64)
  single = lm.ndim == 2
  if single:
    lm = lm[None]
  if lm.shape[1:] != (68, 2):
    raise ValueError(f"expected (N, 68, 2) landmarks, got {lm.shape}")
  p = (lm + 0.5) * (256.0 / size) - 0.5
  z = np.clip((p[:, 17:, :] - 16.0) / 224.0, 0.0, 1.0)
  z = z.reshape(len(lm), -1).astype(np.float32)  # x0, y0, x1, y1, ...
  return z[0] if single else z


def _flip_permutation() -> np.ndarray:
  perm = np.arange(68)
  pairs = []
  pairs += [(i, 16 - i) for i in range(17)]  # jaw
  pairs += [(17 + i, 26 - i) for i in range(5)]  # eyebrows
  pairs += [(31 + i, 35 - i) for i in range(5)]  # nostrils
  pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
  pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
  pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
  for a, b in pairs:
    perm[a], perm[b] = b, a
  # 27..30 (nose bridge), 51, 57, 62, 66 map to themselves.
  return perm


FLIP_PERMUTATION = _flip_permutation()


def flip_landmarks(landmarks_crop, size: int) -> np.ndarray:
  """Landmarks of the horizontally flipped crop (``crop[:, ::-1]``).

  x -> size - 1 - x, and the 68 indices are permuted to their mirror partners
  so index 36..41 is still the image-left eye after the flip.
  Works on (68, 2) or (N, 68, 2).
  """
  lm = np.asarray(landmarks_crop, dtype=np.float64)
  out = lm[..., FLIP_PERMUTATION, :].copy()
  out[..., 0] = (size - 1) - out[..., 0]
  return out


def hull_mask(landmarks_crop, size: int, for_video: bool = False) -> np.ndarray:
  """Landmark-hull face mask (size, size) uint8 in {0, 1}, standing in for BiSeNet.

  Construction (all in crop pixels, landmarks (68, 2)):

  * ``for_video=True`` (paste-back mask, the face only): filled convex hull
    of all 68 landmarks, after lifting the 10 eyebrow points (17..26) by 12%
    of the chin-to-brow distance so the mask covers the brows fully.
  * ``for_video=False`` (training mask, like BiSeNet's non-background,
    non-cloth region: face + hair + ears + some neck): with ``up`` the
    vector from the chin (8) to the brow centre (mean of 17..26) and
    ``centre`` the midpoint of jaw points 0 and 16, the hull of
      - the 68 landmarks;
      - the jaw points 0..16 widened by 15% about ``centre`` (ears);
      - the jaw points 0..16 reflected about the brow line (``p + 2 * (brow
        projection - p)`` along ``up``) and widened by 30% (forehead and
        top of the hair, ~1 face height above the brows);
      - jaw points 4..12 moved down by 0.35 * |up| (neck).
    The polygon is clipped to the crop.
  """
  lm = np.asarray(landmarks_crop, dtype=np.float64)
  if lm.shape != (68, 2):
    raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
  brow = lm[17:27].mean(0)
  up = brow - lm[8]
  h = max(np.linalg.norm(up), 1e-6)
  u = up / h
  if for_video:
    pts = lm.copy()
    pts[17:27] += 0.12 * up
  else:
    jaw = lm[0:17]
    centre = 0.5 * (lm[0] + lm[16])
    ears = centre + 1.15 * (jaw - centre)
    # reflect the jaw about the line through ``brow`` perpendicular to u
    d = (jaw - brow) @ u
    top = jaw - 2.0 * d[:, None] * u[None, :]
    tcentre = top.mean(0)
    top = tcentre + 1.30 * (top - tcentre)
    neck = lm[4:13] - 0.35 * up
    pts = np.concatenate([lm, ears, top, neck], axis=0)
  pts = np.clip(pts, -size, 2 * size)
  hull = cv2.convexHull(np.round(pts).astype(np.int32))
  mask = np.zeros((size, size), np.uint8)
  cv2.fillConvexPoly(mask, hull, 1)
  return mask


# ---------------------------------------------------------------------------
# The official path: the reference's frozen encoders
# ---------------------------------------------------------------------------
class OfficialFeatures:
  """IR-SE50 z_id, MobileNet z_lnd and BiSeNet video masks of aligned crops.

  Crops (N, C, C, 3) uint8 are resized to 256 px when C differs (the size the
  encoders' fixed crop windows assume) and fed as ``crop/127.5 - 1``, like the
  reference's model input. Each output is its own jitted program, so the identity
  metric runs IR-SE50 alone; crops go through in fixed-size chunks (the last one
  padded by repeating its last crop), split over every device of ``mesh``, and each
  program is compiled once per chunk size.

  Args:
    variables: ``OfficialEncoders`` variables (``{'params', 'batch_stats'}``), e.g.
      ``porting.dva_checkpoint.load_frozen_encoders(workdir)``.
    chunk: crops per call (rounded up to a multiple of the device count).
    mesh: a ``jax.sharding.Mesh``; default one axis over every device.
  """

  def __init__(self, variables, chunk: int = 8, mesh=None):
    self.model = face_encoders.OfficialEncoders()
    self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
    self.num_devices = int(self.mesh.size)
    self.chunk = int(chunk)
    self._repl = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.variables = jax.device_put(dict(variables), self._repl)
    model = self.model

    def video_mask(v, x):
      return model.apply(v, x, for_video=True, method="face_mask")[..., 0]

    fns = {
        "id_feats": lambda v, x: model.apply(v, x, method="id_feats"),
        "lnd_feats": lambda v, x: model.apply(v, x, method="lnd_feats"),
        "video_mask": video_mask,
    }
    self._jit = {
        k: jax.jit(f, in_shardings=(self._repl, self._batch), out_shardings=self._batch)
        for k, f in fns.items()
    }
    self._compiled = {}
    self._hash = None

  def params_hash(self) -> str:
    """sha256 of the encoder variables (computed once; they are frozen)."""
    if self._hash is None:
      h = hashlib.sha256()
      flat = jax.tree_util.tree_flatten_with_path(self.variables)[0]
      for path, v in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        v = np.ascontiguousarray(np.asarray(jax.device_get(v)))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(repr((v.shape, str(v.dtype))).encode())
        h.update(v.data)
      self._hash = h.hexdigest()
    return self._hash

  def chunk_size(self, num_crops: int) -> int:
    n = min(self.chunk, max(int(num_crops), 1))
    return -(-n // self.num_devices) * self.num_devices

  def _program(self, method: str, chunk: int, timings: dict):
    key = (method, chunk)
    if key not in self._compiled:
      t0 = time.perf_counter()
      x = jax.ShapeDtypeStruct(
          (chunk, OFFICIAL_SIZE, OFFICIAL_SIZE, 3), np.float32, sharding=self._batch
      )
      self._compiled[key] = self._jit[method].lower(self.variables, x).compile()
      timings["compile"] = timings.get("compile", 0.0) + time.perf_counter() - t0
    return self._compiled[key]

  def _run(self, method: str, crops_u8, timings: Optional[dict]) -> np.ndarray:
    timings = {} if timings is None else timings
    x = resize_crops(_as_batch(crops_u8), OFFICIAL_SIZE)
    m = len(x)
    chunk = self.chunk_size(m)
    fn = self._program(method, chunk, timings)
    outs = []
    for start in range(0, m, chunk):
      part = images.to_model(x[start : start + chunk])
      k = len(part)
      if k < chunk:
        part = np.concatenate([part, np.repeat(part[-1:], chunk - k, 0)])
      outs.append((fn(self.variables, jax.device_put(part, self._batch)), k))
    return np.concatenate([np.asarray(jax.device_get(o))[:k] for o, k in outs])

  def id_feats(self, crops_u8, timings: Optional[dict] = None) -> np.ndarray:
    """(N, 512) float32 L2-normalised ArcFace (IR-SE50) embeddings: z_id."""
    return self._run("id_feats", crops_u8, timings).astype(np.float32)

  def lnd_feats(self, crops_u8, timings: Optional[dict] = None) -> np.ndarray:
    """(N, 102) float32 landmark features (51 non-jaw points in [0, 1]): z_lnd."""
    return self._run("lnd_feats", crops_u8, timings).astype(np.float32)

  def video_masks(self, crops_u8, size: Optional[int] = None, timings=None) -> np.ndarray:
    """(N, S, S) uint8 {0, 1} BiSeNet paste-back masks (``face_mask(for_video=True)``).

    Computed at 256 px and resized (nearest, as the reference resizes its parsing) to
    ``size`` (default the crops' size).
    """
    crops = _as_batch(crops_u8)
    size = crops.shape[1] if size is None else int(size)
    masks = (self._run("video_mask", crops, timings) > 0.5).astype(np.uint8)
    if size != OFFICIAL_SIZE:
      masks = np.stack(
          [cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in masks]
      )
    return masks


def resize_crops(crops_u8, size: int) -> np.ndarray:
  """(N, C, C, 3) uint8 -> (N, size, size, 3): INTER_AREA down, INTER_CUBIC up."""
  x = _as_batch(crops_u8)
  if x.shape[1] == size:
    return x
  interp = cv2.INTER_AREA if x.shape[1] > size else cv2.INTER_CUBIC
  return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in x])
