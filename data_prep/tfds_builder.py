"""TFDS ArrayRecord writer for aligned face frames (works without TensorFlow).

Record layout
=============
One record is one aligned frame (or one CelebA-HQ image). All datasets written
by ``data_prep`` share this layout; ``size`` is the crop size (256 by default)
and ``D`` the identity-feature width (128 for the dlib path, 512 for ArcFace).

==============  =====================  =========================================
key             type / shape           meaning
==============  =====================  =========================================
``video_id``    str (TFDS ``Text``)    video key, e.g. ``id10001/1zcIwhmdeo4``;
                                       for CelebA-HQ the image stem (``"123"``)
``identity``    str (TFDS ``Text``)    speaker / person id used for the
                                       train/test split (``id10001``)
``frame_index`` int32 scalar           index of the frame in the source video
``image``       bytes                  PNG (default) or JPEG (``--image_format
                                       jpeg``), ``size x size`` RGB uint8, the
                                       aligned crop (FFHQ quad, STIT smoothing)
``landmarks``   float32 (68, 2)        dlib 68 points (x, y) in crop pixels
``quad``        float32 (4, 2)         crop quad in source-frame pixels
                                       (smoothed; corners as ``align_video``)
``mask``        bytes                  PNG, ``size x size`` uint8 {0, 255},
                                       training mask (landmark hull)
``mask_video``  bytes                  PNG, same, paste-back mask
                                       (``hull_mask(..., for_video=True)``)
``mask_flip``   bytes                  official path only: PNG, training mask
                                       of the mirrored crop (BiSeNet parsing
                                       of ``image[:, ::-1]``); the dlib path
                                       mirrors ``mask`` instead
``z_id``        float32 (D,)           identity feature of the unflipped crop
``z_id_flip``   float32 (D,)           identity feature of the mirrored crop
``z_lnd``       float32 (102,)         68 points in [0,1] over crop
                                       [16:240] (scaled to ``size``), jaw
                                       points 0..16 dropped, (x, y) interleaved
``z_lnd_flip``  float32 (102,)         same for the mirrored crop
                                       (``flip_landmarks``: points mirrored and
                                       left/right indices swapped)
``interpolated`` int32 scalar          1 when no face was detected in this
                                       frame and its quad/landmarks were
                                       interpolated from neighbours, else 0
``attributes``  int32 (40,)            CelebA-HQ only: the 40 attributes,
                                       -1 / 1, in the annotation file's order
==============  =====================  =========================================

On the ``official`` path (``--encoders`` / ``--checkpoint``) z_id is the
IR-SE50 ArcFace embedding (D = 512), z_lnd the MobileNetV2-GDConv output and the
masks come from BiSeNet parsing (``OfficialEncoders.face_mask``), each computed
on the 256 px crop and, for the ``*_flip`` keys, on its mirror.

Frames that ``align_video`` passes through (no face, gap too long) are not
written. Splits are ``train`` and ``test`` and are made by *identity* (no
person appears in both); a split with no records is omitted.

On disk: ``<data_dir>/<name>/<version>/`` holds ``dataset_info.json``,
``features.json`` and ``<name>-<split>.array_record-XXXXX-of-YYYYY`` shards,
plus ``video_index.json`` (record ranges per video, used by the input pipeline
to group frames without decoding records) and ``face_features.json`` (which
feature path made the records: ``{"face_features": "dlib"|"official",
"z_id_dim", ...}``, plus the encoder weights' source and fingerprint; the DVA
trainer checks it against ``config.model.face_features``), and TFDS's
``metadata.json`` (``builder.info.metadata``): ``{"image_format": "png"|"jpeg",
"jpeg_quality", "mask_format": "png"}``. Records are written in generation
order (``disable_shuffling=True``): video by video, frames in order.

The single-process build (TFDS's own writer) cuts shards by size anywhere;
:func:`write_sharded` (the Beam path, ``data_prep.beam_pipeline``) cuts them at
video boundaries and writes each shard in a worker. Either way the records,
their order and ``video_index.json`` are the same.

Open it without TensorFlow with any of::

    tfds.data_source('voxceleb_faces', data_dir=DATA_DIR)  # after importing
                                                           # this module
    tfds.builder_from_directory(VERSION_DIR).as_data_source(split='train')
    s3jax.input_pipeline.open_split(DATA_DIR_OR_VERSION_DIR, 'train')

``features.Image`` needs TensorFlow to *encode*, so images and masks are
stored as encoded bytes (``Tensor(shape=(), dtype=object)``) and decoded by the
input pipeline (OpenCV reads PNG and JPEG alike). Masks stay PNG with
``--image_format jpeg``: they are {0, 255} maps whose edges JPEG would smear
into grey levels (the training loss and paste-back threshold them), and as
flat maps they cost ~1 KB as PNG anyway.

Per-video intermediate results ("units") are ``.npz`` files written by
:func:`save_unit`; builders only pack units into shards, so a rebuild is cheap
and a killed run loses no alignment/feature work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_ATTRIBUTES = 40
Z_LND_DIM = 102
VIDEO_INDEX_FILE = "video_index.json"
FACE_FEATURES_FILE = "face_features.json"
FILE_FORMAT = "array_record"
IMAGE_FORMATS = ("png", "jpeg")
# Beam path: a shard closes at the first video boundary past this many bytes of units.
DEFAULT_SHARD_BYTES = 512 << 20

# Keys of a unit (.npz) that hold one encoded image per frame (stored as blob + offsets).
_PNG_KEYS = ("image", "mask", "mask_video")
_OPTIONAL_PNG_KEYS = ("mask_flip",)  # official path only
_ARRAY_KEYS = (
    "frame_index",
    "landmarks",
    "quad",
    "z_id",
    "z_id_flip",
    "z_lnd",
    "z_lnd_flip",
    "interpolated",
)


# ----------------------------------------------------------------------------
# PNG helpers
# ----------------------------------------------------------------------------
def encode_png(array: np.ndarray) -> bytes:
  """uint8 (H,W) or (H,W,3) RGB -> PNG bytes (fast, compression level 1)."""
  array = np.ascontiguousarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"encode_png wants uint8, got {array.dtype}")
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  if not ok:
    raise ValueError("PNG encoding failed")
  return buf.tobytes()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  """uint8 (H,W,3) RGB -> JPEG bytes, full-resolution chroma (4:4:4).

  4:4:4 because the crops are small: at 256 px and quality 95 OpenCV's default
  4:2:0 saves 19% of the bytes but costs 2.4 dB PSNR (benchmarks/records.py).
  """
  array = np.ascontiguousarray(array)
  if array.dtype != np.uint8 or array.ndim != 3:
    raise ValueError(f"encode_jpeg wants uint8 (H, W, 3), got {array.dtype} {array.shape}")
  bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  params = [
      cv2.IMWRITE_JPEG_QUALITY,
      int(quality),
      cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
  ]
  ok, buf = cv2.imencode(".jpg", bgr, params)
  if not ok:
    raise ValueError("JPEG encoding failed")
  return buf.tobytes()


@dataclasses.dataclass(frozen=True)
class RecordFormat:
  """How the ``image`` crops are stored: PNG (lossless, default) or JPEG at ``jpeg_quality``.

  Masks are PNG either way (see the module docstring).
  """

  image_format: str = "png"
  jpeg_quality: int = 95

  def __post_init__(self):
    if self.image_format not in IMAGE_FORMATS:
      raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

  def encode_image(self, rgb: np.ndarray) -> bytes:
    if self.image_format == "jpeg":
      return encode_jpeg(rgb, self.jpeg_quality)
    return encode_png(rgb)

  def info(self) -> dict:
    """What a unit status records (resume compares it); the quality only matters for JPEG."""
    if self.image_format == "jpeg":
      return {"image_format": "jpeg", "jpeg_quality": self.jpeg_quality}
    return {"image_format": "png"}

  def metadata(self) -> dict:
    """The dataset's ``metadata.json`` (``builder.info.metadata``)."""
    return {**self.info(), "mask_format": "png"}


