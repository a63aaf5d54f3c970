"""One prepared GPU benchmark: IP-FaceDiff at SD-1.4 size, the paper DVA train step and edit, remat.

    bash benchmarks/gpu.sh [--out benchmarks/results/gpu.json] [--budget-s 420]
    bash benchmarks/gpu.sh --dry-run --out /tmp/gpu_dry.json   # CPU, tiny sizes (CI runs this)

Each item runs in a fresh worker process (a clean device-memory high-water mark, a hard
timeout), in this order, which is also the priority when time runs short:
1. env: the backend (a GPU, unless --dry-run; otherwise a clear error and exit 2), the device
   kind and memory limit, the project's imports, and a matmul ceiling (bf16 and f32 at JAX's
   default precision, 8192^3) to hold the peak table against.
2. ipfacediff_bfloat16: the IP-FaceDiff edit (`StableDiffusion.edit_video`: VAE encode, DDIM
   inversion scan, TokenFlow-PnP edit scan with CFG, VAE decode) at SD-1.4's UNet/VAE/text
   sizes with random weights, bf16 compute (the reference runs fp16), 512 px, 16 frames, B 8,
   10 inversion + 5 edit steps; inversion, edit and VAE timed apart after a first (compiling)
   call, then extrapolated linearly in UNet sample-evaluations to the reference's defaults
   (40 frames, 500 inversion + 50 edit steps), next to benchmarks/ipfacediff.py's FLOP-based
   H100 projection. The tokenizer is read from --sd-tokenizer (vocab.json + merges.txt).
3. train_bfloat16: the paper DVA train step (configs/voxceleb.py, 256 px; the real
   `DVATask.train_step`: two noises, L1 + masked x0 regulariser, backward, clip, Adam, EMA,
   finite guard) at the largest batch that fits: compile at one item (2 frames), read XLA's
   compiled memory analysis, compile again at the largest batch it predicts fits under
   --headroom of the device's limit (memory is linear in the batch; a line through two
   compiles), an out-of-memory guard at the first step. Images/s (median over rounds of
   back-to-back steps), FLOPs per step from XLA's `cost_analysis()`, MFU, peak device memory,
   compile times.
4. edit_float32: frames/s of one edit of 16 frames of 256 px at 100 DDIM steps (inversion,
   N-1 UNet calls, + decoding, N calls) on the paper UNet: `diffusion.ddim_scan` over
   `diffusion.ddim_constants(steps, kind, pad=True)`, one compiled program for both
   directions, as the editor runs it. float32 is what a checkpoint of the default config
   edits in.
5. remat_bfloat16: item 3's step with `model.remat=True` at item 3's batch: peak device memory,
   XLA temp bytes, FLOPs and images/s against item 3.
6. train_float32 (sized from item 3's bytes per item), then edit_bfloat16.
Weights come from a host RNG and the Adam moments start at zero: speed does not depend on the
values, and nothing is read or downloaded. A global time budget (--budget-s) guards the run:
each item may use its share of the budget (ITEMS) within what is left and is killed past it;
an item whose minimum is no longer left is skipped; both are noted in the JSON, which is
rewritten after every item (a killed item keeps what it had measured).

MFU = XLA's FLOPs per step / step time / the device's dense peak (PEAKS: NVIDIA's datasheet
figures without sparsity, keyed by `jax.devices()[0].device_kind`). JAX's default matmul
precision lets XLA run float32 convs and matmuls as TF32 on Ampere and later, so float32 MFU
is against the TF32 peak and, apart, the plain FP32 peak (`--f32-precision highest` turns
TF32 off and takes the FP32 peak).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the checkout's `configs` package

import bench_util  # noqa: E402

# Dense peak TFLOP/s by device kind (first match of the substring wins, so the more specific
# names come first): (bf16 tensor core, TF32 tensor core, plain FP32). NVIDIA datasheets for
# H100/H200 (SXM, PCIe, NVL), GH200, A100 (SXM and PCIe), L40S and L4; the sparse figures
# there are twice these.
PEAKS = (
    ("GH200", 989.4, 494.7, 67.0),
    ("H200 NVL", 835.5, 417.5, 60.0),
    ("H100 NVL", 835.5, 417.5, 60.0),
    ("H100 PCIe", 756.5, 378.0, 51.0),
    ("H200", 989.4, 494.7, 67.0),
    ("H100", 989.4, 494.7, 67.0),
    ("A100", 312.0, 156.0, 19.5),
    ("L40S", 362.1, 183.0, 91.6),
    ("L4", 121.0, 60.0, 30.3),
)
PEAKS_SOURCE = "NVIDIA datasheets, dense (no sparsity), TFLOP/s bf16/TF32/FP32: " + "; ".join(
    f"{key} {bf16}/{tf32}/{fp32}" for key, bf16, tf32, fp32 in PEAKS
)
# --dry-run runs on a CPU, which has no entry: a nominal 1 TFLOP/s only exercises the MFU
# arithmetic (the figure means nothing there).
DRY_RUN_PEAK_TFLOPS = 1.0

# --dry-run: the same script on a tiny UNet (16 px, one level; its middle block keeps the
# attention), few steps, small batches; XLA's CPU backend optimises little (compile time is
# most of a dry run, and none of its figures means anything).
DRY_RUN_UNET = dict(
    image_size=16,
    model_channels=32,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(),
)
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# The ipfacediff item: the run it measures (512 px; dry: the tiny golden configs at their 32
# px), and the reference's defaults it extrapolates to.
SD_RUN = dict(frames=16, batch_size=8, inversion_steps=10, steps=5)
SD_DRY_RUN = dict(frames=16, batch_size=8, inversion_steps=4, steps=2)
SD_REFERENCE = {k: bench_util.TOKENFLOW_REFERENCE[k] for k in SD_RUN}

# (name, kind, dtype, share of the budget it may use at most, seconds it needs at the least
# on a GPU). The order is the priority: an item starts only with its minimum left, so later
# items are the first to be skipped.
ITEMS = (
    ("env", "env", None, 0.10, 20),
    ("ipfacediff_bfloat16", "ipfacediff", "bfloat16", 0.45, 90),
    ("train_bfloat16", "train", "bfloat16", 0.40, 90),
    ("edit_float32", "edit", "float32", 0.20, 45),
    ("remat_bfloat16", "remat", "bfloat16", 0.25, 60),
    ("train_float32", "train", "float32", 0.30, 75),
    ("edit_bfloat16", "edit", "bfloat16", 0.15, 40),
)


def parse(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
  p.add_argument(
      "--budget-s",
      type=float,
      default=None,
      help="whole run (default 420; 900 with --dry-run, for a loaded CPU)",
  )
  p.add_argument(
      "--items",
      default=",".join(i[0] for i in ITEMS),
      help="a subset (env is required; they run in the order above)",
  )
  p.add_argument(
      "--train-items",
      type=int,
      default=0,
      help="fixed items per train step (2 frames each); 0 searches for the largest that fits",
  )
  p.add_argument("--max-items", type=int, default=None, help="cap of the search (256; 2 dry)")
  p.add_argument("--train-steps", type=int, default=None, help="timed steps (12; 4 dry)")
  p.add_argument("--edit-frames", type=int, default=None, help="frames per edit call (16; 2)")
  p.add_argument("--edit-steps", type=int, default=None, help="DDIM steps (100; 10 dry)")
  p.add_argument(
      "--sd-tokenizer",
      default=str(ROOT.parent / "shared" / "golden" / "ipfacediff" / "tokenizer"),
      help="a CLIP tokenizer dir (vocab.json, merges.txt) for the ipfacediff item's prompts",
  )
  p.add_argument(
      "--sd-configs",
      default=str(ROOT.parent / "shared" / "golden" / "ipfacediff"),
      help="--dry-run only: the dir of the tiny SD configs (unet/vae/text_encoder_config.json)",
  )
  p.add_argument(
      "--headroom",
      type=float,
      default=0.9,
      help="fraction of the device's memory limit the chosen batch may plan to use",
  )
  p.add_argument(
      "--f32-precision",
      choices=("default", "highest"),
      default="default",
      help="jax_default_matmul_precision of the float32 runs ('highest' turns TF32 off)",
  )
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  dry = a.dry_run
  a.budget_s = a.budget_s if a.budget_s is not None else (900.0 if dry else 420.0)
  a.max_items = a.max_items or (2 if dry else 256)
  a.train_steps = a.train_steps or (4 if dry else 12)
  a.edit_frames = a.edit_frames or (2 if dry else 16)
  a.edit_steps = a.edit_steps or (10 if dry else 100)
  return a


# ---------------------------------------------------------------------------
# The parent: plans the items, runs each in a worker process, merges the JSON
# ---------------------------------------------------------------------------
def peaks_for(device_kind: str, dry_run: bool) -> dict:
  """The dense peaks (TFLOP/s) of a device kind; None where the table has no entry."""
  if dry_run:
    return dict(
        key="dry-run nominal",
        bfloat16=DRY_RUN_PEAK_TFLOPS,
        tf32=DRY_RUN_PEAK_TFLOPS,
        float32=DRY_RUN_PEAK_TFLOPS,
        source="dry run: a nominal figure that only exercises the MFU arithmetic",
    )
  for key, bf16, tf32, fp32 in PEAKS:
    if key.lower() in device_kind.lower():
      return dict(key=key, bfloat16=bf16, tf32=tf32, float32=fp32, source=PEAKS_SOURCE)
  return dict(key=None, bfloat16=None, tf32=None, float32=None, source=PEAKS_SOURCE)


def add_mfu(run: dict, peaks: dict, dtype: str, f32_precision: str) -> None:
  """MFU of a run with `achieved_tflops`: bf16 against the bf16 peak; f32 against TF32 (JAX's
  default precision on NVIDIA) or FP32 (--f32-precision highest), and against FP32 apart."""
  tflops = run.get("achieved_tflops")
  if tflops is None:
    return
  if dtype == "bfloat16":
    ref = ("bfloat16", peaks["bfloat16"])
  elif f32_precision == "default":
    ref = ("tf32", peaks["tf32"])
  else:
    ref = ("float32", peaks["float32"])
  run["mfu_peak"] = dict(name=ref[0], tflops=ref[1])
  run["mfu"] = tflops / ref[1] if ref[1] else None
  if dtype == "float32":
    run["mfu_vs_fp32_peak"] = tflops / peaks["float32"] if peaks["float32"] else None


def plan_item(share, min_s, budget_s, budget_left, dry_run):
  """Seconds an item may run (its share of the budget, within what is left), or None when
  what is left is under its minimum."""
  floor = 5 if dry_run else min_s
  if budget_left < floor:
    return None
  return min(share * budget_s, budget_left)


def run_worker(spec: dict, hard_s: float, env: dict) -> dict:
  """One item in a fresh process; its result file is read even after a kill."""
  with tempfile.TemporaryDirectory() as tmp:
    spec = dict(spec, result_file=str(pathlib.Path(tmp) / "result.json"))
    t0 = time.monotonic()
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
      rc = subprocess.run(cmd, env=env, timeout=hard_s).returncode
      note = None if rc == 0 else f"worker exited with {rc}"
    except subprocess.TimeoutExpired:
      note = f"killed at its time limit ({hard_s:.0f} s)"
    path = pathlib.Path(spec["result_file"])
    result = json.loads(path.read_text()) if path.exists() else {}
  result["wall_s"] = time.monotonic() - t0
  if note:
    result["incomplete"] = note
  return result


def worker_env(args) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  env.setdefault("PYTHONUNBUFFERED", "1")
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + DRY_RUN_XLA_FLAGS).strip()
  else:
    # The largest batch needs most of the memory: JAX preallocates 75% unless told.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  return env


def flat_figures(result: dict) -> dict:
  """The main figures under flat, machine-readable keys."""
  out = {}
  for dtype, run in result.get("train", {}).items():
    for k in ("images_per_s", "mfu", "images_per_step", "peak_bytes", "compile_s"):
      if k in run:
        out[f"train_{dtype}_{k}"] = run[k]
  for dtype, run in result.get("edit", {}).items():
    for k in ("frames_per_s", "mfu", "compile_s"):
      if k in run:
        out[f"edit_{dtype}_{k}"] = run[k]
  for k in ("frames_per_s", "mfu", "reference_defaults_extrapolated_s", "compile_s"):
    if k in result.get("ipfacediff", {}):
      out[f"ipfacediff_{k}"] = result["ipfacediff"][k]
  remat = result.get("remat", {})
  for k in ("peak_bytes_ratio", "temp_bytes_ratio", "flops_ratio", "images_per_s_ratio"):
    if k in remat:
      out[f"remat_over_no_remat_{k}"] = remat[k]
  return out


def headline(result: dict) -> dict:
  """{label: number} for benchmarks/run_all.py's table; the labels name what is measured."""
  out = {}
  short = {"bfloat16": "bf16", "float32": "f32"}
  for dtype, run in result.get("train", {}).items():
    if run.get("images_per_s"):
      what = f"train {short[dtype]}, {run['image_size']} px, {run['images_per_step']} img/step"
      out[f"{what}: images/s"] = run["images_per_s"]
      if run.get("mfu") is not None:
        out[f"{what}: MFU vs {run['mfu_peak']['name']} peak"] = run["mfu"]
  for dtype, run in result.get("edit", {}).items():
    if run.get("frames_per_s"):
      what = f"edit {short[dtype]}, {run['image_size']} px, {run['steps']} steps"
      out[f"{what}: frames/s (inversion + decoding)"] = run["frames_per_s"]
  sd = result.get("ipfacediff", {})
  if sd.get("frames_per_s"):
    what = f"IP-FaceDiff bf16, {sd['frames']} frames {sd['image_size']} px"
    out[f"{what}: frames/s ({sd['inversion_steps']} inv + {sd['steps']} edit steps)"] = sd[
        "frames_per_s"
    ]
    ref = SD_REFERENCE
    what = (
        f"IP-FaceDiff, {ref['frames']} frames {sd['image_size']} px, {ref['inversion_steps']} inv"
        f" + {ref['steps']} edit steps"
    )
    out[f"{what}: s (extrapolated)"] = sd["reference_defaults_extrapolated_s"]
  remat = result.get("remat", {})
  if remat.get("peak_bytes_ratio"):
    what = "remat/no remat, " + ("same batch" if remat["same_batch"] else "batches differ")
    out[f"{what}: peak device bytes"] = remat["peak_bytes_ratio"]
    out[f"{what}: FLOPs"] = remat["flops_ratio"]
  return {k: v for k, v in out.items() if v is not None}


