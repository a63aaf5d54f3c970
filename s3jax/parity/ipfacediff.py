"""Golden-vector check of the IP-FaceDiff port (`golden/ipfacediff`: README.md, SPEC.md).

`check(golden_dir, backend='jax')` loads the golden tiny models through
`s3jax.sd.pipeline.StableDiffusion.load` (the flat golden layout), recomputes every array of
`io.npz` that a port computes, and returns rows `{'name', 'rel_err', 'tol', 'ok'}` (rel_err =
||out - ref|| / ||ref||, `parity.unet.rel_row`) at the README's recommended float32
tolerances:
- models: `unet_out`, `vae_*`, `text_last_hidden_state`, `latents_x0`, `inversion_cond`,
  `edit_text_embeds`, `edit_pnp_guidance_embeds` (1e-5), `text_input_ids` (exact);
- inversion: `inversion_latents` (all 21, 2e-5), `inversion_recon_latents`/`_frames` (2e-4),
  the schedules (exact);
- edit setup: `edit_vae_recon` (1e-5), `edit_eps`, `edit_noisy_latents` (5e-5), ᾱ, the
  timesteps, the injection lists, the keyframe indices (exact);
- the edit (keyframes from `edit_pivot_offsets`): `edit_latents` (all, 3e-3) and
  `edit_latents[k]` (1e-5·1.8^k), `edit_frames` (3e-3), `edit_step0_unet_in/out` (5e-5),
  `edit_steplast_unet_in/out` (3e-3), `edit_step0_unet_text` (1e-5), `edit_nn_idx` (exact:
  rel_err is then the share of differing entries) and `edit_frames_png_u8` = floor(255·frames)
  (rel_err is the MAX ABSOLUTE difference in levels, tol 1: a float32 difference of 1e-6 can
  cross an integer boundary, as the reference's own float32 and float64 runs do);
- units: `prop_out`, `ea_out_injected`, `ea_out_not_injected`, `ea_down_out` (1e-6).

Staging: the inversion/edit chain starts from io.npz's own `latents_x0` and embeddings, so each
stage is held to its tolerance given that stage's golden inputs. The chain run from this port's
own VAE/CLIP outputs is checked too, as rows `e2e/<key>` (inversion_latents, edit_latents,
edit_frames, edit_nn_idx, edit_frames_png_u8). Its step-by-step latents are not rows: two
independent float32 errors add up there (see docs/ipfacediff.md).

With `f64=True` (the default) the float64 run (`jax_enable_x64`, params cast to float64) runs
in a subprocess (`python -m s3jax.parity.ipfacediff --f64 GOLDEN`; x64 is process-global),
concurrently with the float32 run, and adds rows `f64/<key>` against `io_f64.npz` at 1e-9, its
chain started from io_f64's latents_x0 and embeddings. Two float32 islands of the reference
cannot be reproduced bit for bit by XLA: the UNet's timestep sinusoid (torch's float32 sin/cos
differ by an ulp in a few % of the entries), for which the f64 run uses torch's own table
(`torch_timestep_sinusoid`, an oracle imported lazily; without torch every f64 row is held to
1e-6, the README's "without the islands"), and the CLIP text encoder's float32 softmax, so the
rows computed by CLIP (F64_FLOAT32_MODULE_KEYS) are held to 1e-6.
`check` prints nothing; `python -m s3jax.parity.ipfacediff [--f64] GOLDEN` prints one JSON row
per line (all rows, or the float64 ones for the parent `check`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from s3jax.parity.unet import rel_row
from s3jax.sd import tokenflow
from s3jax.sd.pipeline import StableDiffusion, jitted_text_encoder
from s3jax.sd.unet import Attention, blend_weights_for_batch, propagate_keyframe_attention
from s3jax.sd.vae import AutoencoderKL

IO_FILE = "io.npz"
IO_F64_FILE = "io_f64.npz"
META_FILE = "meta.json"
BACKENDS = ("jax",)  # the torch twin has its own module (parity/ipfacediff_torch.py)

TOL_MODEL = 1e-5
TOL_INVERSION = 2e-5
TOL_RECON = 2e-4
TOL_EDIT_START = 5e-5
TOL_EDIT = 3e-3
TOL_UNIT = 1e-6
TOL_F64 = 1e-9
TOL_F64_FLOAT32_MODULES = 1e-6
PNG_MAX_LEVELS = 1
# io_f64 keys computed by the CLIP text encoder: its attention softmax is float32 in every dtype
# (transformers' eager attention, which wrote the golden), and XLA's float32 exp differs from
# torch's in the last ulp (2.6e-8 in x64).
F64_FLOAT32_MODULE_KEYS = frozenset(
    {"text_last_hidden_state", "inversion_cond", "edit_text_embeds", "edit_pnp_guidance_embeds"}
)
NUM_TRAIN_TIMESTEPS = 1000


def nhwc(a) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(np.asarray(a), -3, -1))


def nchw(a) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, -3))


def read_golden(golden_dir) -> tuple[dict, dict]:
  d = pathlib.Path(golden_dir)
  for name in (IO_FILE, META_FILE):
    if not (d / name).is_file():
      raise FileNotFoundError(f"golden file not found: {d / name}")
  with np.load(d / IO_FILE, allow_pickle=False) as z:
    io = {k: z[k] for k in z.files}
  return io, json.loads((d / META_FILE).read_text())["config"]


def flax_path(diffusers_path: str) -> tuple[str, ...]:
  """'up_blocks.2.attentions.1.transformer_blocks.0.attn1' -> ('up_blocks_2', ..., 'attn1')."""
  return tuple(re.sub(r"\.(\d+)", r"_\1", diffusers_path).split("."))


def sub_tree(params, path):
  for name in path:
    params = params[name]
  return params


def store_key(nn_block: str) -> str:
  """golden nn block name (`...attentions.0.transformer_blocks.0`) -> UNet store key."""
  return nn_block.removesuffix(".transformer_blocks.0")


# --------------------------------------------------------------------------------- the run
CHAIN_INPUTS = ("latents_x0", "inversion_cond", "edit_text_embeds", "edit_pnp_guidance_embeds")


@functools.lru_cache(maxsize=8)
def torch_sinusoid_table(dim: int, flip_sin_to_cos: bool, freq_shift: float) -> np.ndarray:
  """diffusers' float32 timestep sinusoid for t = 0..999, computed by torch itself."""
  import torch  # Lazy: an oracle (test extra), used by the float64 run only.
  from diffusers.models.embeddings import get_timestep_embedding

  t = torch.arange(NUM_TRAIN_TIMESTEPS)
  emb = get_timestep_embedding(
      t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift
  )
  return emb.numpy()


