"""Read and write videos and frame folders; paste edited crops back (STIT step 5).

Frames are (H, W, 3) uint8 RGB numpy arrays everywhere in this module.
"""

from __future__ import annotations

import os
import pathlib
import re
from fractions import Fraction
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import av
import cv2

from s3jax import alignment

__all__ = [
    "VideoReadError",
    "IMAGE_EXTENSIONS",
    "DEFAULT_FOLDER_FPS",
    "read_frames",
    "iter_frames",
    "frame_rate",
    "frame_files",
    "write_video",
    "VideoWriter",
    "side_by_side",
    "write_side_by_side",
    "paste_back",
    "BLEND_DEFAULTS",
    "blend_band",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A folder of images carries no frame rate; this one is returned for it.
DEFAULT_FOLDER_FPS = 25.0


class VideoReadError(ValueError):
  """The path exists but holds no readable frames (corrupt video, empty folder...)."""


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _resize_width(img: np.ndarray, width: Optional[int]) -> np.ndarray:
  if width is None or img.shape[1] == width:
    return img
  h = max(1, int(round(img.shape[0] * width / img.shape[1])))
  interp = cv2.INTER_AREA if width < img.shape[1] else cv2.INTER_CUBIC
  return cv2.resize(img, (width, h), interpolation=interp)


def read_frames(
    path,
    max_frames: Optional[int] = None,
    resize_width: Optional[int] = None,
    folder_fps: float = DEFAULT_FOLDER_FPS,
) -> Tuple[np.ndarray, float]:
  """Frames (N, H, W, 3) uint8 RGB and fps from a video file or an image folder.

  * A video file is decoded with PyAV; fps is the stream's average rate.
  * A folder reads its images (``IMAGE_EXTENSIONS``) in natural sort order;
    fps is ``folder_fps``.  All images must have the same size.
  ``resize_width`` downscales each frame on the fly (aspect kept), to save
  memory on 1080p input.  Raises ``FileNotFoundError`` for a missing path
  and ``VideoReadError`` for an empty folder, an unreadable image or a video
  that cannot be decoded. ``iter_frames`` reads one frame at a time.
  """
  fps = frame_rate(path, folder_fps)
  return np.stack(list(iter_frames(path, max_frames, resize_width))), fps


def frame_rate(path, folder_fps: float = DEFAULT_FOLDER_FPS) -> float:
  """The frame rate ``read_frames`` returns for ``path``, without decoding any frame."""
  p = _existing(path)
  if p.is_dir():
    return float(folder_fps)
  try:
    with av.open(str(p)) as container:
      if not container.streams.video:
        raise VideoReadError(f"{p} has no video stream")
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  except VideoReadError:
    raise
  except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
    raise VideoReadError(f"cannot decode video {p}: {e}") from e
  return float(rate) if rate else DEFAULT_FOLDER_FPS


def iter_frames(
    path, max_frames: Optional[int] = None, resize_width: Optional[int] = None
) -> Iterator[np.ndarray]:
  """The frames of ``read_frames`` one at a time, (H, W, 3) uint8 RGB each: only the frame
  being decoded is held, so a long video streams in constant memory. The checks and errors
  are ``read_frames``' (an error about a later frame comes when it is reached)."""
  p = _existing(path)
  if max_frames is not None and max_frames <= 0:
    raise ValueError(f"max_frames must be positive, got {max_frames}")
  if p.is_dir():
    return _iter_folder(p, max_frames, resize_width)
  return _iter_video(p, max_frames, resize_width)


def _existing(path) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such video file or frame folder: {p}")
  return p


def frame_files(path, max_frames: Optional[int] = None) -> list:
  """The image files of a frame folder in natural sort order (the order ``read_frames``
  reads them); ``VideoReadError`` when it holds none."""
  p = pathlib.Path(path)
  names = sorted(
      (f for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS) and (p / f).is_file()),
      key=_natural_key,
  )
  if not names:
    raise VideoReadError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return [p / n for n in names[:max_frames]]


def _iter_folder(p: pathlib.Path, max_frames, resize_width) -> Iterator[np.ndarray]:
  files = frame_files(p, max_frames)
  first_shape = None
  for f in files:
    bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
    if bgr is None:
      raise VideoReadError(f"cannot read image {f}")
    img = _resize_width(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), resize_width)
    if first_shape is None:
      first_shape = img.shape
    elif img.shape != first_shape:
      raise VideoReadError(
          f"{f} is {img.shape[1]}x{img.shape[0]} but {files[0]} is "
          f"{first_shape[1]}x{first_shape[0]}; frames must share one size"
      )
    yield img


