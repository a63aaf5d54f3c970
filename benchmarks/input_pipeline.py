r"""Input pipeline and data_prep throughput.

  python -m benchmarks.input_pipeline [--size 256] [--repeats 5] [--batches 20]
      [--out benchmarks/results/input_pipeline.json]

* pipeline: frames/s (= records/s) through the grain pipeline at ``--size``
  px with decode + random flip + batching (B items x k frames), median over
  repeats, single process, ``read_threads`` threads, no workers. Records are
  real-looking faces (the sample's synthetic astronaut / grace_hopper videos,
  resized to the crop size) so PNG sizes and decode cost are realistic.
* data_prep: frames/s of the real per-video path (dlib alignment, dlib
  descriptor of the crop and of its mirror, z_lnd, masks, PNG encoding) on a
  synthetic video, with the time split into alignment and the rest.

``measure(...)`` returns the figures as a dict (the trainer benchmark can
compare its step consumption against ``pipeline.frames_per_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def build_dataset(root, size, videos=8, frames=16, record_format=None):
  """A voxceleb_faces dataset of synthetic sample crops at ``size`` px; ``record_format``
  (``tfds_builder.RecordFormat``, default PNG) encodes the crops."""
  import cv2
  from data_prep import sample, tfds_builder
  from s3jax.face_features import hull_mask

  record_format = record_format or tfds_builder.RecordFormat()
  units = []
  rng = np.random.default_rng(0)
  for v in range(videos):
    ident = ("astronaut", "grace_hopper")[v % 2]
    vid = sample.synth_video(ident, frames, seed=100 + v, frame_size=320)
    crops = [cv2.resize(f[32:288, 32:288], (size, size), interpolation=cv2.INTER_AREA) for f in vid]
    lnd = np.stack([rng.uniform(0.3 * size, 0.7 * size, (68, 2)) for _ in crops])
    masks = [tfds_builder.encode_png(hull_mask(l, size) * 255) for l in lnd]
    z = rng.normal(size=(frames, 128)).astype(np.float32)
    unit = {
        "video_id": f"{ident}/{v}",
        "identity": ident,
        "frame_index": np.arange(frames, dtype=np.int32),
        "image": [record_format.encode_image(c) for c in crops],
        "mask": masks,
        "mask_video": masks,
        "landmarks": lnd.astype(np.float32),
        "quad": np.zeros((frames, 4, 2), np.float32),
        "z_id": z,
        "z_id_flip": z,
        "z_lnd": np.zeros((frames, 102), np.float32),
        "z_lnd_flip": np.zeros((frames, 102), np.float32),
        "interpolated": np.zeros(frames, np.int32),
    }
    p = pathlib.Path(root) / "units" / f"v{v}.npz"
    tfds_builder.save_unit(p, unit)
    units.append(str(p))
  return tfds_builder.build_dataset(
      root, {"train": units}, tfds_builder.VoxcelebFaces, record_format=record_format
  )


def pipeline_rate(version_dir, batch_size, frames_per_item, seed, batches, read_threads):
  """-> (frames/s through the training pipeline over ``batches`` batches, the last batch)."""
  from s3jax import input_pipeline as ip

  pipe = ip.build_pipeline(
      version_dir,
      "train",
      global_batch_size=batch_size,
      frames_per_item=frames_per_item,
      seed=seed,
      process_index=0,
      process_count=1,
      read_threads=read_threads,
  )
  it = iter(pipe)
  next(it)  # warm up threads / readers
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  return batches * batch_size * frames_per_item / dt, b


def measure_pipeline(
    size=256, batch_size=8, frames_per_item=2, repeats=5, batches=20, read_threads=2, workdir=None
):
  from s3jax import input_pipeline as ip

  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    version_dir = build_dataset(tmp, size)
    rates = []
    for r in range(repeats):
      rate, b = pipeline_rate(version_dir, batch_size, frames_per_item, r, batches, read_threads)
      rates.append(rate)
    png_kb = (
        os.path.getsize(next(pathlib.Path(version_dir).glob("*.array_record-*")))
        / 1024
        / len(ip.open_split(version_dir, "train"))
    )
  return {
      "size": size,
      "batch_items": batch_size,
      "frames_per_item": frames_per_item,
      "read_threads": read_threads,
      "batches_per_repeat": batches,
      "frames_per_s": statistics.median(rates),
      "frames_per_s_all": [round(x, 1) for x in rates],
      "batches_per_s": statistics.median(rates) / (batch_size * frames_per_item),
      "record_kb": round(png_kb, 1),
      "batch_image_shape": list(b["image"].shape),
  }


def measure_data_prep(size=256, frames=8):
  from data_prep import common, sample
  from s3jax import alignment

  video = sample.synth_video("astronaut", frames, seed=5)
  alignment.align_video(video[:1], size=size)  # load dlib models
  t0 = time.perf_counter()
  alignment.align_video(video, size=max(size, common.FEATURE_SIZE))
  t_align = time.perf_counter() - t0
  t0 = time.perf_counter()
  unit, _ = common.process_frames(video, video_id="bench", identity="bench", size=size)
  dt = time.perf_counter() - t0
  return {
      "size": size,
      "frames": frames,
      "frame_px": list(video[0].shape[:2]),
      "frames_per_s": frames / dt,
      "seconds_per_frame": dt / frames,
      "align_seconds_per_frame": t_align / frames,
      "features_and_encode_seconds_per_frame": (dt - t_align) / frames,
      "frames_written": int(len(unit["frame_index"])),
  }


def measure(
    size=256, repeats=5, batches=20, batch_size=8, frames_per_item=2, read_threads=2, prep_frames=8
):
  """All figures as a dict: {"pipeline": {...}, "data_prep": {...}}."""
  return {
      "pipeline": measure_pipeline(
          size, batch_size, frames_per_item, repeats, batches, read_threads
      ),
      "data_prep": measure_data_prep(size, prep_frames),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batches", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--frames_per_item", type=int, default=2)
  ap.add_argument("--read_threads", type=int, default=2)
  ap.add_argument("--prep_frames", type=int, default=8)
  ap.add_argument(
      "--out", default=str(pathlib.Path(__file__).parent / "results" / "input_pipeline.json")
  )
  a = ap.parse_args()
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  res = measure(
      a.size, a.repeats, a.batches, a.batch_size, a.frames_per_item, a.read_threads, a.prep_frames
  )
  res["command"] = " ".join(
      [os.path.basename(sys.executable), "-m", "benchmarks.input_pipeline"] + sys.argv[1:]
  )
  res["machine"] = {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "load_avg_at_end": os.getloadavg(),
  }
  res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=1))
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
