r"""Peak memory of `python -m s3jax.edit` on long videos: streamed in chunks vs in memory.

  python benchmarks/long_video.py [--checkpoint /work/fresh_demo/runs/demo] \
      [--frames 100,1000] [--steps 5] [--width 384] [--in-memory] \
      [--out benchmarks/results/long_video.json]

A synthetic long clip is made from the office sample clip (../shared/data/office_clip):
its frames resized to ``--width`` px and played forwards and backwards (0..99, 98..1, ...)
up to each length, written as an H.264 mp4. Each length is edited in a fresh process:

* ``stream``: ``python -m s3jax.edit`` as a user runs it (the streamed edit,
  ``s3jax.edit_stream``; default options, metrics and cache on, a fresh cache);
* ``in_memory`` (``--in-memory``): what the CLI did before streaming, in one process:
  ``video.read_frames`` of the whole clip, ``VideoEditor.edit_video``, ``video.write_video``.

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``: that process alone). The machine is shared: wall times
are contended; the memory figures are not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_util  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_CLIP = REPO.parent / "shared" / "data" / "office_clip"
DEFAULT_CHECKPOINT = pathlib.Path("/work/fresh_demo/runs/demo")

# The old CLI path: the whole clip read, edited and written in memory.
IN_MEMORY = """
import json, sys, time
from s3jax import edit_job, editing, loading, video
t0 = time.perf_counter()
ckpt, clip, out, attribute, steps, cache, metrics = sys.argv[1:8]
frames, fps = video.read_frames(clip)
ed = editing.VideoEditor(ckpt, steps=int(steps))
clf = loading.load_classifier(ckpt + "/classifier")
edited, report = ed.edit_video(
    frames, attribute, 1.0, classifier=clf, cache_dir=cache, compute_metrics=metrics == "1"
)
video.write_video(out, edited, fps)
report["timings_s"]["run_total"] = time.perf_counter() - t0
edit_job.report_path(out).write_text(json.dumps(report))
"""


def make_clip(src, path: pathlib.Path, num_frames: int, width: int) -> dict:
  """The office clip resized to ``width``, ping-ponged to ``num_frames``, as an mp4."""
  import numpy as np
  from s3jax import video

  frames = list(video.iter_frames(src, resize_width=width))
  cycle = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
  order = [cycle[i % len(cycle)] for i in range(num_frames)]
  video.write_video(path, (frames[i] for i in order), video.DEFAULT_FOLDER_FPS)
  h, w = frames[0].shape[:2]
  return {
      "frames": num_frames,
      "width": w,
      "height": h,
      "bytes": path.stat().st_size,
      "source_frames": len(frames),
      "raw_bytes": int(num_frames * np.prod(frames[0].shape)),
  }


def run_child(cmd, env, log: pathlib.Path) -> dict:
  """Runs ``cmd`` (output to ``log``): its wall seconds, peak RSS (MiB) and exit status."""
  t0 = time.perf_counter()
  with open(log, "wb") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  code = os.waitstatus_to_exitcode(status)
  return {
      "seconds": round(time.perf_counter() - t0, 1),
      "peak_rss_mib": round(usage.ru_maxrss / 1024.0, 1),  # KiB on Linux
      "status": code,
      "log_tail": log.read_text(errors="replace")[-1500:] if code else "",
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
  p.add_argument("--clip", default=str(DEFAULT_CLIP))
  p.add_argument("--frames", default="100,1000")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--attribute", default="Mouth_Wide")
  p.add_argument("--in-memory", action="store_true", help="also measure the in-memory path")
  p.add_argument("--metrics", action="store_true", help="TL-ID/TG-ID too (slow: dlib per frame)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--workdir", default=None, help="where clips and outputs go (default: a tmp)")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "long_video.json"))
  args = p.parse_args()
  bench_util.set_cpu_threads(args.threads)
  info = bench_util.run_info(args.threads)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="long_video_"))
  work.mkdir(parents=True, exist_ok=True)
  runs = []
  for n in [int(v) for v in args.frames.split(",")]:
    clip = work / f"clip_{n}.mp4"
    clip_info = make_clip(args.clip, clip, n, args.width)
    modes = ["stream"] + (["in_memory"] if args.in_memory else [])
    for mode in modes:
      out = work / f"{mode}_{n}.mp4"
      cache = work / f"cache_{mode}_{n}"
      if mode == "stream":
        cmd = [
            sys.executable,
            "-m",
            "s3jax.edit",
            "--checkpoint",
            args.checkpoint,
            "--input",
            str(clip),
            "--attribute",
            args.attribute,
            "--strength",
            "1",
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--cache-dir",
            str(cache),
            "--noprogress",
            "--metrics" if args.metrics else "--nometrics",
        ]
      else:
        cmd = [
            sys.executable,
            "-c",
            IN_MEMORY,
            args.checkpoint,
            str(clip),
            str(out),
            args.attribute,
            str(args.steps),
            str(cache),
            "1" if args.metrics else "0",
        ]
      print(f"{mode} {n} frames ...", flush=True)
      res = run_child(cmd, env, work / f"{mode}_{n}.log")
      rec = {"mode": mode, "frames": n, **res}
      report = out.with_suffix(".report.json")
      if report.exists():
        rep = json.loads(report.read_text())
        rec["timings_s"] = rep["timings_s"]
        rec["stream"] = rep.get("stream")
        rec["edited_frames"] = rep["edited_frames"]
        rec["passthrough"] = len(rep["passthrough"])
      if cache.exists():
        rec["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
      rec["clip"] = clip_info
      runs.append(rec)
      write(args, info, runs)  # after every run: a stopped benchmark keeps what it measured
      print(
          f"  peak RSS {rec['peak_rss_mib']} MiB in {rec['seconds']:.0f} s "
          f"(status {rec['status']})",
          flush=True,
      )
  print(json.dumps(write(args, info, runs)["summary"], indent=2))


def write(args, info: dict, runs: list) -> dict:
  """Writes the result JSON with a summary of the peaks per mode and length."""
  peaks = {(r["mode"], r["frames"]): r["peak_rss_mib"] for r in runs}
  lengths = sorted({r["frames"] for r in runs})
  summary = {}
  for mode in ("stream", "in_memory"):
    got = [peaks.get((mode, n)) for n in lengths]
    if all(v is not None for v in got) and len(got) > 1:
      summary[mode] = {
          "peak_rss_mib": dict(zip(map(str, lengths), got)),
          "growth_longest_over_shortest": round(got[-1] / got[0], 3),
      }
  result = dict(
      info,
      benchmark="long_video",
      checkpoint=args.checkpoint,
      steps=args.steps,
      metrics=args.metrics,
      attribute=args.attribute,
      width=args.width,
      runs=runs,
      summary=summary,
      loadavg_after=os.getloadavg(),
      contended=bench_util.contended(info, args.threads),
      note=(
          "peak RSS (ru_maxrss) of a fresh process per run; the stream's should not grow with "
          "the length (the per-frame arrays are a few KB a frame), the in-memory path's does. "
          "Wall times are on a shared 2-core machine."
      ),
  )
  bench_util.write_result(args.out, result)
  return result


if __name__ == "__main__":
  main()
