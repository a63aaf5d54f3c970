r"""CelebA-HQ images + the 40 attributes -> TFDS ArrayRecord shards.

  python -m data_prep.celebahq --images DIR \
      --attributes CelebAMask-HQ-attribute-anno.txt --out DIR \
      [--mapping CelebA-HQ-to-CelebA-mapping.txt] [--size 256] [--workers N] \
      [--encoders DIR | --checkpoint FILE] [--encoder_batch 16] \
      [--image_format png|jpeg] [--jpeg_quality 95] \
      [--beam_pipeline_options "runner=DirectRunner,direct_num_workers=2"] [--shard_mb 512]

``--images`` holds ``<idx>.jpg`` (CelebAMask-HQ's ``CelebA-HQ-img/``, idx
0..29999; any extension in IMAGE_EXTS). Each image is processed like a
one-frame video (dlib alignment to the FFHQ quad, cached features: dlib by
default, the official IR-SE50 / MobileNet / BiSeNet encoders with ``--encoders``
or ``--checkpoint``, as in ``data_prep.voxceleb``) and stored
with the record layout of ``data_prep/tfds_builder.py`` plus ``attributes``
(40,) int32 in {-1, 1}, in the annotation file's column order. Dataset name:
``celebahq_faces`` (``DIR/celebahq_faces/1.0.0``). ``video_id`` is the image
stem, ``frame_index`` 0. Images with no face are ``failed`` in report.json.
``--image_format`` and ``--beam_pipeline_options`` work as in ``data_prep.voxceleb``
(``docs/data_prep.md``).

Annotation file format (CelebAMask-HQ-attribute-anno.txt)::

    30000
    5_o_Clock_Shadow Arched_Eyebrows ... Young        (40 names)
    0.jpg  -1 1 1 -1 ...                              (40 values, -1/1)

Train/test split:
  * with ``--mapping`` (CelebAMask-HQ's ``CelebA-HQ-to-CelebA-mapping.txt``,
    columns ``idx orig_idx orig_file``; also picked up automatically when it
    sits next to the attribute file): CelebA's official partition of the
    original image -- ``orig_idx < 182637`` (CelebA train + val) -> train,
    the CelebA test partition -> test. CelebA's partitions are identity-
    disjoint, so this split is by identity; ``identity`` = ``orig_file``.
  * without it: by index, ``idx < 27000`` -> train, the rest -> test (the
    common 27k/3k split; not guaranteed identity-disjoint).
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
from absl import app, flags

from data_prep import common, tfds_builder

CELEBA_TEST_START = 182637  # first 0-based CelebA index of the official test partition
INDEX_SPLIT = 27000

FLAGS = flags.FLAGS


def define_flags():
  """CLI flags (defined only when run as a program, so modules import together)."""
  flags.DEFINE_string("images", None, "Folder of CelebA-HQ images (<idx>.jpg).")
  flags.DEFINE_string("attributes", None, "CelebAMask-HQ-attribute-anno.txt")
  flags.DEFINE_string("mapping", None, "Optional CelebA-HQ-to-CelebA-mapping.txt (official split).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("size", 256, "Crop size (px).")
  flags.DEFINE_integer("workers", 1, "Parallel worker processes.")
  flags.DEFINE_enum(
      "detector",
      "cascade",
      ["hog", "cnn", "cascade"],
      "dlib face detector (cascade: HOG, CNN on misses).",
  )
  flags.DEFINE_integer("limit", None, "Only the first N annotated images (smoke tests).")
  flags.DEFINE_bool("retry_failed", False, "Re-run images that failed before.")
  flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
  common.define_feature_flags()
  common.define_output_flags()


def parse_attributes(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
  """-> (40 names, {image file name: int32 (40,) in {-1, 1}})."""
  lines = [l.strip() for l in pathlib.Path(path).read_text().splitlines() if l.strip()]
  if len(lines) < 2:
    raise ValueError(f"{path}: expected a count line and a names line")
  try:
    count = int(lines[0].split()[0])
  except ValueError as e:
    raise ValueError(f"{path}: first line should be the image count, got {lines[0]!r}") from e
  names = lines[1].split()
  if len(names) != tfds_builder.NUM_ATTRIBUTES:
    raise ValueError(
        f"{path}: expected {tfds_builder.NUM_ATTRIBUTES} attribute names, " f"got {len(names)}"
    )
  table = {}
  for ln, line in enumerate(lines[2:], start=3):
    parts = line.split()
    if len(parts) != len(names) + 1:
      raise ValueError(f"{path}:{ln}: expected a name and {len(names)} values")
    vals = np.array([int(v) for v in parts[1:]], np.int32)
    if not np.isin(vals, (-1, 1)).all():
      raise ValueError(f"{path}:{ln}: attribute values must be -1 or 1")
    table[parts[0]] = vals
  if len(table) != count:
    raise ValueError(f"{path}: header says {count} images, found {len(table)}")
  return names, table


def parse_mapping(path: str | os.PathLike) -> dict[int, tuple[int, str]]:
  """CelebA-HQ-to-CelebA-mapping.txt -> {idx: (orig_idx, orig_file)}."""
  out = {}
  for line in pathlib.Path(path).read_text().splitlines():
    parts = line.split()
    if len(parts) >= 3 and parts[0].isdigit():
      out[int(parts[0])] = (int(parts[1]), parts[2])
  if not out:
    raise ValueError(f"{path}: no 'idx orig_idx orig_file' rows")
  return out


def _load_image(path, attributes):
  return [common.read_image(path)], {"attributes": attributes}


def _stem_index(name: str):
  stem = pathlib.Path(name).stem
  return int(stem) if stem.isdigit() else None


def prepare(
    images: str,
    attributes: str,
    out: str,
    *,
    mapping: str | None = None,
    size: int = 256,
    workers: int = 1,
    detector: str = "cascade",
    limit: int | None = None,
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
  """Library entry point of the CLI (``features``: an already loaded ``OfficialFeatures``)."""
  images_dir = pathlib.Path(images)
  if not images_dir.is_dir():
    raise FileNotFoundError(f"--images is not a folder: {images_dir}")
  _, table = parse_attributes(attributes)
  if features is None:
    features = common.load_official_features(encoders, checkpoint, encoder_batch)
  feature_source = common.official_feature_source(encoders, checkpoint, encoder_batch)
  record_format = tfds_builder.RecordFormat(image_format, jpeg_quality)
  if mapping is None:
    cand = pathlib.Path(attributes).parent / "CelebA-HQ-to-CelebA-mapping.txt"
    mapping = str(cand) if cand.exists() else None
  hq_to_celeba = parse_mapping(mapping) if mapping else None
  files = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in common.IMAGE_EXTS}
  jobs, is_test = [], {}
  names = sorted(table, key=lambda n: (_stem_index(n) is None, _stem_index(n) or 0, n))
  if limit:
    names = names[:limit]
  for name in names:
    stem = pathlib.Path(name).stem
    path = files.get(stem, images_dir / name)
    idx = _stem_index(name)
    identity = stem
    if hq_to_celeba is not None and idx in hq_to_celeba:
      orig_idx, identity = hq_to_celeba[idx]
      test = orig_idx >= CELEBA_TEST_START
    else:
      test = idx is not None and idx >= INDEX_SPLIT
    job = common.Job(
        key=common.safe_key(stem),
        path=str(path),
        video_id=stem,
        identity=identity,
        load=_load_image,
        load_args=(str(path), table[name]),
    )
    jobs.append(job)
    is_test[job.key] = test
  os.makedirs(out, exist_ok=True)
  statuses = common.run_jobs(
      jobs,
      out,
      size=size,
      detector=detector,
      max_gap=0,
      workers=workers,
      retry_failed=retry_failed,
      progress=progress,
      features=features,
      record_format=record_format,
      beam_pipeline_options=beam_pipeline_options,
      feature_source=feature_source,
  )
  dataset_dir = common.build_from_statuses(
      out,
      jobs,
      statuses,
      lambda j: is_test[j.key],
      tfds_builder.CelebahqFaces,
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
      "split": (
          "celeba_official_partition" if hq_to_celeba is not None else f"index<{INDEX_SPLIT}"
      ),
      **common.features_info(features),
      **record_format.info(),
  }
  return common.write_report(out, statuses, extra)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("images", "attributes", "out"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    report = prepare(
        FLAGS.images,
        FLAGS.attributes,
        FLAGS.out,
        mapping=FLAGS.mapping,
        size=FLAGS.size,
        workers=FLAGS.workers,
        detector=FLAGS.detector,
        limit=FLAGS.limit,
        retry_failed=FLAGS.retry_failed,
        progress=FLAGS.progress,
        **common.feature_flag_values(FLAGS),
        **common.output_flag_values(FLAGS),
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = report["summary"]
  print(f"{s['ok']}/{s['videos']} images ok; dataset: {report['dataset_dir']}")
  return 0 if report["dataset_dir"] else 1


if __name__ == "__main__":
  define_flags()
  app.run(main)