def decode_png(data: bytes, channels: int = 3) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 (H,W,3) RGB or (H,W) gray. Raises ValueError."""
  flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    raise ValueError("could not decode image bytes")
  if channels == 3:
    array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
  return array


# ----------------------------------------------------------------------------
# Per-video units
# ----------------------------------------------------------------------------
def save_unit(path: str | os.PathLike, unit: dict) -> None:
  """Atomically writes one video's records (a dict of per-frame arrays).

  ``unit`` keys: ``video_id`` (str), ``identity`` (str), the array keys of
  the record layout with a leading frame axis N, and ``image``, ``mask``,
  ``mask_video`` as lists of PNG bytes. ``attributes`` (N, 40) and
  ``mask_flip`` (PNG list) are optional.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  out = {"video_id": np.array(unit["video_id"]), "identity": np.array(unit["identity"])}
  for key in _ARRAY_KEYS:
    out[key] = np.asarray(unit[key])
  if unit.get("attributes") is not None:
    out["attributes"] = np.asarray(unit["attributes"], np.int32)
  for key in _PNG_KEYS + tuple(k for k in _OPTIONAL_PNG_KEYS if unit.get(k) is not None):
    blobs = list(unit[key])
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out[key + "_blob"] = np.frombuffer(b"".join(blobs), np.uint8)
    out[key + "_off"] = offsets
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
  os.close(fd)
  try:
    np.savez(tmp, **out)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_unit(path: str | os.PathLike) -> dict:
  """Inverse of :func:`save_unit`."""
  with np.load(path, allow_pickle=False) as z:
    unit = {"video_id": str(z["video_id"]), "identity": str(z["identity"])}
    for key in _ARRAY_KEYS:
      unit[key] = z[key]
    unit["attributes"] = z["attributes"] if "attributes" in z else None
    for key in _PNG_KEYS + _OPTIONAL_PNG_KEYS:
      if key + "_blob" not in z:
        unit[key] = None
        continue
      blob, off = z[key + "_blob"].tobytes(), z[key + "_off"]
      unit[key] = [blob[off[i] : off[i + 1]] for i in range(len(off) - 1)]
  return unit


