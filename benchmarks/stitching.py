"""Stitching-tuning speed: all frames tuned at once in JAX vs the reference's per-frame loop.

    python benchmarks/stitching.py [--threads 2] [--frames 8] [--steps 100] [--rounds 3]
                                   [--out benchmarks/results/stitching.json]

Both sides run STIT's stitching tuning (`edit_video_stitching_tuning.py`) of `--frames` frames
with the tiny golden stylegan2-ada generator (64 px, `../shared/golden/stit`), the same
`--steps` Adam steps (STIT's default 100), masks, edits and crops:

- ours: `s3jax.gan.stitching.StitchingTuner`, one jitted program per chunk of `--chunk` frames
  (naive-edit render, masks, `lax.scan` over the steps of `vmap`(non-fused forward, loss,
  gradient, Adam), final render); its XLA compile is reported apart;
- the reference procedure: `s3jax.torch_twin.stitching.reference_stitching` on the PyTorch
  twin of the generator (same weights), frame after frame as the reference runs it: render the
  naive edit, build the masks, `optimize_border` (deepcopy, train mode, Adam, final forward).

Rounds interleave the two sides (`bench_util.interleaved_rounds`, the machine is shared);
figures are medians over rounds and the ratio compares figures of the same run. The segmentation
network is not run on either side (a given face mask stands in for it, as in the golden set).

Also a FLOP-based projection for a 300-frame video at 1024 px (the FFHQ generator STIT uses)
on one H100: XLA's cost analysis of one frame's tuning pieces at that config, from abstract
shapes only (nothing runs), at 50% of the H100 SXM's ~989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import bench_util

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse():
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--steps", type=int, default=100, help="Adam steps per frame (STIT: 100)")
  p.add_argument("--chunk", type=int, default=8, help="our frames per jitted call")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  p.add_argument("--golden", default=str(ROOT.parent / "shared" / "golden" / "stit"))
  p.add_argument(
      "--parts",
      default="timing,projection",
      help="subset to run; a subset updates those keys of an existing --out file",
  )
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stitching.json"))
  return p.parse_args()


ARGS = parse()
bench_util.set_cpu_threads(ARGS.threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from s3jax.gan import stitching  # noqa: E402
from s3jax.models import stylegan2  # noqa: E402
from s3jax.parity import stitching as parity  # noqa: E402
from s3jax.porting.state_dict import load_state_dict  # noqa: E402
from s3jax.torch_twin.stitching import reference_stitching  # noqa: E402
from s3jax.torch_twin.stylegan2 import from_state_dict  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)
H100_BF16_PEAK = bench_util.H100_BF16_PEAK
UTILISATION = 0.5
# The FFHQ generator STIT loads (ffhq.pkl's G_ema; golden README section 1).
FFHQ_INIT_KWARGS = dict(
    z_dim=512,
    c_dim=0,
    w_dim=512,
    img_resolution=1024,
    img_channels=3,
    mapping_kwargs=dict(num_layers=8),
    synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
)
BASELINE = (
    "the reference procedure = create_masks / optimize_border of STIT's "
    "edit_video_stitching_tuning.py on the PyTorch twin of the stylegan2-ada generator (same "
    "weights, f32, same threads): frame after frame, naive-edit render (eval), masks, deepcopy + "
    "train mode + Adam(3e-4) for the same number of steps as ours, final forward"
)


def video(golden: pathlib.Path, n: int):
  """n frames: edits (float64, as STIT makes them), crops (NHWC) and half-size face masks."""
  config, variables = parity.load_golden_generator(golden)
  with np.load(golden / parity.IO_FILE) as z:
    crop, mask = parity.nhwc(z["crop"]), parity.nhwc(z["face_mask_half"])
  with np.load(golden / "latent_edit_io.npz") as z:
    w_pivots, direction = z["w_pivots"], z["direction"]
  r = np.random.default_rng(0)
  pivots = w_pivots[np.arange(n) % len(w_pivots)] + 0.05 * r.standard_normal(
      (n,) + w_pivots.shape[1:]
  ).astype(np.float32)
  w_edits = pivots + 3.0 * direction  # factor 6, halved as the latent editor does
  inversions = np.asarray(stylegan2.synthesis(config, variables, pivots.astype(np.float32)))
  crops = np.clip(0.5 * crop + 0.5 * inversions, -1, 1).astype(np.float32)
  masks = np.stack([np.roll(mask[0], (i % 5) - 2, axis=1) for i in range(n)])
  return config, variables, w_edits, crops, masks


def timing(golden: pathlib.Path) -> dict:
  n, steps = ARGS.frames, ARGS.steps
  config, variables, w_edits, crops, masks = video(golden, n)
  tuner = stitching.StitchingTuner(config, variables, num_steps=steps, frames_per_chunk=ARGS.chunk)
  t = {}
  ours_out = tuner.tune(w_edits, crops, masks, t)  # compile + warm-up
  compile_s = t.get("compile", 0.0)
  twin = from_state_dict(
      parity.generator_init_kwargs(golden), load_state_dict(golden / parity.GENERATOR_STATE_DICT)
  )
  crops_nchw, masks_nchw = parity.nchw(crops), parity.nchw(masks)

  def ours():
    tuner.tune(w_edits, crops, masks)

  def reference():
    reference_stitching(twin, crops_nchw, w_edits, masks_nchw, num_steps=steps)

  rounds = bench_util.interleaved_rounds({"ours": ours, "reference": reference}, ARGS.rounds)
  ref_out = reference_stitching(twin, crops_nchw[:2], w_edits[:2], masks_nchw[:2], steps)
  ours_s, ref_s = rounds["ours"]["median_s"], rounds["reference"]["median_s"]
  return {
      "frames": n,
      "steps": steps,
      "image_size": config.img_resolution,
      "ours_chunk": tuner.chunk_size(n),
      "ours_compile_s (excluded)": compile_s,
      "ours_median_s": ours_s,
      "reference_median_s": ref_s,
      "ratio_reference_over_ours": ref_s / ours_s,
      "ours_frames_per_s": n / ours_s,
      "reference_frames_per_s": n / ref_s,
      "rounds": rounds,
      "tuned_rel_diff_ours_vs_reference (first 2 frames)": parity.rel_err(
          parity.nchw(ours_out["images"][:2]), ref_out
      ),
  }


def projection() -> dict:
  """FLOPs of one frame's stitching tuning at the FFHQ 1024 config (abstract shapes only)."""
  config = stylegan2.GeneratorConfig.from_init_kwargs(FFHQ_INIT_KWARGS)
  variables = stylegan2.abstract_variables(config)
  params, buffers = variables["params"]["synthesis"], variables["buffers"]
  s, steps = config.img_resolution, stitching.NUM_STEPS
  train = stitching.generator_synthesis(config, fused_modconv=False)
  evaluate = stitching.generator_synthesis(config, fused_modconv=True)
  opt = stitching.stitching_optimizer()
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  w, img, mask = f32(1, config.num_ws, config.w_dim), f32(s, s, 3), f32(s, s, 1)

  def step(params, opt_state, buffers, w, crop, edited, border, content):
    def loss(p):
      image = train(p, buffers, w)[0]
      return stitching.stitching_loss(image, crop, edited, border, content, 0.01)[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return value, jax.tree.map(jnp.add, params, updates), opt_state

  def flops(fn, *args):
    t0 = time.perf_counter()
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost["flops"]), time.perf_counter() - t0

  opt_state = jax.eval_shape(opt.init, params)
  step_flops, t_step = flops(step, params, opt_state, buffers, w, img, img, mask, mask)
  eval_flops, t_eval = flops(evaluate, params, buffers, w)
  train_flops, t_train = flops(train, params, buffers, w)
  per_frame = eval_flops + steps * step_flops + train_flops
  n_frames, rate = 300, UTILISATION * H100_BF16_PEAK
  return {
      "config": FFHQ_INIT_KWARGS,
      "steps": steps,
      "flops": {
          "train_step_per_frame (forward + backward + Adam)": step_flops,
          "eval_forward (naive edit)": eval_flops,
          "train_forward (final render)": train_flops,
          "per_frame_total": per_frame,
      },
      "frames": n_frames,
      "h100_seconds_300_frames": n_frames * per_frame / rate,
      "h100_seconds_per_frame": per_frame / rate,
      "cost_analysis_s": t_step + t_eval + t_train,
      "assumptions": [
          f"H100 SXM dense bf16 peak {H100_BF16_PEAK / 1e12:.1f} TFLOP/s at {UTILISATION:.0%} "
          f"utilisation ({rate / 1e12:.0f} TFLOP/s sustained), the same for ours and the "
          "reference: both do the same FLOPs per frame (one naive-edit render, 100 train steps, "
          "one final render); what batching changes is how close to that rate a 1-frame-at-a-"
          "time loop gets, which this projection does not model",
          "FLOPs from XLA's cost_analysis() of the lowered (unoptimised) programs for one frame "
          "at the FFHQ config (1024 px, 18 ws, channel_base 32768, channel_max 512), abstract "
          "shapes only; masks, segmentation, alignment and paste-back not counted",
      ],
  }


