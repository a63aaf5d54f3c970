"""Face detection, 68 landmarks, FFHQ quads, STIT temporal smoothing and crops.

Video path (DESIGN.md "Video path (STIT)"):

1. ``detect_landmarks`` finds the face (dlib HOG by default, score-thresholded;
   the CNN mmod detector, or the 'cascade' -- HOG, then the CNN only where HOG
   finds nothing -- as options) and its 68 landmarks.
2. ``ffhq_quad`` builds the FFHQ-style oriented square from the landmarks.
3. ``fill_face_gaps`` interpolates short runs of frames without a face and
   reports long ones (those pass through unedited).
4. ``smooth_quads`` applies STIT's Gaussian filters over time (sigma 1 on the
   centres, sigma 3 on the x/y half-axis vectors).
5. ``crop_from_quad`` warps the quad to ``size x size``.  ``paste_matrix``
   gives the inverse (crop -> frame) affine used for paste-back.

``align_video`` runs them all on frames in memory. Steps 2-4 need only the
detections: ``plan_alignment`` returns them as an ``AlignPlan`` (a few arrays per
frame), so a long video can be detected, planned and then cropped frame by frame
(``s3jax.edit_stream``).

Reference-exact path (the DVA reference's editing script, checked bit for bit
against its golden vectors by ``s3jax.parity.edit``): ``detect_landmarks`` with
``**REFERENCE_DETECT`` on frames decoded by ``dlib.load_rgb_image``, ``ffhq_quad``,
``smooth_quads`` over the clip, ``reference_crop`` (PIL QUAD warp at 1024 px,
JPEG round trip, PIL bilinear resize) and ``reference_paste`` (PIL PERSPECTIVE
with ``perspective_coeffs``, hard paste).  ``crop_from_quad`` and
``video.paste_back`` are faster and pad/blend differently; they are not exact.

Coordinate conventions
----------------------
* Landmarks and quads are in *pixel-index* coordinates (pixel centres at
  integers), as dlib returns them.
* The quad corner order is STIT's: ``[c-x-y, c-x+y, c+x+y, c+x-y]``, i.e.
  top-left, bottom-left, bottom-right, top-right of the crop (y points down).
* As in STIT/FFHQ (``PIL.Image.transform(..., QUAD, quad + 0.5)``) the quad
  corners, shifted by +0.5, are the *outer edges* of the crop: continuous crop
  coordinate ``u in [0, size]`` maps linearly onto the quad.  ``crop_matrix``
  and ``paste_matrix`` are the exact 2x3 affines between pixel-index
  coordinates of frame and crop under that convention.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import os
import time
from typing import Iterable, List, NamedTuple, Optional, Sequence

import cv2
import dlib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter1d
from tqdm import tqdm

__all__ = [
    "NoFaceError",
    "AlignResult",
    "GapFill",
    "model_path",
    "get_detector",
    "detector_stages",
    "detector_name",
    "DETECTORS",
    "FaceDetection",
    "detect_face",
    "detect_faces_batch",
    "get_shape_predictor",
    "detect_landmarks",
    "detect_landmarks_batch",
    "ffhq_quad",
    "quad_to_cxy",
    "cxy_to_quad",
    "smooth_quads",
    "fill_face_gaps",
    "crop_matrix",
    "paste_matrix",
    "crop_from_quad",
    "REFERENCE_DETECT",
    "reference_crop",
    "jpeg_round_trip",
    "reference_resize",
    "perspective_coeffs",
    "reference_paste",
    "transform_points",
    "landmarks_in_crop",
    "predict_landmarks_in_crop",
    "align_video",
    "quad_jitter",
    "CANONICAL_FACE_RECT",
]

# Minimum HOG score for a detection to count as a face.  dlib's HOG detector
# gave a 0.12-score false positive on skimage's astronaut at upsample=1, while
# the real faces we measured (astronaut, office clip at 480-640 px wide) score
# 1.1-2.3.
DEFAULT_HOG_MIN_SCORE = 0.5
# Minimum mmod (CNN) confidence.
DEFAULT_CNN_MIN_SCORE = 0.3
# Frames are downscaled for detection so that their longer side is at most
# this; landmarks are then predicted on the full-resolution frame.
DEFAULT_DETECT_MAX_SIDE = 640
# Where dlib's HOG detector puts its box on an FFHQ-aligned crop, as a
# fraction of the crop size (left, top, right, bottom).  Measured on aligned
# crops of the office clip and the astronaut (see tests); used to run the
# shape predictor on crops without detecting again.
CANONICAL_FACE_RECT = (0.186, 0.319, 0.784, 0.916)
# The DVA reference's detection: HOG at upsample 0 on the full-resolution frame, no
# score threshold, its first detection (``detect_landmarks(frame, **REFERENCE_DETECT)``).
REFERENCE_DETECT = dict(upsample=0, min_score=0.0, detect_max_side=None, pick="first")
# Detector kinds: dlib's HOG, its CNN (mmod), and 'cascade': HOG, then the CNN only on
# frames where HOG finds nothing. On an animated talking head HOG found 79% of the faces
# and the CNN 99.6% at 8.5x the time, so the cascade pays the CNN only on HOG's misses.
DETECTORS = ("hog", "cnn", "cascade")
CASCADE = ("hog", "cnn")


class NoFaceError(RuntimeError):
  """No face was found in any frame (or in the image that needs one)."""


# --------------------------------------------------------------------------
# Models (loaded once per process)
# --------------------------------------------------------------------------


def model_path(name: str) -> str:
  """Absolute path of a dlib model file shipped in ``face_recognition_models``."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "the 'face_recognition_models' package is required for the dlib "
        "models (pip install face_recognition_models); nothing is downloaded"
    )
  root = list(spec.submodule_search_locations)[0]
  path = os.path.join(root, "models", name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dlib model {name!r} not found at {path}")
  return path


@functools.lru_cache(maxsize=None)
def get_detector(kind: str = "hog"):
  if kind == "hog":
    return dlib.get_frontal_face_detector()
  if kind == "cnn":
    return dlib.cnn_face_detection_model_v1(model_path("mmod_human_face_detector.dat"))
  raise ValueError(f"get_detector kind must be 'hog' or 'cnn', got {kind!r}")


def detector_stages(detector="hog"):
  """[(kind, dlib detector)] that detection tries in order, the first with a face winning.

  ``detector``: 'hog', 'cnn', 'cascade' (HOG then CNN), or a sequence of
  ``(kind, detector object)`` pairs with kind 'hog' (an object with dlib's ``run``) or
  'cnn' (callable like ``cnn_face_detection_model_v1``), e.g. wrapped detectors.
  """
  if isinstance(detector, str):
    if detector not in DETECTORS:
      raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    kinds = CASCADE if detector == "cascade" else (detector,)
    return [(k, get_detector(k)) for k in kinds]
  stages = [(str(k), d) for k, d in detector]
  bad = [k for k, _ in stages if k not in CASCADE]
  if bad or not stages:
    raise ValueError(f"detector stages need kinds in {CASCADE}, got {[k for k, _ in stages]}")
  return stages


def detector_name(detector) -> str:
  """The name of a ``detector`` argument for reports and cache keys ('hog+cnn' for stages)."""
  if isinstance(detector, str):
    return detector
  return "+".join(str(k) for k, _ in detector)


@functools.lru_cache(maxsize=None)
def get_shape_predictor():
  return dlib.shape_predictor(model_path("shape_predictor_68_face_landmarks.dat"))


def _as_rgb_uint8(frame) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.ndim == 2:
    frame = np.stack([frame] * 3, axis=-1)
  if frame.ndim != 3 or frame.shape[-1] not in (3, 4):
    raise ValueError(f"expected an HxWx3 RGB image, got shape {frame.shape}")
  frame = frame[..., :3]
  if frame.dtype != np.uint8:
    raise ValueError(f"expected uint8 RGB, got dtype {frame.dtype}")
  return np.ascontiguousarray(frame)


def _shape_to_array(shape) -> np.ndarray:
  return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


# --------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------


def _detect_rects(img: np.ndarray, kind: str, det, upsample: int, min_score: float):
  """[(left, top, right, bottom, score)] on ``img`` above ``min_score``."""
  out = []
  if kind == "hog":
    rects, scores, _ = det.run(img, upsample, 0.0)
    for r, s in zip(rects, scores):
      if s >= min_score:
        out.append((r.left(), r.top(), r.right(), r.bottom(), float(s)))
  else:
    for d in det(img, upsample):
      if d.confidence >= min_score:
        r = d.rect
        out.append((r.left(), r.top(), r.right(), r.bottom(), float(d.confidence)))
  return out


class FaceDetection(NamedTuple):
  landmarks: Optional[np.ndarray]  # (68, 2) float64 frame pixels, None without a face
  score: Optional[float]  # HOG score / mmod confidence of the picked box
  source: Optional[str]  # the detector kind that found it ('hog' | 'cnn'), None without


def detect_face(
    frame,
    detector="hog",
    upsample: Optional[int] = None,
    min_score: Optional[float] = None,
    detect_max_side: Optional[int] = DEFAULT_DETECT_MAX_SIDE,
    pick: str = "largest",
) -> FaceDetection:
  """The face ``detect_landmarks`` finds, with its score and the detector kind that found it.

  ``detector`` as ``detector_stages`` takes it: the stages run in order and the first
  one with a face above its threshold wins, so 'cascade' runs the CNN only when HOG
  finds nothing. Each stage keeps its own conventions: ``upsample=None`` tries 0 and,
  only if nothing is found, 1; ``min_score=None`` is the kind's default threshold
  (``DEFAULT_HOG_MIN_SCORE`` / ``DEFAULT_CNN_MIN_SCORE``), a given one applies to all.
  """
  if pick not in ("largest", "first"):
    raise ValueError(f"pick must be 'largest' or 'first', got {pick!r}")
  stages = detector_stages(detector)
  img = _as_rgb_uint8(frame)
  h, w = img.shape[:2]
  scale = 1.0
  small = img
  if detect_max_side is not None and max(h, w) > detect_max_side:
    scale = detect_max_side / float(max(h, w))
    small = cv2.resize(
        img,
        (max(1, int(round(w * scale))), max(1, int(round(h * scale)))),
        interpolation=cv2.INTER_AREA,
    )
  ups = [upsample] if upsample is not None else [0, 1]
  rects, source = [], None
  for kind, det in stages:
    if min_score is not None:
      thr = min_score
    else:
      thr = DEFAULT_HOG_MIN_SCORE if kind == "hog" else DEFAULT_CNN_MIN_SCORE
    for up in ups:
      rects = _detect_rects(small, kind, det, up, thr)
      if rects:
        break
    if rects:
      source = kind
      break
  if not rects:
    return FaceDetection(None, None, None)
  if pick == "first":
    l, t, r, b, s = rects[0]
  else:
    l, t, r, b, s = max(rects, key=lambda q: ((q[2] - q[0]) * (q[3] - q[1]), q[4]))
  inv = 1.0 / scale
  rect = dlib.rectangle(
      int(round(l * inv)), int(round(t * inv)), int(round(r * inv)), int(round(b * inv))
  )
  lm = _shape_to_array(get_shape_predictor()(img, rect))
  return FaceDetection(lm, s, source)


def detect_landmarks(
    frame,
    detector="hog",
    upsample: Optional[int] = None,
    min_score: Optional[float] = None,
    detect_max_side: Optional[int] = DEFAULT_DETECT_MAX_SIDE,
    return_score: bool = False,
    pick: str = "largest",
):
  """68 landmarks (68, 2) float64 of the largest face in an RGB uint8 frame, or None.

  Detection runs on a copy downscaled so its longer side is at most
  ``detect_max_side`` (None: full size); the 68-point predictor then runs on
  the full-resolution frame.  ``upsample=None`` tries 0 and, only if nothing
  is found, 1 -- fast on large faces, still finds faces down to ~40 px (HOG).
  Detections below ``min_score`` (HOG score / mmod confidence) are dropped;
  among the rest the largest box wins (ties: higher score), or with
  ``pick='first'`` dlib's first one, as the reference takes it.  ``detector``:
  'hog', 'cnn' or 'cascade' (see ``detect_face``, which also says which one found it).
  With ``return_score=True`` returns ``(landmarks, score)`` (``(None, None)``
  when nothing is found).
  """
  found = detect_face(
      frame,
      detector=detector,
      upsample=upsample,
      min_score=min_score,
      detect_max_side=detect_max_side,
      pick=pick,
  )
  return (found.landmarks, found.score) if return_score else found.landmarks


def detect_faces_batch(
    frames: Iterable,
    detector="hog",
    upsample: Optional[int] = None,
    progress: bool = False,
    **kwargs,
) -> List[FaceDetection]:
  """``detect_face`` over frames; a tqdm bar when ``progress``."""
  stages = detector_stages(detector)  # load the models once, not per frame
  it = frames
  if progress:
    it = tqdm(frames, desc="landmarks", total=len(frames) if hasattr(frames, "__len__") else None)
  return [detect_face(f, detector=stages, upsample=upsample, **kwargs) for f in it]


def detect_landmarks_batch(
    frames: Iterable,
    detector="hog",
    upsample: Optional[int] = None,
    progress: bool = False,
    **kwargs,
) -> List[Optional[np.ndarray]]:
  """``detect_landmarks`` over frames; a tqdm bar when ``progress``."""
  found = detect_faces_batch(
      frames, detector=detector, upsample=upsample, progress=progress, **kwargs
  )
  return [f.landmarks for f in found]


# --------------------------------------------------------------------------
# Quads
# --------------------------------------------------------------------------


def ffhq_quad(landmarks68, scale: float = 1.0) -> np.ndarray:
  """FFHQ oriented crop square (4, 2) from 68 landmarks (STIT corner order)."""
  lm = np.asarray(landmarks68, dtype=np.float64)
  if lm.shape != (68, 2):
    raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
  eye_left = lm[36:42].mean(0)
  eye_right = lm[42:48].mean(0)
  eye_avg = 0.5 * (eye_left + eye_right)
  eye_to_eye = eye_right - eye_left
  mouth_avg = 0.5 * (lm[48] + lm[54])
  eye_to_mouth = mouth_avg - eye_avg
  x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
  x = x / np.hypot(*x)
  x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) * scale
  y = np.flipud(x) * np.array([-1.0, 1.0])
  c = eye_avg + eye_to_mouth * 0.1
  return cxy_to_quad(c, x, y)


