r"""VoxCeleb (or any face videos) -> TFDS ArrayRecord shards for DVA training.

  python -m data_prep.voxceleb --videos PATH --out DIR [--size 256] [--workers N]
      [--detector cascade|hog|cnn] [--test_fraction 0.1] [--max_frames N] [--retry_failed]
      [--encoders DIR | --checkpoint FILE] [--encoder_batch 16]
      [--image_format png|jpeg] [--jpeg_quality 95]
      [--beam_pipeline_options "runner=DirectRunner,direct_num_workers=2"] [--shard_mb 512]

PATH is one of
  * a video file (``clip.mp4``): one video, identity = its stem;
  * a folder of frame images (``0000.jpeg ...``): one video, identity = folder name;
  * a VoxCeleb tree ``PATH/id*/<video_id>/*.mp4`` (each mp4 a video/utterance,
    identity = the ``id*`` folder), or ``PATH/id*/<video_id>/<utt>/`` folders of
    frames. Any folder whose sub-folders hold videos or frames is scanned
    recursively the same way: identity = first path component below PATH.

Per video: read, align (dlib detection + 68 landmarks, FFHQ quads, STIT
smoothing, gap filling), compute the cached features of the crop and of its
mirror and keep the result in ``DIR/units/``. Features (``face_features``):

* default, ``dlib``: dlib descriptor z_id (128), z_lnd from the dlib landmarks,
  landmark-hull masks;
* ``official``, with ``--encoders DIR`` (the three published files, see
  ``s3jax.face_encoding``) or ``--checkpoint FILE`` (a DVA checkpoint holding
  ``encoder.idnet|lndnet|bgnet.*``): IR-SE50 ArcFace z_id (512), MobileNet
  z_lnd and BiSeNet parsing masks, run batched on the local accelerators.

The dataset records which (``face_features.json``, and in report.json); the
trainer refuses a config whose ``model.face_features`` differs. Finished videos
made with other features (or other encoder weights) are processed again. Finished videos are skipped when the command runs again, so a
killed run loses at most the videos in flight. A video without a usable face is
marked ``failed`` with a reason in ``DIR/report.json`` and never stops the run.
Finally the ok videos are written as the ``voxceleb_faces`` TFDS dataset
(``DIR/voxceleb_faces/1.0.0``), split train/test by identity (see
``tfds_builder.split_identities``). Record layout: ``data_prep/tfds_builder.py``.

``--image_format jpeg`` stores the crops as JPEG (``--jpeg_quality``; masks stay
PNG; the dataset's TFDS ``metadata.json`` says which). With
``--beam_pipeline_options`` the per-video work and the shard writing run as
Apache Beam pipelines (``data_prep.beam_pipeline``, ``pip install .[beam]``);
runners, resume and shard names: ``docs/data_prep.md``.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags

from data_prep import common, tfds_builder

FLAGS = flags.FLAGS


def define_flags():
  """CLI flags (defined only when run as a program, so modules import together)."""
  flags.DEFINE_string(
      "videos",
      None,
      "A video file, a folder of frames, or a VoxCeleb tree " "(id*/video_id/*.mp4).",
  )
  flags.DEFINE_string("out", None, "Output directory (units, report.json, TFDS dataset).")
  flags.DEFINE_integer("size", 256, "Crop size of the stored frames (px).")
  flags.DEFINE_integer("workers", 1, "Parallel worker processes (videos in flight).")
  flags.DEFINE_enum(
      "detector",
      "cascade",
      ["hog", "cnn", "cascade"],
      "dlib face detector (cascade: HOG, CNN on misses).",
  )
  flags.DEFINE_float("test_fraction", 0.1, "Fraction of identities held out as the test split.")
  flags.DEFINE_integer("max_frames", None, "Read at most this many frames per video.")
  flags.DEFINE_integer("max_gap", 5, "Longest run of face-less frames that is interpolated.")
  flags.DEFINE_bool("retry_failed", False, "Re-run videos that failed in an earlier run.")
  flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
  common.define_feature_flags()
  common.define_output_flags()
  flags.DEFINE_alias("test-fraction", "test_fraction")
  flags.DEFINE_alias("max-frames", "max_frames")
  flags.DEFINE_alias("retry-failed", "retry_failed")


def _load_video(path, max_frames):
  return common.read_video_or_folder(path, max_frames=max_frames), {}


def _is_frame_folder(p: pathlib.Path) -> bool:
  return p.is_dir() and any(c.suffix.lower() in common.IMAGE_EXTS for c in p.iterdir())


def discover_videos(path: str | os.PathLike) -> list[tuple[str, str, str]]:
  """-> [(source path, video_id, identity)], sorted by video_id.

  Raises FileNotFoundError for a missing path and ValueError when nothing
  that looks like a video is found.
  """
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"--videos path does not exist: {root}")
  if root.is_file():
    return [(str(root), root.stem, root.stem)]
  if _is_frame_folder(root):
    return [(str(root), root.name, root.name)]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    d = pathlib.Path(dirpath)
    rel = d.relative_to(root)
    if d != root and any(pathlib.Path(f).suffix.lower() in common.IMAGE_EXTS for f in filenames):
      found.append((str(d), rel.as_posix(), rel.parts[0]))
      dirnames[:] = []  # a frame folder is a leaf video
      continue
    for f in sorted(filenames):
      if pathlib.Path(f).suffix.lower() in common.VIDEO_EXTS:
        p = d / f
        relp = p.relative_to(root)
        vid = relp.with_suffix("").as_posix()
        ident = relp.parts[0] if len(relp.parts) > 1 else relp.stem
        found.append((str(p), vid, ident))
  if not found:
    raise ValueError(f"no videos (*.mp4, ...) or frame folders found under {root}")
  return sorted(found, key=lambda t: t[1])


def prepare(
    videos: str,
    out: str,
    *,
    size: int = 256,
    workers: int = 1,
    detector: str = "cascade",
    test_fraction: float = 0.1,
    max_frames: int | None = None,
    max_gap: int = 5,
    retry_failed: bool = False,
    progress: bool = True,
    encoders: str | None = None,
    checkpoint: str | None = None,
    encoder_batch: int = 16,
    features=None,
    image_format: str = "png",
    jpeg_quality: int = 95,
    beam_pipeline_options: str | None = None,
    shard_mb: float = tfds_builder.DEFAULT_SHARD_BYTES / 2**20,
) -> dict:
  """Library entry point of the CLI. Returns the report dict (also in out/report.json).

  ``encoders`` / ``checkpoint`` select the official face features (see the module
  docstring); ``features`` passes an already loaded ``OfficialFeatures`` instead.
  """
  found = discover_videos(videos)
  if features is None:
    features = common.load_official_features(encoders, checkpoint, encoder_batch)
  feature_source = common.official_feature_source(encoders, checkpoint, encoder_batch)
  record_format = tfds_builder.RecordFormat(image_format, jpeg_quality)
  jobs = [
      common.Job(
          key=common.safe_key(vid),
          path=p,
          video_id=vid,
          identity=ident,
          load=_load_video,
          load_args=(p, max_frames),
      )
      for p, vid, ident in found
  ]
  os.makedirs(out, exist_ok=True)
  statuses = common.run_jobs(
      jobs,
      out,
      size=size,
      detector=detector,
      max_gap=max_gap,
      workers=workers,
      retry_failed=retry_failed,
      progress=progress,
      features=features,
      record_format=record_format,
      beam_pipeline_options=beam_pipeline_options,
      feature_source=feature_source,
  )
  # Split over the identities that have at least one usable video, so a
  # failed identity cannot take a test slot (train always keeps one).
  ok_ids = [j.identity for j, st in zip(jobs, statuses) if st and st["status"] == "ok"]
  test_ids = tfds_builder.split_identities(ok_ids, test_fraction)
  dataset_dir = common.build_from_statuses(
      out,
      jobs,
      statuses,
      lambda j: j.identity in test_ids,
      tfds_builder.VoxcelebFaces,
      features=features,
      record_format=record_format,
      beam_pipeline_options=beam_pipeline_options,
      max_shard_bytes=int(shard_mb * 2**20),
  )
  extra = {
      "command": " ".join(sys.argv),
      "size": size,
      "detector": detector,
      "dataset_dir": str(dataset_dir) if dataset_dir else None,
      "test_identities": sorted(test_ids),
      **common.features_info(features),
      **record_format.info(),
  }
  return common.write_report(out, statuses, extra)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.videos or not FLAGS.out:
    raise app.UsageError("--videos and --out are required")
  try:
    report = prepare(
        FLAGS.videos,
        FLAGS.out,
        size=FLAGS.size,
        workers=FLAGS.workers,
        detector=FLAGS.detector,
        test_fraction=FLAGS.test_fraction,
        max_frames=FLAGS.max_frames,
        max_gap=FLAGS.max_gap,
        retry_failed=FLAGS.retry_failed,
        progress=FLAGS.progress,
        **common.feature_flag_values(FLAGS),
        **common.output_flag_values(FLAGS),
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = report["summary"]
  print(
      f"{s['ok']}/{s['videos']} videos ok, {s['frames_written']} frames written; "
      f"dataset: {report['dataset_dir']}; report: {os.path.join(FLAGS.out, 'report.json')}"
  )
  return 0 if report["dataset_dir"] else 1


if __name__ == "__main__":
  define_flags()
  app.run(main)