def unit_num_frames(path: str | os.PathLike) -> int:
  with np.load(path, allow_pickle=False) as z:
    return int(z["frame_index"].shape[0])


def unit_z_id_dim(path: str | os.PathLike) -> int:
  with np.load(path, allow_pickle=False) as z:
    return int(z["z_id"].shape[-1])


def unit_has_mask_flip(path: str | os.PathLike) -> bool:
  with np.load(path, allow_pickle=False) as z:
    return "mask_flip_blob" in z.files


def unit_summary(path: str | os.PathLike) -> dict:
  """``{"video_id", "identity", "count"}`` of a unit, without reading its images."""
  with np.load(path, allow_pickle=False) as z:
    return {
        "video_id": str(z["video_id"]),
        "identity": str(z["identity"]),
        "count": int(z["frame_index"].shape[0]),
    }


def unit_records(
    unit: dict, *, with_attributes: bool, with_mask_flip: bool, source: str = "unit"
) -> Iterator[dict]:
  """The records of one loaded unit, frame by frame (the record layout above)."""
  for i in range(len(unit["frame_index"])):
    rec = {
        "video_id": unit["video_id"],
        "identity": unit["identity"],
        "frame_index": int(unit["frame_index"][i]),
        "image": unit["image"][i],
        "landmarks": unit["landmarks"][i].astype(np.float32),
        "quad": unit["quad"][i].astype(np.float32),
        "mask": unit["mask"][i],
        "mask_video": unit["mask_video"][i],
        "z_id": unit["z_id"][i].astype(np.float32),
        "z_id_flip": unit["z_id_flip"][i].astype(np.float32),
        "z_lnd": unit["z_lnd"][i].astype(np.float32),
        "z_lnd_flip": unit["z_lnd_flip"][i].astype(np.float32),
        "interpolated": int(unit["interpolated"][i]),
    }
    if with_attributes:
      rec["attributes"] = np.asarray(unit["attributes"][i], np.int32)
    if with_mask_flip:
      if unit["mask_flip"] is None:
        raise ValueError(f"{source} has no mask_flip; rebuild it with the other units' flags")
      rec["mask_flip"] = unit["mask_flip"][i]
    yield rec