def remat_comparison(no_remat: dict, remat: dict, peaks: dict, args) -> dict:
  """Same batch, same dtype, with and without `model.remat`.

  The remat step's own FLOPs count the recomputation: from them comes `hfu` (hardware FLOPs
  utilisation); its `mfu` counts the model's FLOPs, those of the step without remat.
  """
  add_mfu(remat, peaks, remat.get("dtype"), args.f32_precision)
  if "mfu" in remat:
    remat["hfu"] = remat.pop("mfu")
    peak = remat["mfu_peak"]["tflops"]
    if peak and no_remat.get("flops_per_step") and remat.get("median_step_s"):
      model_tflops = no_remat["flops_per_step"] / remat["median_step_s"] / 1e12
      remat["mfu"] = model_tflops / peak

  def ratio(key):
    a, b = remat.get(key), no_remat.get(key)
    return a / b if a and b else None

  return dict(
      dtype=remat.get("dtype"),
      images_per_step=remat.get("images_per_step"),
      same_batch=remat.get("images_per_step") == no_remat.get("images_per_step"),
      peak_bytes_source=remat.get("peak_bytes_source"),
      no_remat=dict(
          peak_bytes=no_remat.get("peak_bytes"),
          temp_bytes=no_remat.get("temp_bytes"),
          flops_per_step=no_remat.get("flops_per_step"),
          images_per_s=no_remat.get("images_per_s"),
      ),
      remat=dict(
          peak_bytes=remat.get("peak_bytes"),
          temp_bytes=remat.get("temp_bytes"),
          flops_per_step=remat.get("flops_per_step"),
          images_per_s=remat.get("images_per_s"),
          compile_s=remat.get("compile_s"),
      ),
      peak_bytes_ratio=ratio("peak_bytes"),
      temp_bytes_ratio=ratio("temp_bytes"),
      flops_ratio=ratio("flops_per_step"),
      images_per_s_ratio=ratio("images_per_s"),
      run=remat,
  )


