"""grain pipeline over synthetic ArrayRecord shards (no dlib: fast)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from data_prep import tfds_builder
from s3jax import input_pipeline as ip
from s3jax.face_features import flip_landmarks, hull_mask

SIZE = 32
VIDEOS = {"idA/v0": 6, "idA/v1": 4, "idB/v0": 6, "idC/v0": 4, "idC/v1": 2}  # even counts


def _landmarks(rng):
  # A face-ish, asymmetric point set inside the crop.
  pts = rng.uniform(0.25 * SIZE, 0.75 * SIZE, size=(68, 2))
  pts[:17, 1] += 0.1 * SIZE  # jaw lower
  return pts.astype(np.float32)


def _make_unit(video_id, n, rng):
  images, masks, lnds = [], [], []
  for _ in range(n):
    img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    img[:, : SIZE // 4] = 255  # asymmetric: white left band
    lnd = _landmarks(rng)
    images.append(tfds_builder.encode_png(img))
    masks.append(tfds_builder.encode_png(hull_mask(lnd, SIZE) * 255))
    lnds.append(lnd)
  z = rng.normal(size=(n, 128)).astype(np.float32)
  return {
      "video_id": video_id,
      "identity": video_id.split("/")[0],
      "frame_index": np.arange(n, dtype=np.int32) * 3,
      "image": images,
      "mask": masks,
      "mask_video": masks,
      "landmarks": np.stack(lnds),
      "quad": rng.normal(size=(n, 4, 2)).astype(np.float32),
      "z_id": z,
      "z_id_flip": -z,
      "z_lnd": rng.uniform(size=(n, 102)).astype(np.float32),
      "z_lnd_flip": rng.uniform(size=(n, 102)).astype(np.float32) + 10.0,
      "interpolated": np.zeros(n, np.int32),
  }


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth_ds")
  rng = np.random.default_rng(0)
  units = {"train": [], "test": []}
  for vid, n in VIDEOS.items():
    p = root / "units" / (vid.replace("/", "__") + ".npz")
    tfds_builder.save_unit(p, _make_unit(vid, n, rng))
    units["test" if vid.startswith("idC") else "train"].append(str(p))
  return tfds_builder.build_dataset(root, units, tfds_builder.VoxcelebFaces)


def _pipe(path, **kw):
  args = dict(global_batch_size=2, frames_per_item=2, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return ip.build_pipeline(path, "train", **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_layout_and_shapes(synth_dataset):
  src = ip.open_split(synth_dataset, "train")
  assert len(src) == 16
  rec = src[0]
  assert rec["video_id"] == "idA/v0" and rec["identity"] == "idA"
  assert rec["landmarks"].shape == (68, 2) and rec["quad"].shape == (4, 2)
  assert rec["z_id"].shape == (128,) and rec["z_lnd_flip"].shape == (102,)
  assert isinstance(rec["image"], bytes) and isinstance(rec["mask_video"], bytes)
  assert ip.available_splits(synth_dataset.parent.parent) == ["train", "test"] or set(
      ip.available_splits(synth_dataset)
  ) == {"train", "test"}
  b = next(iter(_pipe(synth_dataset)))
  assert b["image"].shape == (2, 2, SIZE, SIZE, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["mask"].shape == (2, 2, SIZE, SIZE, 1)
  assert b["z_id"].shape == (2, 2, 128) and b["z_lnd"].shape == (2, 2, 102)
  assert b["landmarks"].shape == (2, 2, 68, 2)
  assert b["video_id"].shape == (2,) and b["frame_index"].shape == (2, 2)


def test_tfds_data_source_opens_without_registration(synth_dataset):
  import tensorflow_datasets as tfds

  ds = tfds.builder_from_directory(str(synth_dataset)).as_data_source(split="test")
  assert len(ds) == 6
  ds2 = tfds.data_source("voxceleb_faces", data_dir=str(synth_dataset.parent.parent), split="train")
  assert len(ds2) == 16


def test_deterministic_for_seed(synth_dataset):
  a = _take(iter(_pipe(synth_dataset, seed=3)), 6)
  b = _take(iter(_pipe(synth_dataset, seed=3)), 6)
  c = _take(iter(_pipe(synth_dataset, seed=4)), 6)
  assert _same(a, b)
  assert not _same(a, c)


def test_restore_continues_with_next_batch(synth_dataset):
  pipe = _pipe(synth_dataset, seed=1)
  it = iter(pipe)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip
  expected = _take(it, 5)  # crosses the epoch boundary (7 items / epoch)
  it2 = iter(_pipe(synth_dataset, seed=1))
  it2.set_state(state)
  assert _same(_take(it2, 5), expected)


def test_items_group_one_video(synth_dataset):
  src = ip.open_split(synth_dataset, "train")
  for b in _take(iter(_pipe(synth_dataset, global_batch_size=4, frames_per_item=2)), 4):
    for i in range(4):
      vids = {src[int(r)]["video_id"] for r in b["record_index"][i]}
      assert vids == {b["video_id"][i]}
      assert len(set(b["frame_index"][i].tolist())) == 2


def test_epochs_cover_all_frames_and_reshuffle(synth_dataset):
  pipe = _pipe(synth_dataset, global_batch_size=1, flip=False)
  n = pipe.items_per_epoch
  assert n == 8  # 6/2 + 4/2 + 6/2
  it = iter(pipe)
  e0 = [next(it)["record_index"][0].tolist() for _ in range(n)]
  e1 = [next(it)["record_index"][0].tolist() for _ in range(n)]
  assert sorted(sum(e0, [])) == list(range(16))
  assert sorted(sum(e1, [])) == list(range(16))
  assert e0 != e1


def test_process_sharding_disjoint_and_complete(synth_dataset):
  seen = []
  for p in range(2):
    pipe = _pipe(
        synth_dataset,
        global_batch_size=2,
        process_index=p,
        process_count=2,
        num_epochs=1,
        drop_remainder=False,
    )
    assert pipe.batch_size == 1
    seen.append([r for b in pipe.dataset for r in b["record_index"].ravel().tolist()])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(16))
  with pytest.raises(ValueError, match="divisible"):
    _pipe(synth_dataset, global_batch_size=3, process_count=2, process_index=0)


def test_flip_consistency(synth_dataset):
  src = ip.open_split(synth_dataset, "train")
  pipe = _pipe(synth_dataset, global_batch_size=4, seed=7)
  checked = {True: 0, False: 0}
  for b in _take(iter(pipe), 4):
    for i in range(4):
      for t in range(2):
        rec = src[int(b["record_index"][i, t])]
        fl = bool(b["flipped"][i, t])
        img = tfds_builder.decode_png(rec["image"]).astype(np.float32) / 127.5 - 1
        lnd = rec["landmarks"]
        if fl:
          img, lnd = img[:, ::-1], flip_landmarks(lnd, SIZE)
        np.testing.assert_allclose(b["image"][i, t], img, atol=1e-5)
        np.testing.assert_allclose(b["landmarks"][i, t], lnd, atol=1e-4)
        np.testing.assert_array_equal(b["z_id"][i, t], rec["z_id_flip"] if fl else rec["z_id"])
        np.testing.assert_array_equal(b["z_lnd"][i, t], rec["z_lnd_flip"] if fl else rec["z_lnd"])
        # The mask follows the image: it matches the hull of the flipped points.
        m = b["mask"][i, t, ..., 0] > 0.5
        h = hull_mask(b["landmarks"][i, t], SIZE) > 0
        assert (m & h).sum() / max((m | h).sum(), 1) > 0.9
        # White band is on the left unflipped, on the right flipped.
        assert (b["image"][i, t][:, -1].mean() > 0.99) == fl
        checked[fl] += 1
  assert checked[True] and checked[False]


def _corrupt_copy(src_dir, dst_dir, mode):
  shutil.copytree(src_dir, dst_dir)
  shard = sorted(pathlib.Path(dst_dir).glob("*-train.array_record-*"))[0]
  data = bytearray(shard.read_bytes())
  if mode == "flip":
    mid = int(len(data) * 0.3)  # inside the records, not the padding
    for j in range(mid, mid + 64):
      data[j] ^= 0xFF
  else:
    data = data[: len(data) // 2]
  shard.write_bytes(bytes(data))
  return shard


def test_corrupt_record_named_and_skipped(synth_dataset, tmp_path):
  shard = _corrupt_copy(synth_dataset, tmp_path / "ds", "flip")
  pipe = _pipe(tmp_path / "ds", global_batch_size=1, num_epochs=1, flip=False)
  with pytest.raises(ip.CorruptRecordError, match=rf"shard {shard}.* record \d+"):
    list(pipe.dataset)
  pipe = _pipe(tmp_path / "ds", global_batch_size=1, num_epochs=1, flip=False, skip_corrupt=True)
  got = list(pipe.dataset)
  assert pipe.corrupt_count >= 1 and pipe.corrupt.items_skipped >= 1
  assert len(got) == pipe.items_per_epoch - pipe.corrupt.items_skipped


def test_truncated_shard_names_shard(synth_dataset, tmp_path):
  shard = _corrupt_copy(synth_dataset, tmp_path / "ds", "trunc")
  pipe = _pipe(tmp_path / "ds", global_batch_size=1, num_epochs=1)
  with pytest.raises(ip.CorruptRecordError, match=str(shard.name)):
    next(iter(pipe))


def test_to_global_arrays(synth_dataset):
  import jax
  from jax.sharding import Mesh

  n = jax.device_count()
  mesh = Mesh(np.asarray(jax.devices()).reshape(n, 1), ("data", "fsdp"))
  b = next(iter(_pipe(synth_dataset, global_batch_size=n)))
  g = ip.to_global_arrays(b, mesh)
  assert "video_id" not in g
  assert g["image"].shape == b["image"].shape
  np.testing.assert_array_equal(np.asarray(g["z_id"]), b["z_id"])


def test_make_train_iterator_from_config(synth_dataset):
  import ml_collections

  cfg = ml_collections.ConfigDict(
      dict(
          data_dir=str(synth_dataset.parent.parent),
          batch_size=2,
          frames_per_item=2,
          shuffle_seed=0,
          num_workers=0,
          skip_corrupt=False,
      )
  )
  it = ip.make_train_iterator(cfg, seed=0)
  assert next(it)["image"].shape == (2, 2, SIZE, SIZE, 3)
  ev = ip.make_eval_iterator(cfg, seed=0, batch_size=1)
  b = next(ev)
  assert b["video_id"][0].startswith("idC") and not b["flipped"].any()


def test_skip_corrupt_does_not_spin_on_a_dead_shard(synth_dataset, tmp_path):
  _corrupt_copy(synth_dataset, tmp_path / "ds", "trunc")
  pipe = _pipe(tmp_path / "ds", global_batch_size=1, skip_corrupt=True)  # infinite
  with pytest.raises(ip.CorruptRecordError, match="in a row"):
    next(iter(pipe))
  assert pipe.corrupt_count == 16


def test_process_blocks_assemble_the_single_process_batch(synth_dataset):
  """Multi-host: [process 0 | process 1] of each batch equals what one process builds alone."""
  whole = _take(iter(_pipe(synth_dataset, global_batch_size=4, flip=True)), 5)
  parts = [
      _take(
          iter(
              _pipe(synth_dataset, global_batch_size=4, process_index=p, process_count=2, flip=True)
          ),
          5,
      )
      for p in range(2)
  ]
  for step, batch in enumerate(whole):
    for key in ("record_index", "image", "z_id", "flipped"):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])