def record_features(
    z_id_dim: int, with_attributes: bool, with_mask_flip: bool
) -> tfds.features.FeaturesDict:
  """The TFDS features of the record layout above."""
  d = int(z_id_dim)
  features = {
      "video_id": tfds.features.Text(),
      "identity": tfds.features.Text(),
      "frame_index": tfds.features.Scalar(np.int32),
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "landmarks": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
      "quad": tfds.features.Tensor(shape=(4, 2), dtype=np.float32),
      "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
      "mask_video": tfds.features.Tensor(shape=(), dtype=np.object_),
      "z_id": tfds.features.Tensor(shape=(d,), dtype=np.float32),
      "z_id_flip": tfds.features.Tensor(shape=(d,), dtype=np.float32),
      "z_lnd": tfds.features.Tensor(shape=(Z_LND_DIM,), dtype=np.float32),
      "z_lnd_flip": tfds.features.Tensor(shape=(Z_LND_DIM,), dtype=np.float32),
      "interpolated": tfds.features.Scalar(np.int32),
  }
  if with_attributes:
    features["attributes"] = tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.int32)
  if with_mask_flip:
    features["mask_flip"] = tfds.features.Tensor(shape=(), dtype=np.object_)
  return tfds.features.FeaturesDict(features)


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------
def split_identities(identities: Iterable[str], test_fraction: float) -> set[str]:
  """Deterministic identity split: returns the set of *test* identities.

  Identities are ordered by the md5 of their name and the first
  ``round(test_fraction * n)`` become test (at least one when
  ``test_fraction > 0`` and there are two or more identities; never all).
  The assignment of a name depends only on the set of names.
  """
  ids = sorted(set(identities), key=lambda s: hashlib.md5(s.encode()).hexdigest())
  if test_fraction <= 0 or len(ids) < 2:
    return set()
  n_test = min(max(1, int(round(test_fraction * len(ids)))), len(ids) - 1)
  return set(ids[:n_test])


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------
class FaceRecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Packs per-video units into ArrayRecord shards (see module docstring).

  Args (besides the usual TFDS ones, e.g. ``data_dir``):
    units: ``{split_name: [unit .npz paths]}``; empty splits are dropped.
    z_id_dim: width D of ``z_id`` / ``z_id_flip``.
    with_mask_flip: adds the ``mask_flip`` feature (official path).
    record_format: how the units' images are encoded (``metadata.json``).
  ``WITH_ATTRIBUTES`` (class attribute) adds the ``attributes`` (40,) feature.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Aligned frames + cached dlib/official face features."}
  WITH_ATTRIBUTES = False
  # TFDS derives this through `importlib_resources` (not installed) for
  # classes inside packages; there are no checksums to find next to it.
  code_path = epath.Path(__file__)

  def __init__(
      self,
      *,
      units: dict[str, Sequence[str]] | None = None,
      z_id_dim: int = 128,
      with_mask_flip: bool = False,
      record_format: RecordFormat | None = None,
      **kwargs,
  ):
    self._units = {k: list(v) for k, v in (units or {}).items() if v}
    self._z_id_dim = int(z_id_dim)
    self._with_mask_flip = bool(with_mask_flip)
    self._record_format = record_format or RecordFormat()
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=record_features(self._z_id_dim, self.WITH_ATTRIBUTES, self._with_mask_flip),
        disable_shuffling=True,  # keep video/frame order (video_index.json)
        metadata=tfds.core.MetadataDict(self._record_format.metadata()),
    )

  def shard_writer(self) -> "ShardWriter":
    """Writes this dataset's records shard by shard (:func:`write_sharded`)."""
    return ShardWriter(self._z_id_dim, self.WITH_ATTRIBUTES, self._with_mask_flip)

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._units:
      raise ValueError("no units to write: every video failed or none given")
    return {split: self._generate_examples(paths) for split, paths in self._units.items()}

  def _generate_examples(self, paths):
    for vi, path in enumerate(paths):
      records = unit_records(
          load_unit(path),
          with_attributes=self.WITH_ATTRIBUTES,
          with_mask_flip=self._with_mask_flip,
          source=path,
      )
      for i, rec in enumerate(records):
        # Keys sort in generation order (video, then frame).
        yield f"{vi:08d}_{i:06d}", rec


