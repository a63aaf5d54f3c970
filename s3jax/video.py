"""Read and write videos and frame folders; paste edited crops back (STIT step 5).

Frames are (H, W, 3) uint8 RGB numpy arrays everywhere in this module.
"""

from __future__ import annotations

import os
import pathlib
import re
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np
import av
import cv2

from s3jax import alignment

__all__ = [
    "VideoReadError",
    "IMAGE_EXTENSIONS",
    "DEFAULT_FOLDER_FPS",
    "read_frames",
    "write_video",
    "write_side_by_side",
    "paste_back",
    "BLEND_DEFAULTS",
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
  that cannot be decoded.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such video file or frame folder: {p}")
  if max_frames is not None and max_frames <= 0:
    raise ValueError(f"max_frames must be positive, got {max_frames}")
  if p.is_dir():
    return _read_folder(p, max_frames, resize_width), float(folder_fps)
  return _read_video(p, max_frames, resize_width)


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


def _read_folder(p: pathlib.Path, max_frames, resize_width) -> np.ndarray:
  names = [f.name for f in frame_files(p, max_frames)]
  frames = []
  for name in names:
    bgr = cv2.imread(str(p / name), cv2.IMREAD_COLOR)
    if bgr is None:
      raise VideoReadError(f"cannot read image {p / name}")
    img = _resize_width(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), resize_width)
    if frames and img.shape != frames[0].shape:
      raise VideoReadError(
          f"{p / name} is {img.shape[1]}x{img.shape[0]} but {p / names[0]} is "
          f"{frames[0].shape[1]}x{frames[0].shape[0]}; frames must share one size"
      )
    frames.append(img)
  return np.stack(frames)


def _read_video(p: pathlib.Path, max_frames, resize_width) -> Tuple[np.ndarray, float]:
  frames = []
  try:
    with av.open(str(p)) as container:
      if not container.streams.video:
        raise VideoReadError(f"{p} has no video stream")
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      fps = float(rate) if rate else DEFAULT_FOLDER_FPS
      for frame in container.decode(stream):
        frames.append(_resize_width(frame.to_ndarray(format="rgb24"), resize_width))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except VideoReadError:
    raise
  except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
    raise VideoReadError(f"cannot decode video {p}: {e}") from e
  if not frames:
    raise VideoReadError(f"video {p} decoded to no frames")
  return np.stack(frames), fps


def write_video(
    path, frames: Sequence[np.ndarray], fps: float, crf: int = 18, codec: str = "libx264"
) -> None:
  """Write RGB uint8 frames as an H.264 (yuv420p) mp4 with PyAV.

  yuv420p needs even dimensions: odd widths/heights are padded by one
  replicated pixel column/row.
  """
  frames = list(frames) if not isinstance(frames, np.ndarray) else frames
  if len(frames) == 0:
    raise ValueError("no frames to write")
  h, w = np.asarray(frames[0]).shape[:2]
  he, we = h + (h % 2), w + (w % 2)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  rate = Fraction(fps).limit_denominator(1001)
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = we, he
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": str(crf)}
    for i, img in enumerate(frames):
      img = np.asarray(img)
      if img.shape[:2] != (h, w) or img.dtype != np.uint8 or img.shape[-1] != 3:
        raise ValueError(f"frame {i} is {img.shape} {img.dtype}; expected ({h}, {w}, 3) uint8")
      if (he, we) != (h, w):
        img = np.pad(img, ((0, he - h), (0, we - w), (0, 0)), mode="edge")
      for packet in stream.encode(
          av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
      ):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_side_by_side(
    path, left: Sequence[np.ndarray], right: Sequence[np.ndarray], fps: float, **kwargs
) -> None:
  """Write ``left | right`` per frame; ``right`` is resized to ``left``'s height."""
  if len(left) != len(right):
    raise ValueError(f"left has {len(left)} frames, right {len(right)}")

  def gen():
    for a, b in zip(left, right):
      a, b = np.asarray(a), np.asarray(b)
      if b.shape[0] != a.shape[0]:
        nw = max(1, int(round(b.shape[1] * a.shape[0] / b.shape[0])))
        b = cv2.resize(b, (nw, a.shape[0]), interpolation=cv2.INTER_AREA)
      yield np.concatenate([a, b], axis=1)

  write_video(path, list(gen()), fps, **kwargs)


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