def compile_times(result: dict) -> dict:
  """Every program's XLA compile seconds (and its trace/lowering seconds), by name."""
  out = {}
  runs = [(f"train_{d}", r) for d, r in result.get("train", {}).items()]
  runs += [(f"edit_{d}", r) for d, r in result.get("edit", {}).items()]
  if "ipfacediff" in result:
    runs.append(("ipfacediff_bfloat16", result["ipfacediff"]))
  if "run" in result.get("remat", {}):
    runs.append(("train_bfloat16_remat", result["remat"]["run"]))
  for name, run in runs:
    for a in run.get("compile_attempts", []):
      out[f"{name} ({a['label']})"] = dict(lower_s=a["lower_s"], compile_s=a["compile_s"])
  return out


def parent(args) -> int:
  info = bench_util.run_info(os.cpu_count() or 1)
  start = time.monotonic()
  names = [n for n in args.items.split(",") if n]
  unknown = sorted(set(names) - {i[0] for i in ITEMS})
  if unknown or "env" not in names:
    raise SystemExit(f"--items: unknown {unknown}; 'env' is required")
  result = dict(
      info,
      benchmark="gpu",
      dry_run=args.dry_run,
      budget_s=args.budget_s,
      status="running",
      settings=dict(
          train_items=args.train_items or "search",
          max_items=args.max_items,
          headroom=args.headroom,
          train_steps=args.train_steps,
          edit_frames=args.edit_frames,
          edit_steps=args.edit_steps,
          f32_precision=args.f32_precision,
      ),
      train={},
      edit={},
      skipped=[],
  )
  env = worker_env(args)
  result["env_vars"] = {
      k: env.get(k)
      for k in (
          "JAX_PLATFORMS",
          "XLA_PYTHON_CLIENT_MEM_FRACTION",
          "XLA_FLAGS",
          "JAX_COMPILATION_CACHE_DIR",
      )
  }
  base = dict(
      dry_run=args.dry_run,
      headroom=args.headroom,
      max_items=args.max_items,
      train_steps=args.train_steps,
      edit_frames=args.edit_frames,
      edit_steps=args.edit_steps,
      f32_precision=args.f32_precision,
      sd_tokenizer=str(pathlib.Path(args.sd_tokenizer).resolve()),
      sd_configs=str(pathlib.Path(args.sd_configs).resolve()),
  )
  peaks = None
  for name, kind, dtype, share, min_s in ITEMS:
    if name not in names:
      continue
    left = args.budget_s - (time.monotonic() - start)
    limit_s = plan_item(share, min_s, args.budget_s, left, args.dry_run)
    if limit_s is None:
      result["skipped"].append(dict(item=name, reason=f"time budget: {left:.0f} s left"))
      if kind == "env":  # nothing runs without the device's facts
        result["status"] = "failed"
        bench_util.write_result(args.out, result)
        return 2
      bench_util.write_result(args.out, result)
      continue
    spec = dict(base, item=name, kind=kind, dtype=dtype, limit_s=limit_s)
    if kind == "train":
      spec["items"] = args.train_items
      spec["remat"] = False
      hint = result["train"].get("bfloat16", {}).get("bytes_per_item")
      if dtype == "float32" and hint:
        spec["bytes_per_item_hint"] = 2 * hint  # f32 activations are twice bf16's
    elif kind == "remat":
      found = result["train"].get("bfloat16", {})
      if "images_per_s" not in found:
        result["skipped"].append(dict(item=name, reason="needs train_bfloat16's batch and run"))
        continue
      spec.update(kind="train", remat=True, items=found["items"])
    print(f"[gpu_bench] {name}: up to {limit_s:.0f} s", flush=True)
    out = run_worker(spec, limit_s, env)
    if kind == "env":
      result["device"] = out
      if "error" in out or "device_kind" not in out:
        result["status"] = "failed"
        bench_util.write_result(args.out, result)
        print(f"[gpu_bench] {out.get('error', 'no device information')}", file=sys.stderr)
        return 2
      peaks = peaks_for(out["device_kind"], args.dry_run)
      result["peaks_tflops"] = peaks
      result["baseline"] = (
          f"absolute figures on one {out['device_kind']} (no reference on the GPU); MFU "
          f"against its dense peak ({peaks['key']}: bf16 {peaks['bfloat16']}, TF32 "
          f"{peaks['tf32']}, FP32 {peaks['float32']} TFLOP/s; {peaks['source']})"
      )
    elif kind == "train":
      add_mfu(out, peaks, dtype, args.f32_precision)
      result["train"][dtype] = out
    elif kind == "edit":
      add_mfu(out, peaks, dtype, args.f32_precision)
      result["edit"][dtype] = out
    elif kind == "ipfacediff":
      add_mfu(out, peaks, dtype, args.f32_precision)
      result["ipfacediff"] = out
    else:
      result["remat"] = remat_comparison(result["train"]["bfloat16"], out, peaks, args)
    if "error" in out or "incomplete" in out:
      result["skipped"].append(
          dict(item=name, reason=out.get("error") or out.get("incomplete"), partial=True)
      )
    result["compile_times_s"] = compile_times(result)
    result["figures"] = flat_figures(result)
    result["headline"] = headline(result)
    result["elapsed_s"] = time.monotonic() - start
    bench_util.write_result(args.out, result)
  result["status"] = "complete" if not result["skipped"] else "partial"
  result["elapsed_s"] = time.monotonic() - start
  result["loadavg_after"] = os.getloadavg()
  result["contended"] = bench_util.contended(info, os.cpu_count() or 1)
  result["notes"] = [
      "each item ran in its own process: peak_bytes is that process's device high-water mark "
      "(host ru_maxrss where the backend has no memory stats, e.g. the CPU of --dry-run)",
      "train images/s: median over rounds of back-to-back steps (one block per round); a "
      "train image is one frame, run through the UNet twice (two noises)",
      "edit frames/s: one edit = inversion (N-1 UNet calls) + decoding (N calls) per frame; "
      "steady-state pass after a first call, compile apart",
      "float32 runs use JAX's default matmul precision unless --f32-precision highest: TF32 "
      "on NVIDIA Ampere and later",
  ]
  bench_util.write_result(args.out, result)
  print(json.dumps(result["figures"], indent=1))
  return 0