def cxy_to_quad(c, x, y) -> np.ndarray:
  """Centre and half-axis vectors -> quad; works on (..., 2) arrays."""
  c, x, y = (np.asarray(a, dtype=np.float64) for a in (c, x, y))
  return np.stack([c - x - y, c - x + y, c + x + y, c + x - y], axis=-2)


def quad_to_cxy(quads):
  """Quad(s) (..., 4, 2) -> (c, x, y) with ``quad = cxy_to_quad(c, x, y)``."""
  q = np.asarray(quads, dtype=np.float64)
  c = q.mean(axis=-2)
  x = 0.25 * ((q[..., 3, :] - q[..., 0, :]) + (q[..., 2, :] - q[..., 1, :]))
  y = 0.25 * ((q[..., 1, :] - q[..., 0, :]) + (q[..., 2, :] - q[..., 3, :]))
  return c, x, y


def smooth_quads(quads, sigma_center: float = 1.0, sigma_xy: float = 3.0) -> np.ndarray:
  """STIT temporal smoothing: Gaussian over time on centres and x/y vectors.

  ``quads`` is (N, 4, 2).  Uses ``scipy.ndimage.gaussian_filter1d`` with its
  default 'reflect' boundary, as STIT does.  A sigma of 0 disables that part.
  """
  q = np.asarray(quads, dtype=np.float64)
  if q.ndim != 3 or q.shape[1:] != (4, 2):
    raise ValueError(f"expected (N, 4, 2) quads, got {q.shape}")
  if len(q) < 2:
    return q.copy()
  c, x, y = quad_to_cxy(q)
  if sigma_center:
    c = gaussian_filter1d(c, sigma=sigma_center, axis=0)
  if sigma_xy:
    x = gaussian_filter1d(x, sigma=sigma_xy, axis=0)
    y = gaussian_filter1d(y, sigma=sigma_xy, axis=0)
  return cxy_to_quad(c, x, y)


