"""benchmarks/gpu.sh: the dry run end to end on the CPU, the budget guard, the batch sizing."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_bench  # noqa: E402  (benchmarks/gpu_bench.py)


def run_gpu_sh(*args, timeout):
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run(
      ["bash", str(REPO / "benchmarks" / "gpu.sh"), *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
  out = tmp_path / "gpu.json"
  # A generous budget: CI's 2 cores may be loaded; the guard itself is tested below.
  res = run_gpu_sh("--dry-run", "--out", str(out), "--budget-s", "1500", timeout=1600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  check_dry_run(json.loads(out.read_text()))


def check_dry_run(r):
  assert r["status"] == "complete" and r["skipped"] == [], r["skipped"]
  assert r["dry_run"] is True and r["device"]["platform"] == "cpu"
  assert "--xla_backend_optimization_level=0" in r["env_vars"]["XLA_FLAGS"]
  assert positive(r["device"]["matmul_tflops"]["bfloat16"])
  assert positive(r["device"]["matmul_tflops"]["float32"])
  assert set(r["train"]) == {"bfloat16", "float32"}
  for dtype, run in r["train"].items():
    for key in (
        "images_per_s",
        "images_per_step",
        "median_step_s",
        "flops_per_step",
        "achieved_tflops",
        "mfu",
        "compile_s",
        "lower_s",
        "temp_bytes",
        "program_bytes",
        "peak_bytes",
    ):
      assert positive(run[key]), (dtype, key, run.get(key))
    assert run["dtype"] == dtype and run["remat"] is False and run["finite"] is True
    assert run["mfu_peak"]["name"] == {"bfloat16": "bfloat16", "float32": "tf32"}[dtype]
    assert run["images_per_step"] <= 2 * r["settings"]["max_items"]
  assert positive(r["train"]["float32"]["mfu_vs_fp32_peak"])
  assert set(r["edit"]) == {"bfloat16", "float32"}
  for dtype, run in r["edit"].items():
    for key in ("frames_per_s", "compile_s", "achieved_tflops", "mfu", "peak_bytes"):
      assert positive(run[key]), (dtype, key, run.get(key))
    assert run["unet_calls_per_frame"] == 2 * r["settings"]["edit_steps"] - 1
    assert run["output_finite"] is True
  sd = r["ipfacediff"]  # the IP-FaceDiff edit at the golden tiny configs, extrapolated
  for key in ("frames_per_s", "compile_s", "invert_s", "edit_s", "achieved_tflops", "mfu"):
    assert positive(sd[key]), (key, sd.get(key))
  assert sd["output_finite"] is True and sd["dtype"] == "bfloat16"
  assert sd["unet_sample_evaluations"] == gpu_bench.bench_util.tokenflow_unet_evaluations(
      **gpu_bench.SD_DRY_RUN
  )
  parts = sd["reference_defaults_extrapolated"]
  assert sd["reference_defaults_extrapolated_s"] == pytest.approx(
      parts["inversion"] + parts["edit"] + parts["vae"]
  )
  # 500 x 40 inversion evaluations vs 4 x 16 measured: the extrapolation scales by 312.5.
  assert parts["inversion"] == pytest.approx(sd["invert_s"] * 20000 / 64)
  remat = r["remat"]
  assert remat["run"]["remat"] is True
  assert remat["images_per_step"] == r["train"]["bfloat16"]["images_per_step"]
  for key in ("peak_bytes_ratio", "temp_bytes_ratio", "flops_ratio", "images_per_s_ratio"):
    assert positive(remat[key]), (key, remat.get(key))
  assert positive(remat["run"]["mfu"]) and positive(remat["run"]["hfu"])
  # Every compiled program has its compile time; the headline figures are all there.
  names = " ".join(r["compile_times_s"])
  for program in (
      "train_bfloat16",
      "train_float32",
      "train_bfloat16_remat",
      "edit_float32",
      "ipfacediff_bfloat16",
  ):
    assert program in names, names
  assert all(positive(v["compile_s"]) for v in r["compile_times_s"].values())
  assert all(v is None or positive(v) for v in r["figures"].values()), r["figures"]
  assert positive(r["figures"]["train_bfloat16_mfu"])
  assert positive(r["figures"]["edit_float32_frames_per_s"])
  # The labelled figures benchmarks/run_all.py puts in its table, and what they are against.
  assert len(r["headline"]) == 10 and all(positive(v) for v in r["headline"].values())
  assert "MFU against its dense peak" in r["baseline"]
  assert r["elapsed_s"] < r["budget_s"]


def test_budget_guard_skips_instead_of_overrunning(tmp_path):
  out = tmp_path / "gpu.json"
  res = run_gpu_sh("--dry-run", "--out", str(out), "--budget-s", "1", timeout=120)
  assert res.returncode == 2
  r = json.loads(out.read_text())
  assert r["status"] == "failed"
  assert r["skipped"] == [dict(item="env", reason="time budget: 1 s left")]
  assert r["train"] == {} and r["edit"] == {}


def test_without_a_gpu_it_says_so(tmp_path):
  out = tmp_path / "gpu.json"
  res = run_gpu_sh("--items", "env", "--out", str(out), timeout=300)
  assert res.returncode == 2
  assert "jax has no GPU backend" in res.stderr
  r = json.loads(out.read_text())
  assert r["status"] == "failed" and "--dry-run" in r["device"]["error"]


def test_budget_shares_and_minimums():
  # An item gets its share of the budget, never more than is left, nothing under its minimum.
  assert gpu_bench.plan_item(0.4, 90, 450, 400, dry_run=False) == 0.4 * 450
  assert gpu_bench.plan_item(0.4, 90, 450, 100, dry_run=False) == 100
  assert gpu_bench.plan_item(0.4, 90, 450, 80, dry_run=False) is None
  assert gpu_bench.plan_item(0.4, 90, 450, 80, dry_run=True) == 80


def test_items_that_fit():
  gb = 1e9
  # One compile: all temp bytes taken as per-item (safe side): (100 - 4) / 10 -> 9.
  assert gpu_bench.items_that_fit([(1, 10 * gb, 14 * gb)], 100 * gb, 1, 256) == 9
  # Two compiles: the line through them (2 GB fixed + 3 GB per item) -> 32, rounded to 4s.
  points = [(1, 3 * gb, 5 * gb), (9, 27 * gb, 29 * gb)]
  assert gpu_bench.items_that_fit(points, 100 * gb, 1, 256) == 32
  assert gpu_bench.items_that_fit(points, 100 * gb, 5, 256) == 30
  assert gpu_bench.items_that_fit(points, 100 * gb, 1, 16) == 16
  # Never below one batch per device, even when nothing fits.
  assert gpu_bench.items_that_fit(points, 1 * gb, 4, 256) == 4


def test_peaks_by_device_kind():
  def bf16(kind):
    return gpu_bench.peaks_for(kind, dry_run=False)["bfloat16"]

  assert bf16("NVIDIA H200") == bf16("NVIDIA H100 80GB HBM3") == 989.4
  assert bf16("NVIDIA H100 PCIe") == 756.5
  assert bf16("NVIDIA H200 NVL") == bf16("NVIDIA H100 NVL") == 835.5
  assert gpu_bench.peaks_for("NVIDIA GH200 480GB", dry_run=False)["key"] == "GH200"
  assert bf16("NVIDIA A100-SXM4-80GB") == 312.0
  assert bf16("NVIDIA L40S") == 362.1 and bf16("NVIDIA L4") == 121.0
  assert gpu_bench.peaks_for("NVIDIA H200", dry_run=False)["float32"] == 67.0
  assert bf16("Tesla V100-SXM2-16GB") is None
  run = dict(achieved_tflops=49.47)
  gpu_bench.add_mfu(run, gpu_bench.peaks_for("NVIDIA H200", False), "float32", "default")
  assert run["mfu_peak"]["name"] == "tf32" and run["mfu"] == pytest.approx(0.1)
  assert run["mfu_vs_fp32_peak"] == pytest.approx(49.47 / 67)


def test_lowered_flops_falls_back_to_the_compiled_analysis():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4)))
  flops, source = gpu_bench.bench_util.lowered_flops(lowered)
  assert flops == 2 * 8 * 16 * 4 and source == "lowered.cost_analysis()"

  class NoLoweredAnalysis:  # what jax 0.11's GPU backend gives: None before compiling

    def cost_analysis(self):
      return None

    def compile(self):
      return lowered.compile()

  flops, source = gpu_bench.bench_util.lowered_flops(NoLoweredAnalysis())
  assert flops == 2 * 8 * 16 * 4 and source == "compiled.cost_analysis()"
  flops, source = gpu_bench.bench_util.lowered_flops(NoLoweredAnalysis(), compile_if_missing=False)
  assert flops is None and "no cost analysis" in source


def test_run_all_summarises_the_gpu_results(tmp_path):
  import run_all  # noqa: PLC0415  (benchmarks/run_all.py)

  out = tmp_path / "summary.json"
  assert run_all.main(["--collect-only", "--out", str(out)]) == 0
  names = {r["name"] for r in json.loads(out.read_text())["benchmarks"]}
  gpu_files = sorted(p.stem for p in (REPO / "benchmarks" / "results").glob("gpu_bench*.json"))
  assert gpu_files and set(gpu_files) <= names, (gpu_files, names)
  assert "ipfacediff" in names and "gpu_bench_h200_ipfacediff" in out.with_suffix(".md").read_text()
  # --only asks for named benchmarks: the GPU results are not added to them.
  assert run_all.main(["--collect-only", "--only", "blend", "--out", str(out)]) == 0
  assert {r["name"] for r in json.loads(out.read_text())["benchmarks"]} == {"blend"}
