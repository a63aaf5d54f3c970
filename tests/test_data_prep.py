"""data_prep on real faces (dlib path), kept small: 64 px, a few frames per video."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_prep import celebahq, common, sample, tfds_builder, voxceleb
from s3jax import input_pipeline as ip

SIZE = 64
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("sample")
  version_dir = sample.build_sample_dataset(out, size=SIZE, frames_per_video=3)
  return out, version_dir


@pytest.fixture(scope="session")
def vox_tree(tmp_path_factory):
  """id*/video/ tree: a frame folder, an mp4, a face-less folder, a corrupt mp4."""
  from s3jax.video import write_video

  root = tmp_path_factory.mktemp("vox_tree")
  frames = sample.synth_video("astronaut", 3, seed=11)
  d = root / "id00001" / "vidA"
  d.mkdir(parents=True)
  for i, f in enumerate(frames):
    common.cv2.imwrite(str(d / f"{i:04d}.png"), f[..., ::-1])
  v = root / "id00002" / "vidB"
  v.mkdir(parents=True)
  write_video(v / "00001.mp4", sample.synth_video("grace_hopper", 3, seed=12), fps=25)
  blank = root / "id00003" / "vidC"
  blank.mkdir(parents=True)
  for i in range(2):
    common.cv2.imwrite(str(blank / f"{i:04d}.png"), np.full((96, 96, 3), 128, np.uint8))
  bad = root / "id00004" / "vidD"
  bad.mkdir(parents=True)
  (bad / "00001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  return root


@pytest.fixture(scope="session")
def vox_out(vox_tree, tmp_path_factory):
  out = tmp_path_factory.mktemp("vox_out")
  report = voxceleb.prepare(str(vox_tree), str(out), size=SIZE, test_fraction=0.5, progress=False)
  return out, report


def test_sample_dataset_builds(sample_dir):
  out, version_dir = sample_dir
  report = json.loads((out / "report.json").read_text())
  assert report["summary"]["ok"] == 7 and report["summary"]["failed"] == 0
  assert set(ip.available_splits(version_dir)) == {"train", "test"}
  src = ip.open_split(out, "train")
  assert len(src) == 5 * 3
  rec = src[0]
  img = tfds_builder.decode_png(rec["image"])
  assert img.shape == (SIZE, SIZE, 3)
  mask = tfds_builder.decode_png(rec["mask"], 1)
  assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
  assert 0.1 < (mask > 0).mean() < 0.95
  assert rec["z_id"].shape == (128,) and abs(np.linalg.norm(rec["z_id"]) - 1) < 1e-4
  assert rec["z_lnd"].shape == (102,) and 0 <= rec["z_lnd"].min() <= rec["z_lnd"].max() <= 1
  # Landmarks in crop pixels of the stored size; the face sits in the crop.
  assert rec["landmarks"].shape == (68, 2)
  assert 0 < rec["landmarks"].min() and rec["landmarks"].max() < SIZE
  # The mirrored crop is the same person: descriptors agree closely.
  assert float(rec["z_id"] @ rec["z_id_flip"]) > 0.9
  # Held-out videos; identities of the sample are split by video.
  test_ids = {ip.open_split(out, "test")[i]["video_id"] for i in range(6)}
  assert test_ids == {"astronaut/test_03", "grace_hopper/test_02"}


def test_ensure_sample_dataset_is_idempotent(sample_dir, monkeypatch):
  out, version_dir = sample_dir
  monkeypatch.setattr(
      sample, "build_sample_dataset", lambda *a, **k: pytest.fail("rebuilt an existing dataset")
  )
  assert sample.ensure_sample_dataset(out, SIZE) == version_dir
  with pytest.raises(ValueError, match="px"):
    sample.ensure_sample_dataset(out, 128)


def test_voxceleb_report_and_failures(vox_out):
  out, report = vox_out
  by_id = {v["video_id"]: v for v in report["videos"]}
  assert by_id["id00001/vidA"]["status"] == "ok"
  assert by_id["id00001/vidA"]["frames_with_face"] == 3
  assert by_id["id00002/vidB/00001"]["status"] == "ok"
  assert by_id["id00003/vidC"]["status"] == "failed"
  assert "no face" in by_id["id00003/vidC"]["reason"]
  assert by_id["id00004/vidD/00001"]["status"] == "failed"
  assert "cannot read video" in by_id["id00004/vidD/00001"]["reason"]
  on_disk = json.loads((out / "report.json").read_text())
  assert {v["status"] for v in on_disk["videos"]} == {"ok", "failed"}
  # Split by identity: no identity in both splits.
  ids = {}
  for split in ip.available_splits(out):
    src = ip.open_split(out, split)
    ids[split] = {src[i]["identity"] for i in range(len(src))}
  assert ids.get("train") and not (ids.get("test", set()) & ids["train"])
  assert sum(len(v) for v in ids.values()) == 2


def test_voxceleb_resume_skips_finished(vox_tree, vox_out, monkeypatch):
  out, report = vox_out
  monkeypatch.setattr(
      common, "process_frames", lambda *a, **k: pytest.fail("finished video processed again")
  )
  again = voxceleb.prepare(str(vox_tree), str(out), size=SIZE, test_fraction=0.5, progress=False)
  assert [v["status"] for v in again["videos"]] == [v["status"] for v in report["videos"]]


def test_voxceleb_resume_after_kill(vox_tree, tmp_path):
  """A run killed after one video keeps it; the next run only does the rest."""
  jobs = [
      common.Job(
          key=common.safe_key(vid),
          path=p,
          video_id=vid,
          identity=ident,
          load=voxceleb._load_video,
          load_args=(p, None),
      )  # pylint: disable=protected-access
      for p, vid, ident in voxceleb.discover_videos(vox_tree)
  ]
  common.run_jobs(jobs[:1], tmp_path, size=SIZE, progress=False)  # "killed" here
  calls = []
  real = common.process_frames

  def counting(*a, **k):
    calls.append(k["video_id"])
    return real(*a, **k)

  import unittest.mock

  with unittest.mock.patch.object(common, "process_frames", counting):
    statuses = common.run_jobs(jobs, tmp_path, size=SIZE, progress=False)
  assert jobs[0].video_id not in calls and len(statuses) == len(jobs)


def test_voxceleb_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError):
    voxceleb.prepare(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "data_prep.voxceleb",
          "--videos",
          str(tmp_path / "nope"),
          "--out",
          str(tmp_path / "out"),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode == 2 and "does not exist" in r.stderr


def test_voxceleb_help():
  r = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "data_prep.voxceleb", "--helpshort"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert "--videos" in r.stdout and "--test_fraction" in r.stdout
  assert "--image_format" in r.stdout and "--beam_pipeline_options" in r.stdout
  # Apache Beam is an optional extra: the CLI imports it only on the Beam path.
  assert "data_prep.common" in r.stderr and "apache_beam" not in r.stderr


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_voxceleb_jpeg_records(vox_tree, vox_out, tmp_path):
  """--image_format jpeg: the PNG run's records with JPEG crops; masks stay PNG."""
  import tensorflow_datasets as tfds

  png_out, _ = vox_out
  report = voxceleb.prepare(
      str(vox_tree),
      str(tmp_path),
      size=SIZE,
      test_fraction=0.5,
      progress=False,
      image_format="jpeg",
      jpeg_quality=95,
  )
  assert report["image_format"] == "jpeg" and report["jpeg_quality"] == 95
  meta = tfds.builder_from_directory(str(ip.find_version_dir(tmp_path))).info.metadata
  assert dict(meta) == {"image_format": "jpeg", "jpeg_quality": 95, "mask_format": "png"}
  assert ip.available_splits(tmp_path) == ip.available_splits(png_out)
  for split in ip.available_splits(png_out):
    png, jpeg = ip.open_split(png_out, split), ip.open_split(tmp_path, split)
    assert len(png) == len(jpeg)
    for i in range(len(png)):
      a, b = png[i], jpeg[i]
      assert b["image"][:3] == b"\xff\xd8\xff" and a["image"][:4] == b"\x89PNG"
      assert len(b["image"]) < len(a["image"]) / 2
      # Features come from the raw crops, so only the stored image changes.
      assert _psnr(tfds_builder.decode_png(a["image"]), tfds_builder.decode_png(b["image"])) > 35
      for key in ("mask", "mask_video", "z_id", "z_lnd", "landmarks", "quad", "frame_index"):
        assert np.array_equal(a[key], b[key]), key
  # The PNG dataset says so too.
  png_meta = tfds.builder_from_directory(str(ip.find_version_dir(png_out))).info.metadata
  assert png_meta["image_format"] == "png"