class GapFill(NamedTuple):
  quads: np.ndarray  # (N, 4, 2); long gaps hold the nearest valid quad
  interpolated: np.ndarray  # (N,) bool: filled from neighbours (short gap)
  passthrough: List[int]  # frames in long gaps: leave them unedited
  long_gaps: List[tuple]  # [(start, end_exclusive)] of the long gaps


def fill_face_gaps(quads: Sequence[Optional[np.ndarray]], max_gap: int = 5) -> GapFill:
  """Interpolate runs of at most ``max_gap`` frames without a face.

  Interior gaps are filled by linear interpolation of (centre, x, y) between
  the two neighbouring detections; gaps at the start or end of the video
  (only one neighbour) hold the nearest detection.  Longer gaps are reported
  in ``passthrough``/``long_gaps``; their ``quads`` entries hold the nearest
  valid quad so arrays stay rectangular, but they must not be edited.
  Raises ``NoFaceError`` when no frame has a quad.
  """
  n = len(quads)
  valid = np.array([q is not None for q in quads], dtype=bool)
  if n == 0 or not valid.any():
    raise NoFaceError(f"no face found in any of the {n} frames")
  out = np.zeros((n, 4, 2), np.float64)
  for i in np.flatnonzero(valid):
    out[i] = np.asarray(quads[i], dtype=np.float64)
  interpolated = np.zeros(n, bool)
  passthrough, long_gaps = [], []
  idx = np.flatnonzero(valid)
  i = 0
  while i < n:
    if valid[i]:
      i += 1
      continue
    j = i
    while j < n and not valid[j]:
      j += 1
    prev = i - 1 if i > 0 else None
    nxt = j if j < n else None
    length = j - i
    for k in range(i, j):
      if prev is not None and nxt is not None:
        t = (k - prev) / float(nxt - prev)
        c0, x0, y0 = quad_to_cxy(out[prev])
        c1, x1, y1 = quad_to_cxy(out[nxt])
        q = cxy_to_quad(c0 + t * (c1 - c0), x0 + t * (x1 - x0), y0 + t * (y1 - y0))
      else:
        near = prev if prev is not None else nxt
        if prev is not None and nxt is not None:
          near = prev if k - prev <= nxt - k else nxt
        q = out[near]
      out[k] = q
    if length <= max_gap:
      interpolated[i:j] = True
    else:
      # Nearest valid detection for long gaps (not an interpolation).
      for k in range(i, j):
        near = idx[np.argmin(np.abs(idx - k))]
        out[k] = out[near]
      passthrough.extend(range(i, j))
      long_gaps.append((i, j))
    i = j
  return GapFill(out, interpolated, passthrough, long_gaps)


