"""UNet forward throughput: jitted Flax vs the PyTorch twin, same weights, same run, same threads.

    python benchmarks/model_forward.py [--threads 2] [--repeats 5] [--out benchmarks/results/model_forward.json]

Reports the median UNet calls/s over `--repeats` interleaved rounds for the golden tiny config and the
mid config (64 px, model_channels 64, mult (1,2,2,4), batch 4), their ratio, and a 3x3-conv
microbenchmark (64 ch, 64 px, batch 8, forward+backward) in GFLOP/s for XLA and PyTorch.
The thread count must be set before JAX starts, so this script sets XLA_FLAGS itself.

Baseline: one UNet call of the PyTorch twin at the same batch (the mid config's batch 4 is
the reference's edit batch), same weights, f32, `torch.inference_mode`, same threads; a
per-call comparison, so no procedure (batching, caching, step count) enters it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import bench_util

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument(
      "--min-time",
      type=float,
      default=0.5,
      help="seconds per timed round (calls per round are sized from a warm-up)",
  )
  p.add_argument("--golden", default=str(ROOT.parent / "shared" / "golden" / "dva"))
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_forward.json"))
  return p.parse_args()


ARGS = parse()
bench_util.set_cpu_threads(ARGS.threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from s3jax.models.unet import UNet, UNetConfig, abstract_params  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_util import conv3x3_rates  # noqa: E402
from s3jax.porting.unet_keys import unet_params_to_torch  # noqa: E402
from s3jax.torch_twin.unet import from_state_dict  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)


def random_params(cfg, seed=0):
  r = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: np.asarray(0.05 * r.standard_normal(l.shape), np.float32), abstract_params(cfg)
  )


def bench_unet(name, cfg, batch):
  params = random_params(cfg)
  r = np.random.default_rng(1)
  s = cfg.image_size
  x = r.uniform(-1, 1, (batch, s, s, cfg.in_channels)).astype(np.float32)
  t = np.linspace(0, 999, batch).astype(np.int32)
  cond = r.standard_normal((batch, cfg.embed_channels)).astype(np.float32)

  apply = jax.jit(UNet(cfg).apply)
  jp = jax.device_put(params)
  jx, jt, jc = map(jnp.asarray, (x, t, cond))
  t0 = time.perf_counter()
  out_j = np.asarray(apply({"params": jp}, jx, jt, jc))
  compile_s = time.perf_counter() - t0

  model = from_state_dict(cfg, unet_params_to_torch(params, cfg))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tt, tc = torch.from_numpy(t.astype(np.int64)), torch.from_numpy(cond)

  def torch_call():
    with torch.inference_mode():
      return model(tx, tt, tc)

  out_t = torch_call().numpy().transpose(0, 2, 3, 1)
  # The two take turns, round by round, so both see the same machine load.
  rounds = bench_util.interleaved_rounds(
      {"jax": lambda: apply({"params": jp}, jx, jt, jc).block_until_ready(), "torch": torch_call},
      ARGS.repeats,
      ARGS.min_time,
  )
  jax_rates, torch_rates = ([1.0 / s for s in rounds[k]["seconds"]] for k in ("jax", "torch"))
  agree = float(np.linalg.norm(out_j - out_t) / max(np.linalg.norm(out_t), 1e-30))
  jm, tm = statistics.median(jax_rates), statistics.median(torch_rates)
  return dict(
      name=name,
      config=cfg.to_json(),
      batch=batch,
      jax_calls_per_s=jm,
      torch_calls_per_s=tm,
      jax_over_torch=jm / tm,
      jax_rates=jax_rates,
      torch_rates=torch_rates,
      cpu_util_median={k: rounds[k]["median_cpu_util"] for k in ("jax", "torch")},
      jax_compile_s=compile_s,
      outputs_rel_diff=agree,
  )


def bench_conv():
  return conv3x3_rates(ARGS.repeats, ARGS.min_time)


def bench_matmul(n=2048):
  """f32 n x n matmul, as a peak-rate reference for the conv figures."""
  r = np.random.default_rng(3)
  a, b = (r.standard_normal((n, n)).astype(np.float32) for _ in range(2))
  flop = 2 * n**3
  mm = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  rounds = bench_util.interleaved_rounds(
      {"xla": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: ta @ tb},
      ARGS.repeats,
      ARGS.min_time,
  )
  xla, tor = ([1.0 / s for s in rounds[k]["seconds"]] for k in ("xla", "torch"))
  return dict(
      n=n,
      xla_gflops=statistics.median(xla) * flop / 1e9,
      torch_gflops=statistics.median(tor) * flop / 1e9,
  )


def main():
  golden = pathlib.Path(ARGS.golden)
  io_path = golden / "unet_tiny_io.npz"
  if io_path.exists():
    io = np.load(io_path)
    tiny_cfg, tiny_batch = UNetConfig.from_json(str(io["config"])), int(io["x"].shape[0])
  else:  # same settings as the golden README describes
    tiny_cfg = UNetConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
    )
    tiny_batch = 3
  mid_cfg = UNetConfig(
      image_size=64,
      model_channels=64,
      channel_mult=(1, 2, 2, 4),
      num_res_blocks=2,
      attention_resolutions=(16,),
  )
  results = bench_util.run_info(ARGS.threads)
  results.update(
      repeats=ARGS.repeats,
      statistic="median calls/s over interleaved rounds (jax and torch take turns)",
      unet=[
          bench_unet("tiny (golden config)", tiny_cfg, tiny_batch),
          bench_unet("mid", mid_cfg, 4),
      ],
      conv3x3=bench_conv(),
      matmul=bench_matmul(),
      flop_convention=(
          "GFLOP/s = nominal FLOPs (2 per multiply-add of direct convolution; "
          "fwd + input grad + weight grad) / time. A backend using a reduced-FLOP "
          "algorithm (e.g. Winograd) can exceed the matmul rate."
      ),
      note="2-core CPU shared with other jobs; compare numbers from the same run only.",
      baseline=(
          "one UNet call of the PyTorch twin (s3jax/torch_twin/unet.py) at the same batch (mid: "
          "4, the reference's edit batch), same weights, f32, torch.inference_mode, same "
          "threads; a per-call comparison, no procedure (batching, caching, steps) enters it"
      ),
  )
  results["loadavg_after"] = os.getloadavg()
  results["contended"] = bench_util.contended(results, ARGS.threads)
  bench_util.write_result(ARGS.out, results)
  for u in results["unet"]:
    print(
        f"{u['name']}: jax {u['jax_calls_per_s']:.2f} calls/s, torch "
        f"{u['torch_calls_per_s']:.2f} calls/s, ratio {u['jax_over_torch']:.2f}"
    )
  c = results["conv3x3"]
  print(
      f"conv3x3 fwd+bwd: XLA {c['xla_gflops']:.1f} GFLOP/s, torch {c['torch_gflops']:.1f} GFLOP/s"
  )
  m = results["matmul"]
  print(
      f"matmul {m['n']}^2: XLA {m['xla_gflops']:.1f} GFLOP/s, torch {m['torch_gflops']:.1f} GFLOP/s"
  )


if __name__ == "__main__":
  main()
