"""data_prep as an Apache Beam pipeline (DirectRunner) writes the records and the report of the
single-process path, on the embedded sample faces and on ../shared's office clip.

One small VoxCeleb-style tree (two sample videos, a face-less one, and three frames of the office
clip at 480 px when ../shared is there) is prepared once each way: in this process, and through
the CLI with two Beam worker processes. The other checks run Beam's in-memory DirectRunner (one
worker, nothing to start), which runs the same transforms.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="the `beam` extra (pip install -e .[beam]) is missing")

from data_prep import beam_pipeline, celebahq, sample, tfds_builder, voxceleb  # noqa: E402
from s3jax import input_pipeline as ip  # noqa: E402

SIZE = 64
REPO = pathlib.Path(__file__).resolve().parents[1]
OFFICE_CLIP = REPO.parent / "shared" / "data" / "office_clip"
OFFICE_FRAMES = 3
TWO_WORKERS = "runner=DirectRunner,direct_num_workers=2"
IN_PROCESS = "runner=DirectRunner"
ONE_VIDEO_PER_SHARD = 1e-6  # --shard_mb: every video closes its shard


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """id*/video/ tree: a frame folder, an mp4, a face-less folder, the office clip if present."""
  from s3jax.video import write_video

  root = tmp_path_factory.mktemp("beam_tree")
  d = root / "id00001" / "vidA"
  d.mkdir(parents=True)
  for i, f in enumerate(sample.synth_video("astronaut", 3, seed=11)):
    cv2.imwrite(str(d / f"{i:04d}.png"), f[..., ::-1])
  v = root / "id00002" / "vidB"
  v.mkdir(parents=True)
  write_video(v / "00001.mp4", sample.synth_video("grace_hopper", 3, seed=12), fps=25)
  blank = root / "id00003" / "vidC"
  blank.mkdir(parents=True)
  for i in range(2):
    cv2.imwrite(str(blank / f"{i:04d}.png"), np.full((96, 96, 3), 128, np.uint8))
  if OFFICE_CLIP.is_dir():
    office = root / "office" / "clip"
    office.mkdir(parents=True)
    for src in sorted(OFFICE_CLIP.glob("*.jpeg"))[:OFFICE_FRAMES]:
      frame = cv2.imread(str(src))
      small = cv2.resize(frame, (480, 270), interpolation=cv2.INTER_AREA)
      cv2.imwrite(str(office / src.name), small, [cv2.IMWRITE_JPEG_QUALITY, 95])
  return root


def _prepare(tree, out, **kwargs):
  return voxceleb.prepare(
      str(tree), str(out), size=SIZE, test_fraction=0.5, progress=False, **kwargs
  )


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory):
  out = tmp_path_factory.mktemp("single")
  _prepare(tree, out)
  return out


@pytest.fixture(scope="module")
def beam_cli(tree, tmp_path_factory):
  """The documented command: two DirectRunner worker processes, one shard per video."""
  out = tmp_path_factory.mktemp("beam")
  cmd = [
      sys.executable,
      "-m",
      "data_prep.voxceleb",
      f"--videos={tree}",
      f"--out={out}",
      f"--size={SIZE}",
      "--test_fraction=0.5",
      f"--shard_mb={ONE_VIDEO_PER_SHARD}",
      "--noprogress",
      f"--beam_pipeline_options={TWO_WORKERS}",
  ]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return out


def _records(out) -> dict:
  """{split: decoded records sorted by (video_id, frame_index)}: the records, order aside."""
  found = {}
  for split in ip.available_splits(out):
    src = ip.open_split(out, split)
    recs = [src[i] for i in range(len(src))]
    found[split] = sorted(recs, key=lambda r: (r["video_id"], int(r["frame_index"])))
  return found


def _assert_same_records(a: dict, b: dict, video_ids=None):
  assert sorted(a) == sorted(b)
  for split in a:
    ra = [r for r in a[split] if video_ids is None or r["video_id"] in video_ids]
    rb = [r for r in b[split] if video_ids is None or r["video_id"] in video_ids]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
      assert sorted(x) == sorted(y)
      for key in x:
        assert np.array_equal(x[key], y[key]), (split, x["video_id"], key)


def _report_content(out) -> dict:
  """report.json without what differs between any two runs: times, command line, out path."""
  report = json.loads((pathlib.Path(out) / "report.json").read_text())
  for key in ("command", "dataset_dir"):
    report.pop(key)
  for key in ("processing_seconds", "frames_per_second"):
    report["summary"].pop(key)
  for row in report["videos"]:
    row.pop("seconds")
  return report


def _version_file(out, name):
  return (ip.find_version_dir(out) / name).read_text()


@pytest.mark.slow
def test_beam_cli_writes_the_single_process_dataset(single, beam_cli):
  _assert_same_records(_records(single), _records(beam_cli))
  assert _report_content(single) == _report_content(beam_cli)
  statuses = {v["video_id"]: v["status"] for v in _report_content(beam_cli)["videos"]}
  assert statuses["id00001/vidA"] == statuses["id00002/vidB/00001"] == "ok"
  assert statuses["id00003/vidC"] == "failed"
  for name in ("video_index.json", "features.json", "face_features.json", "metadata.json"):
    assert _version_file(single, name) == _version_file(beam_cli, name), name
  info = {o: json.loads(_version_file(o, "dataset_info.json")) for o in (single, beam_cli)}
  splits = {o: {s["name"]: s for s in info[o].pop("splits")} for o in info}
  assert info[single] == info[beam_cli]
  for name, split in splits[beam_cli].items():
    # Shards cut at video boundaries, one per video here; the same records and bytes.
    assert split["numBytes"] == splits[single][name]["numBytes"]
    index = json.loads(_version_file(beam_cli, "video_index.json"))[name]
    assert [int(n) for n in split["shardLengths"]] == [v["count"] for v in index]
  shards = list(ip.find_version_dir(beam_cli).glob("*.array_record-*"))
  assert len(shards) == sum(s["ok"] for s in [_report_content(beam_cli)["summary"]]) >= 2
  # Nothing left over: task chunks, temporary data dirs, partial shards.
  assert not (beam_cli / ".beam").exists()
  assert sorted(p.name for p in beam_cli.iterdir()) == ["report.json", "units", "voxceleb_faces"]
  assert not [p for p in ip.find_version_dir(beam_cli).iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.skipif(not OFFICE_CLIP.is_dir(), reason=f"no office clip at {OFFICE_CLIP}")
def test_beam_cli_office_clip_same_records(single, beam_cli):
  rows = {v["video_id"]: v for v in _report_content(beam_cli)["videos"]}
  assert rows["office/clip"]["status"] == "ok"
  assert rows["office/clip"]["frames_written"] == OFFICE_FRAMES
  a, b = _records(single), _records(beam_cli)
  assert sum(r["video_id"] == "office/clip" for recs in b.values() for r in recs) == OFFICE_FRAMES
  _assert_same_records(a, b, video_ids={"office/clip"})


@pytest.mark.slow
def test_beam_resume_redoes_only_unfinished_videos(tree, single, beam_cli, tmp_path):
  out = tmp_path / "resumed"
  shutil.copytree(beam_cli, out)
  units = out / "units"
  gone = "id00002__vidB__00001"
  (units / f"{gone}.npz").unlink()
  (units / f"{gone}.status.json").unlink()
  kept = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
  _prepare(tree, out, beam_pipeline_options=IN_PROCESS, shard_mb=ONE_VIDEO_PER_SHARD)
  now = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
  assert {k: now[k] for k in kept} == kept  # finished videos (and the failed one) untouched
  assert f"{gone}.npz" in now and f"{gone}.status.json" in now
  _assert_same_records(_records(single), _records(out))
  assert _report_content(single) == _report_content(out)


def test_celebahq_beam_same_as_single_process(tmp_path):
  import skimage.data

  images = tmp_path / "img"
  images.mkdir()
  cv2.imwrite(str(images / "0.jpg"), skimage.data.astronaut()[..., ::-1])
  cv2.imwrite(str(images / "1.jpg"), np.full((128, 128, 3), 90, np.uint8))
  names = [f"attr{i}" for i in range(tfds_builder.NUM_ATTRIBUTES)]
  rows = ["0.jpg " + " ".join(["1", "-1"] * 20), "1.jpg " + " ".join(["-1"] * 40)]
  anno = tmp_path / "anno.txt"
  anno.write_text("2\n" + " ".join(names) + "\n" + "\n".join(rows) + "\n")
  outs = {"single": tmp_path / "single", "beam": tmp_path / "beam"}
  for kind, out in outs.items():
    options = IN_PROCESS if kind == "beam" else None
    celebahq.prepare(
        str(images), str(anno), str(out), size=SIZE, progress=False, beam_pipeline_options=options
    )
  a, b = _records(outs["single"]), _records(outs["beam"])
  _assert_same_records(a, b)
  assert b["train"][0]["attributes"].tolist() == [1, -1] * 20
  assert _report_content(outs["single"]) == _report_content(outs["beam"])
  assert _version_file(outs["single"], "dataset_info.json") == _version_file(
      outs["beam"], "dataset_info.json"
  )


def test_direct_runner_workers_run_in_processes():
  from apache_beam.options.pipeline_options import DirectOptions

  def mode(text):
    return beam_pipeline.parse_options(text).view_as(DirectOptions).direct_running_mode

  assert mode(TWO_WORKERS) == "multi_processing"  # Beam's default would run one worker
  assert mode(TWO_WORKERS + ",direct_running_mode=multi_threading") == "multi_threading"
  assert mode(IN_PROCESS) == "in_memory"
  opts = beam_pipeline.parse_options("runner=DataflowRunner,project=p,region=r")
  assert opts.get_all_options()["project"] == "p" and mode("runner=DataflowRunner") == "in_memory"


def test_beam_run_map_returns_results_in_item_order(tmp_path):
  items = [{"n": n} for n in range(7)]
  got = beam_pipeline.run_map(lambda d: d["n"] ** 2, items, IN_PROCESS, tmp_path, collect=True)
  assert got == [n**2 for n in range(7)]
  assert not os.listdir(tmp_path)  # the task chunks are gone


def test_beam_workers_load_the_official_encoders_from_their_source(tmp_path):
  """A worker's copy of the job runner loads the encoders itself (here: finds them missing)."""
  import pickle

  import cloudpickle

  from data_prep import common

  source = common.official_feature_source(encoders=str(tmp_path / "no_encoders"))
  runner = common.JobRunner(tmp_path, SIZE, "hog", 5, tfds_builder.RecordFormat(), None, source)
  worker_copy = pickle.loads(cloudpickle.dumps(runner))
  job = common.Job("k", "p", "v", "i", load=lambda: ([], {}))
  with pytest.raises(ValueError, match="model_ir_se50.pth"):
    worker_copy(job)
  loaded = common.JobRunner(tmp_path, SIZE, "hog", 5, tfds_builder.RecordFormat(), object())
  with pytest.raises(ValueError, match="encoders= or checkpoint="):
    cloudpickle.dumps(loaded)  # a loaded extractor does not travel to workers
