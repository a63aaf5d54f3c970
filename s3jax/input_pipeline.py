"""grain input pipeline over the ``data_prep`` ArrayRecord shards.

Each *item* is ``k = frames_per_item`` frames of one video (the reference
samples k frames of a video per item); a batch is ``B`` items, so a train step
sees ``B*k`` frames. The pipeline is::

  frames = grain.MapDataset.source(FrameSource)            # random access records
  grain.MapDataset.range(items_per_epoch)                  # item table over videos
    .shuffle(seed).repeat(num_epochs)                      # new order every epoch
    .map_with_index(-> (epoch, item))                      # global position -> epoch
    [process_index::process_count]                         # shard by process
    .map(load k frames of one video + decode + flip)       # per-frame random flip
    .to_iter_dataset(ReadOptions(threads, prefetch))       # drops skipped items
    .batch(global_batch // process_count, drop_remainder)

Item table: video ``v`` with ``n`` frames gives ``items_per_video`` items per
epoch (default ``max(1, n // k)``, so every frame is seen about once an
epoch; ``1`` is the reference's "one item per video"). Item ``j`` of video
``v`` in epoch ``e`` takes slots ``j*k .. j*k+k-1`` of a permutation of the
video's frames drawn from ``(seed, e, v)``. Flips are drawn per frame from
``(seed, e, item)``. Everything random is a function of the seed and the
position, so a pipeline is deterministic for a seed, independent of the
number of threads/processes, and a restored iterator continues with exactly
the next batch.

Batches (numpy, per process, ``Bp = global_batch_size // process_count``):

==============  ======================  ======================================
key             shape, dtype            meaning
==============  ======================  ======================================
image           (Bp, k, H, W, 3) f32    RGB in [-1, 1] (flipped if ``flipped``)
mask            (Bp, k, H, W, 1) f32    training mask in {0, 1} (``mask_flip``
                                        for flipped frames when the records
                                        have it: the official path)
z_id            (Bp, k, D) f32          ``z_id_flip`` for flipped frames
z_lnd           (Bp, k, 102) f32        ``z_lnd_flip`` for flipped frames
landmarks       (Bp, k, 68, 2) f32      crop pixels, flipped with the image
flipped         (Bp, k) bool
frame_index     (Bp, k) int32           frame index in the source video
record_index    (Bp, k) int64           record index in the split
video_id        (Bp,) str
attributes      (Bp, k, 40) int32       only for datasets that have them
==============  ======================  ======================================

The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()``
(JSON-able dict) or ``grain.checkpoint.CheckpointSave/Restore`` in orbax.
"""

from __future__ import annotations

import dataclasses
import sys
import json
import os
import pathlib
import threading
from typing import Any, Optional, Sequence

import cv2
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from s3jax import images
from s3jax.face_features import flip_landmarks

VIDEO_INDEX_FILE = "video_index.json"
FACE_FEATURES_FILE = "face_features.json"  # written by data_prep (tfds_builder)
# z_id width -> feature path, for datasets written before face_features.json existed.
_FACE_FEATURES_BY_DIM = {128: "dlib", 512: "official"}
_OPEN_LOCK = threading.Lock()
_TEXT_KEYS = ("video_id", "identity")


class CorruptRecordError(RuntimeError):
  """A record that cannot be read or decoded; the message names shard and record."""


# ----------------------------------------------------------------------------
# Opening a split
# ----------------------------------------------------------------------------
def find_version_dir(path: str | os.PathLike) -> pathlib.Path:
  """A TFDS version dir from a version dir, ``<data_dir>/<name>`` or a data_dir."""
  path = pathlib.Path(path)
  if (path / "dataset_info.json").exists():
    return path
  candidates = sorted(path.glob("*/dataset_info.json")) + sorted(path.glob("*/*/dataset_info.json"))
  if not candidates:
    raise FileNotFoundError(
        f"no TFDS dataset (dataset_info.json) under {path}; build one with "
        f"`python -m data_prep.sample --out {path}` (the embedded sample, add --size N for "
        "another image size), `python -m data_prep.voxceleb` or `python -m data_prep.celebahq`"
    )
  if len({c.parent.parent for c in candidates}) > 1:
    raise ValueError(
        f"several datasets under {path}: "
        f"{sorted({str(c.parent) for c in candidates})}; pass one"
    )
  return max(
      (c.parent for c in candidates),
      key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()),
  )


def available_splits(path: str | os.PathLike) -> list[str]:
  info = json.loads((find_version_dir(path) / "dataset_info.json").read_text())
  return [s["name"] for s in info.get("splits", [])]