def _iter_video(p: pathlib.Path, max_frames, resize_width) -> Iterator[np.ndarray]:
  count = 0
  try:
    with av.open(str(p)) as container:
      if not container.streams.video:
        raise VideoReadError(f"{p} has no video stream")
      for frame in container.decode(container.streams.video[0]):
        img = _resize_width(frame.to_ndarray(format="rgb24"), resize_width)
        count += 1
        yield img
        if max_frames is not None and count >= max_frames:
          break
  except VideoReadError:
    raise
  except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
    raise VideoReadError(f"cannot decode video {p}: {e}") from e
  if not count:
    raise VideoReadError(f"video {p} decoded to no frames")


class VideoWriter:
  """An H.264 (yuv420p) mp4 written one frame at a time with PyAV (a context manager).

  The first frame fixes the size; yuv420p needs even dimensions, so odd widths/heights are
  padded by one replicated pixel column/row. ``write_video`` writes a whole sequence.
  """

  def __init__(self, path, fps: float, crf: int = 18, codec: str = "libx264"):
    self.path = pathlib.Path(path)
    self.fps, self.crf, self.codec = fps, crf, codec
    self.count = 0
    self._container = self._stream = self._shape = None

  def write(self, img) -> None:
    img = np.asarray(img)
    if self._container is None:
      self._open(img.shape[:2])
    h, w = self._shape
    if img.shape[:2] != (h, w) or img.dtype != np.uint8 or img.shape[-1] != 3:
      raise ValueError(
          f"frame {self.count} is {img.shape} {img.dtype}; expected ({h}, {w}, 3) uint8"
      )
    he, we = self._stream.height, self._stream.width
    if (he, we) != (h, w):
      img = np.pad(img, ((0, he - h), (0, we - w), (0, 0)), mode="edge")
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
    for packet in self._stream.encode(frame):
      self._container.mux(packet)
    self.count += 1

  def _open(self, shape) -> None:
    h, w = shape
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._container = av.open(str(self.path), mode="w")
    self._stream = self._container.add_stream(
        self.codec, rate=Fraction(self.fps).limit_denominator(1001)
    )
    self._stream.width, self._stream.height = w + (w % 2), h + (h % 2)
    self._stream.pix_fmt = "yuv420p"
    if self.codec == "libx264":
      self._stream.options = {"crf": str(self.crf)}
    self._shape = (h, w)

  def close(self) -> None:
    """Flushes the encoder and closes the file; ``ValueError`` if no frame was written."""
    if self._container is None:
      raise ValueError("no frames to write")
    for packet in self._stream.encode():
      self._container.mux(packet)
    self._container.close()
    self._container = None

  def abort(self) -> None:
    """Closes the file without flushing the encoder (after an error; the file is partial)."""
    if self._container is not None:
      self._container.close()
      self._container = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_video(
    path, frames: Iterable[np.ndarray], fps: float, crf: int = 18, codec: str = "libx264"
) -> None:
  """Write RGB uint8 frames (an array or any iterable) as an H.264 (yuv420p) mp4 with PyAV.

  yuv420p needs even dimensions: odd widths/heights are padded by one
  replicated pixel column/row (``VideoWriter``).
  """
  with VideoWriter(path, fps, crf=crf, codec=codec) as writer:
    for img in frames:
      writer.write(img)


def side_by_side(left, right) -> np.ndarray:
  """``left | right`` as one frame; ``right`` is resized to ``left``'s height."""
  a, b = np.asarray(left), np.asarray(right)
  if b.shape[0] != a.shape[0]:
    nw = max(1, int(round(b.shape[1] * a.shape[0] / b.shape[0])))
    b = cv2.resize(b, (nw, a.shape[0]), interpolation=cv2.INTER_AREA)
  return np.concatenate([a, b], axis=1)


def write_side_by_side(
    path, left: Sequence[np.ndarray], right: Sequence[np.ndarray], fps: float, **kwargs
) -> None:
  """Write ``side_by_side(left[i], right[i])`` per frame."""
  if len(left) != len(right):
    raise ValueError(f"left has {len(left)} frames, right {len(right)}")
  write_video(path, (side_by_side(a, b) for a, b in zip(left, right)), fps, **kwargs)


# ---------------------------------------------------------------------------
# Paste-back
# ---------------------------------------------------------------------------

