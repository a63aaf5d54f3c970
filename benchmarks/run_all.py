"""Runs every benchmark in benchmarks/ and writes one summary.

    python benchmarks/run_all.py [--timeout 7200] [--only model_forward,edit]
                                 [--args edit="--frames 2"] [--collect-only]

Each `benchmarks/<name>.py` (every script but this one) runs as
`python benchmarks/<name>.py --out benchmarks/results/<name>.json [extra args]`, one at a
time, under a per-benchmark timeout. A benchmark that fails, times out or writes no JSON
is recorded with its exit code and the tail of its stderr; the others still run.
`--collect-only` runs nothing and summarises the JSON files already in results/ (the
command recorded is the one stored in each file when it has one).

Writes
  benchmarks/results/summary.json  every numeric figure of every benchmark (flattened
                                   key paths) with the command that produced it, its
                                   status, wall time and the machine load;
  benchmarks/results/summary.md    a short markdown performance table (headline figures:
                                   rates, GFLOP/s, seconds per frame, speedups) for the
                                   README, and each benchmark's stated baseline.

A benchmark whose JSON has a `headline` object ({label: number}) gets exactly those figures
in the table, under its own labels (which name the baseline); the others get the figures whose
key names look like rates, times or ratios. A `baseline` string is quoted under the table, so
no speed-up appears without what it is measured against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results"
SELF = pathlib.Path(__file__).resolve().name
# Order: cheap first; unknown new scripts run after these, alphabetically.
ORDER = ("model_forward", "input_pipeline", "train_step", "edit")
HEADLINE = re.compile(
    r"(per_s|gflops|per_frame|_over_|speedup|frames_s|fps|minutes|hours|"
    r"seconds|_s$|rel_diff|tflop)",
    re.I,
)
NOT_HEADLINE = re.compile(r"(^|\.)(config|threads|versions|machine|args)(\.|$)|_all$|rates$")


# Needs a GPU (benchmarks/gpu.sh runs it; its --dry-run is tested in CI).
GPU_ONLY = ("gpu_bench.py",)


def discover(only=None) -> list[str]:
  # A benchmark is a script: helper modules (no __main__ block) are not run.
  names = sorted(
      p.stem
      for p in BENCH_DIR.glob("*.py")
      if p.name != SELF
      and p.name not in GPU_ONLY
      and not p.name.startswith("_")
      and "__main__" in p.read_text(errors="replace")
  )
  names = sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
  if only:
    unknown = set(only) - set(names)
    if unknown:
      raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; found {names}")
    names = [n for n in names if n in only]
  return names


def flatten(obj, prefix="") -> dict:
  """Numeric leaves as {'a.b[0].c': value}; lists of numbers (per-repeat samples) skipped."""
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  elif isinstance(obj, list):
    if obj and all(isinstance(v, dict) for v in obj):
      for i, v in enumerate(obj):
        label = v.get("name") if isinstance(v.get("name"), str) else str(i)
        out.update(flatten(v, f"{prefix}[{label}]"))
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    if isinstance(obj, float) and not math.isfinite(obj):
      return out
    out[prefix] = obj
  return out


def headline(figures: dict) -> dict:
  return {
      k: v
      for k, v in figures.items()
      if HEADLINE.search(k.rsplit(".", 1)[-1]) and not NOT_HEADLINE.search(k)
  }


def _loadavg():
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def run_one(name: str, timeout: float, extra: str) -> dict:
  out = RESULTS / f"{name}.json"
  cmd = [sys.executable, f"benchmarks/{name}.py", "--out", str(out.relative_to(ROOT))]
  cmd += shlex.split(extra or "")
  before = out.stat().st_mtime if out.exists() else None
  rec = {"name": name, "command": shlex.join(["python"] + cmd[1:]), "loadavg_before": _loadavg()}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    rec["returncode"] = proc.returncode
    rec["stderr_tail"] = proc.stderr[-2000:] if proc.returncode else ""
    status = "ok" if proc.returncode == 0 else "failed"
  except subprocess.TimeoutExpired as e:
    status = "timeout"
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    rec["stderr_tail"] = err[-2000:]
  rec["wall_s"] = round(time.perf_counter() - t0, 1)
  rec["loadavg_after"] = _loadavg()
  fresh = out.exists() and (before is None or out.stat().st_mtime > before)
  if status == "ok" and not fresh:
    status = "failed"
    rec["error"] = f"exited 0 but did not write {out.relative_to(ROOT)}"
  rec["status"] = status
  if fresh:
    rec.update(_read(out))
  return rec


def _read(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return {"error": f"unreadable {path.name}: {e}"}
  figs = flatten(data)
  own = data.get("headline")
  rec = {
      "results_file": str(path.relative_to(ROOT)),
      "figures": figs,
      "headline": flatten(own) if isinstance(own, dict) else headline(figs),
  }
  for k in (
      "command",
      "when",
      "notes",
      "note",
      "contention",
      "warning",
      "baseline",
      "loadavg_before",
  ):
    if k in data:
      rec[f"reported_{k}"] = data[k]
  return rec


def collect_one(name: str) -> list:
  """Records of `name`'s results: `<name>.json`, else its variants `<name>_<variant>.json`
  (a benchmark run with other arguments and `--out`)."""
  out = RESULTS / f"{name}.json"
  files = [out] if out.exists() else sorted(RESULTS.glob(f"{name}_*.json"))
  if not files:
    return [
        {
            "name": name,
            "status": "missing",
            "command": f"python benchmarks/{name}.py --out {out.relative_to(ROOT)}",
        }
    ]
  records = []
  for f in files:
    rec = {"name": f.stem, "status": "ok (collected)"}
    rec.update(_read(f))
    rec["command"] = rec.get("reported_command") or f"python benchmarks/{name}.py"
    records.append(rec)
  return records


def _fmt(v) -> str:
  if isinstance(v, int):
    return str(v)
  a = abs(v)
  if a >= 100:
    return f"{v:.0f}"
  if a >= 1:
    return f"{v:.2f}"
  if a >= 1e-3:
    return f"{v:.3f}"
  return f"{v:.1e}"


def markdown(summary: dict) -> str:
  lines = [
      "# Performance summary",
      "",
      f"Generated by `python benchmarks/run_all.py` on {summary['when']} "
      f"({summary['machine']['cpus']} CPUs, {summary['machine']['platform']}). "
      "Full figures and commands: `benchmarks/results/summary.json`.",
      "",
      "| benchmark | figure | value | command |",
      "|---|---|---|---|",
  ]
  for b in summary["benchmarks"]:
    cmd = f"`{b.get('command', '')}`"
    if not b.get("headline"):
      lines.append(f"| {b['name']} | *{b['status']}* | – | {cmd} |")
      continue
    for k, v in b["headline"].items():
      lines.append(f"| {b['name']} | {k} | {_fmt(v)} | {cmd} |")
  baselines = [b for b in summary["benchmarks"] if b.get("reported_baseline")]
  if baselines:
    lines += ["", "Baselines:"]
    lines += [f"- {b['name']}: {b['reported_baseline']}" for b in baselines]
  bad = [b for b in summary["benchmarks"] if not str(b["status"]).startswith("ok")]
  if bad:
    lines += [
        "",
        "Not measured: "
        + "; ".join(
            f"{b['name']} ({b['status']}{': ' + b['error'] if b.get('error') else ''})" for b in bad
        ),
    ]
  loads = [
      b.get("loadavg_before") or b.get("reported_loadavg_before") for b in summary["benchmarks"]
  ]
  loads = [l for l in loads if l]
  if loads and max(l[0] for l in loads) > summary["machine"]["cpus"]:
    lines += [
        "",
        f"Note: the 1-minute load average exceeded the CPU count during these runs "
        f"(max {max(l[0] for l in loads)}): the machine was shared, so rates are lower "
        "bounds.",
    ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--timeout",
      type=float,
      default=7200,
      help="seconds per benchmark (edit.py at T=1000: ~35 min idle)",
  )
  p.add_argument("--only", default="", help="comma-separated benchmark names")
  p.add_argument(
      "--args",
      action="append",
      default=[],
      metavar='NAME="ARGS"',
      help='extra arguments for one benchmark, e.g. --args edit="--frames 2"',
  )
  p.add_argument(
      "--collect-only",
      action="store_true",
      help="run nothing; summarise the JSON files already in results/",
  )
  p.add_argument("--out", default=str(RESULTS / "summary.json"))
  a = p.parse_args(argv)
  extra = {}
  for item in a.args:
    name, sep, val = item.partition("=")
    if not sep:
      raise SystemExit(f"--args expects NAME=ARGS, got {item!r}")
    extra[name] = val
  only = [n for n in a.only.split(",") if n]
  names = discover(only)
  RESULTS.mkdir(parents=True, exist_ok=True)
  records = []
  for name in names:
    if a.collect_only:
      records.extend(collect_one(name))
      continue
    print(f"[run_all] {name} ...", flush=True)
    rec = run_one(name, a.timeout, extra.get(name, ""))
    print(f"[run_all] {name}: {rec['status']} in {rec['wall_s']}s", flush=True)
    records.append(rec)
  # GPU-only benchmarks never run here; the results a GPU machine wrote are summarised.
  for gpu_name in [] if only else [pathlib.Path(n).stem for n in GPU_ONLY]:
    records.extend(r for r in collect_one(gpu_name) if r["status"] != "missing")
  summary = {
      "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "command": shlex.join(
          ["python", "benchmarks/run_all.py"] + (argv if argv is not None else sys.argv[1:])
      ),
      "machine": {
          "cpus": os.cpu_count(),
          "platform": platform.platform(),
          "python": platform.python_version(),
      },
      "benchmarks": records,
  }
  out = pathlib.Path(a.out)
  out.write_text(json.dumps(summary, indent=1))
  md = markdown(summary)
  out.with_suffix(".md").write_text(md)
  print(md)
  return 0 if all(str(r["status"]).startswith("ok") for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
