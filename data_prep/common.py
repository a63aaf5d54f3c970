"""Shared data_prep machinery: frames -> aligned crops + cached face features
(a per-video "unit", see ``tfds_builder``), and a resumable job runner that
writes ``report.json``.

Output directory layout (``--out DIR``)::

    DIR/report.json                   per-video status (written after every run)
    DIR/units/<key>.npz               finished video: its records (resume skips it)
    DIR/units/<key>.status.json       {"status": "ok"|"failed", "reason", ...}
    DIR/<dataset name>/1.0.0/         the TFDS ArrayRecord dataset

With ``--beam_pipeline_options`` the same per-video work runs as an Apache Beam
pipeline and workers write the shards (``data_prep.beam_pipeline``); the layout
is the same.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
from absl import flags

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
# Face-feature paths
# ----------------------------------------------------------------------------
def load_official_features(encoders=None, checkpoint=None, batch_size: int = 16):
  """The ``official`` extractor (``s3jax.face_encoding.OfficialFeatures``) from the
  published files in ``encoders`` or a DVA ``checkpoint``; None when neither is given
  (the ``dlib`` path). Raises ``ValueError`` (names the expected files) on bad weights."""
  if encoders is None and checkpoint is None:
    return None
  if encoders is not None and checkpoint is not None:
    raise ValueError("give --encoders or --checkpoint, not both")
  # Lazy: JAX and the encoders are only needed on the official path.
  from s3jax import face_encoding  # pylint: disable=g-import-not-at-top

  return face_encoding.OfficialFeatures.load(encoders, checkpoint, batch_size=batch_size)


def official_feature_source(encoders=None, checkpoint=None, batch_size: int = 16):
  """``load_official_features`` kwargs for Beam workers; None on the dlib path."""
  if encoders is None and checkpoint is None:
    return None
  return {"encoders": encoders, "checkpoint": checkpoint, "batch_size": batch_size}


def define_feature_flags() -> None:
  """The CLIs' --encoders / --checkpoint / --encoder_batch (call from ``define_flags``)."""
  # absl files a program's own flags under argv[0]; --helpshort then lists these too.
  own = {"module_name": sys.argv[0]}
  flags.DEFINE_string(
      "encoders",
      None,
      "Official face features (IR-SE50 z_id, MobileNet z_lnd, BiSeNet masks) from this folder "
      "of the published encoder files: model_ir_se50.pth, "
      "mobilenet_224_model_best_gdconv_external.pth.tar, 79999_iter.pth. Default: the dlib "
      "features.",
      **own,
  )
  flags.DEFINE_string(
      "checkpoint",
      None,
      "Official face features from the frozen encoders in this DVA checkpoint "
      "(encoder.idnet|lndnet|bgnet.backbone.*; .ckpt/.pt/.safetensors, EMA set, or an s3jax "
      "workdir after `convert import`). Exclusive with --encoders.",
      **own,
  )
  flags.DEFINE_integer("encoder_batch", 16, "Crops per encoder call (official features).", **own)


def feature_flag_values(flag_values) -> dict:
  """``prepare(**...)`` kwargs of the feature flags."""
  return {
      "encoders": flag_values.encoders,
      "checkpoint": flag_values.checkpoint,
      "encoder_batch": flag_values.encoder_batch,
  }


def define_output_flags() -> None:
  """The CLIs' --image_format / --jpeg_quality / --beam_pipeline_options / --shard_mb."""
  own = {"module_name": sys.argv[0]}
  flags.DEFINE_enum(
      "image_format",
      "png",
      list(tfds_builder.IMAGE_FORMATS),
      "How the crops are stored: png (lossless) or jpeg (--jpeg_quality). Masks stay PNG.",
      **own,
  )
  flags.DEFINE_integer(
      "jpeg_quality", 95, "JPEG quality of the crops (--image_format jpeg).", **own
  )
  flags.DEFINE_string(
      "beam_pipeline_options",
      None,
      "Run as an Apache Beam pipeline (needs the `beam` extra) with these comma-separated "
      'options, e.g. "runner=DirectRunner,direct_num_workers=2" or "runner=DataflowRunner,'
      'project=P,region=R,temp_location=gs://B/tmp" (docs/data_prep.md). Default: this process.',
      **own,
  )
  flags.DEFINE_float(
      "shard_mb",
      tfds_builder.DEFAULT_SHARD_BYTES / 2**20,
      "Beam path: a shard closes at the first video boundary past this many MB.",
      **own,
  )