def quad_jitter(quads) -> float:
  """Mean norm (pixels) of the second temporal difference of the quad corners.

  0 for constant-velocity motion; large for frame-to-frame shake.
  """
  q = np.asarray(quads, dtype=np.float64)
  if len(q) < 3:
    return 0.0
  d2 = q[2:] - 2.0 * q[1:-1] + q[:-2]
  return float(np.linalg.norm(d2, axis=-1).mean())


# --------------------------------------------------------------------------
# Warps
# --------------------------------------------------------------------------


def paste_matrix(quad, size: int) -> np.ndarray:
  """2x3 affine: crop pixel-index coords -> frame pixel-index coords.

  Exact for parallelogram quads (all quads built here are squares); a
  general quad is fitted in the least-squares sense over its 4 corners.
  """
  q = np.asarray(quad, dtype=np.float64) + 0.5  # outer edges, continuous
  # continuous crop corners, in the quad's corner order (TL, BL, BR, TR)
  src = np.array([[0, 0], [0, size], [size, size], [size, 0]], np.float64)
  a = np.concatenate([src, np.ones((4, 1))], axis=1)  # (4, 3)
  m_cont, *_ = np.linalg.lstsq(a, q, rcond=None)  # (3, 2): cont crop -> cont frame
  m = m_cont.T  # (2, 3)
  # index coords: frame_idx = M_cont(crop_idx + 0.5) - 0.5
  out = m.copy()
  out[:, 2] = m[:, 2] + m[:, :2] @ np.array([0.5, 0.5]) - 0.5
  return out


