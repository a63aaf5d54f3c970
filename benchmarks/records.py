"""Record formats and data_prep engines: PNG vs JPEG records, one process vs Apache Beam.

    python benchmarks/records.py [--size 256] [--jpeg_quality 95] [--repeats 5] [--batches 20]
        [--prep_videos 8] [--prep_frames 16] [--no_prep] [--threads 2]
        [--out benchmarks/results/records.json]

records (the same synthetic sample crops, ``benchmarks/input_pipeline.build_dataset``,
8 videos x 16 frames, written once as PNG and once as JPEG at ``--jpeg_quality``):
  * bytes per record (shard bytes / records: image + masks + features) and per image;
  * decode: images/s of ``cv2.imdecode`` alone, and frames/s through the real grain training
    pipeline (``s3jax.input_pipeline.build_pipeline``: read, decode image + mask, flip,
    batch), PNG and JPEG rounds taking turns, medians over ``--repeats``;
  * PSNR of each decoded JPEG crop against the PNG crop (lossless, so the crop itself); the
    same quality with 4:2:0 chroma as a labelled extra (data_prep stores 4:4:4).
data_prep (``--no_prep`` skips it): ``data_prep.voxceleb`` on ``--prep_videos`` synthetic
sample videos of ``--prep_frames`` 320 px frames, dlib path, wall seconds of the whole
command (per-video work + dataset writing) three ways: one process, ``--workers 2``
(multiprocessing pool), and ``--beam_pipeline_options runner=DirectRunner,
direct_num_workers=2`` (worker start-up included).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench_util  # noqa: E402

BEAM_OPTIONS = "runner=DirectRunner,direct_num_workers=2"


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--jpeg_quality", type=int, default=95)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--frames_per_item", type=int, default=2)
  p.add_argument("--read_threads", type=int, default=2)
  p.add_argument("--prep_videos", type=int, default=8)
  p.add_argument("--prep_frames", type=int, default=16)
  p.add_argument("--no_prep", action="store_true")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "records.json"))
  return p.parse_args()


def psnr(a, b, np) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def dataset_records(version_dir):
  from s3jax import input_pipeline as ip

  src = ip.open_split(version_dir, "train")
  return [src[i] for i in range(len(src))]


def record_sizes(version_dir, records) -> dict:
  shard_bytes = sum(p.stat().st_size for p in pathlib.Path(version_dir).glob("*.array_record-*"))
  n = len(records)
  return dict(
      records=n,
      record_kb=shard_bytes / n / 1024,
      image_kb=sum(len(r["image"]) for r in records) / n / 1024,
      mask_kb=sum(len(r["mask"]) + len(r["mask_video"]) for r in records) / n / 1024,
  )


def decode_rate(blobs, repeats, cv2, np) -> list[float]:
  """images/s of cv2.imdecode over ``blobs``, one figure per round."""
  arrays = [np.frombuffer(b, np.uint8) for b in blobs]
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for a in arrays:
      cv2.imdecode(a, cv2.IMREAD_COLOR)
    rates.append(len(arrays) / (time.perf_counter() - t0))
  return rates


def measure_records(args, workdir, cv2, np) -> dict:
  import input_pipeline as pipeline_bench  # benchmarks/input_pipeline.py

  from data_prep import tfds_builder

  formats = {
      "png": tfds_builder.RecordFormat(),
      "jpeg": tfds_builder.RecordFormat("jpeg", args.jpeg_quality),
  }
  dirs, records = {}, {}
  for name, fmt in formats.items():
    dirs[name] = pipeline_bench.build_dataset(
        pathlib.Path(workdir) / name, args.size, record_format=fmt
    )
    records[name] = dataset_records(dirs[name])
  sizes = {name: record_sizes(dirs[name], records[name]) for name in formats}
  # Decode alone, then through the pipeline; PNG and JPEG rounds alternate.
  decode = {name: [] for name in formats}
  pipeline = {name: [] for name in formats}
  for r in range(args.repeats):
    for name in formats:
      decode[name] += decode_rate([x["image"] for x in records[name]], 1, cv2, np)
      rate, _ = pipeline_bench.pipeline_rate(
          dirs[name], args.batch_size, args.frames_per_item, r, args.batches, args.read_threads
      )
      pipeline[name].append(rate)
  # Quality: each JPEG crop against its PNG crop; 4:2:0 at the same quality as an extra.
  crops = [tfds_builder.decode_png(x["image"]) for x in records["png"]]
  jpeg = [psnr(c, tfds_builder.decode_png(x["image"]), np) for c, x in zip(crops, records["jpeg"])]
  sub = []
  sub_kb = []
  for c in crops:
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(c, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality],  # OpenCV's default chroma: 4:2:0
    )
    assert ok
    sub.append(psnr(c, tfds_builder.decode_png(buf.tobytes()), np))
    sub_kb.append(len(buf) / 1024)
  return dict(
      size=args.size,
      jpeg_quality=args.jpeg_quality,
      sizes=sizes,
      jpeg_over_png_record_bytes=sizes["jpeg"]["record_kb"] / sizes["png"]["record_kb"],
      decode_images_per_s={k: statistics.median(v) for k, v in decode.items()},
      decode_images_per_s_all=decode,
      pipeline=dict(
          batch_items=args.batch_size,
          frames_per_item=args.frames_per_item,
          read_threads=args.read_threads,
          batches_per_round=args.batches,
          frames_per_s={k: statistics.median(v) for k, v in pipeline.items()},
          frames_per_s_all=pipeline,
      ),
      jpeg_over_png_pipeline_rate=statistics.median(pipeline["jpeg"])
      / statistics.median(pipeline["png"]),
      psnr_db=dict(
          jpeg_444_mean=statistics.mean(jpeg),
          jpeg_444_min=min(jpeg),
          extra_jpeg_420_mean=statistics.mean(sub),
          extra_jpeg_420_min=min(sub),
          extra_jpeg_420_image_kb=statistics.mean(sub_kb),
      ),
  )


def measure_prep(args, workdir, cv2) -> dict:
  from data_prep import sample, voxceleb

  tree = pathlib.Path(workdir) / "tree"
  for v in range(args.prep_videos):
    ident = ("astronaut", "grace_hopper")[v % 2]
    d = tree / f"id{v % 2:05d}" / f"vid{v:02d}"
    d.mkdir(parents=True)
    for i, f in enumerate(sample.synth_video(ident, args.prep_frames, seed=300 + v)):
      cv2.imwrite(str(d / f"{i:04d}.png"), f[..., ::-1])
  runs = {
      "one_process": {},
      "pool_2_workers": {"workers": 2},
      "beam_direct_2_workers": {"beam_pipeline_options": BEAM_OPTIONS},
  }
  out = {}
  for name, kwargs in runs.items():
    t0 = time.perf_counter()
    report = voxceleb.prepare(
        str(tree),
        str(pathlib.Path(workdir) / name),
        size=args.size,
        detector="hog",
        test_fraction=0.0,
        progress=False,
        **kwargs,
    )
    wall = time.perf_counter() - t0
    s = report["summary"]
    assert s["ok"] == args.prep_videos, report["videos"]
    out[name] = dict(
        wall_s=wall,
        frames=s["frames"],
        frames_written=s["frames_written"],
        frames_per_s=s["frames"] / wall,
        loadavg_after=os.getloadavg(),
    )
  base = out["one_process"]["wall_s"]
  for name in runs:
    out[name]["speedup_over_one_process"] = base / out[name]["wall_s"]
  return dict(videos=args.prep_videos, frames_per_video=args.prep_frames, runs=out)


def main():
  args = parse()
  bench_util.set_cpu_threads(args.threads)
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  info = bench_util.run_info(args.threads)
  with tempfile.TemporaryDirectory() as tmp:
    rec = measure_records(args, tmp, cv2, np)
    prep = None if args.no_prep else measure_prep(args, tmp, cv2)
  headline = {
      f"PNG record KB ({args.size} px)": rec["sizes"]["png"]["record_kb"],
      f"JPEG q{args.jpeg_quality} record KB": rec["sizes"]["jpeg"]["record_kb"],
      "PNG pipeline frames/s": rec["pipeline"]["frames_per_s"]["png"],
      "JPEG pipeline frames/s": rec["pipeline"]["frames_per_s"]["jpeg"],
      "JPEG PSNR vs PNG (dB, mean)": rec["psnr_db"]["jpeg_444_mean"],
  }
  if prep:
    for name, run in prep["runs"].items():
      headline[f"data_prep frames/s, {name}"] = run["frames_per_s"]
  result = dict(
      info,
      records=rec,
      data_prep=prep,
      headline=headline,
      baseline="PNG records (data_prep's default) and the one-process data_prep, same run",
      loadavg_after=os.getloadavg(),
      contended=bench_util.contended(info, args.threads),
      notes=[
          "record_kb: shard bytes / records (image + 2-3 PNG masks + landmarks and features)",
          "pipeline frames/s: grain pipeline, read_threads threads, no worker processes; "
          "PNG and JPEG rounds alternate, medians",
          "data_prep wall_s includes the dataset writing; the Beam run also starts two "
          "worker processes per pipeline (two pipelines: per-video work, shards)",
          "2-core CPU shared with other jobs: absolute times move with the load",
      ],
  )
  bench_util.write_result(args.out, result)


if __name__ == "__main__":
  main()