def output_flag_values(flag_values) -> dict:
  """``prepare(**...)`` kwargs of the output flags."""
  return {
      "image_format": flag_values.image_format,
      "jpeg_quality": flag_values.jpeg_quality,
      "beam_pipeline_options": flag_values.beam_pipeline_options,
      "shard_mb": flag_values.shard_mb,
  }


def features_info(features) -> dict:
  """Which face features a dataset holds (its metadata, the report and unit statuses)."""
  if features is None:
    return {"face_features": "dlib", "z_id_dim": 128}
  return features.info()


def unit_settings(features, record_format: tfds_builder.RecordFormat) -> dict:
  """What a finished unit must match to be reused: its features and its image encoding."""
  return {**features_info(features), **record_format.info()}


def _same_settings(status: dict, settings: dict) -> bool:
  # Statuses written before the official path / JPEG existed are dlib / PNG units.
  return (
      status.get("face_features", "dlib") == settings["face_features"]
      and status.get("encoders_fingerprint") == settings.get("encoders_fingerprint")
      and status.get("image_format", "png") == settings["image_format"]
      and status.get("jpeg_quality") == settings.get("jpeg_quality")
  )


# ----------------------------------------------------------------------------
# Frames -> unit
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Aligned:
  """Usable frames of one video, aligned at ``max(size, 256)`` px (``align_frames``)."""

  idx: np.ndarray  # (M,) frame indices in the source video
  crops: np.ndarray  # (M, F, F, 3) uint8 at the feature size F
  landmarks: np.ndarray  # (M, 68, 2) float64, crop pixels at F
  quads: np.ndarray  # (M, 4, 2)
  interpolated: np.ndarray  # (M,) int32
  stats: dict


def align_frames(
    frames: Sequence[np.ndarray],
    *,
    size: int = 256,
    detector: str = "cascade",
    max_gap: int = 5,
) -> Aligned:
  """Aligns frames at ``max(size, 256)`` px and keeps the usable ones.

  Frames that ``align_video`` passes through (no face and gap longer than
  ``max_gap``) are dropped. Raises ``PrepError`` when no frame is usable.
  """
  from s3jax import alignment  # pylint: disable=g-import-not-at-top

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
  stats = {
      "frames": len(frames),
      "frames_with_face": int(np.sum(res.has_face)),
      "passthrough": len(res.passthrough),
  }
  return Aligned(
      idx=idx,
      crops=res.crops[idx],
      landmarks=np.asarray(res.landmarks_crop[idx], np.float64),
      quads=np.asarray(res.quads[idx], np.float32),
      interpolated=(~np.asarray(res.has_face, bool)[idx]).astype(np.int32),
      stats=stats,
  )


def _dlib_features(crops, lnd, fsize: int) -> dict:
  from s3jax import face_features  # pylint: disable=g-import-not-at-top

  lnd_flip = face_features.flip_landmarks(lnd, fsize)
  return {
      "z_id": face_features.dlib_descriptor(crops, landmarks_crop=lnd),
      "z_id_flip": face_features.dlib_descriptor(
          np.ascontiguousarray(crops[:, :, ::-1]), landmarks_crop=lnd_flip
      ),
      "z_lnd": face_features.z_lnd_from_landmarks(lnd, fsize),
      "z_lnd_flip": face_features.z_lnd_from_landmarks(lnd_flip, fsize),
  }


def _official_features(crops, features) -> dict:
  """IR-SE50 / MobileNet / BiSeNet outputs of the crops and of their mirrors (one call)."""
  n = len(crops)
  # One call for both: the extractor brings larger crops down to its 256 px (INTER_AREA).
  f = features(np.concatenate([crops, crops[:, :, ::-1]]))
  return {
      "z_id": f["z_id"][:n],
      "z_id_flip": f["z_id"][n:],
      "z_lnd": f["z_lnd"][:n],
      "z_lnd_flip": f["z_lnd"][n:],
      "mask": f["mask"][:n],
      "mask_flip": f["mask"][n:],  # parsing of the mirror, not the mirrored parsing
      "mask_video": f["mask_video"][:n],
  }


def _mask_png(mask, size: int) -> bytes:
  m = np.asarray(mask, bool).astype(np.uint8) * 255
  if m.shape[0] != size:  # nearest, as the reference resizes its parsing
    m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
  return tfds_builder.encode_png(m)