def crop_matrix(quad, size: int) -> np.ndarray:
  """2x3 affine: frame pixel-index coords -> crop pixel-index coords."""
  return cv2.invertAffineTransform(paste_matrix(quad, size))


def transform_points(points, matrix) -> np.ndarray:
  p = np.asarray(points, dtype=np.float64)
  m = np.asarray(matrix, dtype=np.float64)
  return p @ m[:, :2].T + m[:, 2]


def landmarks_in_crop(landmarks, quad, size: int) -> np.ndarray:
  """Frame landmarks mapped into the crop's pixel coordinates."""
  return transform_points(landmarks, crop_matrix(quad, size))


def crop_from_quad(
    frame, quad, size: int, transform_size: int = 1024, border: str = "reflect"
) -> np.ndarray:
  """Warp ``quad`` of ``frame`` to a ``size x size`` uint8 crop.

  Equivalent to FFHQ's "crop at 1024 then resize": the quad is warped with
  bilinear filtering to an intermediate square of ``m * size`` pixels, where
  ``m`` is the smallest integer with ``m * size >= quad side`` (so the warp
  itself never minifies), capped at ``transform_size``; then an INTER_AREA
  resize (an exact box filter for integer ``m``) brings it to ``size``.
  ``border``: 'reflect' (like FFHQ's padded recipe, default) or 'constant'
  (black, like STIT without padding).
  """
  img = _as_rgb_uint8(frame)
  q = np.asarray(quad, dtype=np.float64)
  side = max(np.hypot(*(q[3] - q[0])), np.hypot(*(q[1] - q[0])))
  mult = max(1, int(np.ceil(side / size)))
  inter = min(size * mult, max(size, transform_size))
  bmode = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}[border]
  m = crop_matrix(q, inter)
  out = cv2.warpAffine(img, m, (inter, inter), flags=cv2.INTER_LINEAR, borderMode=bmode)
  if inter != size:
    out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
  return out


