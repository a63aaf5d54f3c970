"""DVA train-step throughput: the jitted JAX step vs the PyTorch twin, same config, same run.

    python benchmarks/train_step.py [--threads 2] [--steps 8] [--paper]

At the mid config (64 px, model_channels 64, mult (1,2,2,4), batch 4 images =
2 items x 2 frames, f32) both sides do the same work per step: two noises as
one batched forward of 2B, L1 on eps, the masked x0 regulariser, backward,
global-norm clip, Adam and the EMA update. The two steps take turns (interleaved rounds,
medians), so both see the same machine load. Also reported, from the same run:
- the step's FLOPs (XLA cost analysis) and its FLOP/s against XLA's own 3x3-conv
  rate (the CPU bound; docs/design.md's performance facts);
- compile time;
- input-pipeline frames/s at the mid config's batch shape, against the frames/s
  the train step consumes (it must be well above);
- with --paper: the paper-size (256 px) step's FLOPs and memory with and
  without remat (compiled abstractly, not run).
Writes benchmarks/results/train_step.json. XLA flag, backend and dtype attempts at the same
config: benchmarks/train_step_cpu_flags.py; the 3x3-conv ceiling: benchmarks/conv_ceiling.py
(docs/cpu_speed.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "configs"))

import bench_util  # noqa: E402


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=8, help="timed steps per side (median)")
  p.add_argument(
      "--paper",
      action="store_true",
      help="also compile the 256 px paper step abstractly (slow on CPU)",
  )
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
  return p.parse_args()


if __name__ == "__main__":  # importers (train_step_cpu_flags.py, conv_ceiling.py) set their own
  ARGS = parse()
  bench_util.pin_cpu_threads(ARGS.threads)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import voxceleb  # noqa: E402
from bench_util import (  # noqa: E402
    contended,
    conv3x3_rates,
    interleaved_rounds,
    run_info,
    write_result,
)

from s3jax import diffusion  # noqa: E402
from s3jax.models.unet import UNetConfig  # noqa: E402
from s3jax.porting.unet_keys import unet_params_to_torch  # noqa: E402
from s3jax.torch_twin.unet import from_state_dict  # noqa: E402
from s3jax.training import state as state_lib  # noqa: E402
from s3jax.training.dva import DVATask  # noqa: E402


def set_torch_threads(threads):
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)


MID_UNET = dict(
    image_size=64,
    model_channels=64,
    channel_mult=(1, 2, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.0,
)
ITEMS, FRAMES = 2, 2


def mid_config(dtype="float32"):
  c = voxceleb.get_config("")
  c.model.unet.update(MID_UNET)
  c.model.dtype = dtype
  c.data.image_size = 64
  c.data.batch_size, c.data.frames_per_item = ITEMS, FRAMES
  return c


def synthetic_batch(size, id_dim, seed=0):
  r = np.random.default_rng(seed)
  shape = (ITEMS, FRAMES)
  return {
      "image": r.uniform(-1, 1, shape + (size, size, 3)).astype(np.float32),
      "mask": (r.uniform(size=shape + (size, size, 1)) > 0.5).astype(np.float32),
      "z_id": r.standard_normal(shape + (id_dim,)).astype(np.float32),
      "z_lnd": r.uniform(size=shape + (102,)).astype(np.float32),
  }


def step_cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return dict(
      flops=float(cost.get("flops", float("nan"))),
      temp_bytes=int(getattr(mem, "temp_size_in_bytes", -1)),
      argument_bytes=int(getattr(mem, "argument_size_in_bytes", -1)),
      output_bytes=int(getattr(mem, "output_size_in_bytes", -1)),
  )


class JaxTrainStep:
  """The jitted DVA train step on a synthetic batch; each call runs one step and blocks.

  `compiler_options` are XLA DebugOptions for this compile only (e.g.
  {"xla_cpu_enable_fast_math": True}), so variants can share one process and take turns.
  Several steps may share one `state_holder` (a one-element list): the state is donated.
  """

  def __init__(self, task, state_holder, compiler_options=None):
    self.state_holder = state_holder
    self.batch = task.global_batch(synthetic_batch(task.config.data.image_size, 128))
    t0 = time.perf_counter()
    self.compiled = task.train_step.lower(state_holder[0], self.batch).compile(
        compiler_options=compiler_options or None
    )
    self.compile_s = time.perf_counter() - t0
    self.loss = float("nan")

  def __call__(self):
    self.state_holder[0], m = self.compiled(self.state_holder[0], self.batch)
    self.loss = float(m["loss"])  # blocks
    return self.loss


def new_task(config, workdir, holder=None):
  """A DVATask at `config` and a state holder: `holder` when given (a task of the same params,
  e.g. another compute dtype, shares it), else a new one with a freshly initialised state."""
  task = DVATask(config, state_lib.make_mesh(config.mesh), workdir, data_iterator=iter([]))
  return task, holder if holder is not None else [task.init_state()]


def torch_twin_step(config, params, autocast_bf16=False):
  """The reference training step on the PyTorch twin (same weights), as a blocking callable.

  `autocast_bf16` runs forward and loss under `torch.autocast("cpu", bfloat16)`, the twin's
  counterpart of `model.dtype="bfloat16"` (params and Adam stay f32 on both sides).
  """
  cfg = UNetConfig(**dict(config.model.unet))
  unet = from_state_dict(cfg, unet_params_to_torch(params["unet"], cfg))
  unet.train()
  fusion = torch.nn.Linear(128 + 102, cfg.embed_channels)
  with torch.no_grad():
    fusion.weight.copy_(torch.from_numpy(np.array(params["encoder"]["linear"]["kernel"]).T))
    fusion.bias.copy_(torch.from_numpy(np.array(params["encoder"]["linear"]["bias"])))
  modules = torch.nn.ModuleList([fusion, unet])
  opt = torch.optim.Adam(modules.parameters(), lr=config.optim.lr)
  ema = [p.detach().clone() for p in modules.parameters()]
  ac = torch.from_numpy(diffusion.alphas_cumprod().astype(np.float32))
  b = {
      k: torch.from_numpy(v.reshape((-1,) + v.shape[2:]))
      for k, v in synthetic_batch(config.data.image_size, 128).items()
  }
  x0 = b["image"].permute(0, 3, 1, 2).contiguous()
  mask = b["mask"].permute(0, 3, 1, 2).contiguous()
  n = x0.shape[0]

  def step():
    t = torch.randint(0, 1000, (n,))
    n1, n2 = torch.randn_like(x0), torch.randn_like(x0)
    a = ac[t].view(-1, 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
      x_t = torch.cat([a.sqrt() * x0 + (1 - a).sqrt() * n1, a.sqrt() * x0 + (1 - a).sqrt() * n2])
      t2 = torch.cat([t, t])
      zf = fusion(torch.cat([b["z_id"], b["z_lnd"]], dim=1))
      eps = unet(x_t, t2, torch.cat([zf, zf])).float()
    noise = torch.cat([n1, n2])
    l1 = (eps - noise).abs().mean(dim=(1, 2, 3))
    a2 = torch.cat([a, a])
    x0_hat = (1 / a2).sqrt() * x_t - (1 / a2 - 1).sqrt() * eps
    reg = (mask * x0_hat[:n] - mask * x0_hat[n:]).abs().mean()
    loss = l1[:n].mean() + l1[n:].mean() + reg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(modules.parameters(), config.optim.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(ema, config.ema_decay)
      torch._foreach_add_(
          ema, [p.detach() for p in modules.parameters()], alpha=1 - config.ema_decay
      )
    return loss.item()

  return step


def bench_steps(config, workdir, steps):
  """The JAX step and the twin's step taking turns, `steps` timed rounds after a warm-up."""
  task, holder = new_task(config, workdir)
  params = jax.device_get(holder[0].params)  # before the first step donates the state
  jax_step = JaxTrainStep(task, holder)
  rounds = interleaved_rounds(
      {"jax": jax_step, "torch_twin": torch_twin_step(config, params)}, steps
  )
  jax_res = dict(
      step_s=rounds["jax"]["seconds"],
      median_step_s=rounds["jax"]["median_s"],
      median_cpu_util=rounds["jax"]["median_cpu_util"],
      compile_s=jax_step.compile_s,
      loss=jax_step.loss,
      **step_cost(jax_step.compiled),
  )
  tw = rounds["torch_twin"]
  torch_res = dict(
      step_s=tw["seconds"], median_step_s=tw["median_s"], median_cpu_util=tw["median_cpu_util"]
  )
  return jax_res, torch_res