class VoxcelebFaces(FaceRecordsBuilder):
  """VoxCeleb-style videos (also the embedded sample dataset)."""


class CelebahqFaces(FaceRecordsBuilder):
  """CelebA-HQ images with the 40 attribute labels."""

  WITH_ATTRIBUTES = True


# ----------------------------------------------------------------------------
# Sharded writing (one shard per task, tasks in parallel: the Beam path)
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One ArrayRecord shard: consecutive units of a split, written into ``directory``."""

  split: str
  index: int
  file_name: str
  directory: str
  units: tuple[str, ...]


def plan_shards(
    dataset_name: str,
    units: dict[str, Sequence[str]],
    directory: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[ShardTask]:
  """Cuts each split's units (in order) into shards of about ``max_shard_bytes``.

  A shard closes at the first video boundary past the limit, so no video spans
  two shards; a unit's file size stands for its records' size.
  """
  tasks = []
  for split, paths in units.items():
    groups, size = [[]], 0
    for p in paths:
      if groups[-1] and size >= max_shard_bytes:
        groups.append([])
        size = 0
      groups[-1].append(str(p))
      size += os.path.getsize(p)
    n = len(groups)
    for i, group in enumerate(groups):
      name = f"{dataset_name}-{split}.{FILE_FORMAT}-{i:05d}-of-{n:05d}"
      tasks.append(ShardTask(split, i, name, os.fspath(directory), tuple(group)))
  return tasks


class ShardWriter:
  """Writes one :class:`ShardTask` (picklable: the features are rebuilt in each worker)."""

  def __init__(self, z_id_dim: int, with_attributes: bool, with_mask_flip: bool):
    self.spec = (int(z_id_dim), bool(with_attributes), bool(with_mask_flip))
    self._features = None

  def __getstate__(self):
    return {"spec": self.spec, "_features": None}

  def __call__(self, task: ShardTask) -> dict:
    """-> ``{"split", "index", "num_examples", "num_bytes"}`` (bytes as TFDS counts them:
    the serialized records)."""
    from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top

    if self._features is None:
      self._features = record_features(*self.spec)
    _, with_attributes, with_mask_flip = self.spec
    counts = {"num_examples": 0, "num_bytes": 0}

    def serialized():
      for path in task.units:
        records = unit_records(
            load_unit(path),
            with_attributes=with_attributes,
            with_mask_flip=with_mask_flip,
            source=path,
        )
        for rec in records:
          data = self._features.serialize_example(rec)
          counts["num_examples"] += 1
          counts["num_bytes"] += len(data)
          yield None, data

    final = pathlib.Path(task.directory) / task.file_name
    tmp = final.with_name(final.name + ".tmp")  # a retried task overwrites its own partial file
    file_adapters.ArrayRecordFileAdapter.write_examples(tmp, serialized())
    os.replace(tmp, final)
    return {"split": task.split, "index": task.index, **counts}


def write_sharded(
    builder: FaceRecordsBuilder,
    units: dict[str, Sequence[str]],
    parallel_map: Callable[[Callable, list], list],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
  """Writes ``builder``'s dataset into ``builder.data_dir``, shard by shard, through
  ``parallel_map(fn, tasks) -> results``, then TFDS's metadata (dataset_info.json,
  features.json, metadata.json) from the shards' counts. Returns ``builder.data_dir``."""
  version_dir = pathlib.Path(builder.data_dir)
  version_dir.mkdir(parents=True, exist_ok=True)
  tasks = plan_shards(builder.name, units, version_dir, max_shard_bytes)
  results = parallel_map(builder.shard_writer(), tasks)
  split_infos = []
  for split in units:
    done = sorted((r for r in results if r["split"] == split), key=lambda r: r["index"])
    split_infos.append(
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[r["num_examples"] for r in done],
            num_bytes=sum(r["num_bytes"] for r in done),
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=epath.Path(version_dir),
                dataset_name=builder.name,
                split=split,
                filetype_suffix=FILE_FORMAT,
            ),
        )
    )
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(version_dir)
  return version_dir