def test_units_of_another_image_format_are_redone(vox_tree, vox_out):
  out, _ = vox_out
  # Only the status files are read: the jobs need no loader.
  jobs = [
      common.Job(common.safe_key(vid), p, vid, ident, load=None)
      for p, vid, ident in voxceleb.discover_videos(vox_tree)
  ]
  png = common.unit_settings(None, tfds_builder.RecordFormat())
  jpeg = common.unit_settings(None, tfds_builder.RecordFormat("jpeg", 95))
  assert common.pending_jobs(jobs, out, png, retry_failed=False) == []
  redo = common.pending_jobs(jobs, out, jpeg, retry_failed=False)
  assert [j.video_id for j in redo] == ["id00001/vidA", "id00002/vidB/00001"]  # the ok ones
  with pytest.raises(ValueError, match="image_format"):
    tfds_builder.RecordFormat("webp")


def test_celebahq_attributes_and_failures(tmp_path):
  import skimage.data

  images = tmp_path / "img"
  images.mkdir()
  common.cv2.imwrite(str(images / "0.jpg"), skimage.data.astronaut()[..., ::-1])
  common.cv2.imwrite(str(images / "1.jpg"), np.full((128, 128, 3), 90, np.uint8))
  names = [f"attr{i}" for i in range(40)]
  rows = ["0.jpg " + " ".join(["1", "-1"] * 20), "1.jpg " + " ".join(["-1"] * 40)]
  anno = tmp_path / "anno.txt"
  anno.write_text("2\n" + " ".join(names) + "\n" + "\n".join(rows) + "\n")
  parsed_names, table = celebahq.parse_attributes(anno)
  assert parsed_names == names and table["0.jpg"].tolist()[:2] == [1, -1]
  report = celebahq.prepare(
      str(images), str(anno), str(tmp_path / "out"), size=SIZE, progress=False
  )
  st = {v["video_id"]: v["status"] for v in report["videos"]}
  assert st == {"0": "ok", "1": "failed"}
  src = ip.open_split(tmp_path / "out", "train")
  assert src[0]["attributes"].tolist() == [1, -1] * 20
  bad = tmp_path / "bad.txt"
  bad.write_text("3\n" + " ".join(names) + "\n" + rows[0] + "\n")
  with pytest.raises(ValueError, match="header says 3"):
    celebahq.parse_attributes(bad)


def test_split_identities_deterministic():
  ids = [f"id{i:05d}" for i in range(20)]
  a = tfds_builder.split_identities(ids, 0.1)
  assert a == tfds_builder.split_identities(list(reversed(ids)), 0.1) and len(a) == 2
  assert tfds_builder.split_identities(["only"], 0.5) == set()