def build_unit(
    aligned: Aligned,
    *,
    video_id: str,
    identity: str,
    size: int = 256,
    attributes: Optional[np.ndarray] = None,
    features=None,
    record_format: Optional[tfds_builder.RecordFormat] = None,
) -> tuple[dict, dict]:
  """Computes the cached features of aligned frames -> ``(unit, stats)``.

  ``features`` None: the dlib path (dlib descriptor z_id, landmark z_lnd and hull
  masks, all from the landmarks). Otherwise an ``OfficialFeatures`` extractor:
  IR-SE50 z_id, MobileNet z_lnd and BiSeNet masks of the 256 px crop and of its
  mirror (``mask_flip``). Crops, landmarks and masks are then resized to ``size``.
  The features are computed on the raw crops; ``record_format`` (default PNG) only
  decides how the stored crops are encoded.
  """
  from s3jax import face_features  # pylint: disable=g-import-not-at-top

  record_format = record_format or tfds_builder.RecordFormat()
  idx, crops, lnd = aligned.idx, aligned.crops, aligned.landmarks
  quads, interpolated = aligned.quads, aligned.interpolated
  fsize = crops.shape[1]
  feats = (
      _dlib_features(crops, lnd, fsize) if features is None else _official_features(crops, features)
  )
  finite = np.ones(len(idx), bool)
  for key in ("z_id", "z_id_flip", "z_lnd"):
    finite &= np.isfinite(feats[key]).all(1)
  if not finite.all():
    idx, crops, lnd = idx[finite], crops[finite], lnd[finite]
    quads, interpolated = quads[finite], interpolated[finite]
    feats = {k: v[finite] for k, v in feats.items()}
    if len(idx) == 0:
      raise PrepError("face features are not finite on any frame")
  if size != fsize:
    crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    lnd = (lnd + 0.5) * (size / fsize) - 0.5  # pixel-centre convention
  images = [record_format.encode_image(c) for c in crops]
  if features is None:
    masks = [_mask_png(face_features.hull_mask(l, size) > 0, size) for l in lnd]
    masks_video = [
        _mask_png(face_features.hull_mask(l, size, for_video=True) > 0, size) for l in lnd
    ]
    masks_flip = None
  else:
    masks = [_mask_png(m, size) for m in feats["mask"]]
    masks_video = [_mask_png(m, size) for m in feats["mask_video"]]
    masks_flip = [_mask_png(m, size) for m in feats["mask_flip"]]
  unit = {
      "video_id": video_id,
      "identity": identity,
      "frame_index": idx.astype(np.int32),
      "image": images,
      "mask": masks,
      "mask_video": masks_video,
      "landmarks": lnd.astype(np.float32),
      "quad": np.asarray(quads, np.float32),
      "z_id": feats["z_id"].astype(np.float32),
      "z_id_flip": feats["z_id_flip"].astype(np.float32),
      "z_lnd": feats["z_lnd"].astype(np.float32),
      "z_lnd_flip": feats["z_lnd_flip"].astype(np.float32),
      "interpolated": interpolated.astype(np.int32),
      "attributes": (
          None
          if attributes is None
          else np.repeat(np.asarray(attributes, np.int32)[None], len(idx), 0)
      ),
  }
  if masks_flip is not None:
    unit["mask_flip"] = masks_flip
  stats = dict(
      aligned.stats,
      frames_written=int(len(idx)),
      interpolated=int(np.sum(unit["interpolated"])),
      **unit_settings(features, record_format),
  )
  return unit, stats


def process_frames(
    frames: Sequence[np.ndarray],
    *,
    video_id: str,
    identity: str,
    size: int = 256,
    detector: str = "cascade",
    max_gap: int = 5,
    attributes: Optional[np.ndarray] = None,
    features=None,
    record_format: Optional[tfds_builder.RecordFormat] = None,
) -> tuple[dict, dict]:
  """Align frames and compute the cached features of every usable frame.

  Alignment and features run at ``max(size, 256)`` px (the dlib descriptor,
  the z_lnd convention and the official encoders are defined on 256 px crops);
  crops, landmarks and masks are then resized to ``size``. Frames that
  ``align_video`` passes through (no face and gap longer than ``max_gap``) are
  dropped. ``features``: None (dlib path) or an ``OfficialFeatures`` extractor.

  Returns ``(unit, stats)``; raises ``PrepError`` when no frame is usable.
  """
  aligned = align_frames(frames, size=size, detector=detector, max_gap=max_gap)
  return build_unit(
      aligned,
      video_id=video_id,
      identity=identity,
      size=size,
      attributes=attributes,
      features=features,
      record_format=record_format,
  )


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


def _new_status(job: Job) -> dict:
  return {
      "path": job.path,
      "video_id": job.video_id,
      "identity": job.identity,
      "frames": 0,
      "frames_with_face": 0,
      "status": "failed",
      "reason": "",
  }