def headline(result) -> dict:
  h = {}
  t = result.get("timing")
  if t:
    k = f"stitching tuning {t['frames']} frames x {t['steps']} steps ({t['image_size']} px)"
    h[f"{k}: ours s"] = t["ours_median_s"]
    h[f"{k}: reference per-frame loop s"] = t["reference_median_s"]
    h[f"{k}: reference / ours"] = t["ratio_reference_over_ours"]
    h[f"{k}: ours XLA compile s"] = t["ours_compile_s (excluded)"]
  p = result.get("h100_projection")
  if p:
    h["H100 projection: stitching tuning of 300 frames at 1024 px, s"] = p[
        "h100_seconds_300_frames"
    ]
  return h


def main():
  parts = set(ARGS.parts.split(","))
  result = bench_util.run_info(ARGS.threads)
  result["threads"]["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
  result["devices"] = [str(d) for d in jax.devices()]
  result["baseline"] = BASELINE
  if "timing" in parts:
    print(f"timing {ARGS.frames} frames x {ARGS.steps} steps ...", flush=True)
    result["timing"] = timing(pathlib.Path(ARGS.golden))
    print(
        json.dumps({k: v for k, v in result["timing"].items() if k != "rounds"}, indent=1),
        flush=True,
    )
  if "projection" in parts:
    print("projection (lowering the 1024 px programs) ...", flush=True)
    result["h100_projection"] = projection()
    print(json.dumps(result["h100_projection"]["flops"], indent=1), flush=True)
  result["loadavg_after"] = os.getloadavg()
  result["contended"] = bench_util.contended(result, ARGS.threads)
  result["notes"] = [
      "2-core CPU shared with other jobs: absolute numbers move with the load (loadavg is "
      "recorded); the ratio from the same run is the meaningful part",
      "ours excludes XLA compilation (reported apart)",
      BASELINE,
  ]
  out = pathlib.Path(ARGS.out)
  if parts != {"timing", "projection"} and out.exists():
    merged = json.loads(out.read_text())
    merged.setdefault("partial_updates", []).append(
        {k: result[k] for k in ("command", "when", "threads", "loadavg_before", "loadavg_after")}
        | {"parts": sorted(parts)}
    )
    for k in ("timing", "h100_projection", "baseline", "notes", "contended"):
      if k in result:
        merged[k] = result[k]
    result = merged
  result["headline"] = headline(result)
  bench_util.write_result(out, result)


if __name__ == "__main__":
  main()
