"""The CPU ceiling of the DVA train step: XLA's 3x3 convolutions against PyTorch's (oneDNN).

    python benchmarks/conv_ceiling.py [--rounds 5] [--min-time 0.2] [--threads 2]
                                      [--skip-step] [--out ...]

1. Microbenchmark: one 3x3 convolution at each resolution of the mid config (batch 8 = 4
   images x 2 noises; 64 px/64 ch, 32 px/128 ch, 16 px/128 ch, 8 px/256 ch), forward, input
   gradient (dgrad) and weight gradient (wgrad). XLA in NHWC/HWIO (the model's layout) and
   NCHW/OIHW dimension numbers, each with YNNPACK (this XLA's default) and with Eigen
   (`xla_cpu_experimental_ynn_fusion_type=""`); PyTorch in NCHW and channels_last. GFLOP/s
   use XLA's FLOP count of the forward convolution for all three passes.
2. Attribution (unless --skip-step): the jitted mid-config train step, compiled with YNNPACK
   and with Eigen, and the twin's step take turns (interleaved rounds); then one profiled run
   of each splits its time by what the ops compute. JAX: the thunk executor's trace events,
   each HLO instruction put in a category (convolution, dot, reduce, data movement,
   elementwise) from the opcodes it contains; PyTorch: the profiler's self times
   (convolution, dot, group norm, other). From the two splits: the JAX step with the twin's
   convolution time, and with the twin's time for all else; 1.0x needs both. Run it with
   --threads 1 on a shared machine: one thread per side makes the splits partition the wall
   time, and a single-threaded step is the least disturbed by other processes.
All timings interleave (the fns of one row take turns, medians over rounds).
Writes benchmarks/results/conv_ceiling.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "configs"))

import bench_util  # noqa: E402


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--min-time", type=float, default=0.2, help="seconds per fn per round")
  p.add_argument("--threads", type=int, default=2, help="CPUs of this process, torch threads")
  p.add_argument("--skip-step", action="store_true", help="microbenchmark only")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "conv_ceiling.json"))
  return p.parse_args()


if __name__ == "__main__":
  ARGS = parse()
  bench_util.pin_cpu_threads(ARGS.threads)

import jax  # noqa: E402
import jax.extend.core as jex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_step  # noqa: E402  benchmarks/train_step.py
from bench_util import contended, interleaved_rounds, run_info, write_result  # noqa: E402

BATCH = 2 * train_step.ITEMS * train_step.FRAMES  # two noisy copies of each image
# (resolution, channels) of the mid config's levels: 64 * channel_mult (1, 2, 2, 4).
LEVELS = ((64, 64), (32, 128), (16, 128), (8, 256))
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
XLA_BACKENDS = (("ynnpack", {}), ("eigen", EIGEN))
XLA_LAYOUTS = {"nhwc": ("NHWC", "HWIO", "NHWC"), "nchw": ("NCHW", "OIHW", "NCHW")}


def blocking(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def compiled(fn, args, options):
  return jax.jit(fn).lower(*args).compile(compiler_options=options or None)


def xla_conv_passes(size, ch, layout, options, r):
  """Blocking fwd, dgrad and wgrad callables of one 3x3 conv, and XLA's FLOPs of the fwd."""
  dn = XLA_LAYOUTS[layout]
  if layout == "nhwc":
    x_shape, w_shape = (BATCH, size, size, ch), (3, 3, ch, ch)
  else:
    x_shape, w_shape = (BATCH, ch, size, size), (ch, ch, 3, 3)
  x = jnp.asarray(r.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(0.05 * r.standard_normal(w_shape), jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  ct = jnp.asarray(r.standard_normal(x_shape), jnp.float32)
  fwd = compiled(conv, (x, w), options)
  dgrad = compiled(lambda x, w, ct: jax.vjp(lambda x: conv(x, w), x)[1](ct)[0], (x, w, ct), options)
  wgrad = compiled(lambda x, w, ct: jax.vjp(lambda w: conv(x, w), w)[1](ct)[0], (x, w, ct), options)
  cost = fwd.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  fns = dict(
      fwd=blocking(fwd, x, w), dgrad=blocking(dgrad, x, w, ct), wgrad=blocking(wgrad, x, w, ct)
  )
  return fns, float(cost["flops"])


def torch_conv_passes(size, ch, channels_last, r):
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.from_numpy(r.standard_normal((BATCH, ch, size, size)).astype(np.float32))
  w = torch.from_numpy((0.05 * r.standard_normal((ch, ch, 3, 3))).astype(np.float32))
  ct = torch.from_numpy(r.standard_normal((BATCH, ch, size, size)).astype(np.float32))
  x, w, ct = (t.contiguous(memory_format=fmt) for t in (x, w, ct))

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        ct, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
    )

  def fwd():
    return torch.nn.functional.conv2d(x, w, padding=1)

  return dict(fwd=fwd, dgrad=backward([True, False, False]), wgrad=backward([False, True, False]))


def microbenchmark(rounds, min_time):
  rows = []
  r = np.random.default_rng(0)
  for size, ch in LEVELS:
    variants, flops = {}, None
    for layout in XLA_LAYOUTS:
      for backend, options in XLA_BACKENDS:
        variants[f"xla_{layout}_{backend}"], flops = xla_conv_passes(size, ch, layout, options, r)
    for channels_last in (False, True):
      name = "torch_channels_last" if channels_last else "torch_nchw"
      variants[name] = torch_conv_passes(size, ch, channels_last, r)
    with torch.no_grad():
      for p in ("fwd", "dgrad", "wgrad"):
        t = interleaved_rounds({v: fns[p] for v, fns in variants.items()}, rounds, min_time)
        row = dict(size=size, channels=ch, batch=BATCH, op=p, gflop=flops / 1e9)
        for unit, key in (("gflops", "median_s"), ("gflops_per_cpu_s", "median_cpu_s")):
          rates = {v: flops / t[v][key] / 1e9 for v in t}
          row[unit] = rates
          row[f"{unit}_xla_best_over_torch_best"] = max(
              x for v, x in rates.items() if v.startswith("xla")
          ) / max(x for v, x in rates.items() if v.startswith("torch"))
        rows.append(row)
        print(
            f"{size:3d}px {ch:3d}ch {p:5s} "
            + " ".join(f"{v}={x:.0f}" for v, x in row["gflops"].items())
            + f"  xla/torch {row['gflops_xla_best_over_torch_best']:.2f}"
            + f" (per CPU s {row['gflops_per_cpu_s_xla_best_over_torch_best']:.2f})"
        )
  return rows


def step_convolutions(jaxpr):
  """Every conv_general_dilated of a jaxpr, sub-jaxprs included, as hashable signatures."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive is jax.lax.conv_general_dilated_p:
      avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
      out.append((avals, tuple(sorted(eqn.params.items(), key=lambda kv: kv[0]))))
    for sub in jex.jaxprs_in_params(eqn.params):
      out += step_convolutions(sub)
  return out


DATA_MOVEMENT = {
    "bitcast",
    "broadcast",
    "concatenate",
    "constant",
    "copy",
    "dynamic-slice",
    "dynamic-update-slice",
    "get-tuple-element",
    "pad",
    "parameter",
    "reshape",
    "reverse",
    "slice",
    "transpose",
    "tuple",
}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?(?<![\w\[])([a-z][a-z0-9\-]*)\(")


def hlo_categories(hlo_text):
  """Instruction name -> what it computes (convolution, dot, reduce, data movement, elementwise),
  from the opcodes it and the computations it calls contain."""
  ops, calls, current = collections.defaultdict(set), collections.defaultdict(set), None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      continue
    m = INSTRUCTION.match(line)
    if m and current:
      ops[current].add(m.group(2))
      ops[m.group(1)].add(m.group(2))
      for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
        calls[m.group(1)].add(callee)

  def all_ops(name, seen):
    out = set(ops.get(name, ()))
    for callee in calls.get(name, ()):
      if callee not in seen:
        seen.add(callee)
        out |= all_ops(callee, seen)
    return out

  cats = {}
  for name in list(ops):
    o = all_ops(name, {name})
    if "convolution" in o:
      cats[name] = "convolution"
    elif "dot" in o:
      cats[name] = "dot"
    elif o & {"reduce", "reduce-window"}:
      cats[name] = "reduce"
    elif o <= DATA_MOVEMENT:
      cats[name] = "data movement"
    else:
      cats[name] = "elementwise"
  return cats


def xla_profile(step, steps=2):
  """Busy seconds per step by category, from the thunk executor's trace events."""
  cats = hlo_categories(step.compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(
        str(sorted(pathlib.Path(tmp).rglob("*.xplane.pb"))[-1])
    )
  busy = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        op = dict(e.stats).get("hlo_op")
        if op is not None:
          busy[cats.get(op, "other")] += e.duration_ns / 1e9 / steps
  total = sum(busy.values())
  # Eigen's convolution thunks run asynchronously on its own pool: their events cover only the
  # dispatch, so their time shows up here (at one thread, nothing else overlaps).
  return dict(
      busy_s=dict(busy),
      busy_total_s=total,
      wall_s=wall / steps,
      unattributed_s=max(0.0, wall / steps - total),
  )


def torch_category(key):
  if "convolution" in key:
    return "convolution"
  if key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
    return "dot"
  if "group_norm" in key:
    return "group norm"
  return "other"


def torch_profile(step, steps=2):
  """Seconds per twin step by category (self times of the profiled ops, which partition it)."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    wall = time.perf_counter() - t0
  busy = collections.Counter()
  for e in prof.key_averages():
    busy[torch_category(e.key)] += e.self_cpu_time_total / 1e6 / steps
  return dict(busy_s=dict(busy), busy_total_s=sum(busy.values()), wall_s=wall / steps)


def attribution(rounds, workdir):
  """The mid-config train step's time by category: JAX (YNNPACK, Eigen) vs the twin."""
  config = train_step.mid_config()
  task, holder = train_step.new_task(config, workdir)
  params = jax.device_get(holder[0].params)
  batch = task.global_batch(train_step.synthetic_batch(config.data.image_size, 128))
  jaxpr = jax.make_jaxpr(task.train_step)(holder[0], batch)
  inventory = collections.Counter(step_convolutions(jaxpr.jaxpr))
  fns = {}
  for name, options in XLA_BACKENDS:
    fns[f"jax_{name}"] = train_step.JaxTrainStep(
        task, holder, compiler_options=dict(options, xla_cpu_enable_xprof_traceme=True)
    )
  fns["torch_twin"] = train_step.torch_twin_step(config, params)
  timing = interleaved_rounds(fns, rounds)
  profiles = {n: xla_profile(fns[n]) for n in fns if n.startswith("jax")}
  profiles["torch_twin"] = torch_profile(fns["torch_twin"])
  twin_s = timing["torch_twin"]["median_s"]
  out = dict(
      convolutions_per_step=sum(inventory.values()),
      distinct_convolutions=len(inventory),
      step_gflop=train_step.step_cost(fns["jax_ynnpack"].compiled)["flops"] / 1e9,
      step_s={n: t["median_s"] for n, t in timing.items()},
      step_cpu_s={n: t["median_cpu_s"] for n, t in timing.items()},
      over_torch_twin={n: twin_s / t["median_s"] for n, t in timing.items()},
      profiles=profiles,
  )
  twin = profiles["torch_twin"]
  twin_conv = twin["busy_s"].get("convolution", 0.0)
  for n, prof in profiles.items():
    if n.startswith("jax"):
      conv = prof["busy_s"].get("convolution", 0.0) + prof["unattributed_s"]
      prof["convolution_incl_unattributed_s"] = conv
      # From the profiles (wall per step): the JAX step with the twin's convolution time, and
      # with the twin's time for everything else; 1.0x needs both halves at the twin's speed.
      prof["with_twin_convs_over_twin"] = twin["wall_s"] / (prof["wall_s"] - conv + twin_conv)
      prof["with_twin_rest_over_twin"] = twin["wall_s"] / (conv + twin["wall_s"] - twin_conv)
  return out


def main():
  train_step.set_torch_threads(ARGS.threads)
  info = run_info(ARGS.threads)
  rows = microbenchmark(ARGS.rounds, ARGS.min_time)
  step = None
  if not ARGS.skip_step:
    with tempfile.TemporaryDirectory() as tmp:
      step = attribution(ARGS.rounds, tmp)
    print(f"step s {step['step_s']}; x twin {step['over_torch_twin']}")
    for n, prof in step["profiles"].items():
      print(
          f"{n}: wall {prof['wall_s']:.2f}s busy {prof['busy_total_s']:.2f}s "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof["busy_s"].items()))
      )
  result = dict(
      **info,
      microbenchmark=rows,
      microbenchmark_unit=(
          "GFLOP/s of wall time and per CPU second (XLA's FLOP count of the forward conv, for"
          " every pass)"
      ),
      step_attribution=step,
      statistic="medians over interleaved rounds; ratios from the same run",
      contended=contended(info, ARGS.threads),
      loadavg_after=os.getloadavg(),
  )
  write_result(ARGS.out, result)


if __name__ == "__main__":
  main()
