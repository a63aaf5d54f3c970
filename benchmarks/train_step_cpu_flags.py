"""DVA train step on XLA's CPU backend: flags, library backends and dtype, each vs the twin.

    python benchmarks/train_step_cpu_flags.py [--group backends|codegen|dtype|all]
                                              [--rounds 5] [--threads 2] [--out ...]

Same step and config as benchmarks/train_step.py (mid config, 4 images, Adam, EMA). Each
attempt is one set of XLA DebugOptions passed to that compile only
(`.compile(compiler_options=...)`), so every attempt of a group lives in one process and
takes turns with the group's default compile and the PyTorch twin's step (interleaved
rounds, medians): its ratios to the twin and to the default are same-run figures.

Groups (docs/cpu_speed.md has the table and the conclusion):
  backends  where XLA sends convolutions and dots: YNNPACK (this XLA's default), Eigen,
            YNNPACK for every fusion type, oneDNN fusions, XNNPACK graph fusion;
  codegen   fast math, 512-bit vectors, single-threaded Eigen, the retired thunk-runtime flag;
  dtype     `model.dtype="bfloat16"` (a config setting; params and Adam stay f32), against the
            twin in f32 and under `torch.autocast(bfloat16)`.
An attempt whose optimised HLO equals one already timed and whose options only act on HLO
passes is recorded as the same program, not timed again. Each attempt also records what
its HLO runs in (library fusions by kind, convolutions left to XLA's own emitters).
Writes benchmarks/results/train_step_cpu_flags.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
import os
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "configs"))

import bench_util  # noqa: E402

YNN_ALL = ",".join(
    "LIBRARY_FUSION_TYPE_" + t
    for t in ("INDIVIDUAL_CONVOLUTION", "INDIVIDUAL_DOT", "DOT", "ELTWISE", "REDUCE")
)
LIB_TYPES = ",".join("LIBRARY_FUSION_TYPE_" + t for t in ("DOT", "ELTWISE", "REDUCE"))
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}

# name, group, dtype, XLA DebugOptions for this compile, whether they act only on HLO passes,
# what it tries.
ATTEMPTS = (
    ("default", "all", "float32", {}, True, "XLA defaults: YNNPACK convolutions and dots"),
    ("eigen", "backends", "float32", EIGEN, True, "YNNPACK off: Eigen convolutions, XLA dots"),
    (
        "ynn_all_types",
        "backends",
        "float32",
        {"xla_cpu_experimental_ynn_fusion_type": YNN_ALL},
        True,
        "YNNPACK for every fusion type (convolution, dot, eltwise, reduce)",
    ),
    (
        "onednn_fusions",
        "backends",
        "float32",
        dict(
            EIGEN,
            xla_cpu_use_onednn=True,
            xla_cpu_experimental_onednn_custom_call=True,
            xla_cpu_experimental_onednn_fusion_type=LIB_TYPES,
        ),
        True,
        "oneDNN fusions (dot, eltwise, reduce) and oneDNN custom calls; YNNPACK off",
    ),
    (
        "xnn_graph_fusion",
        "backends",
        "float32",
        dict(
            EIGEN,
            xla_cpu_experimental_xnn_fusion_type=LIB_TYPES,
            xla_cpu_experimental_xnn_graph_fusion_mode="XNN_GRAPH_FUSION_MODE_GREEDY",
        ),
        True,
        "XNNPACK fusions (dot, eltwise, reduce) and greedy XNNPACK graph fusion; YNNPACK off",
    ),
    (
        "fast_math",
        "codegen",
        "float32",
        {"xla_cpu_enable_fast_math": True},
        False,
        "LLVM fast math in XLA's own kernels",
    ),
    (
        "vector_width_512",
        "codegen",
        "float32",
        {"xla_cpu_prefer_vector_width": 512},
        False,
        "512-bit vectors in XLA's own kernels (default 256)",
    ),
    (
        "eigen_single_thread",
        "codegen",
        "float32",
        {"xla_cpu_multi_thread_eigen": False},
        False,
        "single-threaded Eigen calls (XLA's thunk pool still runs ops in parallel)",
    ),
    (
        "thunk_runtime_off",
        "codegen",
        "float32",
        {"xla_cpu_use_thunk_runtime": False},
        True,
        "the pre-thunk runtime (the flag is retired in this XLA)",
    ),
    ("bf16", "dtype", "bfloat16", {}, True, "model.dtype=bfloat16 (YNNPACK default)"),
    ("bf16_eigen", "dtype", "bfloat16", EIGEN, True, "model.dtype=bfloat16, YNNPACK off"),
)
GROUPS = ("backends", "codegen", "dtype")


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--group", default="all", choices=GROUPS + ("all",))
  p.add_argument(
      "--attempts", default="", help="comma-separated attempt names (instead of --group)"
  )
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step each per round)")
  p.add_argument(
      "--threads",
      type=int,
      default=2,
      help="CPUs this process runs on (XLA's pool) and PyTorch threads; with 1, CPU seconds per"
      " step are a load-proof measure of each side's work",
  )
  p.add_argument("--out", default=str(RESULTS / "train_step_cpu_flags.json"))
  return p.parse_args()


if __name__ == "__main__":
  ARGS = parse()
  bench_util.pin_cpu_threads(ARGS.threads)

import jax  # noqa: E402

import train_step  # noqa: E402  benchmarks/train_step.py
from bench_util import contended, interleaved_rounds, run_info, write_result  # noqa: E402


def hlo_summary(compiled) -> dict:
  """What the optimised program runs in: library fusions by kind, convolutions in all."""
  text = compiled.as_text()
  kinds = collections.Counter(re.findall(r'"kind":"(__\w+)"', text))
  return dict(
      library_fusions=dict(kinds),
      convolutions=len(re.findall(r" convolution\(", text)),
      hlo_sha1=hashlib.sha1(text.encode()).hexdigest()[:12],
  )


def selected(group, names=()):
  if names:
    unknown = set(names) - {a[0] for a in ATTEMPTS}
    if unknown:
      raise SystemExit(f"unknown attempts {sorted(unknown)}")
    return [a for a in ATTEMPTS if a[0] == "default" or a[0] in names]
  return [a for a in ATTEMPTS if a[1] == "all" or group in ("all", a[1])]


def run_group(attempts, rounds, workdir):
  dtypes = sorted({a[2] for a in attempts})
  f32_task, f32_holder = train_step.new_task(train_step.mid_config("float32"), workdir)
  tasks = {dt: train_step.new_task(train_step.mid_config(dt), workdir, f32_holder) for dt in dtypes}
  params = jax.device_get(f32_holder[0].params)  # before any step donates the state
  fns, records, timed_hlo = {}, [], {}
  for name, _, dtype, options, hlo_only, what in attempts:
    rec = dict(name=name, what=what, dtype=dtype, compiler_options=options)
    records.append(rec)
    try:
      step = train_step.JaxTrainStep(*tasks[dtype], compiler_options=options)
    except Exception as e:  # an option this XLA rejects is a finding, not a crash
      rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      continue
    rec.update(compile_s=step.compile_s, **hlo_summary(step.compiled))
    same = timed_hlo.get((dtype, rec["hlo_sha1"]))
    if hlo_only and same is not None:
      rec["same_program_as"] = same
      continue
    timed_hlo.setdefault((dtype, rec["hlo_sha1"]), name)
    fns[name] = step
  torch_names = ["torch_twin"]
  fns["torch_twin"] = train_step.torch_twin_step(f32_task.config, params)
  if "bfloat16" in dtypes:
    fns["torch_twin_bf16_autocast"] = train_step.torch_twin_step(
        f32_task.config, params, autocast_bf16=True
    )
    torch_names.append("torch_twin_bf16_autocast")
  timing = interleaved_rounds(fns, rounds)
  images = train_step.ITEMS * train_step.FRAMES
  base = timing["default"]["median_s"]
  twin = timing["torch_twin"]["median_s"]
  twin_cpu = timing["torch_twin"]["median_cpu_s"]
  for rec in records:
    t = timing.get(rec["name"])
    if t is None:
      continue
    rec.update(
        step_s=t["seconds"],
        median_step_s=t["median_s"],
        median_cpu_util=t["median_cpu_util"],
        step_cpu_s=t["cpu_seconds"],
        median_step_cpu_s=t["median_cpu_s"],
        images_per_s=images / t["median_s"],
        over_torch_twin=twin / t["median_s"],
        over_default=base / t["median_s"],
        cpu_over_torch_twin=twin_cpu / t["median_cpu_s"],
        loss_finite=bool(math.isfinite(fns[rec["name"]].loss)),
    )
    if rec["dtype"] == "bfloat16":
      autocast = timing["torch_twin_bf16_autocast"]
      rec["over_torch_twin_bf16_autocast"] = autocast["median_s"] / t["median_s"]
      rec["cpu_over_torch_twin_bf16_autocast"] = autocast["median_cpu_s"] / t["median_cpu_s"]
  baselines = {
      n: dict(
          step_s=timing[n]["seconds"],
          median_step_s=timing[n]["median_s"],
          median_cpu_util=timing[n]["median_cpu_util"],
          step_cpu_s=timing[n]["cpu_seconds"],
          median_step_cpu_s=timing[n]["median_cpu_s"],
          images_per_s=images / timing[n]["median_s"],
      )
      for n in torch_names
  }
  return records, baselines


def main():
  train_step.set_torch_threads(ARGS.threads)
  info = run_info(ARGS.threads)
  with tempfile.TemporaryDirectory() as tmp:
    attempts = selected(ARGS.group, [n for n in ARGS.attempts.split(",") if n])
    records, baselines = run_group(attempts, ARGS.rounds, tmp)
  timed = [r for r in records if "over_torch_twin" in r]
  best = max(timed, key=lambda r: r["over_torch_twin"])
  result = dict(
      **info,
      mid_config=dict(train_step.MID_UNET, images_per_step=train_step.ITEMS * train_step.FRAMES),
      group=ARGS.attempts or ARGS.group,
      rounds=ARGS.rounds,
      attempts=records,
      torch=baselines,
      best_attempt=best["name"],
      best_over_torch_twin=best["over_torch_twin"],
      statistic=(
          "median over rounds; in each round every attempt and the twin run one step in turn,"
          " so ratios are same-run figures"
      ),
      contended=contended(info, ARGS.threads),
      loadavg_after=os.getloadavg(),
  )
  write_result(ARGS.out, result)
  for r in records:
    if "over_torch_twin" in r:
      print(
          f"{r['name']:22s} {r['images_per_s']:.2f} img/s  {r['over_torch_twin']:.2f}x twin"
          f"  {r['over_default']:.2f}x default  cpu {r['median_cpu_util']:.2f}"
          f" ({r['cpu_over_torch_twin']:.2f}x twin in CPU s)"
          f"  {r['library_fusions']} conv={r['convolutions']}"
      )
    else:
      print(f"{r['name']:22s} {r.get('same_program_as') or r.get('error')}")
  for n, b in baselines.items():
    print(f"{n:22s} {b['images_per_s']:.2f} img/s  cpu {b['median_cpu_util']:.2f}")


if __name__ == "__main__":
  main()
