"""Timing helpers shared by the benchmark scripts (medians over rounds, same-run comparisons)."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

# Dense bf16 FLOP/s of one H100 SXM5: the H100 projections of every benchmark divide by it.
H100_BF16_PEAK = 989.4e12


# IP-FaceDiff's edit at the reference's defaults (TokenFlow's config_pnp.yaml, preprocess.py):
# the IP-FaceDiff projections and extrapolations are made to it.
TOKENFLOW_REFERENCE = dict(
    frames=40, size=512, latent=64, inversion_steps=500, steps=50, batch_size=8
)


def tokenflow_unet_evaluations(frames: int, batch_size: int, inversion_steps: int, steps: int):
  """UNet sample-evaluations of one IP-FaceDiff edit: inversion N per step; the edit per step
  3 n_kf (keyframe pass, 3 branches) + 3 N (batch passes), n_kf = N // B."""
  inversion = inversion_steps * frames
  edit = steps * (3 * (frames // batch_size) + 3 * frames)
  return {"inversion": inversion, "edit": edit, "total": inversion + edit}


def lowered_flops(lowered, compile_if_missing: bool = True):
  """(FLOPs, source) of a lowered JAX program: the unoptimised HLO's analysis, or, where the
  backend gives none for it (jax 0.11's GPU returns None), the compiled program's; (None, why)
  when neither is available."""
  cost = lowered.cost_analysis()
  source = "lowered.cost_analysis()"
  if cost is None and compile_if_missing:
    cost, source = lowered.compile().cost_analysis(), "compiled.cost_analysis()"
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    return None, "no cost analysis from this backend"
  return float(cost["flops"]), source


def set_cpu_threads(threads: int) -> None:
  """Pins XLA's and OpenMP's CPU thread pools; call before jax or torch is imported."""
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
      f" intra_op_parallelism_threads={threads}"
  ).strip()
  os.environ.setdefault("OMP_NUM_THREADS", str(threads))
  # Without this, libgomp threads spin-wait and torch runs up to 100x slower on a loaded CPU.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pin_cpu_threads(threads: int) -> None:
  """Runs this process on its first `threads` CPUs; call before jax or torch is imported.

  XLA sizes its CPU thread pool from the CPUs the process may run on, PyTorch (OpenMP) from
  OMP_NUM_THREADS.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def timed_rounds(fn, repeats: int, min_time: float) -> list[float]:
  """Calls/s of `fn` (which blocks) for each of `repeats` rounds, after warm-up."""
  fn()
  t0 = time.perf_counter()
  fn()
  one = max(time.perf_counter() - t0, 1e-6)
  n = max(1, int(min_time / one))
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n):
      fn()
    rates.append(n / (time.perf_counter() - t0))
  return rates


def interleaved_rounds(fns: dict, rounds: int, min_time: float = 0.0) -> dict:
  """Seconds per call of each blocking fn in `fns`, over `rounds` rounds in which they take turns.

  Taking turns exposes every fn to the same machine load, so their ratios are same-run figures.
  Each fn is warmed up once; a round makes enough calls to last `min_time` (one when it is 0).
  Also returns the process's CPU seconds per call and CPU time over wall time in each round
  (2.0 = two busy cores): on a shared machine a single-threaded fn's CPU seconds stay close to
  its work while its wall time stretches with the load.
  """
  calls = {}
  for name, fn in fns.items():
    fn()
    calls[name] = 1
    if min_time > 0:
      t0 = time.perf_counter()
      fn()
      calls[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
  out = {
      name: dict(calls_per_round=calls[name], seconds=[], cpu_seconds=[], cpu_util=[])
      for name in fns
  }
  for _ in range(rounds):
    for name, fn in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      for _ in range(calls[name]):
        fn()
      wall, cpu = time.perf_counter() - t0, time.process_time() - c0
      out[name]["seconds"].append(wall / calls[name])
      out[name]["cpu_seconds"].append(cpu / calls[name])
      out[name]["cpu_util"].append(cpu / wall)
  for rec in out.values():
    rec["median_s"] = statistics.median(rec["seconds"])
    rec["median_cpu_s"] = statistics.median(rec["cpu_seconds"])
    rec["median_cpu_util"] = statistics.median(rec["cpu_util"])
  return out


def conv3x3_rates(repeats: int, min_time: float, batch=8, ch=64, size=64, layers=2) -> dict:
  """Forward+backward of a stack of 3x3 convs: XLA vs PyTorch GFLOP/s, nominal FLOPs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  r = np.random.default_rng(2)
  x = r.standard_normal((batch, size, size, ch)).astype(np.float32)
  ws = [r.standard_normal((3, 3, ch, ch)).astype(np.float32) * 0.05 for _ in range(layers)]
  flop = 3 * layers * 2 * batch * size * size * ch * ch * 9  # fwd + dgrad + wgrad

  def f(ws, x):
    h = x
    for w in ws:
      h = jax.nn.relu(
          jax.lax.conv_general_dilated(
              h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
          )
      )
    return jnp.sum(h)

  g = jax.jit(jax.grad(f, argnums=(0, 1)))
  jws, jx = [jnp.asarray(w) for w in ws], jnp.asarray(x)
  xla = timed_rounds(lambda: jax.block_until_ready(g(jws, jx)), repeats, min_time)

  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  tws = [torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True) for w in ws]

  def tstep():
    h = tx
    for w in tws:
      h = torch.relu(torch.nn.functional.conv2d(h, w, padding=1))
    return torch.autograd.grad(h.sum(), [*tws, tx])

  tor = timed_rounds(tstep, repeats, min_time)
  return dict(
      batch=batch,
      channels=ch,
      size=size,
      layers=layers,
      gflop_per_step=flop / 1e9,
      xla_gflops=statistics.median(xla) * flop / 1e9,
      torch_gflops=statistics.median(tor) * flop / 1e9,
      xla_steps_per_s=xla,
      torch_steps_per_s=tor,
  )


def run_info(threads: int) -> dict:
  import jax
  import numpy as np
  import torch

  return dict(
      command=" ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
      when=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      versions=dict(
          python=platform.python_version(),
          jax=jax.__version__,
          torch=torch.__version__,
          numpy=np.__version__,
      ),
      threads=dict(
          requested=threads,
          torch=torch.get_num_threads(),
          xla_flags=os.environ.get("XLA_FLAGS", ""),
          cpu_count=os.cpu_count(),
      ),
      loadavg_before=os.getloadavg(),
  )


def contended(info: dict, threads: int) -> bool:
  return bool(max(info["loadavg_before"][0], os.getloadavg()[0]) > threads + 0.5)


def write_result(path, result: dict) -> pathlib.Path:
  """Writes one benchmark's JSON (which carries its command, see ``run_info``)."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")
  return out