def _record_failure(status: dict, e: Exception) -> None:
  """Call inside ``except``: a PrepError is a reason, anything else also a traceback."""
  if isinstance(e, PrepError):
    status["reason"] = str(e)
    if "no face" in str(e) and status["frames"]:
      status["frames_with_face"] = 0
  else:
    status["reason"] = f"{type(e).__name__}: {e}"
    status["traceback"] = traceback.format_exc(limit=5)


def run_job(
    job: Job,
    out_dir: str,
    size: int,
    detector: str,
    max_gap: int,
    features=None,
    record_format: Optional[tfds_builder.RecordFormat] = None,
) -> dict:
  """Processes one job; never raises (except KeyboardInterrupt). Returns its status."""
  t0 = time.perf_counter()
  status = _new_status(job)
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
        features=features,
        record_format=record_format,
        **extra,
    )
    tfds_builder.save_unit(_unit_path(out_dir, job.key), unit)
    status.update(stats, status="ok", reason="")
  except Exception as e:  # pylint: disable=broad-except
    _record_failure(status, e)
  status["seconds"] = round(time.perf_counter() - t0, 3)
  _write_json(_status_path(out_dir, job.key), status)
  return status


def align_job(job: Job, out_dir: str, size: int, detector: str, max_gap: int):
  """Reads and aligns one job (a worker's share on the official path); never raises.

  Returns ``(job, status, Aligned or None, extra process_frames kwargs)``.
  """
  del out_dir
  t0 = time.perf_counter()
  status, aligned, extra = _new_status(job), None, {}
  try:
    frames, extra = job.load(*job.load_args)
    status["frames"] = len(frames)
    aligned = align_frames(frames, size=size, detector=detector, max_gap=max_gap)
  except Exception as e:  # pylint: disable=broad-except
    _record_failure(status, e)
  status["seconds"] = time.perf_counter() - t0
  return job, status, aligned, extra


def finish_job(
    job: Job,
    out_dir,
    size: int,
    status: dict,
    aligned,
    extra: dict,
    features,
    record_format: Optional[tfds_builder.RecordFormat] = None,
) -> dict:
  """Features + unit + status file of an ``align_job`` result; never raises."""
  t0 = time.perf_counter()
  if aligned is not None:
    try:
      unit, stats = build_unit(
          aligned,
          video_id=job.video_id,
          identity=job.identity,
          size=size,
          features=features,
          record_format=record_format,
          **extra,
      )
      tfds_builder.save_unit(_unit_path(out_dir, job.key), unit)
      status.update(stats, status="ok", reason="")
    except Exception as e:  # pylint: disable=broad-except
      _record_failure(status, e)
  status["seconds"] = round(status["seconds"] + time.perf_counter() - t0, 3)
  _write_json(_status_path(out_dir, job.key), status)
  return status


class JobRunner:
  """``run_job`` with fixed settings, for pools and Beam workers (picklable).

  On the official path a Beam worker loads the encoders once, from
  ``feature_source`` (``load_official_features`` kwargs); in this process
  ``features`` is the extractor already loaded.
  """

  def __init__(
      self,
      out_dir,
      size: int,
      detector: str,
      max_gap: int,
      record_format: tfds_builder.RecordFormat,
      features=None,
      feature_source: Optional[dict] = None,
  ):
    self.settings = (os.fspath(out_dir), size, detector, max_gap)
    self.record_format = record_format
    self.feature_source = feature_source
    self._features = features

  def __getstate__(self):
    if self._features is not None and self.feature_source is None:
      raise ValueError(
          "official features in other processes need their source: give encoders= or checkpoint="
      )
    return dict(self.__dict__, _features=None)

  def __call__(self, job: Job) -> dict:
    if self._features is None and self.feature_source is not None:
      self._features = load_official_features(**self.feature_source)
    return run_job(job, *self.settings, features=self._features, record_format=self.record_format)


def _align_job_star(args):
  return align_job(*args)


def pending_jobs(jobs: Sequence[Job], out_dir, settings: dict, retry_failed: bool) -> list[Job]:
  """The jobs a run must do: no status yet, failed (with ``retry_failed``), or a
  finished unit made with other ``settings`` (``unit_settings``)."""
  todo = []
  for j in jobs:
    st = _read_status(out_dir, j.key)
    done = st is not None and (
        st["status"] == "failed"
        and not retry_failed
        or st["status"] == "ok"
        and _unit_path(out_dir, j.key).exists()
        and _same_settings(st, settings)
    )
    if not done:
      todo.append(j)
  return todo