# --------------------------------------------------------------------------
# The DVA reference's crop and paste-back (PIL, bit for bit)
# --------------------------------------------------------------------------


def reference_crop(
    frame,
    quad,
    size: int = 256,
    transform_size: int = 1024,
    jpeg_quality: Optional[int] = 75,
) -> np.ndarray:
  """The reference's model input: ``size x size`` uint8 crop of ``quad``, bit for bit.

  Its ``crop_image`` (FFHQ's recipe without padding) on a PIL-decoded frame: frames
  whose quad diagonal is 4 * ``transform_size`` or more are first shrunk (LANCZOS),
  the frame is cut to the quad's box plus a border, and PIL's QUAD transform (a bilinear
  map of ``quad + 0.5`` that truncates to uint8, black outside the frame) warps it to
  ``transform_size``. The reference then saves that crop as a JPEG (PIL defaults,
  quality 75; ``jpeg_quality=None`` skips it) and its data set resizes it with PIL's
  antialiased bilinear (``reference_resize``).
  """
  img = Image.fromarray(_as_rgb_uint8(frame))
  q = np.array(quad, dtype=np.float64)
  if q.shape != (4, 2):
    raise ValueError(f"expected a (4, 2) quad, got {q.shape}")
  # The reference's qsize is the quad's diagonal (2*sqrt(2)*|x|), not FFHQ's side 2*|x|.
  qsize = np.hypot(*((q[3] - q[1]) / 2)) * 2
  shrink = int(np.floor(qsize / transform_size * 0.5))
  if shrink > 1:
    rsize = (int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink)))
    img = img.resize(rsize, Image.Resampling.LANCZOS)
    q /= shrink
    qsize /= shrink
  border = max(int(np.rint(qsize * 0.1)), 3)
  box = (
      max(int(np.floor(q[:, 0].min())) - border, 0),
      max(int(np.floor(q[:, 1].min())) - border, 0),
      min(int(np.ceil(q[:, 0].max())) + border, img.size[0]),
      min(int(np.ceil(q[:, 1].max())) + border, img.size[1]),
  )
  if box[2] - box[0] < img.size[0] or box[3] - box[1] < img.size[1]:
    img = img.crop(box)
    q -= box[:2]
  img = img.transform(
      (transform_size, transform_size),
      Image.Transform.QUAD,
      tuple((q + 0.5).flatten()),
      Image.Resampling.BILINEAR,
  )
  out = np.asarray(img)
  if jpeg_quality is not None:
    out = jpeg_round_trip(out, jpeg_quality)
  return reference_resize(out, size)


def jpeg_round_trip(image, quality: int = 75) -> np.ndarray:
  """Encode ``image`` (H, W, 3) uint8 as a PIL JPEG (4:2:0) and decode it again."""
  buf = io.BytesIO()
  Image.fromarray(_as_rgb_uint8(image)).save(buf, format="JPEG", quality=int(quality))
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"))


def reference_resize(image, size: int) -> np.ndarray:
  """PIL's antialiased bilinear resize of a square uint8 image to ``size x size``.

  The reference data set's ``Resize(size)`` + ``CenterCrop(size)`` on a square crop.
  """
  img = _as_rgb_uint8(image)
  if img.shape[0] != img.shape[1]:
    raise ValueError(f"expected a square image, got {img.shape[:2]}")
  if img.shape[0] == size:
    return img.copy()
  return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def perspective_coeffs(quad, size: int) -> np.ndarray:
  """PIL PERSPECTIVE coefficients (a..h), continuous frame coords -> continuous crop coords.

  The projective map taking the quad's outer corners ``quad + 0.5`` to the crop's
  corners (0, 0), (0, size), (size, size), (size, 0), as the reference's
  ``calc_alignment_coefficients``: X' = (aX + bY + c) / (gX + hY + 1), Y' likewise.
  """
  src = np.asarray(quad, dtype=np.float64) + 0.5
  dst = np.array([[0, 0], [0, size], [size, size], [size, 0]], np.float64)
  a = np.zeros((8, 8), np.float64)
  for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
    a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
    a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
  return np.linalg.solve(a, dst.reshape(8))