def torch_timestep_sinusoid(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """SDUNet.timestep_sinusoid_fn with torch's bits: its float32 sin/cos differ from XLA's by an
  ulp in a few % of the entries, which an x64 run would carry as ~2e-9."""
  table = torch_sinusoid_table(dim, bool(flip_sin_to_cos), float(freq_shift))
  return jnp.asarray(table)[jnp.asarray(timesteps, jnp.int32)]


def torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def load_model(golden_dir, x64: bool) -> StableDiffusion:
  """The golden tiny models; for the x64 run params cast to float64 and, where torch is
  installed, torch's own float32 timestep sinusoid (the SPEC §13 island, bit for bit)."""
  sd = StableDiffusion.load(golden_dir, dtype=jnp.float64 if x64 else jnp.float32)
  if x64:
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
    sd.unet_params, sd.vae_params, sd.text_params = map(
        cast, (sd.unet_params, sd.vae_params, sd.text_params)
    )
    if torch_available():
      sd.timestep_sinusoid_fn = torch_timestep_sinusoid
  return sd


def run_models(sd: StableDiffusion, io: dict, cfg: dict) -> dict[str, np.ndarray]:
  """Units (a)-(c), (f), (g), the frame latents and the text embeddings, from golden inputs."""
  dt = sd.dtype
  arr = lambda a: jnp.asarray(np.asarray(a), dt)  # noqa: E731
  out = {}
  # (a) one plain UNet forward
  unet_model = sd.unet_module()
  eps = jax.jit(lambda p, x, t, c: unet_model.apply({"params": p}, x, t, c))(
      sd.unet_params,
      arr(nhwc(io["unet_in_latents"])),
      jnp.asarray(io["unet_in_timesteps"], jnp.int32),
      arr(io["unet_in_encoder_hidden_states"]),
  )
  out["unet_out"] = nchw(eps)

  # (b) VAE
  vae_model = AutoencoderKL(sd.vae_config, dtype=dt)
  mean, logvar = jax.jit(
      lambda p, x: vae_model.apply({"params": p}, x, method=AutoencoderKL.encode)
  )(
      sd.vae_params, 2 * arr(nhwc(io["frames"][:2])) - 1
  )  # = vae_in, in the run's dtype
  decoded = jax.jit(lambda p, z: vae_model.apply({"params": p}, z, method=AutoencoderKL.decode))(
      sd.vae_params, mean.astype(dt)
  )
  out["vae_posterior_mean"], out["vae_posterior_logvar"] = nchw(mean), nchw(logvar)
  out["vae_decoded"] = nchw(decoded)

  # (c) text
  out["text_input_ids"] = sd.tokenizer([str(p) for p in io["text_prompts"]]).astype(np.int64)
  out["text_last_hidden_state"] = np.asarray(
      jitted_text_encoder(sd.text_config, dt)(
          sd.text_params, jnp.asarray(io["text_input_ids"], jnp.int32)
      )
  )

  # the pipeline's own encoders: frame latents and prompt embeddings
  out["latents_x0"] = nchw(sd.encode_frames(arr(nhwc(io["frames"]))))
  out["inversion_cond"] = np.asarray(sd.text_embeds([cfg["inversion_prompt"]]))
  out["edit_text_embeds"] = np.asarray(sd.text_embeds([cfg["negative_prompt"], cfg["prompt"]]))
  out["edit_pnp_guidance_embeds"] = out["inversion_cond"]

  # (f) propagation alone
  pf, pk = arr(io["prop_frame_feats"]), arr(io["prop_keyframe_feats"])
  pa = arr(io["prop_keyframe_attn_out"])
  n_kf, seq, ch = pk.shape[1:]
  out["prop_out"] = np.stack(
      [
          np.asarray(
              propagate_keyframe_attention(
                  pf[0],
                  pk[0],
                  pa.reshape(3, n_kf, seq, ch),
                  int(b),
                  blend_weights_for_batch(int(b), pf.shape[1], dt),
              )
          )
          for b in io["prop_batch_idx"]
      ]
  )

  # (g) extended attention with/without Q/K injection
  def attn1(block: str, x, inject):
    module = Attention(x.shape[-1], sd.unet_config.heads, dt)
    p = sub_tree(sd.unet_params, flax_path(block))
    return np.asarray(module.apply({"params": p}, x, inject, method=Attention.extended))

  timesteps = sd.scheduler.timesteps(cfg["n_timesteps"])
  _, k_a = tokenflow.injection_counts(cfg["n_timesteps"], cfg["pnp_f_t"], cfg["pnp_attn_t"])
  qk_times = set(timesteps[:k_a].tolist())
  for name in ("injected", "not_injected"):
    inject = jnp.asarray(int(io[f"ea_t_{name}"]) in qk_times)
    out[f"ea_out_{name}"] = attn1(str(io["ea_block"]), arr(io["ea_x"]), inject)
  out["ea_down_out"] = attn1(str(io["ea_down_block"]), arr(io["ea_down_x"]), None)
  return out


def run_chain(
    sd: StableDiffusion, io: dict, cfg: dict, inputs: dict, preview: bool = True
) -> dict[str, np.ndarray]:
  """Units (d)-(e): the inversion (and, with `preview`, its reconstruction) and the edit from
  `inputs` (CHAIN_INPUTS, NCHW / (n,77,C)) with the golden keyframes; every schedule, latent,
  UNet call and frame of the chain."""
  dt = sd.dtype
  arr = lambda a: jnp.asarray(np.asarray(a), dt)  # noqa: E731
  s = sd.scheduler
  x0, cond = arr(nhwc(inputs["latents_x0"])), arr(inputs["inversion_cond"])
  text, src_text = arr(inputs["edit_text_embeds"]), arr(inputs["edit_pnp_guidance_embeds"])
  out = {}
  n_inv, n_edit, b = cfg["n_inversion_steps"], cfg["n_timesteps"], cfg["batch_size"]

  # (d) inversion, every step saved, and the preview reconstruction
  asc = s.timesteps(n_inv)[::-1]
  out["inversion_timesteps"] = asc
  out["inversion_timesteps_to_save"] = s.timesteps(cfg["save_steps"])
  out["inversion_saved_timesteps"] = tokenflow.inversion_save_plan(
      s, n_inv, s.timesteps(cfg["save_steps"])
  )[2]
  saved_t, saved = sd.invert(x0, cond, n_inv, asc)
  out["inversion_latents"] = nchw(jnp.concatenate([x0[None], saved], axis=0))
  if preview:
    recon = sd.reconstruct(saved[-1], cond, n_inv, n_saved=len(saved_t))  # the inversion's scan
    out["inversion_recon_latents"] = nchw(recon)
    out["inversion_recon_frames"] = nchw(sd.decode_latents(recon))

  # (e) the edit: setup
  timesteps = s.timesteps(n_edit)
  k_f, k_a = tokenflow.injection_counts(n_edit, cfg["pnp_f_t"], cfg["pnp_attn_t"])
  out["alphas_cumprod"] = s.alphas_cumprod
  out["final_alpha_cumprod"] = np.asarray([s.final_alpha_cumprod])
  out["edit_timesteps"] = timesteps
  out["edit_conv_injection_timesteps"] = timesteps[:k_f]
  out["edit_qk_injection_timesteps"] = timesteps[:k_a]
  n = tokenflow.usable_frames(min(x0.shape[0], cfg["n_frames"]), b)
  x0 = x0[:n]
  out["edit_latents_x0"] = nchw(x0)
  out["edit_vae_recon"] = nchw(sd.decode_latents(x0))
  eps_star = tokenflow.ddim_eps(s, saved[-1, :n], x0, int(saved_t[-1]))
  out["edit_eps"] = nchw(eps_star)
  out["edit_noisy_latents"] = nchw(tokenflow.start_latent(s, x0, eps_star, n_edit))
  offsets = np.asarray(io["edit_pivot_offsets"])
  n_batches = n // b
  out["edit_pivot_idx"] = offsets + np.arange(n_batches) * b

  # the edit loop
  uncond, cond_text = text[:1], text[1:]
  final, extras = tokenflow.edit(
      sd.unet_params,
      sd.unet_config,
      s,
      x0,
      tokenflow.saved_latents_for(saved_t, saved[:, :n], timesteps),
      eps_star,
      (uncond, cond_text, src_text),
      n_timesteps=n_edit,
      guidance_scale=cfg["guidance_scale"],
      pnp_f_t=cfg["pnp_f_t"],
      pnp_attn_t=cfg["pnp_attn_t"],
      batch_size=b,
      pivots=offsets,
      return_trajectory=True,
      dtype=dt,
      return_nn=True,
      return_unet_io=True,
      unet_module=sd.unet_module(),
  )
  out["edit_latents"] = nchw(extras["trajectory"])
  out["edit_frames"] = nchw(sd.decode_latents(final))
  out["edit_frames_png_u8"] = np.floor(255 * np.asarray(out["edit_frames"], np.float64)).astype(
      np.uint8
  )
  for tag, k in (("step0", 0), ("steplast", n_edit - 1)):
    out[f"edit_{tag}_unet_t"] = np.asarray(timesteps[k])
    out[f"edit_{tag}_unet_in"] = nchw(extras["unet_in"][k])
    out[f"edit_{tag}_unet_out"] = nchw(extras["unet_out"][k])
  contexts = [
      tokenflow.branch_context((src_text, uncond, cond_text), m)
      for m in [n_batches] + [b] * n_batches
  ]
  out["edit_step0_unet_text"] = np.asarray(jnp.concatenate(contexts))
  out["edit_nn_idx"] = gather_nn(extras["nn"], io["edit_nn_table"], io["edit_nn_blocks"])
  return out


def run(golden_dir, x64: bool = False, chain_inputs: dict | None = None):
  """(outputs, end-to-end outputs): every computed io.npz array (NCHW where the golden is).

  The inversion/edit chain starts from `chain_inputs` (default: io.npz's own latents_x0 and
  embeddings), so each stage is held to its tolerance given the golden inputs of that stage;
  the end-to-end chain (from this port's own VAE and CLIP outputs) is returned apart (float32
  run only: the float64 VAE/CLIP have float32 parts).
  """
  io, cfg = read_golden(golden_dir)
  sd = load_model(golden_dir, x64)
  out = run_models(sd, io, cfg)
  chain_inputs = io if chain_inputs is None else chain_inputs
  out.update(run_chain(sd, io, cfg, {k: chain_inputs[k] for k in CHAIN_INPUTS}))
  e2e = None if x64 else run_chain(sd, io, cfg, {k: out[k] for k in CHAIN_INPUTS}, False)
  return {k: np.asarray(v) for k, v in out.items()}, e2e


def gather_nn(nn: dict, table: np.ndarray, blocks) -> np.ndarray:
  """Our nn indices {block: (steps, batches, 2, B·S)} laid out as the golden `edit_nn_idx`."""
  nn = {k: np.asarray(v) for k, v in nn.items()}
  flat = np.zeros(int(table[:, 4].max() + table[:, 5].max()), np.int64)
  for step, batch, block, chunk, offset, n_rows, _ in table:
    flat[offset : offset + n_rows] = nn[store_key(str(blocks[block]))][step, batch, chunk]
  return flat


# ------------------------------------------------------------------------------ comparison
def tolerance(key: str) -> float:
  if key in ("unet_out", "text_last_hidden_state", "latents_x0", "inversion_cond"):
    return TOL_MODEL
  if key.startswith("vae_") or key in (
      "edit_text_embeds",
      "edit_pnp_guidance_embeds",
      "edit_vae_recon",
      "edit_latents_x0",
      "edit_step0_unet_text",
  ):
    return TOL_MODEL
  if key == "inversion_latents":
    return TOL_INVERSION
  if key.startswith("inversion_recon"):
    return TOL_RECON
  if key in ("edit_eps", "edit_noisy_latents", "edit_step0_unet_in", "edit_step0_unet_out"):
    return TOL_EDIT_START
  if key in ("edit_latents", "edit_frames", "edit_steplast_unet_in", "edit_steplast_unet_out"):
    return TOL_EDIT
  if key.startswith(("prop_", "ea_")):
    return TOL_UNIT
  return 0.0  # integer arrays, schedules, ᾱ


def exact_row(name: str, out, ref) -> dict:
  """Share of differing entries (0 = equal)."""
  if np.shape(out) != np.shape(ref):
    return rel_row(name, out, ref, 0.0)
  frac = float(np.mean(np.asarray(out) != np.asarray(ref))) if np.size(ref) else 0.0
  return dict(name=name, rel_err=frac, tol=0.0, ok=frac == 0.0, metric="fraction differing")


def png_row(name: str, out_u8, ref_u8) -> dict:
  """floor(255·frames) PNG levels: rel_err is the max absolute difference in levels."""
  png, ref = np.asarray(out_u8).astype(int), np.asarray(ref_u8).astype(int)
  if png.shape != ref.shape:
    return rel_row(name, png, ref, PNG_MAX_LEVELS)
  diff = np.abs(png - ref)
  return dict(
      name=name,
      rel_err=float(diff.max()),
      tol=PNG_MAX_LEVELS,
      ok=bool(diff.max() <= PNG_MAX_LEVELS),
      metric="max abs difference in levels",
      n_differing=int((diff > 0).sum()),
  )


E2E_KEYS = ("inversion_latents", "edit_latents", "edit_frames", "edit_nn_idx")


def compare(out: dict, io: dict, e2e: dict | None = None) -> list[dict]:
  rows = []
  for key in sorted(out):
    if key not in io or key == "edit_frames_png_u8":
      continue
    ref = io[key]
    if key in ("text_input_ids", "edit_nn_idx") or ref.dtype.kind in "iu":
      rows.append(exact_row(key, out[key], ref))
    elif key in ("alphas_cumprod", "final_alpha_cumprod"):
      rows.append(exact_row(key, out[key].astype(ref.dtype), ref))
    else:
      rows.append(rel_row(key, out[key], ref, tolerance(key)))
  for k in range(len(io["edit_latents"])):
    tol = 1e-5 * 1.8**k
    rows.append(rel_row(f"edit_latents[{k}]", out["edit_latents"][k], io["edit_latents"][k], tol))
  rows.append(png_row("edit_frames_png_u8", out["edit_frames_png_u8"], io["edit_frames_png_u8"]))
  if e2e is not None:
    for key in E2E_KEYS:
      if key == "edit_nn_idx":
        rows.append(exact_row(f"e2e/{key}", e2e[key], io[key]))
      else:
        rows.append(rel_row(f"e2e/{key}", e2e[key], io[key], tolerance(key)))
    rows.append(
        png_row("e2e/edit_frames_png_u8", e2e["edit_frames_png_u8"], io["edit_frames_png_u8"])
    )
  return rows


def compare_f64(out: dict, io64: dict, torch_sinusoid: bool = True) -> list[dict]:
  """f64 rows at 1e-9; at 1e-6 (the README's "without the islands") for the CLIP rows and, when
  the run could not use torch's sinusoid, for everything."""
  rows = []
  for key in sorted(io64):
    if key not in out:
      rows.append(dict(name=f"f64/{key}", rel_err=float("inf"), tol=TOL_F64, ok=False))
    elif key == "edit_nn_idx":
      rows.append(exact_row(f"f64/{key}", out[key], io64[key]))
    else:
      loose = key in F64_FLOAT32_MODULE_KEYS or not torch_sinusoid
      tol = TOL_F64_FLOAT32_MODULES if loose else TOL_F64
      rows.append(rel_row(f"f64/{key}", out[key], io64[key], tol))
  return rows


def f64_rows(golden_dir) -> list[dict]:
  """The float64 run, in this process: needs jax_enable_x64 (the `--f64` entry point)."""
  if not jax.config.jax_enable_x64:
    raise RuntimeError("the float64 check needs jax_enable_x64 (run `--f64` in a new process)")
  with np.load(pathlib.Path(golden_dir) / IO_F64_FILE, allow_pickle=False) as z:
    io64 = {k: z[k] for k in z.files}
  return compare_f64(run(golden_dir, x64=True, chain_inputs=io64)[0], io64, torch_available())


def start_f64_subprocess(golden_dir) -> subprocess.Popen:
  env = dict(os.environ, JAX_ENABLE_X64="1")
  return subprocess.Popen(
      [sys.executable, "-m", "s3jax.parity.ipfacediff", "--f64", str(golden_dir)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
  )


def collect_f64_subprocess(proc: subprocess.Popen) -> list[dict]:
  stdout, stderr = proc.communicate()
  if proc.returncode != 0:
    tail = stderr.strip().splitlines()[-5:]
    return [dict(name="f64/run", rel_err=float("inf"), tol=TOL_F64, ok=False, error=tail)]
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def check(golden_dir, backend: str = "jax", f64: bool = True) -> list[dict]:
  """All rows of the float32 run (and, with f64, of the float64 run) as the docstring says."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  io, _ = read_golden(golden_dir)
  if f64 and not (pathlib.Path(golden_dir) / IO_F64_FILE).is_file():
    raise FileNotFoundError(f"golden file not found: {pathlib.Path(golden_dir) / IO_F64_FILE}")
  proc = start_f64_subprocess(golden_dir) if f64 else None
  try:
    out, e2e = run(golden_dir)
    rows = compare(out, io, e2e)
  except BaseException:
    if proc is not None:
      proc.kill()
    raise
  if proc is not None:
    rows += collect_f64_subprocess(proc)
  return rows


def main(argv) -> int:
  """`python -m s3jax.parity.ipfacediff [--f64] GOLDEN_DIR`: one JSON row per line; every row
  of `check`, or with --f64 the float64 rows alone (the subprocess `check` starts)."""
  args = argv[1:]
  f64_only = args[:1] == ["--f64"]
  if f64_only:
    args = args[1:]
  if len(args) != 1:
    print("usage: python -m s3jax.parity.ipfacediff [--f64] GOLDEN_DIR", file=sys.stderr)
    return 2
  if f64_only:
    jax.config.update("jax_enable_x64", True)
  for row in f64_rows(args[0]) if f64_only else check(args[0]):
    print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