def run_jobs(
    jobs: Sequence[Job],
    out_dir: str | os.PathLike,
    *,
    size: int = 256,
    detector: str = "cascade",
    max_gap: int = 5,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
    features=None,
    record_format: Optional[tfds_builder.RecordFormat] = None,
    beam_pipeline_options: Optional[str] = None,
    feature_source: Optional[dict] = None,
) -> list[dict]:
  """Runs every job that has no status yet (or failed, with ``retry_failed``).

  A finished video keeps its unit + status file, so a killed run resumes
  where it stopped; a finished video whose features are not the requested
  ones (``features``: None for dlib, else an ``OfficialFeatures``; for the
  official path also the encoder weights) or whose images are encoded
  otherwise (``record_format``, default PNG) is processed again. With
  ``workers > 1`` on the official path the workers read and align, and this
  process runs the encoders. With ``beam_pipeline_options`` the jobs run as an
  Apache Beam pipeline (``data_prep.beam_pipeline``; on the official path each
  worker loads the encoders from ``feature_source``). Returns the statuses of
  all ``jobs`` (in order).
  """
  from tqdm import tqdm

  out_dir = os.fspath(out_dir)
  record_format = record_format or tfds_builder.RecordFormat()
  keys = [j.key for j in jobs]
  if len(set(keys)) != len(keys):
    dup = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"duplicate video keys: {dup[:5]}")
  todo = pending_jobs(jobs, out_dir, unit_settings(features, record_format), retry_failed)
  runner = JobRunner(out_dir, size, detector, max_gap, record_format, features, feature_source)
  if beam_pipeline_options is not None:
    if workers > 1:
      raise ValueError("--workers is for the single-process path; Beam's options set its workers")
    if features is not None and feature_source is None:
      raise ValueError("Beam workers load the official encoders: give encoders= or checkpoint=")
    # Lazy: Apache Beam is an optional extra.
    from data_prep import beam_pipeline  # pylint: disable=g-import-not-at-top

    beam_pipeline.run_map(runner, todo, beam_pipeline_options, workdir=out_dir)
    return [_read_status(out_dir, j.key) for j in jobs]
  bar = tqdm(total=len(todo), desc="videos", unit="video", disable=not progress, dynamic_ncols=True)
  bar.set_postfix(skipped=len(jobs) - len(todo))
  if workers > 1 and len(todo) > 1:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
      if features is None:
        results = pool.imap_unordered(runner, todo)
      else:  # one process owns the accelerator: workers only align
        args = [(j, out_dir, size, detector, max_gap) for j in todo]
        results = (
            finish_job(job, out_dir, size, st, aligned, extra, features, record_format)
            for job, st, aligned, extra in pool.imap_unordered(_align_job_star, args)
        )
      for st in results:
        bar.update(1)
        bar.set_postfix(last=st["status"])
  else:
    for j in todo:
      st = runner(j)
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
    features=None,
    record_format: Optional[tfds_builder.RecordFormat] = None,
    beam_pipeline_options: Optional[str] = None,
    max_shard_bytes: int = tfds_builder.DEFAULT_SHARD_BYTES,
) -> Optional[pathlib.Path]:
  """Packs the ok units into train/test splits; None when nothing succeeded.

  The dataset's metadata (``face_features.json``) records ``features_info(features)``,
  TFDS's ``metadata.json`` the image format. With ``beam_pipeline_options`` Beam
  workers write the shards (of about ``max_shard_bytes``) in parallel.
  """
  record_format = record_format or tfds_builder.RecordFormat()
  info = features_info(features)
  settings = unit_settings(features, record_format)
  units = {"train": [], "test": []}
  for j, st in zip(jobs, statuses):
    if st and st["status"] == "ok":
      if not _same_settings(st, settings):  # run_jobs redoes these; never pack a mix
        have = {k: st.get(k) for k in settings}
        raise ValueError(f"unit {j.key} was made with {have}, the run asked for {settings}")
      split = "test" if is_test(j) else "train"
      units[split].append(str(_unit_path(out_dir, j.key)))
  if not units["train"] and not units["test"]:
    return None
  parallel_map = None
  if beam_pipeline_options is not None:
    from data_prep import beam_pipeline  # pylint: disable=g-import-not-at-top

    parallel_map = beam_pipeline.parallel_map(beam_pipeline_options, workdir=out_dir)
  return tfds_builder.build_dataset(
      out_dir,
      units,
      builder_cls,
      metadata=info,
      record_format=record_format,
      parallel_map=parallel_map,
      max_shard_bytes=max_shard_bytes,
  )
