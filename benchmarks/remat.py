"""Remat: the paper-size train step's XLA temp memory and FLOPs with and without it.

    python benchmarks/remat.py [--threads 2] [--image-size 256] [--skip-mechanism]
                               [--out benchmarks/results/remat.json]

(a) `paper_step`: the DVA train step of `configs/voxceleb.py` (the paper's UNet, 256 px,
    one item of one frame = two noisy copies, f32, dropout 0.1, Adam, EMA), compiled
    abstractly (not run) with `model.remat` off and on: `temp_size_in_bytes` of XLA's
    memory analysis, `flops` of its cost analysis, and the compile time of each.
    Also the bytes JAX itself saves for the backward pass (`print_saved_residuals`, the
    arguments left out) for the paper UNet alone at the step's batch of 2.
(b) `mechanism`: why `jax.checkpoint` (`nn.remat`) left the temp bytes unchanged: the gradient
    of a stack of ResBlocks (128 ch, 64 px, batch 2, dropout 0.1) plain, under `nn.remat`
    (XLA's default CPU scheduler and its memory-optimised one), and under `unet.remat`,
    whose recomputation waits for the cotangent; temp bytes, FLOPs and JAX's saved bytes.
Compile-time figures only: they do not depend on the machine's load (compile times do).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import pathlib
import re
import sys
import time

import bench_util

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--image-size", type=int, default=256, help="paper step's image size")
  p.add_argument("--skip-mechanism", action="store_true", help="only the paper step")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "remat.json"))
  return p.parse_args()


ARGS = parse()
bench_util.set_cpu_threads(ARGS.threads)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.ad_checkpoint  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import configs  # noqa: E402
from s3jax.models import unet  # noqa: E402
from s3jax.models.autoencoder import LND_DIM, id_dim  # noqa: E402
from s3jax.training import state as state_lib  # noqa: E402
from s3jax.training.dva import DVATask  # noqa: E402

MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
HLO_BYTES = dict(f64=8, s64=8, u64=8, f32=4, s32=4, u32=4, bf16=2, f16=2, s8=1, u8=1, pred=1)


def saved_residual_bytes(fn, *args) -> int:
  """Bytes JAX keeps from the forward pass of `grad(fn)` for its backward pass, arguments left
  out (they are held anyway), summed from `jax.ad_checkpoint.print_saved_residuals`."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  total = 0
  for line in printed.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] ", line)
    if m and m.group(1) in HLO_BYTES and "from the argument" not in line:
      dims = [int(d) for d in m.group(2).split(",") if d]
      total += math.prod(dims) * HLO_BYTES[m.group(1)]
  return total


RNG = jax.random.key(0)


def compiled_costs(lowered, compiler_options=None) -> dict:
  """Compiles `lowered`; XLA's temp/argument/output bytes, FLOPs and the compile time."""
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options=compiler_options or {})
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return dict(
      temp_bytes=int(mem.temp_size_in_bytes),
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      flops=float(cost["flops"]),
      compile_s=compile_s,
  )


def paper_step(size: int) -> dict:
  out = {}
  for remat in (False, True):
    c = configs.get("voxceleb")
    c.model.remat = remat
    c.model.unet.image_size = c.data.image_size = size
    c.data.batch_size, c.data.frames_per_item = 1, 1
    mesh = state_lib.make_mesh(c.mesh)
    task = DVATask(c, mesh, "/tmp", data_iterator=iter([]))
    sharding = state_lib.batch_sharding(mesh)
    shapes = dict(
        image=(size, size, 3), mask=(size, size, 1), z_id=(id_dim(c.model),), z_lnd=(LND_DIM,)
    )
    batch = {
        k: jax.ShapeDtypeStruct((1, 1) + s, jnp.float32, sharding=sharding)
        for k, s in shapes.items()
    }
    lowered = task.train_step.lower(task.abstract_state, batch)
    out["remat" if remat else "plain"] = compiled_costs(lowered)
    print(f"paper step remat={remat}: {out['remat' if remat else 'plain']}", flush=True)
  out["unet_saved_residual_bytes"] = paper_unet_residuals(size)
  out["num_params_trained"] = int(
      sum(np.prod(x.shape) for x in jax.tree.leaves(task.abstract_state.params))
  )
  out["temp_plain_over_remat"] = out["plain"]["temp_bytes"] / out["remat"]["temp_bytes"]
  out["flops_remat_over_plain"] = out["remat"]["flops"] / out["plain"]["flops"]
  out["setup"] = dict(
      config="configs/voxceleb.py (paper UNet, dropout 0.1, f32)",
      image_size=size,
      images=1,
      unet_batch=2,
      compiled="abstractly (lower + compile), not run",
  )
  return out


