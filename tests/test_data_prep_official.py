"""data_prep on the official feature path (IR-SE50 z_id, MobileNet z_lnd, BiSeNet masks) with
random-weight encoders, and a tiny DVA trained on the records it writes.

One synthetic video of 4 frames (the embedded astronaut, no ../shared needed) is prepared once
at 32 px (features on the 256 px crops) by a module fixture; the encoders at 256 px take seconds
per crop on a shared 2-core CPU, so every check reads that one dataset.
"""

import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from data_prep import common, sample, tfds_builder, voxceleb
from s3jax import face_encoding, images
from s3jax import input_pipeline as ip
from s3jax.models import face_encoders as fe
from s3jax.porting import encoder_keys
from s3jax.porting import state_dict as sdlib
from s3jax.training import runner
from train_helpers import REPO, random_encoder_variables, tiny_dva_config

SIZE = 32  # stored crops; the encoders see the 256 px crops
NUM_FRAMES = 4  # one video: 4 crops + 4 mirrors = one encoder batch
BATCH = 8


@pytest.fixture(scope="module")
def enc_variables():
  return random_encoder_variables(0)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, enc_variables):
  """A bare DVA checkpoint (no UNet keys): frozen encoders + fusion layer."""
  sd = encoder_keys.encoders_params_to_torch(enc_variables, prefix="encoder.")
  sd["encoder.linear.weight"] = np.zeros((512, 614), np.float32)
  sd["encoder.linear.bias"] = np.zeros((512,), np.float32)
  path = tmp_path_factory.mktemp("ckpt") / "dva.safetensors"
  return sdlib.save_state_dict(sd, path)


@pytest.fixture(scope="module")
def features(checkpoint_file):
  return common.load_official_features(checkpoint=str(checkpoint_file), batch_size=BATCH)


@pytest.fixture(scope="module")
def vox_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("official_tree")
  d = root / "id00001" / "vidA"
  d.mkdir(parents=True)
  for i, f in enumerate(sample.synth_video("astronaut", NUM_FRAMES, seed=11)):
    cv2.imwrite(str(d / f"{i:04d}.png"), f[..., ::-1])
  return root


@pytest.fixture(scope="module")
def prepared(vox_tree, features, tmp_path_factory):
  """A dlib run first, then the official run in the same folder (it must redo the unit)."""
  out = tmp_path_factory.mktemp("official_out")
  dlib_report = voxceleb.prepare(str(vox_tree), str(out), size=SIZE, progress=False)
  report = voxceleb.prepare(str(vox_tree), str(out), size=SIZE, progress=False, features=features)
  return out, dlib_report, report


@pytest.fixture(scope="module")
def records(prepared):
  src = ip.open_split(prepared[0], "train")
  return [src[i] for i in range(len(src))]


@pytest.mark.slow
def test_loaders_read_the_published_files_and_checkpoints(enc_variables, checkpoint_file, tmp_path):
  torch = pytest.importorskip("torch")
  for net, name in face_encoding.ENCODER_FILES.items():
    sub = {coll: tree[net] for coll, tree in enc_variables.items()}
    content = encoder_keys.export_published_encoder(net, sub)
    to_t = lambda d: {k: torch.from_numpy(np.array(v)) for k, v in d.items()}
    if "state_dict" in content:  # the landmark file's {'state_dict': {'module.*'}} wrapper
      content = {"state_dict": to_t(content["state_dict"]), "epoch": 43}
    else:
      content = to_t(content)
    torch.save(content, tmp_path / name)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(face_encoding.load_encoders(encoders_dir=tmp_path), enc_variables)
  assert same(face_encoding.load_encoders(checkpoint=checkpoint_file), enc_variables)
  (tmp_path / face_encoding.ENCODER_FILES["bgnet"]).unlink()
  with pytest.raises(face_encoding.EncoderLoadError, match="79999_iter.pth"):
    face_encoding.load_encoders(encoders_dir=tmp_path)
  with pytest.raises(face_encoding.EncoderLoadError, match="model_ir_se50.pth"):
    face_encoding.load_encoders(encoders_dir=tmp_path / "missing")
  bare = sdlib.save_state_dict({"encoder.linear.bias": np.zeros(512)}, tmp_path / "x.safetensors")
  with pytest.raises(face_encoding.EncoderLoadError, match="no frozen encoders"):
    face_encoding.load_encoders(checkpoint=bare)
  with pytest.raises(ValueError, match="not both"):
    common.load_official_features(encoders=str(tmp_path), checkpoint=str(bare))