# ---------------------------------------------------------------------------
# The workers (one item each; jax is imported only here)
# ---------------------------------------------------------------------------
class Recorder:
  """A worker's result dict, rewritten to its file at every `put` (survives a kill)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.data = {}

  def put(self, **kw):
    self.data.update(kw)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=1))
    tmp.replace(self.path)


def worker_deadline(spec) -> float:
  """When optional work (a larger batch, more rounds) must be done: the parent kills the
  worker at `limit_s`; a margin is kept for what follows the last optional step."""
  return time.monotonic() + 0.85 * spec["limit_s"]


def bench_config(dry_run: bool):
  """The paper DVA config (configs/voxceleb.py), or its tiny stand-in for --dry-run."""
  import configs

  c = configs.get("voxceleb")
  if dry_run:
    c.model.unet.update(DRY_RUN_UNET)
    c.data.image_size = DRY_RUN_UNET["image_size"]
  return c


def peak_bytes() -> tuple:
  """(the process's peak device bytes, where the figure comes from)."""
  import resource

  import jax

  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device.memory_stats()['peak_bytes_in_use']"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host ru_maxrss"


def memory_limit() -> tuple:
  """(bytes the device may hold, source): the allocator's limit, or half the host RAM."""
  import jax

  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]), "device.memory_stats()['bytes_limit']"
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2, "half the host RAM"


