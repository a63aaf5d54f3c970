"""The CPU ceiling of the DVA train step: XLA's 3x3 convolutions against PyTorch's (oneDNN).

    python benchmarks/conv_ceiling.py [--rounds 5] [--min-time 0.2] [--threads 2]
                                      [--skip-step] [--out ...]

1. Microbenchmark: one 3x3 convolution at each resolution of the mid config (batch 8 = 4
   images x 2 noises; 64 px/64 ch, 32 px/128 ch, 16 px/128 ch, 8 px/256 ch), forward, input
   gradient (dgrad) and weight gradient (wgrad). XLA in NHWC/HWIO (the model's layout) and
   NCHW/OIHW dimension numbers, each with YNNPACK (this XLA's default) and with Eigen
   (`xla_cpu_experimental_ynn_fusion_type=""`); PyTorch in NCHW and channels_last. GFLOP/s
   use XLA's FLOP count of the forward convolution for all three passes.
2. Attribution (unless --skip-step): every convolution of the jitted mid-config train step,
   read from its jaxpr (forward and the transposed ones of the backward pass), each timed
   alone in XLA (YNNPACK and Eigen) and summed; against it the whole JAX step and the twin's
   step, interleaved, with the twin's convolution time from the PyTorch profiler. If XLA's
   convolutions alone take longer than the twin's whole step, no setting outside the
   convolutions can bring the JAX step to 1.0x.
All timings interleave (the fns of one row take turns, medians over rounds).
Writes benchmarks/results/conv_ceiling.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
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
  p.add_argument("--threads", type=int, default=2)
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


def torch_conv_share(step, steps=3):
  """Share of the twin step's time spent in convolutions (forward and backward), profiled."""
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    wall = time.perf_counter() - t0
  us = sum(
      e.cpu_time_total
      for e in prof.key_averages()
      if e.key in ("aten::convolution", "aten::convolution_backward")
  )
  return us / 1e6 / wall


def attribution(rounds, min_time, workdir):
  config = train_step.mid_config()
  task, holder = train_step.new_task(config, workdir)
  params = jax.device_get(holder[0].params)
  batch = task.global_batch(train_step.synthetic_batch(config.data.image_size, 128))
  inventory = collections.Counter(
      step_convolutions(jax.make_jaxpr(task.train_step)(holder[0], batch).jaxpr)
  )
  r = np.random.default_rng(1)
  conv_s = {(b, k): 0.0 for b, _ in XLA_BACKENDS for k in ("median_s", "median_cpu_s")}
  flops_total = 0.0
  convs = []
  for (avals, params_items), count in inventory.items():
    conv_params = dict(params_items)
    args = [jnp.asarray(r.standard_normal(s), d) for s, d in avals]
    fns = {}
    for name, options in XLA_BACKENDS:
      c = compiled(
          lambda a, b: jax.lax.conv_general_dilated_p.bind(a, b, **conv_params), args, options
      )
      fns[name] = blocking(c, *args)
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    t = interleaved_rounds(fns, rounds, min_time)
    rec = dict(lhs=avals[0][0], rhs=avals[1][0], count=count, gflop=float(cost["flops"]) / 1e9)
    for name in fns:
      rec[f"{name}_s"], rec[f"{name}_cpu_s"] = t[name]["median_s"], t[name]["median_cpu_s"]
      for k in ("median_s", "median_cpu_s"):
        conv_s[name, k] += count * t[name][k]
    flops_total += count * rec["gflop"]
    convs.append(rec)
  twin = train_step.torch_twin_step(config, params)
  twin_conv_share = torch_conv_share(twin)
  jax_step = train_step.JaxTrainStep(task, holder)
  steps = interleaved_rounds({"jax": jax_step, "torch_twin": twin}, rounds)
  out = dict(
      convolutions_per_step=sum(inventory.values()),
      distinct_convolutions=len(inventory),
      conv_gflop_per_step=flops_total,
      step_gflop=train_step.step_cost(jax_step.compiled)["flops"] / 1e9,
      torch_conv_share_of_twin_step=twin_conv_share,
  )
  for unit, k in (("wall", "median_s"), ("cpu", "median_cpu_s")):
    jax_s, twin_s = steps["jax"][k], steps["torch_twin"][k]
    xla_conv = {b: conv_s[b, k] for b, _ in XLA_BACKENDS}
    best = min(xla_conv.values())
    twin_conv = twin_conv_share * twin_s
    out[unit] = dict(
        xla_conv_s_per_step=xla_conv,
        torch_conv_s_per_step=twin_conv,
        jax_step_s=jax_s,
        torch_twin_step_s=twin_s,
        jax_over_torch_twin=twin_s / jax_s,
        xla_conv_share_of_jax_step=best / jax_s,
        jax_non_conv_s=jax_s - best,
        torch_non_conv_s=twin_s - twin_conv,
        # The JAX step with every op but XLA's (best) convolutions free, against the twin.
        ceiling_over_torch_twin=twin_s / best,
        # The JAX step with the twin's convolution time in place of XLA's.
        jax_with_torch_convs_over_twin=twin_s / (jax_s - best + twin_conv),
    )
  out["convolutions"] = convs
  return out


def main():
  train_step.set_torch_threads(ARGS.threads)
  info = run_info(ARGS.threads)
  rows = microbenchmark(ARGS.rounds, ARGS.min_time)
  step = None
  if not ARGS.skip_step:
    with tempfile.TemporaryDirectory() as tmp:
      step = attribution(ARGS.rounds, ARGS.min_time, tmp)
    for unit in ("wall", "cpu"):
      a = step[unit]
      print(
          f"step ({unit} s): XLA convs {a['xla_conv_s_per_step']}, twin convs"
          f" {a['torch_conv_s_per_step']:.2f}; JAX step {a['jax_step_s']:.2f}, twin"
          f" {a['torch_twin_step_s']:.2f} ({a['jax_over_torch_twin']:.2f}x); ceiling"
          f" {a['ceiling_over_torch_twin']:.2f}x; with the twin's convs"
          f" {a['jax_with_torch_convs_over_twin']:.2f}x"
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