def build_dataset(
    data_dir: str | os.PathLike,
    units: dict[str, Sequence[str]],
    builder_cls: type[FaceRecordsBuilder] = VoxcelebFaces,
    z_id_dim: int | None = None,
    metadata: dict | None = None,
    record_format: RecordFormat | None = None,
    parallel_map: Callable[[Callable, list], list] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
  """Writes the shards for ``units`` and returns the version directory.

  Rewrites the dataset when the set of units (or ``metadata``, or the record
  format) changed since the last build (tracked in ``<version dir>/units.json``);
  otherwise returns it unchanged. ``metadata`` (which face features the units
  hold, see ``common.features_info``) is written to ``face_features.json``.
  ``parallel_map(fn, items) -> results`` (the Beam path) writes shards of about
  ``max_shard_bytes`` in parallel (:func:`write_sharded`); without it TFDS's own
  writer packs them in this process.
  """
  record_format = record_format or RecordFormat()
  units = {k: sorted(map(str, v)) for k, v in units.items() if v}
  all_paths = [p for v in units.values() for p in v]
  if not all_paths:
    raise ValueError("no units to write: every video failed or none given")
  if z_id_dim is None:
    z_id_dim = unit_z_id_dim(all_paths[0])
  with_mask_flip = unit_has_mask_flip(all_paths[0])
  manifest = {
      "units": {k: [os.path.basename(p) for p in v] for k, v in units.items()},
      "mtimes": {os.path.basename(p): os.path.getmtime(p) for p in all_paths},
      "z_id_dim": z_id_dim,
  }
  if metadata is not None:
    manifest["metadata"] = metadata
  if record_format != RecordFormat():  # PNG manifests stay as they were
    manifest["record_format"] = record_format.info()
  kwargs = dict(
      units=units,
      z_id_dim=z_id_dim,
      with_mask_flip=with_mask_flip,
      record_format=record_format,
      data_dir=os.fspath(data_dir),
  )
  builder = builder_cls(**kwargs)
  version_dir = pathlib.Path(builder.data_dir)
  manifest_path = version_dir / "units.json"
  if manifest_path.exists():
    try:
      if json.loads(manifest_path.read_text()) == manifest:
        return version_dir
    except (OSError, ValueError):
      pass
  if parallel_map is not None:
    # Built in a fresh data_dir (a builder over an existing one reads its old info), then
    # swapped in: the old dataset stays readable until the new one is complete.
    tmp_root = pathlib.Path(data_dir) / f"incomplete.{uuid.uuid4().hex}"
    try:
      built = write_sharded(
          builder_cls(**dict(kwargs, data_dir=os.fspath(tmp_root))),
          units,
          parallel_map,
          max_shard_bytes,
      )
      if version_dir.exists():
        shutil.rmtree(version_dir)
      version_dir.parent.mkdir(parents=True, exist_ok=True)
      os.replace(built, version_dir)
    finally:
      shutil.rmtree(tmp_root, ignore_errors=True)
  else:
    if version_dir.exists():
      shutil.rmtree(version_dir)
      builder = builder_cls(**kwargs)
    tfds.disable_progress_bar()  # data_prep shows its own tqdm bar
    with tempfile.TemporaryDirectory() as dl_dir:
      builder.download_and_prepare(download_dir=dl_dir)
  # Record ranges per video, in record order, for the input pipeline.
  index = {}
  for split, paths in units.items():
    start, videos = 0, []
    for p in paths:
      summary = unit_summary(p)
      videos.append(
          {
              "video_id": summary["video_id"],
              "identity": summary["identity"],
              "start": start,
              "count": summary["count"],
          }
      )
      start += summary["count"]
    index[split] = videos
  (version_dir / VIDEO_INDEX_FILE).write_text(json.dumps(index, indent=1))
  if metadata is not None:
    (version_dir / FACE_FEATURES_FILE).write_text(json.dumps(metadata, indent=1))
  manifest_path.write_text(json.dumps(manifest, indent=1))
  return version_dir