def reference_paste(frame, crop, quad) -> np.ndarray:
  """The reference's paste-back: ``crop`` warped into ``frame`` over ``quad``, hard.

  PIL PERSPECTIVE (``perspective_coeffs``) with bilinear sampling that truncates to
  uint8; every frame pixel whose centre maps inside the crop is replaced, the rest
  are kept bit for bit. Returns a new (H, W, 3) uint8 frame.
  """
  base = Image.fromarray(_as_rgb_uint8(frame))
  c = _as_rgb_uint8(crop)
  coeffs = perspective_coeffs(quad, c.shape[0])
  warped = (
      Image.fromarray(c)
      .convert("RGBA")
      .transform(base.size, Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BILINEAR)
  )
  base.paste(warped, (0, 0), mask=warped)
  return np.asarray(base)


def predict_landmarks_in_crop(crop) -> np.ndarray:
  """68 landmarks on an FFHQ-aligned crop without detecting again.

  Runs dlib's shape predictor inside ``CANONICAL_FACE_RECT`` (where the HOG
  detector's box lands on aligned crops), so it cannot fail.
  """
  img = _as_rgb_uint8(crop)
  h, w = img.shape[:2]
  l, t, r, b = CANONICAL_FACE_RECT
  rect = dlib.rectangle(int(round(l * w)), int(round(t * h)), int(round(r * w)), int(round(b * h)))
  return _shape_to_array(get_shape_predictor()(img, rect))


# --------------------------------------------------------------------------
# Whole video
# --------------------------------------------------------------------------


@dataclasses.dataclass
class AlignResult:
  crops: np.ndarray  # (N, size, size, 3) uint8, from the smoothed quads
  quads: np.ndarray  # (N, 4, 2) smoothed quads (frame pixel coords)
  raw_quads: np.ndarray  # (N, 4, 2) per-frame quads after gap filling, before smoothing
  landmarks_crop: np.ndarray  # (N, 68, 2) landmarks in crop pixel coords
  has_face: np.ndarray  # (N,) bool: detected in this frame
  interpolated: np.ndarray  # (N,) bool: short gap, quad interpolated
  passthrough: List[int]  # frames to leave unedited (long gaps)
  report: dict
  size: int = 256
  # (N,) the detector kind that found each frame's face ('hog' | 'cnn'), None without one
  detector_per_frame: List[Optional[str]] = dataclasses.field(default_factory=list)

  def __len__(self):
    return len(self.crops)


def _segments(mask: np.ndarray):
  """[(start, end)] runs of True."""
  runs, i, n = [], 0, len(mask)
  while i < n:
    if mask[i]:
      j = i
      while j < n and mask[j]:
        j += 1
      runs.append((i, j))
      i = j
    else:
      i += 1
  return runs


@dataclasses.dataclass
class AlignPlan:
  """What ``align_video`` decides from the detections alone, before any crop: the small
  per-frame arrays a long video keeps while its frames stream (``plan_alignment``)."""

  quads: np.ndarray  # (N, 4, 2) smoothed quads (frame pixel coords)
  raw_quads: np.ndarray  # (N, 4, 2) after gap filling, before smoothing
  landmarks: List[Optional[np.ndarray]]  # (68, 2) detected landmarks (frame px) or None
  has_face: np.ndarray  # (N,) bool: detected in this frame
  interpolated: np.ndarray  # (N,) bool: short gap, quad interpolated
  passthrough: List[int]  # frames to leave unedited (long gaps)
  report: dict
  detector_per_frame: List[Optional[str]]

  def crop_landmarks(self, i: int, crop) -> np.ndarray:
    """Frame ``i``'s landmarks in pixels of ``crop`` (its crop from the smoothed quad): the
    detected ones mapped through the quad, or for a frame without a detection the shape
    predictor's on the crop."""
    if self.landmarks[i] is not None:
      return landmarks_in_crop(self.landmarks[i], self.quads[i], np.shape(crop)[0])
    return predict_landmarks_in_crop(crop)

  def result(self, crops, report: dict) -> "AlignResult":
    """The ``AlignResult`` of this plan and its frames' crops (landmarks mapped to them)."""
    crops = np.asarray(crops)
    return AlignResult(
        crops=crops,
        quads=self.quads,
        raw_quads=self.raw_quads,
        landmarks_crop=np.stack([self.crop_landmarks(i, c) for i, c in enumerate(crops)]),
        has_face=self.has_face,
        interpolated=self.interpolated,
        passthrough=self.passthrough,
        report=report,
        size=int(crops.shape[1]),
        detector_per_frame=self.detector_per_frame,
    )