class FrameSource:
  """Random access to the records of one split (grain ``RandomAccessDataSource``).

  ``source[i]`` returns the record dict with images still encoded (bytes)
  and text as ``str``. Any read/parse failure raises
  :class:`CorruptRecordError` naming the shard file and the record's index
  within it. Picklable (reopens lazily), so it works with grain workers.
  """

  def __init__(self, path: str | os.PathLike, split: str = "train"):
    self.version_dir = find_version_dir(path)
    self.split = split
    self._tfds = None
    info = json.loads((self.version_dir / "dataset_info.json").read_text())
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
      raise ValueError(f"split {split!r} not in {self.version_dir} " f"(has {sorted(splits)})")
    self._len = sum(int(n) for n in splits[split]["shardLengths"])
    # Shard table (file, first global index, count), as TFDS lays it out.
    name = info["name"]
    lengths = [int(n) for n in splits[split]["shardLengths"]]
    fmt = info.get("fileFormat", "array_record")
    self._shards, start = [], 0
    for i, n in enumerate(lengths):
      f = self.version_dir / f"{name}-{split}.{fmt}-{i:05d}-of-{len(lengths):05d}"
      self._shards.append((str(f), start, n))
      start += n
    # Opened here, on the constructing thread, before any prefetch thread runs:
    # TFDS's import swaps builtins.__import__ process-wide while it runs, so an
    # import on another thread meanwhile (orbax restoring a checkpoint, say) gets
    # an etils LazyModule instead of the real object.
    self._open()

  def _open(self):
    if self._tfds is None:
      # Serialised: TFDS's lazy imports deadlock when two threads trigger them at once.
      with _OPEN_LOCK:
        if self._tfds is None:
          # Lazy: importing TFDS costs seconds, and worker processes reopen sources.
          import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

          builder = tfds.builder_from_directory(os.fspath(self.version_dir))
          self._features = builder.info.features
          self._tfds = builder.as_data_source(split=self.split)
    return self._tfds

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_tfds"] = None
    d.pop("_features", None)
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._open()  # On the unpickling thread, for the reason given in __init__.

  def __len__(self) -> int:
    return self._len

  def locate(self, index: int) -> tuple[str, int]:
    """Global record index -> (shard file, index within the shard)."""
    for f, start, n in self._shards:
      if start <= index < start + n:
        return f, index - start
    raise IndexError(f"record {index} out of range [0, {self._len})")

  def corrupt_error(self, index: int, err: BaseException, what: str = "read") -> CorruptRecordError:
    f, k = self.locate(index)
    return CorruptRecordError(
        f"corrupt record: shard {f} record {k} (split {self.split!r} index {index}): "
        f"cannot {what}: {type(err).__name__}: {err}"
    )

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range [0, {self._len})")
    src = self._open()
    try:
      raw = src.data_source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise self.corrupt_error(index, e, "read") from e
    try:
      rec = self._features.deserialize_example_np(raw)
    except Exception as e:  # pylint: disable=broad-except
      raise self.corrupt_error(index, e, "parse") from e
    for k in _TEXT_KEYS:
      if k in rec and isinstance(rec[k], bytes):
        rec[k] = rec[k].decode("utf-8")
    return rec


def open_split(path: str | os.PathLike, split: str = "train") -> FrameSource:
  return FrameSource(path, split)


def dataset_face_features(path: str | os.PathLike) -> dict:
  """Which face features a dataset's records hold: ``{"face_features", "z_id_dim", ...}``.

  From ``face_features.json`` (data_prep writes it); for older datasets inferred from
  the width of ``z_id`` in ``features.json`` (128: dlib, 512: official).
  """
  version_dir = find_version_dir(path)
  meta_path = version_dir / FACE_FEATURES_FILE
  if meta_path.exists():
    return json.loads(meta_path.read_text())
  dim = None
  features_path = version_dir / "features.json"
  if features_path.exists():
    feats = json.loads(features_path.read_text())
    try:
      spec = feats["featuresDict"]["features"]["z_id"]["tensor"]["shape"]
      dim = int(spec["dimensions"][0])
    except (KeyError, IndexError, TypeError, ValueError):
      dim = None
  return {"face_features": _FACE_FEATURES_BY_DIM.get(dim, "unknown"), "z_id_dim": dim}


