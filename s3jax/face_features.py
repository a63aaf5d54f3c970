"""Face features of aligned crops, on both feature paths (``config.model.face_features``).

* ``dlib`` (offline; DESIGN.md "Frozen encoders without downloadable weights"): the
  128-d dlib descriptor stands in for z_id, the 68 dlib landmarks give z_lnd, and a
  landmark hull stands in for BiSeNet parsing. Landmark inputs are in pixel-index
  coordinates of the aligned crop (as ``AlignResult.landmarks_crop``).
* ``official`` (the published reference): ``face_encoding.OfficialFeatures`` runs the
  frozen encoders of ``models.face_encoders`` (IR-SE50 z_id, MobileNet z_lnd, BiSeNet
  masks) on crops brought to 256 px by this module's ``resize_crops``.
"""

from __future__ import annotations

import functools

import cv2
import dlib
import numpy as np

from s3jax import alignment, metrics

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
    "resize_crops",
    "video_identity_report",
]

Z_ID_DIM = 128
Z_LND_DIM = 102


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


def video_identity_report(original_frames, edited_frames, aligned, frame_indices) -> dict:
  """TL-ID / TG-ID of an edited video normalised by the input's (STIT 4.2), with dlib.

  Both videos are cropped with the same smoothed quads (``aligned``, an ``AlignResult``), over
  the edited ``frame_indices`` that have a detected face.
  """
  idx = [i for i in frame_indices if aligned.has_face[i]]
  if len(idx) < 2:
    return {"tl_id": None, "tg_id": None, "note": "needs at least 2 frames with a face"}

  def embeddings(frames):
    crops = [alignment.crop_from_quad(frames[i], aligned.quads[i], 256) for i in idx]
    return identity_embeddings(np.stack(crops))

  e_orig, e_edit = embeddings(original_frames), embeddings(edited_frames)
  return {
      "tl_id": float(metrics.tl_id_normalised(e_edit, e_orig)),
      "tg_id": float(metrics.tg_id_normalised(e_edit, e_orig)),
      "identity_preservation": float(metrics.identity_preservation(e_edit, e_orig)),
      "embedding": "dlib descriptor (128-d), the edited frames re-cropped with the smoothed quads",
      "num_frames": len(idx),
  }


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


def resize_crops(crops_u8, size: int) -> np.ndarray:
  """(N, C, C, 3) uint8 -> (N, size, size, 3): INTER_AREA down, INTER_CUBIC up."""
  x = _as_batch(crops_u8)
  if x.shape[1] == size:
    return x
  interp = cv2.INTER_AREA if x.shape[1] > size else cv2.INTER_CUBIC
  return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in x])