def bench_pipeline(size, workdir):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import input_pipeline as pipeline_bench  # benchmarks/input_pipeline.py

  return pipeline_bench.measure_pipeline(
      size=size, batch_size=ITEMS, frames_per_item=FRAMES, repeats=3, batches=20, workdir=workdir
  )


def paper_costs(workdir):
  out = {}
  for remat in (False, True):
    c = voxceleb.get_config("")
    c.model.remat = remat
    c.data.batch_size, c.data.frames_per_item = 1, 1  # one image (2 noisy copies)
    mesh = state_lib.make_mesh(c.mesh)
    task = DVATask(c, mesh, workdir, data_iterator=iter([]))
    batch = {
        k: jax.ShapeDtypeStruct(
            (1, 1) + v.shape[2:], v.dtype, sharding=state_lib.batch_sharding(mesh)
        )
        for k, v in synthetic_batch(256, 128).items()
    }
    t0 = time.perf_counter()
    compiled = task.train_step.lower(task.abstract_state, batch).compile()
    out["remat" if remat else "no_remat"] = dict(
        compile_s=time.perf_counter() - t0, **step_cost(compiled)
    )
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(task.abstract_state.params))
  out["num_params_trained"] = n_params
  return out


def main():
  import tempfile

  set_torch_threads(ARGS.threads)
  info = run_info(ARGS.threads)
  config = mid_config()
  with tempfile.TemporaryDirectory() as tmp:
    jax_res, torch_res = bench_steps(config, tmp, ARGS.steps)
    conv = conv3x3_rates(repeats=5, min_time=0.5)
    pipe = bench_pipeline(64, tmp)
    paper = paper_costs(tmp) if ARGS.paper else None
  images = ITEMS * FRAMES
  jax_ips = images / jax_res["median_step_s"]
  torch_ips = images / torch_res["median_step_s"]
  jax_gflops = jax_res["flops"] / jax_res["median_step_s"] / 1e9
  result = dict(
      **info,
      mid_config=dict(MID_UNET, images_per_step=images, dtype="float32"),
      jax=jax_res,
      torch_twin=torch_res,
      jax_images_per_s=jax_ips,
      torch_images_per_s=torch_ips,
      jax_over_torch=jax_ips / torch_ips,
      jax_step_gflops_per_s=jax_gflops,
      xla_conv3x3_gflops=conv["xla_gflops"],
      torch_conv3x3_gflops=conv["torch_gflops"],
      step_rate_vs_xla_conv_rate=jax_gflops / conv["xla_gflops"],
      conv3x3=conv,
      input_pipeline_64px=pipe,
      pipeline_over_step_consumption=pipe["frames_per_s"] / jax_ips,
      paper_256px_step=paper,
      statistic="median over timed steps, the JAX and twin steps taking turns; same-run ratios",
      contended=contended(info, ARGS.threads),
      loadavg_after=os.getloadavg(),
  )
  write_result(ARGS.out, result)
  print(
      f"mid config: JAX {jax_ips:.2f} img/s, twin {torch_ips:.2f} img/s, "
      f"ratio {jax_ips / torch_ips:.2f}; compile {jax_res['compile_s']:.1f}s"
  )
  print(
      f"step {jax_gflops:.1f} GFLOP/s = {result['step_rate_vs_xla_conv_rate']:.0%} of XLA's "
      f"conv rate ({conv['xla_gflops']:.1f}); pipeline {pipe['frames_per_s']:.0f} frames/s = "
      f"{result['pipeline_over_step_consumption']:.1f}x the step's consumption"
  )


if __name__ == "__main__":
  main()