def check_face_features(path: str | os.PathLike, face_features: str) -> dict:
  """Raises ValueError unless the dataset at ``path`` holds ``face_features`` records."""
  meta = dataset_face_features(path)
  have = meta.get("face_features")
  if have != face_features:
    how = {
        "official": "--encoders DIR or --checkpoint FILE",
        "dlib": "neither --encoders nor --checkpoint",
    }
    raise ValueError(
        f"config.model.face_features={face_features!r} but the records in "
        f"{find_version_dir(path)} hold {have!r} features (z_id width {meta.get('z_id_dim')}); "
        f"set config.model.face_features={have!r} or rebuild the data with data_prep and "
        f"{how.get(face_features, 'the matching flags')}"
    )
  return meta


def video_index(source: FrameSource) -> list[dict]:
  """[{video_id, start, count}] record ranges per video (contiguous records).

  Read from ``video_index.json`` (written by data_prep); else built by
  scanning the records once (slow for big datasets).
  """
  p = source.version_dir / VIDEO_INDEX_FILE
  if p.exists():
    return json.loads(p.read_text())[source.split]
  videos, prev = [], None
  for i in range(len(source)):
    vid = source[i]["video_id"]
    if vid != prev:
      videos.append({"video_id": vid, "start": i, "count": 0})
      prev = vid
    videos[-1]["count"] += 1
  return videos


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------
def decode_image(data: bytes, channels: int = 3) -> np.ndarray:

  arr = cv2.imdecode(
      np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
  )
  if arr is None:
    raise ValueError("image bytes do not decode (PNG/JPEG)")
  if channels == 3:
    arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
  return arr


class CorruptCounter:
  """Thread-safe count of corrupt records met with ``skip_corrupt=True``."""

  def __init__(self):
    self._lock = threading.Lock()
    self.reads = 0  # corrupt reads (a record met twice counts twice)
    self.records = set()  # distinct (shard file, index in shard)
    self.items_skipped = 0
    self.consecutive = 0  # items skipped in a row (guards against spinning)
    self.last_error = ""

  @property
  def count(self) -> int:
    return len(self.records)

  def add(self, source: FrameSource, index: int, err: BaseException):
    with self._lock:
      self.reads += 1
      self.records.add(source.locate(index))
      self.last_error = str(err)

  def __getstate__(self):
    return {
        "reads": self.reads,
        "records": self.records,
        "consecutive": 0,
        "items_skipped": self.items_skipped,
        "last_error": self.last_error,
    }

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()