def paper_unet_residuals(size: int) -> dict:
  out = {}
  for remat in (False, True):
    cfg = unet.UNetConfig.paper(image_size=size, remat=remat)
    args = (
        unet.abstract_params(cfg),
        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2, cfg.embed_channels), jnp.float32),
    )

    def loss(p, x, t, cond, cfg=cfg):
      y = unet.UNet(cfg).apply({"params": p}, x, t, cond, train=True, rngs={"dropout": RNG})
      return jnp.mean(jnp.square(y))

    out["remat" if remat else "plain"] = saved_residual_bytes(loss, *args)
  return out


class ResBlockStack(nn.Module):
  """`depth` ResBlocks at one width, each wrapped by `wrap` (None, nn.remat or unet.remat)."""

  depth: int
  channels: int
  wrap: str

  @nn.compact
  def __call__(self, x, emb):
    wrap = {"plain": lambda cls: cls, "nn_remat": nn.remat, "unet_remat": unet.remat}[self.wrap]
    cls = wrap(unet.ResBlock)
    for i in range(self.depth):
      x = cls(cin=self.channels, cout=self.channels, dropout=0.1, train=True, name=f"block_{i}")(
          x, emb, emb
      )
    return x


def mechanism(depth=8, channels=128, size=64, batch=2) -> dict:
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  emb = jax.ShapeDtypeStruct((batch, 512), jnp.float32)
  out = dict(
      setup=dict(depth=depth, channels=channels, size=size, batch=batch, dropout=0.1),
      activation_bytes=batch * size * size * channels * 4,
  )
  variants = [
      ("plain", "plain", None),
      ("nn_remat", "nn_remat", None),
      ("nn_remat_memory_optimized_scheduler", "nn_remat", MEMORY_OPTIMIZED),
      ("unet_remat", "unet_remat", None),
  ]
  for name, wrap, options in variants:
    model = ResBlockStack(depth, channels, wrap)
    params = jax.eval_shape(lambda: model.init(RNG, jnp.zeros(x.shape), jnp.zeros(emb.shape)))

    def loss(p, x, emb, model=model):
      y = model.apply(p, x, emb, rngs={"dropout": RNG})
      return jnp.mean(jnp.square(y))

    out[name] = compiled_costs(jax.jit(jax.grad(loss)).lower(params, x, emb), options)
    out[name]["saved_residual_bytes"] = saved_residual_bytes(loss, params, x, emb)
    print(f"stack {name}: {out[name]}", flush=True)
  return out


def main():
  info = bench_util.run_info(ARGS.threads)
  result = dict(**info)
  if not ARGS.skip_mechanism:
    result["mechanism"] = mechanism()
  result["paper_step"] = paper_step(ARGS.image_size)
  result["contended"] = bench_util.contended(info, ARGS.threads)
  result["loadavg_after"] = os.getloadavg()
  p = result["paper_step"]
  print(
      f"paper step: temp {p['plain']['temp_bytes'] / 1e9:.2f} GB -> "
      f"{p['remat']['temp_bytes'] / 1e9:.2f} GB ({p['temp_plain_over_remat']:.2f}x less), "
      f"FLOPs x{p['flops_remat_over_plain']:.2f}"
  )
  bench_util.write_result(ARGS.out, result)


if __name__ == "__main__":
  main()