def plan_alignment(
    found: Sequence[FaceDetection],
    detector="hog",
    max_gap: int = 5,
    sigma_center: float = 1.0,
    sigma_xy: float = 3.0,
    scale: float = 1.0,
) -> AlignPlan:
  """FFHQ quads from per-frame detections, gaps filled, smoothed over time (STIT).

  Smoothing runs separately over each run of usable frames (detected or
  interpolated); long gaps split runs.  ``scale`` enlarges the FFHQ quad (STIT's
  ``scale``).  ``detector`` only names the detector in the report.  Raises
  ``NoFaceError`` if no frame has a face.
  """
  n = len(found)
  lms = [f.landmarks for f in found]
  sources = [f.source for f in found]
  has_face = np.array([lm is not None for lm in lms], bool)
  name = detector_name(detector)
  if not has_face.any():
    raise NoFaceError(f"no face found in any of the {n} frames (detector={name!r})")
  per_frame = [ffhq_quad(lm, scale=scale) if lm is not None else None for lm in lms]
  filled = fill_face_gaps(per_frame, max_gap=max_gap)
  raw = filled.quads
  usable = np.ones(n, bool)
  usable[filled.passthrough] = False
  smoothed = raw.copy()
  for s, e in _segments(usable):
    smoothed[s:e] = smooth_quads(raw[s:e], sigma_center, sigma_xy)
  report = {
      "num_frames": n,
      "detected": int(has_face.sum()),
      "face_found_fraction": float(has_face.mean()),
      "interpolated": [int(i) for i in np.flatnonzero(filled.interpolated)],
      "passthrough": [int(i) for i in filled.passthrough],
      "long_gaps": [tuple(map(int, g)) for g in filled.long_gaps],
      "jitter_raw": quad_jitter(raw),
      "jitter_smoothed": quad_jitter(smoothed),
      "detector": name,
      # Which stage found each frame's face ('hog' | 'cnn' | None), and how often.
      "detector_per_frame": sources,
      "detector_counts": {k: sources.count(k) for k, _ in detector_stages(detector)},
  }
  return AlignPlan(
      quads=smoothed,
      raw_quads=raw,
      landmarks=lms,
      has_face=has_face,
      interpolated=filled.interpolated,
      passthrough=list(filled.passthrough),
      report=report,
      detector_per_frame=sources,
  )


def align_video(
    frames,
    size: int = 256,
    detector="hog",
    max_gap: int = 5,
    sigma_center: float = 1.0,
    sigma_xy: float = 3.0,
    upsample: Optional[int] = None,
    progress: bool = False,
    border: str = "reflect",
    scale: float = 1.0,
    **detect_kwargs,
) -> AlignResult:
  """Detect, build quads, fill gaps, smooth (STIT) and crop every frame.

  ``detect_faces_batch``, then ``plan_alignment`` (smoothing per run of usable frames;
  ``scale`` enlarges the FFHQ quad), then one crop per frame.  ``landmarks_crop`` is the
  detected landmarks mapped through the *smoothed* quad; for frames without a
  detection it comes from the shape predictor run on the crop inside
  ``CANONICAL_FACE_RECT`` (``AlignPlan.crop_landmarks``).  Raises ``NoFaceError`` if no
  frame has a face.
  """
  frames = list(frames) if not isinstance(frames, np.ndarray) else frames
  t0 = time.perf_counter()
  found = detect_faces_batch(
      frames, detector=detector, upsample=upsample, progress=progress, **detect_kwargs
  )
  t_detect = time.perf_counter() - t0
  plan = plan_alignment(found, detector, max_gap, sigma_center, sigma_xy, scale)
  t1 = time.perf_counter()
  crops = np.stack([crop_from_quad(f, q, size, border=border) for f, q in zip(frames, plan.quads)])
  t_crop = time.perf_counter() - t1
  return plan.result(crops, dict(plan.report, seconds_detect=t_detect, seconds_crop=t_crop))