@dataclasses.dataclass
class _ItemLoader:
  """(epoch, item) -> one item dict of k decoded (and maybe flipped) frames."""

  source: FrameSource
  starts: np.ndarray  # per video: first record
  counts: np.ndarray  # per video: number of records
  item_video: np.ndarray  # per item: video
  item_slot: np.ndarray  # per item: j (item number within its video)
  video_ids: list
  k: int
  seed: int
  shuffle: bool
  flip: bool
  skip_corrupt: bool
  counter: CorruptCounter
  size: int = 0

  def frame_records(self, epoch: int, item: int) -> np.ndarray:
    v = int(self.item_video[item])
    n = int(self.counts[v])
    out = np.empty(self.k, np.int64)
    perms = {}
    for t in range(self.k):
      rnd, q = divmod(int(self.item_slot[item]) * self.k + t, n)
      if rnd not in perms:
        perms[rnd] = (
            np.random.default_rng([self.seed, epoch, v, rnd]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
      out[t] = self.starts[v] + perms[rnd][q]
    return out

  def __call__(self, epoch_item):

    epoch, item = int(epoch_item[0]), int(epoch_item[1])
    recs = self.frame_records(epoch, item)
    if self.flip:
      flips = np.random.default_rng([self.seed, epoch, item, 1]).random(self.k) < 0.5
    else:
      flips = np.zeros(self.k, bool)
    frames = []
    for r, fl in zip(recs, flips):
      try:
        rec = self.source[int(r)]
        # Official records hold the mirror's own parsing mask.
        own_flip_mask = fl and "mask_flip" in rec
        try:
          img = decode_image(rec["image"], 3)
          mask = decode_image(rec["mask_flip" if own_flip_mask else "mask"], 1)
        except Exception as e:  # pylint: disable=broad-except
          raise self.source.corrupt_error(int(r), e, "decode image/mask") from e
      except CorruptRecordError as e:
        if not self.skip_corrupt:
          raise
        self.counter.add(self.source, int(r), e)
        with self.counter._lock:  # pylint: disable=protected-access
          self.counter.items_skipped += 1
          self.counter.consecutive += 1
          stuck = self.counter.consecutive > max(100, 2 * len(self.item_video))
        if stuck:  # e.g. every shard truncated: do not spin forever
          raise CorruptRecordError(
              f"{self.counter.consecutive} items in a row skipped as corrupt "
              f"(skip_corrupt=True); last: {e}"
          ) from e
        return None
      size = img.shape[0]
      lnd = rec["landmarks"].astype(np.float32)
      if fl:
        img = img[:, ::-1]
        mask = mask if own_flip_mask else mask[:, ::-1]
        lnd = flip_landmarks(lnd, size).astype(np.float32)
      frame = {
          "image": images.to_model(img),
          "mask": (mask > 127).astype(np.float32)[..., None],
          "z_id": rec["z_id_flip" if fl else "z_id"],
          "z_lnd": rec["z_lnd_flip" if fl else "z_lnd"],
          "landmarks": lnd,
          "flipped": np.bool_(fl),
          "frame_index": np.int32(rec["frame_index"]),
          "record_index": np.int64(r),
      }
      if "attributes" in rec:
        frame["attributes"] = rec["attributes"].astype(np.int32)
      frames.append(frame)
    self.counter.consecutive = 0
    item_dict = {k: np.stack([f[k] for f in frames]) for k in frames[0]}
    item_dict["video_id"] = np.asarray(self.video_ids[int(self.item_video[item])])
    return item_dict


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _WithEpoch:
  items_per_epoch: int

  def __call__(self, index, item):
    return (index // self.items_per_epoch, item)


class _ProcessBlock(grain.MapDataset):
  """This process's contiguous block of every global batch of the parent's order."""

  def __init__(self, parent, global_batch: int, local_batch: int, process_index: int):
    super().__init__(parent)
    self._global, self._local, self._pi = global_batch, local_batch, process_index
    n = len(parent)
    self._length = n if n >= sys.maxsize else (n // global_batch) * local_batch

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, j: int) -> int:
    b, o = divmod(j, self._local)
    return b * self._global + self._pi * self._local + o

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessBlock(global={self._global}, local={self._local}, p={self._pi})"


@dataclasses.dataclass
class Pipeline:
  """A built pipeline: ``iter(pipeline)`` gives a fresh checkpointable iterator."""

  dataset: Any  # grain IterDataset of batches
  source: FrameSource
  items_per_epoch: int  # global (all processes)
  batch_size: int  # per process
  frames_per_item: int
  corrupt: CorruptCounter  # filled when skip_corrupt=True (in-process workers only)

  def __iter__(self):
    it = iter(self.dataset)
    it.corrupt = self.corrupt  # convenience: reach the counter from the iterator
    return it

  @property
  def corrupt_count(self) -> int:
    return self.corrupt.count


def build_pipeline(
    path: str | os.PathLike,
    split: str = "train",
    *,
    global_batch_size: int,
    frames_per_item: int = 2,
    seed: int = 0,
    num_epochs: Optional[int] = None,
    shuffle: bool = True,
    flip: bool = True,
    items_per_video: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    skip_corrupt: bool = False,
    drop_remainder: bool = True,
    num_workers: int = 0,
    read_threads: int = 2,
    prefetch_buffer_size: Optional[int] = None,
) -> Pipeline:
  """Builds the pipeline over ``path`` (data_dir, dataset dir or version dir).

  Args:
    global_batch_size: items per global batch; each process gets
      ``global_batch_size // process_count`` (must divide).
    frames_per_item: k frames of one video per item.
    seed: shuffle / frame-sampling / flip seed (0 <= seed < 2**32).
    num_epochs: None repeats forever (training), reshuffling every epoch.
    shuffle: False keeps item order (video order, frames in order) -- eval.
    flip: random horizontal flip per frame (p=0.5).
    items_per_video: items per video per epoch (None: ``max(1, n // k)``).
    process_index / process_count: default ``jax.process_index/count()``.
      Process p takes slots ``[p*Bp, (p+1)*Bp)`` of every global batch, so
      the global batch assembled from all processes equals the batch one
      process would build alone (same order, same per-position noise).
    skip_corrupt: drop items with a corrupt record and count it
      (``pipeline.corrupt``) instead of raising ``CorruptRecordError``.
    num_workers: grain worker processes (0 = in-process; on 2 cores extra
      workers do not help). Absl flags must be parsed for workers > 0.
    read_threads / prefetch_buffer_size: grain ``ReadOptions`` (threads
      decoding items in this process; items buffered).
  """
  if process_index is None or process_count is None:

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}"
    )
  batch_size = global_batch_size // process_count
  k = int(frames_per_item)
  source = FrameSource(path, split)
  videos = [v for v in video_index(source) if v["count"] > 0]
  if not videos:
    raise ValueError(f"split {split!r} of {source.version_dir} has no records")
  starts = np.array([v["start"] for v in videos], np.int64)
  counts = np.array([v["count"] for v in videos], np.int64)
  per_video = (
      np.maximum(1, counts // k)
      if items_per_video is None
      else np.full(len(videos), int(items_per_video))
  )
  item_video = np.repeat(np.arange(len(videos)), per_video)
  item_slot = np.concatenate([np.arange(n) for n in per_video])
  n_items = len(item_video)
  counter = CorruptCounter()
  loader = _ItemLoader(
      source=source,
      starts=starts,
      counts=counts,
      item_video=item_video,
      item_slot=item_slot,
      video_ids=[v["video_id"] for v in videos],
      k=k,
      seed=int(seed),
      shuffle=shuffle,
      flip=flip,
      skip_corrupt=skip_corrupt,
      counter=counter,
  )

  ds = grain.MapDataset.range(n_items)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(_WithEpoch(n_items))
  ds = _ProcessBlock(ds, global_batch_size, batch_size, process_index)
  ds = ds.map(loader)
  buf = prefetch_buffer_size or max(2 * batch_size, 4)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buf))
  it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return Pipeline(
      dataset=it_ds,
      source=source,
      items_per_epoch=n_items,
      batch_size=batch_size,
      frames_per_item=k,
      corrupt=counter,
  )