def test_cli_names_the_expected_files(vox_tree, tmp_path):
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "data_prep.voxceleb",
          "--videos",
          str(vox_tree),
          "--out",
          str(tmp_path / "out"),
          "--encoders",
          str(tmp_path / "no_encoders"),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert "mobilenet_224_model_best_gdconv_external.pth.tar" in r.stderr


class StubFeatures:
  """Stands in for OfficialFeatures: cheap, deterministic outputs of the crops it is given."""

  def __init__(self, fingerprint):
    self.fingerprint = fingerprint
    self.crops = 0

  def __call__(self, crops):
    assert crops.shape[1:] == (256, 256, 3) and crops.dtype == np.uint8
    self.crops += len(crops)
    x = crops.astype(np.float32) / 255.0
    z_id = np.repeat(x.mean((1, 2)), 171, axis=1)[:, :512]
    mask = x[..., 0] > x[:, :, ::-1, 0]  # not mirror-symmetric: mask_flip must be its own
    return {
        "z_id": z_id / np.linalg.norm(z_id, axis=1, keepdims=True),
        "z_lnd": np.repeat(x[:, ::32, ::32, 0].reshape(len(x), -1), 2, axis=1)[:, :102],
        "mask": mask,
        "mask_video": ~mask,
    }

  def info(self):
    return {
        "face_features": "official",
        "z_id_dim": 512,
        "encoders_source": "stub",
        "encoders_fingerprint": self.fingerprint,
    }


def test_workers_align_and_new_weights_redo_units(vox_tree, tmp_path, monkeypatch):
  """workers > 1: the pool aligns, this process extracts; other weights redo finished units."""
  tree = tmp_path / "tree"
  shutil.copytree(vox_tree, tree)
  shutil.copytree(tree / "id00001" / "vidA", tree / "id00002" / "vidB")
  out = tmp_path / "out"
  stub = StubFeatures("aaaa")
  report = voxceleb.prepare(
      str(tree), str(out), size=SIZE, workers=2, progress=False, features=stub, test_fraction=0
  )
  assert report["summary"]["ok"] == 2 and stub.crops == 4 * NUM_FRAMES
  assert report["encoders_fingerprint"] == "aaaa"
  rec = ip.open_split(out, "train")[0]
  mask, mask_flip = (tfds_builder.decode_png(rec[k], 1) > 0 for k in ("mask", "mask_flip"))
  assert mask.shape == (SIZE, SIZE) and not np.array_equal(mask[:, ::-1], mask_flip)
  other = StubFeatures("bbbb")
  voxceleb.prepare(str(tree), str(out), size=SIZE, progress=False, features=other)
  assert other.crops == 4 * NUM_FRAMES  # both videos again
  assert ip.dataset_face_features(out)["encoders_fingerprint"] == "bbbb"
  monkeypatch.setattr(common, "process_frames", lambda *a, **k: pytest.fail("redone"))
  voxceleb.prepare(str(tree), str(out), size=SIZE, progress=False, features=other)


