"""Shared data_prep machinery: frames -> aligned crops + cached face features
(a per-video "unit", see ``tfds_builder``), and a resumable job runner that
writes ``report.json``.

Output directory layout (``--out DIR``)::

    DIR/report.json                   per-video status (written after every run)
    DIR/units/<key>.npz               finished video: its records (resume skips it)
    DIR/units/<key>.status.json       {"status": "ok"|"failed", "reason", ...}
    DIR/<dataset name>/1.0.0/         the TFDS ArrayRecord dataset
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from data_prep import tfds_builder

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
FEATURE_SIZE = 256  # features (dlib descriptor, z_lnd) are computed on >=256 px crops


class PrepError(RuntimeError):
  """A video/image that cannot be turned into records (reported, not raised)."""


def safe_key(video_id: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "__", video_id).strip("_") or "video"


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
  img = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
  if img is None:
    raise PrepError(f"cannot read image {path}")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_video_or_folder(path: str | os.PathLike, max_frames: Optional[int] = None):
  """-> (N, H, W, 3) uint8 RGB frames of a video file or a folder of images.

  Uses ``s3jax.video.read_frames`` (PyAV; folders in natural sort order).
  Every failure becomes a ``PrepError`` with the reason.
  """
  from s3jax.video import read_frames  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not path.exists():
    raise PrepError(f"path does not exist: {path}")
  try:
    frames, _ = read_frames(os.fspath(path), max_frames=max_frames)
  except Exception as e:  # corrupt container, unknown codec, unreadable image, ...
    kind = "folder" if path.is_dir() else "video"
    raise PrepError(f"cannot read {kind} {path}: {type(e).__name__}: {e}") from e
  if len(frames) == 0:
    raise PrepError(f"no frames in {path}")
  return frames


# ----------------------------------------------------------------------------
# Frames -> unit
# ----------------------------------------------------------------------------
def process_frames(
    frames: Sequence[np.ndarray],
    *,
    video_id: str,
    identity: str,
    size: int = 256,
    detector: str = "hog",
    max_gap: int = 5,
    attributes: Optional[np.ndarray] = None,
) -> tuple[dict, dict]:
  """Align frames and compute the cached features of every usable frame.

  Alignment and features run at ``max(size, 256)`` px (the dlib descriptor
  and the z_lnd convention are defined on 256 px crops); crops, landmarks
  and masks are then resized to ``size``. Frames that ``align_video`` passes
  through (no face and gap longer than ``max_gap``) are dropped.

  Returns ``(unit, stats)``; raises ``PrepError`` when no frame is usable.
  """
  from s3jax import alignment, face_features

  frames = list(frames)
  fsize = max(size, FEATURE_SIZE)
  try:
    res = alignment.align_video(frames, size=fsize, detector=detector, max_gap=max_gap)
  except alignment.NoFaceError as e:
    raise PrepError(f"no face: {e}") from e
  keep = np.asarray(res.has_face, bool) | np.asarray(res.interpolated, bool)
  keep[list(res.passthrough)] = False
  idx = np.flatnonzero(keep)
  if len(idx) == 0:
    raise PrepError("no usable frame (all passthrough)")
  crops = res.crops[idx]
  lnd = np.asarray(res.landmarks_crop[idx], np.float64)
  lnd_flip = face_features.flip_landmarks(lnd, fsize)
  z_id = face_features.dlib_descriptor(crops, landmarks_crop=lnd)
  z_id_flip = face_features.dlib_descriptor(
      np.ascontiguousarray(crops[:, :, ::-1]), landmarks_crop=lnd_flip
  )
  z_lnd = face_features.z_lnd_from_landmarks(lnd, fsize)
  z_lnd_flip = face_features.z_lnd_from_landmarks(lnd_flip, fsize)
  finite = np.isfinite(z_id).all(1) & np.isfinite(z_id_flip).all(1) & np.isfinite(z_lnd).all(1)
  if not finite.all():
    idx, crops, lnd = idx[finite], crops[finite], lnd[finite]
    z_id, z_id_flip = z_id[finite], z_id_flip[finite]
    z_lnd, z_lnd_flip = z_lnd[finite], z_lnd_flip[finite]
    if len(idx) == 0:
      raise PrepError("face features are not finite on any frame")
  if size != fsize:
    crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    lnd = (lnd + 0.5) * (size / fsize) - 0.5  # pixel-centre convention
  images, masks, masks_video = [], [], []
  for c, l in zip(crops, lnd):
    images.append(tfds_builder.encode_png(c))
    masks.append(
        tfds_builder.encode_png((face_features.hull_mask(l, size) > 0).astype(np.uint8) * 255)
    )
    masks_video.append(
        tfds_builder.encode_png(
            (face_features.hull_mask(l, size, for_video=True) > 0).astype(np.uint8) * 255
        )
    )
  unit = {
      "video_id": video_id,
      "identity": identity,
      "frame_index": idx.astype(np.int32),
      "image": images,
      "mask": masks,
      "mask_video": masks_video,
      "landmarks": lnd.astype(np.float32),
      "quad": np.asarray(res.quads[idx], np.float32),
      "z_id": z_id.astype(np.float32),
      "z_id_flip": z_id_flip.astype(np.float32),
      "z_lnd": z_lnd.astype(np.float32),
      "z_lnd_flip": z_lnd_flip.astype(np.float32),
      "interpolated": (~np.asarray(res.has_face, bool)[idx]).astype(np.int32),
      "attributes": (
          None
          if attributes is None
          else np.repeat(np.asarray(attributes, np.int32)[None], len(idx), 0)
      ),
  }
  stats = {
      "frames": len(frames),
      "frames_with_face": int(np.sum(res.has_face)),
      "frames_written": int(len(idx)),
      "interpolated": int(np.sum(unit["interpolated"])),
      "passthrough": len(res.passthrough),
  }
  return unit, stats


# ----------------------------------------------------------------------------
# Resumable job runner
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
  """One video (or image). ``load`` returns (frames, extra kwargs for process_frames)."""

  key: str
  path: str
  video_id: str
  identity: str
  load: Callable[..., Any]
  load_args: tuple = ()


def _unit_path(out_dir, key):
  return pathlib.Path(out_dir) / "units" / f"{key}.npz"


def _status_path(out_dir, key):
  return pathlib.Path(out_dir) / "units" / f"{key}.status.json"


def _write_json(path, obj):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def run_job(job: Job, out_dir: str, size: int, detector: str, max_gap: int) -> dict:
  """Processes one job; never raises (except KeyboardInterrupt). Returns its status."""
  t0 = time.perf_counter()
  status = {
      "path": job.path,
      "video_id": job.video_id,
      "identity": job.identity,
      "frames": 0,
      "frames_with_face": 0,
      "status": "failed",
      "reason": "",
  }
  try:
    frames, extra = job.load(*job.load_args)
    status["frames"] = len(frames)
    unit, stats = process_frames(
        frames,
        video_id=job.video_id,
        identity=job.identity,
        size=size,
        detector=detector,
        max_gap=max_gap,
        **extra,
    )
    tfds_builder.save_unit(_unit_path(out_dir, job.key), unit)
    status.update(stats, status="ok", reason="")
  except PrepError as e:
    status["reason"] = str(e)
    if "no face" in str(e) and status["frames"]:
      status["frames_with_face"] = 0
  except Exception as e:  # pylint: disable=broad-except
    status["reason"] = f"{type(e).__name__}: {e}"
    status["traceback"] = traceback.format_exc(limit=5)
  status["seconds"] = round(time.perf_counter() - t0, 3)
  _write_json(_status_path(out_dir, job.key), status)
  return status


def _run_job_star(args):
  return run_job(*args)


def run_jobs(
    jobs: Sequence[Job],
    out_dir: str | os.PathLike,
    *,
    size: int = 256,
    detector: str = "hog",
    max_gap: int = 5,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> list[dict]:
  """Runs every job that has no status yet (or failed, with ``retry_failed``).

  A finished video keeps its unit + status file, so a killed run resumes
  where it stopped. Returns the statuses of all ``jobs`` (in order).
  """
  from tqdm import tqdm

  out_dir = os.fspath(out_dir)
  keys = [j.key for j in jobs]
  if len(set(keys)) != len(keys):
    dup = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"duplicate video keys: {dup[:5]}")
  todo = []
  for j in jobs:
    st = _read_status(out_dir, j.key)
    done = st is not None and (
        st["status"] == "failed"
        and not retry_failed
        or st["status"] == "ok"
        and _unit_path(out_dir, j.key).exists()
    )
    if not done:
      todo.append(j)
  args = [(j, out_dir, size, detector, max_gap) for j in todo]
  bar = tqdm(total=len(todo), desc="videos", unit="video", disable=not progress, dynamic_ncols=True)
  bar.set_postfix(skipped=len(jobs) - len(todo))
  if workers > 1 and len(todo) > 1:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
      for st in pool.imap_unordered(_run_job_star, args):
        bar.update(1)
        bar.set_postfix(last=st["status"])
  else:
    for a in args:
      st = run_job(*a)
      bar.update(1)
      bar.set_postfix(last=st["status"])
  bar.close()
  return [_read_status(out_dir, j.key) for j in jobs]


def _read_status(out_dir, key) -> Optional[dict]:
  p = _status_path(out_dir, key)
  if not p.exists():
    return None
  try:
    return json.loads(p.read_text())
  except ValueError:
    return None


def write_report(out_dir, statuses: Sequence[dict], extra: Optional[dict] = None) -> dict:
  """``out_dir/report.json``: {"videos": [...], "summary": {...}, **extra}."""
  videos = []
  for st in statuses:
    row = {
        k: st.get(k)
        for k in (
            "path",
            "video_id",
            "identity",
            "frames",
            "frames_with_face",
            "frames_written",
            "status",
            "reason",
            "seconds",
        )
    }
    videos.append(row)
  ok = [v for v in videos if v["status"] == "ok"]
  secs = sum(v["seconds"] or 0 for v in videos)
  frames = sum(v["frames"] or 0 for v in videos)
  report = {
      "videos": videos,
      "summary": {
          "videos": len(videos),
          "ok": len(ok),
          "failed": len(videos) - len(ok),
          "frames": frames,
          "frames_written": sum(v["frames_written"] or 0 for v in ok),
          "processing_seconds": round(secs, 3),
          "frames_per_second": round(frames / secs, 3) if secs else None,
      },
  }
  report.update(extra or {})
  _write_json(pathlib.Path(out_dir) / "report.json", report)
  return report


def build_from_statuses(
    out_dir,
    jobs: Sequence[Job],
    statuses: Sequence[dict],
    is_test: Callable[[Job], bool],
    builder_cls,
) -> Optional[pathlib.Path]:
  """Packs the ok units into train/test splits; None when nothing succeeded."""
  units = {"train": [], "test": []}
  for j, st in zip(jobs, statuses):
    if st and st["status"] == "ok":
      split = "test" if is_test(j) else "train"
      units[split].append(str(_unit_path(out_dir, j.key)))
  if not units["train"] and not units["test"]:
    return None
  return tfds_builder.build_dataset(out_dir, units, builder_cls)