def compiled_costs(compiled) -> dict:
  """XLA's FLOPs and memory analysis of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  fields = dict(
      flops=float(cost.get("flops", float("nan"))),
      temp_bytes=int(mem.temp_size_in_bytes),
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes),
  )
  # Donated state: outputs that alias arguments take no memory of their own.
  fields["program_bytes"] = (
      fields["argument_bytes"] + fields["output_bytes"] - fields["alias_bytes"]
  ) + fields["temp_bytes"]
  return fields


def items_that_fit(points, memory_budget: float, multiple: int, max_items: int) -> int:
  """The largest batch (items) whose program bytes stay under `memory_budget`.

  `points` are (items, temp bytes, program bytes) of compiled programs. Memory is linear in
  the batch: with two batch sizes the line through the last two; with one, all temp bytes
  are taken as per-item (an over-estimate, so the first guess stays on the safe side).
  """
  i1, temp1, prog1 = points[-1]
  per_item, fixed = temp1 / i1, prog1 - temp1
  distinct = [p for p in points if p[0] != i1]
  if distinct:
    i0, _, prog0 = distinct[-1]
    slope = (prog1 - prog0) / (i1 - i0)
    if slope > 0:
      per_item, fixed = slope, prog1 - slope * i1
  n = int((memory_budget - fixed) // max(per_item, 1.0))
  n = n // multiple * multiple
  return max(multiple, min(n, max_items // multiple * multiple))


def random_params(abstract_params, rng):
  """Host-random parameters shaped like `abstract_params`: speed does not depend on values."""
  import jax
  import numpy as np

  return jax.tree.map(
      lambda a: (0.02 * rng.standard_normal(a.shape, dtype=np.float32)).astype(a.dtype),
      abstract_params,
  )


def random_train_state(task, seed=0):
  """`task`'s train state with random params and zero optimizer moments (as Adam starts),
  put in its shardings: no init program to compile."""
  import jax
  import numpy as np

  a = task.abstract_state
  params = random_params(a.params, np.random.default_rng(seed))
  host = a.replace(
      step=np.zeros(a.step.shape, a.step.dtype),
      params=params,
      ema_params=params,
      opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), a.opt_state),
  )
  return jax.device_put(host, task.state_sharding)


def random_batch(items, frames, size, id_dim, lnd_dim, seed=0):
  import numpy as np

  r = np.random.default_rng(seed)
  shape = (items, frames)
  return {
      "image": r.uniform(-1, 1, shape + (size, size, 3)).astype(np.float32),
      "mask": (r.uniform(size=shape + (size, size, 1)) > 0.5).astype(np.float32),
      "z_id": r.standard_normal(shape + (id_dim,)).astype(np.float32),
      "z_lnd": r.uniform(size=shape + (lnd_dim,)).astype(np.float32),
  }


def env_worker(spec, rec):
  import jax
  import jax.numpy as jnp

  rec.put(
      jax=jax.__version__,
      backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()],
      python=sys.version.split()[0],
      default_matmul_precision=str(jax.config.jax_default_matmul_precision),
  )
  if not spec["dry_run"] and jax.default_backend() != "gpu":
    raise SystemExit(
        f"jax has no GPU backend here (backend {jax.default_backend()!r}, devices "
        f"{jax.devices()}): run gpu.sh with a Python whose jax has CUDA (PYTHON=...; "
        "pip install -e '.[cuda]'), or pass --dry-run for the CPU check"
    )
  # The project must import (the train step is DVATask's); fail here, not after a compile.
  import jaxlib

  importlib.import_module("s3jax.training.dva")

  dev = jax.devices()[0]
  limit, source = memory_limit()
  rec.put(
      jaxlib=jaxlib.__version__,
      device_kind=dev.device_kind,
      platform=dev.platform,
      device_count=jax.device_count(),
      memory_limit_bytes=limit,
      memory_limit_source=source,
  )
  n = 256 if spec["dry_run"] else 8192
  ceiling = {}
  for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    reps = 10
    t0 = time.perf_counter()
    out = a
    for _ in range(reps):
      out = mm(a, a)
    jax.block_until_ready(out)
    ceiling[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
  rec.put(matmul_tflops=dict(n=n, precision="default", **ceiling))


def train_worker(spec, rec):
  import jax
  import numpy as np

  from s3jax.models import autoencoder
  from s3jax.training import state as state_lib
  from s3jax.training.dva import DVATask

  deadline = worker_deadline(spec)
  config = bench_config(spec["dry_run"])
  config.model.dtype = spec["dtype"]
  config.model.remat = bool(spec["remat"])
  frames = int(config.data.frames_per_item)
  size = int(config.model.unet.image_size)
  mesh = state_lib.make_mesh(config.mesh)
  multiple = int(mesh.size)  # items are split over every device
  limit, limit_source = memory_limit()
  memory_budget = spec["headroom"] * limit
  rec.put(
      dtype=spec["dtype"],
      remat=bool(spec["remat"]),
      image_size=size,
      frames_per_item=frames,
      memory_limit_bytes=limit,
      memory_limit_source=limit_source,
  )
  # The workdir is never written: no checkpoints or sample grids here.
  task = DVATask(config, mesh, tempfile.gettempdir(), data_iterator=iter([]))
  id_dim, lnd_dim = autoencoder.id_dim(config.model), autoencoder.LND_DIM
  shapes = random_batch(1, frames, size, id_dim, lnd_dim)
  sharding = state_lib.batch_sharding(mesh)
  attempts = []

  def compile_at(items, label):
    abstract = {
        k: jax.ShapeDtypeStruct((items,) + v.shape[1:], v.dtype, sharding=sharding)
        for k, v in shapes.items()
    }
    t0 = time.perf_counter()
    lowered = task.train_step.lower(task.abstract_state, abstract)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    costs = compiled_costs(compiled)
    attempts.append(
        dict(
            label=label,
            items=items,
            images=items * frames,
            lower_s=t1 - t0,
            compile_s=t2 - t1,
            planned_fraction_of_limit=costs["program_bytes"] / limit,
            **costs,
        )
    )
    rec.put(compile_attempts=attempts)
    return compiled

  fixed_items = int(spec["items"] or 0)
  hint = spec.get("bytes_per_item_hint")
  if fixed_items:
    items = fixed_items
  elif hint:
    items = items_that_fit([(1, hint, hint)], memory_budget, multiple, spec["max_items"])
  else:
    items = multiple  # a small first batch: its memory analysis sizes the next
  compiled = compile_at(items, f"items {items}")
  t0 = time.perf_counter()
  state = random_train_state(task)
  jax.block_until_ready(state)
  state_s = time.perf_counter() - t0
  # Search: recompile at the largest batch the memory analyses predict fits, while a compile
  # and a short run still fit in the time left (a smaller batch that fits is kept otherwise).
  run_allowance_s = 2.0 if spec["dry_run"] else 15.0
  search_note = "fixed by --train-items" if fixed_items else "largest predicted to fit"
  while not fixed_items:
    last = attempts[-1]
    points = [(a["items"], a["temp_bytes"], a["program_bytes"]) for a in attempts]
    best = items_that_fit(points, memory_budget, multiple, spec["max_items"])
    fits = last["program_bytes"] <= memory_budget
    if not fits and best >= items:  # the line was wrong: halve
      best = max(multiple, (items // 2) // multiple * multiple)
    if best == items or (fits and best < 1.1 * items):  # fits, and little to gain
      break
    if len(attempts) >= 4:
      search_note = "stopped after 4 compiles"
      break
    one_more = 1.3 * (last["lower_s"] + last["compile_s"]) + run_allowance_s
    if fits and time.monotonic() + one_more > deadline:
      search_note = f"time budget: kept {items} items, {best} predicted to fit"
      break
    items = best
    compiled = compile_at(items, f"items {items}")
  if not fixed_items and attempts[-1]["program_bytes"] > memory_budget:
    raise RuntimeError(f"no batch fits in {memory_budget / 1e9:.1f} GB: {attempts}")

  ooms = []
  while True:
    batch = task.global_batch(random_batch(items, frames, size, id_dim, lnd_dim))
    try:
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)  # first call
      jax.block_until_ready(metrics["loss"])
      first_step_s = time.perf_counter() - t0
      break
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e) or len(ooms) >= 2 or items <= multiple:
        raise
      ooms.append(dict(items=items, error=str(e).splitlines()[0][:300]))
      rec.put(out_of_memory_at_run=ooms)
      items = max(multiple, int(items * 0.75) // multiple * multiple)
      compiled = compile_at(items, f"items {items} after out-of-memory")
      state = random_train_state(task)  # the failed call may have consumed the donated state
  final = attempts[-1]
  rec.put(
      items=items,
      images_per_step=items * frames,
      unet_rows_per_step=2 * items * frames,
      state_s=state_s,
      first_step_s=first_step_s,
      compile_s=final["compile_s"],
      lower_s=final["lower_s"],
      flops_per_step=final["flops"],
      temp_bytes=final["temp_bytes"],
      program_bytes=final["program_bytes"],
      bytes_per_item=final["program_bytes"] / items,
      batch_search=search_note,
      peak_bytes_includes_failed_attempt=bool(ooms),
  )
  # Rounds of back-to-back steps (no host sync inside a round), median over rounds.
  per_round = 3
  rounds = []
  max_rounds = max(2, -(-spec["train_steps"] // per_round))
  while len(rounds) < max_rounds:
    t0 = time.perf_counter()
    for _ in range(per_round):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    rounds.append((time.perf_counter() - t0) / per_round)
    if len(rounds) >= 2 and time.monotonic() + rounds[-1] * per_round > deadline:
      break
  step_s = float(np.median(rounds))
  peak, peak_source = peak_bytes()
  rec.put(
      round_step_s=rounds,
      steps_per_round=per_round,
      median_step_s=step_s,
      images_per_s=items * frames / step_s,
      achieved_tflops=final["flops"] / step_s / 1e12,
      loss=float(metrics["loss"]),
      finite=bool(float(metrics["finite"]) == 1.0),
      peak_bytes=peak,
      peak_bytes_source=peak_source,
  )


def edit_worker(spec, rec):
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from s3jax import diffusion
  from s3jax.models import autoencoder

  deadline = worker_deadline(spec)
  config = bench_config(spec["dry_run"])
  config.model.dtype = spec["dtype"]
  model = autoencoder.make_dva(config.model)
  size = int(config.model.unet.image_size)
  frames, steps = int(spec["edit_frames"]), int(spec["edit_steps"])
  id_dim, lnd_dim = autoencoder.id_dim(config.model), autoencoder.LND_DIM
  rec.put(dtype=spec["dtype"], image_size=size, frames=frames, steps=steps)
  abstract = jax.eval_shape(
      functools.partial(autoencoder.init_params, model, config.model), jax.random.key(0)
  )
  r = np.random.default_rng(0)
  params = jax.device_put(random_params(abstract, r))

  def ddim(params, x, z_id, z_lnd, consts):
    z_face = model.apply({"params": params}, z_id, z_lnd, method="z_face")

    def eps_fn(x, t, z_face):
      return model.apply({"params": params}, x, t, z_face, method="denoise")

    return diffusion.ddim_scan(eps_fn, x, z_face, consts)

  consts = {k: diffusion.ddim_constants(steps, k, pad=True) for k in ("invert", "decode")}
  x0 = jnp.asarray(r.uniform(-1, 1, (frames, size, size, 3)).astype(np.float32))
  z_id = jnp.asarray(r.standard_normal((frames, id_dim)).astype(np.float32))
  z_lnd = jnp.asarray(r.uniform(size=(frames, lnd_dim)).astype(np.float32))
  t0 = time.perf_counter()
  lowered = jax.jit(ddim).lower(params, x0, z_id, z_lnd, consts["decode"])
  t1 = time.perf_counter()
  fn = lowered.compile()
  t2 = time.perf_counter()
  costs = compiled_costs(fn)
  rec.put(
      compile_attempts=[dict(label=f"frames {frames}", lower_s=t1 - t0, compile_s=t2 - t1)],
      compile_s=t2 - t1,
      lower_s=t1 - t0,
      temp_bytes=costs["temp_bytes"],
      program_bytes=costs["program_bytes"],
  )
  dev = {k: jax.device_put(v) for k, v in consts.items()}

  def timed(x, kind):
    t0 = time.perf_counter()
    out = fn(params, x, z_id, z_lnd, dev[kind])
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0

  x_T, first_invert_s = timed(x0, "invert")
  _, decode_s = timed(x_T, "decode")
  invert_s, steady = first_invert_s, False
  if time.monotonic() + 1.2 * first_invert_s < deadline:
    _, invert_s = timed(x0, "invert")
    steady = True
  calls = 2 * steps - 1  # inversion N-1 + decoding N
  total = invert_s + decode_s
  peak, peak_source = peak_bytes()
  rec.put(
      unet_calls_per_frame=calls,
      first_invert_s=first_invert_s,
      invert_s=invert_s,
      decode_s=decode_s,
      invert_is_steady_state=steady,
      frames_per_s=frames / total,
      output_finite=bool(np.isfinite(np.asarray(x_T)).all()),
      peak_bytes=peak,
      peak_bytes_source=peak_source,
  )
  # One UNet call's FLOPs from the lowered forward (no compile); XLA's analysis of the scan
  # counts its body once, not once per step.
  zf = jax.ShapeDtypeStruct((frames, config.model.unet.embed_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((frames,), jnp.int32)

  def denoise(p, x, t, zf):
    return model.apply({"params": p}, x, t, zf, method="denoise")

  unet_flops, source = bench_util.lowered_flops(jax.jit(denoise).lower(params, x0, t, zf))
  rec.put(
      unet_forward_flops_source=source,
      unet_forward_flops_per_frame=unet_flops / frames,
      achieved_tflops=unet_flops * calls / total / 1e12,
  )


def ipfacediff_worker(spec, rec):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from s3jax.sd import clip as sd_clip
  from s3jax.sd import tokenflow as sd_tokenflow
  from s3jax.sd import unet as sd_unet
  from s3jax.sd import vae as sd_vae
  from s3jax.sd.pipeline import StableDiffusion

  if spec["dry_run"]:
    d = pathlib.Path(spec["sd_configs"])
    read = lambda name: json.loads((d / name).read_text())  # noqa: E731
    configs = (
        sd_unet.SDUNetConfig.from_diffusers(read("unet_config.json")),
        sd_vae.VAEConfig.from_diffusers(read("vae_config.json")),
        sd_clip.CLIPTextConfig.from_transformers(read("text_encoder_config.json")),
    )
    run = SD_DRY_RUN
  else:  # SD-1.4's sizes: UNet 320/640/1280/1280 cross 768, the SD VAE, CLIP ViT-L/14 text
    configs = (
        sd_unet.SDUNetConfig(),
        sd_vae.VAEConfig(),
        sd_clip.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768
        ),
    )
    run = SD_RUN
  t0 = time.perf_counter()
  sd = StableDiffusion.random(*configs, tokenizer_dir=spec["sd_tokenizer"])
  sd.dtype = jnp.dtype(spec["dtype"])
  # Params live on the device once (numpy params would be copied over at every call).
  sd.unet_params, sd.vae_params, sd.text_params = jax.device_put(
      (sd.unet_params, sd.vae_params, sd.text_params)
  )
  size, n, b = sd.resolution, run["frames"], run["batch_size"]
  counts = bench_util.tokenflow_unet_evaluations(**run)
  rec.put(
      dtype=spec["dtype"],
      image_size=size,
      random_weights_s=time.perf_counter() - t0,
      unet_params=int(sum(np.size(x) for x in jax.tree.leaves(sd.unet_params))),
      unet_sample_evaluations=counts,
      **run,
  )
  frames = np.random.default_rng(0).uniform(0, 1, (n, size, size, 3)).astype(np.float32)
  settings = dict(
      n_inversion_steps=run["inversion_steps"], n_timesteps=run["steps"], batch_size=b, seed=0
  )
  prompts = ("a man with blonde hair", "a man talking")

  def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0

  # The first call compiles every program (encode, text, inversion scan, edit scan, decode).
  edited, first_s = timed(lambda: sd.edit_video(frames, *prompts, **settings))
  rec.put(first_call_s=first_s, output_finite=bool(np.isfinite(edited).all()))
  _, total_s = timed(lambda: sd.edit_video(frames, *prompts, **settings))
  x0, encode_s = timed(lambda: sd.encode_frames(frames))
  cond = sd.text_embeds([prompts[1]])
  timesteps = sd.scheduler.timesteps(run["steps"])
  _, invert_s = timed(lambda: sd.invert(x0, cond, run["inversion_steps"], timesteps))
  _, decode_s = timed(lambda: sd.decode_latents(x0))
  edit_s = max(total_s - invert_s - encode_s - decode_s, 0.0)
  per_inversion_eval = invert_s / counts["inversion"]
  per_edit_eval = edit_s / counts["edit"]
  ref = bench_util.tokenflow_unet_evaluations(**SD_REFERENCE)
  vae_per_frame = (encode_s + decode_s) / n
  extrapolated = dict(
      inversion=ref["inversion"] * per_inversion_eval,
      edit=ref["edit"] * per_edit_eval,
      vae=SD_REFERENCE["frames"] * vae_per_frame,
  )
  extrapolated["total"] = sum(extrapolated.values())
  peak, peak_source = peak_bytes()
  rec.put(
      compile_s=first_s - total_s,
      compile_attempts=[
          dict(label="whole edit (first call - second)", lower_s=0.0, compile_s=first_s - total_s)
      ],
      total_s=total_s,
      frames_per_s=n / total_s,
      encode_s=encode_s,
      invert_s=invert_s,
      edit_s=edit_s,
      decode_s=decode_s,
      ms_per_unet_eval=dict(inversion=1e3 * per_inversion_eval, edit=1e3 * per_edit_eval),
      reference_defaults=dict(SD_REFERENCE, unet_sample_evaluations=ref),
      reference_defaults_extrapolated_s=extrapolated["total"],
      reference_defaults_extrapolated=extrapolated,
      peak_bytes=peak,
      peak_bytes_source=peak_source,
  )
  # MFU: the plain UNet's FLOPs per sample x the inversion's evaluations / its time. Where the
  # backend has no analysis of the lowered program, benchmarks/ipfacediff.py's recorded figure
  # for the SD-1.4 UNet at 64x64 latents stands in (compiling a UNet here costs ~30 s).
  lat = size // sd.vae_scale_factor
  apply = jax.jit(sd_tokenflow.unet_apply(sd.unet_module()))
  lowered = apply.lower(
      jax.eval_shape(lambda: sd.unet_params),
      jax.ShapeDtypeStruct((1, lat, lat, 4), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((1, 77, configs[2].hidden_size), jnp.float32),
  )
  per_sample_flops, source = bench_util.lowered_flops(lowered, compile_if_missing=False)
  recorded = ROOT / "benchmarks" / "results" / "ipfacediff.json"
  if per_sample_flops is None and not spec["dry_run"] and recorded.exists():
    projection = json.loads(recorded.read_text())["h100_projection"]
    per_sample_flops = projection["flops"]["unet_plain_per_sample"]
    source = f"{recorded.relative_to(ROOT)} (h100_projection.flops.unet_plain_per_sample)"
  if per_sample_flops is not None:
    rec.put(
        unet_flops_per_sample=per_sample_flops,
        unet_flops_source=source,
        achieved_tflops=per_sample_flops * counts["inversion"] / invert_s / 1e12,
        achieved_tflops_basis="inversion: plain-UNet FLOPs x sample-evaluations / inversion time",
    )


WORKERS = {
    "env": env_worker,
    "train": train_worker,
    "edit": edit_worker,
    "ipfacediff": ipfacediff_worker,
}


def worker(spec: dict) -> int:
  rec = Recorder(spec["result_file"])
  try:
    if spec.get("dtype") == "float32" and spec.get("f32_precision") == "highest":
      import jax

      jax.config.update("jax_default_matmul_precision", "highest")
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    WORKERS[spec["kind"]](spec, rec)
  except (Exception, SystemExit) as e:  # recorded for the parent, then the worker fails
    rec.put(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    print(f"[gpu_bench] {spec['item']} failed: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


def main(argv=None) -> int:
  args = parse(argv)
  if args.worker:
    return worker(json.loads(args.worker))
  return parent(args)


if __name__ == "__main__":
  sys.exit(main())