@pytest.mark.slow
def test_records_hold_the_encoders_features(prepared, records, enc_variables, features, vox_tree):
  out, dlib_report, report = prepared
  assert dlib_report["face_features"] == "dlib"
  assert report["face_features"] == "official" and report["summary"]["ok"] == 1
  assert report["encoders_fingerprint"] == face_encoding.fingerprint(enc_variables)
  meta = ip.dataset_face_features(out)
  assert meta["face_features"] == "official" and meta["z_id_dim"] == 512
  assert features.compiled_programs() == {("features", BATCH)}  # all outputs, one program
  assert len(records) == NUM_FRAMES
  rec = records[0]
  assert rec["z_id"].shape == (512,) and rec["z_lnd"].shape == (102,)
  for r in records:  # the mirror's features come from the mirrored crop
    assert abs(np.linalg.norm(r["z_id"]) - 1) < 1e-4
    assert not np.allclose(r["z_id"], r["z_id_flip"], atol=1e-3)
    assert not np.allclose(r["z_lnd"], r["z_lnd_flip"], atol=1e-3)
    assert 0 <= r["z_lnd"].min() and r["z_lnd"].max() <= 1

  # The same frames aligned again at 256 px: the stored crops are their 32 px copies and the
  # stored features are OfficialEncoders' outputs on them (first and last frame, + mirrors).
  frames = common.read_video_or_folder(vox_tree / "id00001" / "vidA")
  crops = common.align_frames(frames, size=SIZE).crops
  assert crops.shape[1:] == (256, 256, 3)
  for r, c in zip(records, crops):
    small = cv2.resize(c, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(tfds_builder.decode_png(r["image"]), small)
  pick = [0, NUM_FRAMES - 1]
  x = np.concatenate([crops[pick], crops[pick][:, :, ::-1]])
  ref = jax.jit(fe.OfficialEncoders().apply)(enc_variables, images.to_model(x))
  ref = jax.tree.map(np.asarray, ref)
  got_id = np.stack([records[i]["z_id"] for i in pick] + [records[i]["z_id_flip"] for i in pick])
  got_lnd = np.stack([records[i]["z_lnd"] for i in pick] + [records[i]["z_lnd_flip"] for i in pick])
  np.testing.assert_allclose(got_id, ref["id_feats"], atol=2e-4)
  np.testing.assert_allclose(got_lnd, ref["lnd_feats"], atol=2e-4)

  def small_mask(m):
    return cv2.resize(
        (m[..., 0] > 0.5).astype(np.uint8) * 255, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST
    )

  n = len(pick)
  for j, i in enumerate(pick):  # BiSeNet's masks, nearest-resized like the reference's
    for key, want in (
        ("mask", ref["face_mask"][j]),
        ("mask_flip", ref["face_mask"][n + j]),
        ("mask_video", ref["face_mask_video"][j]),
    ):
      stored = tfds_builder.decode_png(records[i][key], 1)
      assert np.mean(stored != small_mask(want)) < 0.01, key
  fg = tfds_builder.decode_png(rec["mask"], 1) > 0
  assert 0.0 < fg.mean() < 1.0  # random weights still give a non-trivial parsing


@pytest.mark.slow
def test_pipeline_uses_the_mirror_records(prepared, records):
  pipe = ip.build_pipeline(
      prepared[0], global_batch_size=1, frames_per_item=NUM_FRAMES, shuffle=False, seed=3
  )
  batch = next(iter(pipe))
  by_index = {int(i): k for k, i in enumerate(batch["record_index"][0])}
  for r, k in by_index.items():
    fl = bool(batch["flipped"][0, k])
    rec = records[r]
    np.testing.assert_array_equal(batch["z_id"][0, k], rec["z_id_flip" if fl else "z_id"])
    np.testing.assert_array_equal(batch["z_lnd"][0, k], rec["z_lnd_flip" if fl else "z_lnd"])
    want = tfds_builder.decode_png(rec["mask_flip" if fl else "mask"], 1) > 127
    np.testing.assert_array_equal(batch["mask"][0, k, ..., 0], want.astype(np.float32))
  assert batch["flipped"].any() and not batch["flipped"].all()


@pytest.mark.slow
def test_tiny_dva_trains_on_official_records(prepared, tmp_path):
  out = prepared[0]
  wrong = tiny_dva_config(out, total_steps=2)  # model.face_features='dlib'
  with pytest.raises(ValueError, match="hold 'official' features"):
    runner.run(wrong, tmp_path / "wrong")
  cfg = tiny_dva_config(out, total_steps=2, **{"model.face_features": "official"})
  result = runner.run(cfg, tmp_path / "run")
  losses = [m["loss"] for _, m in result["history"]]
  assert result["step"] == 2 and len(losses) == 2 and np.all(np.isfinite(losses)), result