# ----------------------------------------------------------------------------
# Config-level entry points used by the trainers
# ----------------------------------------------------------------------------
def _cfg(config, key, default=None):
  try:
    v = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  except (AttributeError, KeyError):
    v = default
  return default if v is None else v


def make_train_iterator(data_config, seed: int = 0, split: str = "train"):
  """Infinite, shuffled, flipped iterator from ``config.data``.

  Uses ``data_dir``, ``batch_size`` (items per *global* batch),
  ``frames_per_item``, ``shuffle_seed`` (falls back to ``seed``),
  ``num_workers``, ``skip_corrupt``. Returns a checkpointable
  ``grain.DatasetIterator`` (``.corrupt`` holds the corrupt-record counter).
  """
  pipe = build_pipeline(
      _cfg(data_config, "data_dir"),
      split,
      global_batch_size=int(_cfg(data_config, "batch_size")),
      frames_per_item=int(_cfg(data_config, "frames_per_item", 2)),
      seed=int(_cfg(data_config, "shuffle_seed", seed)),
      num_epochs=None,
      shuffle=True,
      flip=bool(_cfg(data_config, "flip", True)),
      num_workers=int(_cfg(data_config, "num_workers", 0)),
      skip_corrupt=bool(_cfg(data_config, "skip_corrupt", False)),
  )
  return iter(pipe)


def make_eval_iterator(
    data_config, seed: int = 0, batch_size: Optional[int] = None, split: Optional[str] = None
):
  """Repeating, unflipped iterator over the ``test`` split (``train`` if absent).

  ``batch_size`` overrides ``config.batch_size`` (global items per batch);
  shuffled with the seed so sample grids mix videos, deterministic.
  """
  path = _cfg(data_config, "data_dir")
  if split is None:
    split = "test" if "test" in available_splits(path) else "train"

  bs = int(batch_size or _cfg(data_config, "batch_size"))
  bs = -(-bs // jax.process_count()) * jax.process_count()
  pipe = build_pipeline(
      path,
      split,
      global_batch_size=bs,
      frames_per_item=int(_cfg(data_config, "frames_per_item", 2)),
      seed=int(_cfg(data_config, "shuffle_seed", seed)),
      num_epochs=None,
      shuffle=True,
      flip=False,
      skip_corrupt=bool(_cfg(data_config, "skip_corrupt", False)),
  )
  return iter(pipe)


def to_global_arrays(batch: dict, mesh, data_axes: Optional[Sequence[str]] = None) -> dict:
  """Per-process numpy batch -> global ``jax.Array``s sharded on the batch axis.

  ``data_axes``: mesh axes the leading axis is split over (default: all
  mesh axes, i.e. pure data parallelism over every device). Non-numeric
  leaves (``video_id`` strings) are left out.
  """

  axes = tuple(mesh.axis_names) if data_axes is None else tuple(data_axes)
  sharding = NamedSharding(mesh, P(axes))
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "USO":
      continue
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