# Defaults per mode, in pixels of the *crop* (scaled to the frame by the quad's
# size).  ``dilate``: radius of the disc dilation of the warped mask;
# ``blur``: Gaussian sigma of the feathering.
BLEND_DEFAULTS = {
    "hard": {"dilate": 0.0, "blur": 0.0},
    "feather": {"dilate": 12.0, "blur": 3.0},
    "poisson": {"dilate": 6.0, "blur": 0.0},
}
BLEND_DEFAULTS["residual"] = BLEND_DEFAULTS["feather"]  # feather's band, over the edit's change
BLEND_CROP_SIZE = 256  # the crop size BLEND_DEFAULTS' pixel counts are meant for


def blend_band(blend: str, crop_size: int) -> dict:
  """``paste_back``'s dilate/blur (crop pixels) for ``blend`` at ``crop_size``: the defaults
  scaled from 256 px crops, so the band covers the same share of the face at any size."""
  scale = crop_size / BLEND_CROP_SIZE
  return {k: v * scale for k, v in BLEND_DEFAULTS[blend].items()}


def _disc(radius: int):
  return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _dilate(mask_u8: np.ndarray, radius: int) -> np.ndarray:
  if radius <= 0:
    return mask_u8
  return cv2.dilate(mask_u8, _disc(radius))


def paste_back(
    frame,
    edited_crop,
    quad,
    mask_crop,
    blend: str = "hard",
    dilate: Optional[float] = None,
    blur: Optional[float] = None,
    return_mask: bool = False,
    reconstruction_crop=None,
):
  """Warp ``edited_crop`` back into ``frame`` inside the (warped) face mask.

  ``quad`` is the crop's quad in frame coordinates (``AlignResult.quads[i]``),
  ``mask_crop`` the (size, size) mask in the crop ({0,1} or {0,255} or float
  in [0,1]).  The crop is warped with the inverse quad transform
  (``alignment.paste_matrix``, bicubic) and the mask bilinearly, then
  thresholded at 0.5 to ``M``.  With ``d = dilate * s`` and ``sigma = blur * s``
  (``s`` = frame pixels per crop pixel) the support is ``S = dilate(M, d)``
  (disc), and:

  * ``hard`` (DVA): alpha = S.
  * ``feather`` (STIT without tuning): alpha = GaussianBlur(dilate(M, d - 2
    sigma), sigma) * S -- M itself gets alpha >= 0.97 when d >= 4 sigma, and
    alpha is ~0.02 where it is cut to 0 at the edge of S.
  * ``poisson``: ``cv2.seamlessClone`` (NORMAL_CLONE) of the warped crop
    into the frame over S.
  * ``residual``: feather's alpha, but what is added is the warped change
    ``edited_crop - reconstruction_crop`` (both decodes of one x_T, uint8), so the
    frame keeps its own detail: ``frame + alpha * warp(edited - reconstruction)``,
    rounded and clipped. Equal crops leave the frame bit-identical.

  Guarantee (all modes): pixels outside S are bit-identical to ``frame``.
  Returns the new frame, or ``(frame, alpha, support)`` with full-size
  float32 alpha and bool ``support`` (= S) when ``return_mask``.
  """
  if blend not in BLEND_DEFAULTS:
    raise ValueError(f"blend must be one of {sorted(BLEND_DEFAULTS)}, got {blend!r}")
  frame = np.asarray(frame)
  if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
    raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
  crop = np.ascontiguousarray(np.asarray(edited_crop))
  if crop.ndim != 3 or crop.shape[0] != crop.shape[1] or crop.dtype != np.uint8:
    raise ValueError(f"edited_crop must be (size, size, 3) uint8, got {crop.shape} {crop.dtype}")
  size = crop.shape[0]
  mask = np.asarray(mask_crop, dtype=np.float32)
  if mask.shape != (size, size):
    raise ValueError(f"mask_crop must be ({size}, {size}), got {mask.shape}")
  if mask.max() > 1.0:
    mask = mask / 255.0
  content = crop
  if blend == "residual":
    recon = np.asarray(reconstruction_crop) if reconstruction_crop is not None else None
    if recon is None or recon.shape != crop.shape or recon.dtype != np.uint8:
      raise ValueError(
          "blend='residual' needs reconstruction_crop, uint8 of the edited crop's shape "
          f"{crop.shape}, got {None if recon is None else (recon.shape, recon.dtype)}"
      )
    content = crop.astype(np.float32) - recon.astype(np.float32)
  dilate = BLEND_DEFAULTS[blend]["dilate"] if dilate is None else float(dilate)
  blur = BLEND_DEFAULTS[blend]["blur"] if blur is None else float(blur)

  H, W = frame.shape[:2]
  m = alignment.paste_matrix(quad, size)  # crop idx -> frame idx
  s = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # frame px per crop px
  d_px = int(round(dilate * s))
  sigma = blur * s if blend in ("feather", "residual") else 0.0
  margin = d_px + 2
  corners = alignment.transform_points(
      np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]]), m
  )
  x0 = max(int(np.floor(corners[:, 0].min())) - margin, 0)
  y0 = max(int(np.floor(corners[:, 1].min())) - margin, 0)
  x1 = min(int(np.ceil(corners[:, 0].max())) + margin + 1, W)
  y1 = min(int(np.ceil(corners[:, 1].max())) + margin + 1, H)
  out = frame.copy()
  alpha_full = np.zeros((H, W), np.float32)
  support_full = np.zeros((H, W), bool)
  if x1 <= x0 or y1 <= y0:  # quad entirely outside the frame
    return (out, alpha_full, support_full) if return_mask else out
  rw, rh = x1 - x0, y1 - y0
  inv = alignment.crop_matrix(quad, size)  # frame idx -> crop idx
  inv_roi = inv.copy()
  inv_roi[:, 2] += inv[:, :2] @ np.array([x0, y0], np.float64)  # roi idx -> crop idx
  flags = cv2.WARP_INVERSE_MAP
  warped = cv2.warpAffine(
      content, inv_roi, (rw, rh), flags=cv2.INTER_CUBIC | flags, borderMode=cv2.BORDER_REPLICATE
  )
  mw = cv2.warpAffine(
      mask,
      inv_roi,
      (rw, rh),
      flags=cv2.INTER_LINEAR | flags,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=0.0,
  )
  binary = (mw >= 0.5).astype(np.uint8)
  support = _dilate(binary, d_px)
  region = frame[y0:y1, x0:x1]
  if blend == "hard":
    alpha = support.astype(np.float32)
  elif blend in ("feather", "residual"):
    core = _dilate(binary, max(d_px - int(np.ceil(2 * sigma)), 0)).astype(np.float32)
    if sigma > 0:
      k = 2 * int(np.ceil(3 * sigma)) + 1
      core = cv2.GaussianBlur(core, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)
    alpha = core * support
  else:
    alpha = support.astype(np.float32)
  if blend in ("hard", "feather", "residual"):
    a = alpha[..., None]
    if blend == "residual":
      mixed = np.rint(region.astype(np.float32) + a * warped)
    else:
      mixed = np.rint(a * warped.astype(np.float32) + (1.0 - a) * region.astype(np.float32))
    res = np.where(a > 0, np.clip(mixed, 0, 255).astype(np.uint8), region)
  else:
    res = _poisson(region, warped, support)
  out[y0:y1, x0:x1] = res
  alpha_full[y0:y1, x0:x1] = alpha
  support_full[y0:y1, x0:x1] = support.astype(bool)
  return (out, alpha_full, support_full) if return_mask else out


def _poisson(region: np.ndarray, warped: np.ndarray, support: np.ndarray) -> np.ndarray:
  """seamlessClone of ``warped`` into ``region`` over ``support``; identity outside."""
  m = support.astype(np.uint8) * 255
  # seamlessClone needs the mask off the image border.
  m[0, :] = m[-1, :] = 0
  m[:, 0] = m[:, -1] = 0
  if not m.any():
    return region.copy()
  # Pad so the clone's internal ROI never clips at the border.
  pad = 2
  dst = cv2.copyMakeBorder(region, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
  src = cv2.copyMakeBorder(warped, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
  mp = cv2.copyMakeBorder(m, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
  x, y, w, h = cv2.boundingRect(mp)
  center = (x + w // 2, y + h // 2)
  src_bgr = cv2.cvtColor(src, cv2.COLOR_RGB2BGR)
  dst_bgr = cv2.cvtColor(dst, cv2.COLOR_RGB2BGR)
  cloned = cv2.cvtColor(
      cv2.seamlessClone(src_bgr, dst_bgr, mp, center, cv2.NORMAL_CLONE), cv2.COLOR_BGR2RGB
  )[pad:-pad, pad:-pad]
  return np.where(support[..., None].astype(bool), cloned, region)
