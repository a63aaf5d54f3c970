"""Stable Diffusion 1.x model bundle and IP-FaceDiff's video edit (DDIM inversion, TokenFlow-PnP).

`StableDiffusion.load(dir)` reads either layout:
- diffusers: `unet/{config.json, diffusion_pytorch_model.safetensors}`, `vae/` (same names),
  `text_encoder/{config.json, model.safetensors}`, `tokenizer/{vocab.json, merges.txt,
  tokenizer_config.json}`, `scheduler/scheduler_config.json` (`.bin` weights also read);
- the flat golden layout of `golden/ipfacediff`: `unet.safetensors` + `unet_config.json`,
  `vae.*`, `text_encoder.*`, `tokenizer/`, `scheduler_config.json`.
`save_sd_dir(dir, sd)` writes the diffusers layout (diffusers' and transformers'
`from_pretrained` read each folder), so tests and demos can make tiny random models
(`StableDiffusion.random`).

The bundle's methods are the reference's steps (golden SPEC §2-§5): `encode_frames` (VAE posterior
mean × 0.18215, the constant hard-coded as the reference does), `decode_latents`
(clamp(D(z / 0.18215) / 2 + 0.5, 0, 1)), `text_embeds` (CLIP last_hidden_state), `invert`
(§4), and `edit_video`, the whole edit. Frames are NHWC float32 in [0, 1] at this boundary
(the reference's ToTensor frames).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import numpy as safetensors_np

from s3jax.porting.sd_keys import unet_params_from_state_dict, unet_state_dict_from_params
from s3jax.porting.sd_vae_clip_keys import (
    abstract_clip_text_params,
    abstract_vae_params,
    clip_text_params_from_state_dict,
    save_clip_dir,
    vae_params_from_state_dict,
    vae_state_dict_from_params,
)
from s3jax.porting.state_dict import load_state_dict
from s3jax.sd import clip, tokenflow, unet, vae
from s3jax.sd.scheduler import SDScheduler
from s3jax.sd.tokenizer import CLIPTokenizer

LATENT_SCALE = 0.18215  # hard-coded in the reference (it does not read `scaling_factor`)
# TokenFlow's configs/config_pnp.yaml default (SPEC §8).
NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
VAE_BATCH = 10  # frames per VAE call (the reference's encode/decode batch; order-independent)
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# (config file, weight files) per component, per layout.
DIFFUSERS_LAYOUT = {
    "unet": ("unet/config.json", tuple(f"unet/{w}" for w in DIFFUSERS_WEIGHTS)),
    "vae": ("vae/config.json", tuple(f"vae/{w}" for w in DIFFUSERS_WEIGHTS)),
    "text_encoder": (
        "text_encoder/config.json",
        tuple(f"text_encoder/{w}" for w in TRANSFORMERS_WEIGHTS),
    ),
    "scheduler": ("scheduler/scheduler_config.json", ()),
}
FLAT_LAYOUT = {
    "unet": ("unet_config.json", ("unet.safetensors",)),
    "vae": ("vae_config.json", ("vae.safetensors",)),
    "text_encoder": ("text_encoder_config.json", ("text_encoder.safetensors",)),
    "scheduler": ("scheduler_config.json", ()),
}


# ------------------------------------------------------------------------- config dicts
def unet_config_to_diffusers(config: unet.SDUNetConfig) -> dict:
  """The diffusers `unet/config.json` of an SD-1.x UNet (UNet2DConditionModel reads it)."""
  return {
      "_class_name": "UNet2DConditionModel",
      "in_channels": config.in_channels,
      "out_channels": config.out_channels,
      "block_out_channels": list(config.block_out_channels),
      "layers_per_block": config.layers_per_block,
      "down_block_types": list(config.down_block_types),
      "up_block_types": list(config.up_block_types),
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "cross_attention_dim": config.cross_attention_dim,
      "attention_head_dim": config.attention_head_dim,
      "norm_num_groups": config.norm_num_groups,
      "norm_eps": config.norm_eps,
      "flip_sin_to_cos": config.flip_sin_to_cos,
      "freq_shift": config.freq_shift,
      "sample_size": config.sample_size,
      "act_fn": "silu",
      "downsample_padding": 1,
      "mid_block_scale_factor": 1,
      "center_input_sample": False,
      "use_linear_projection": False,
      "upcast_attention": False,
      "only_cross_attention": False,
      "dual_cross_attention": False,
  }


def scheduler_config_to_diffusers(s: SDScheduler) -> dict:
  """A DDIMScheduler `scheduler_config.json` with every setting explicit (so `clip_sample`
  keeps its resolved value whatever scheduler class reads it)."""
  return {
      "_class_name": "DDIMScheduler",
      "num_train_timesteps": s.num_train_timesteps,
      "beta_start": s.beta_start,
      "beta_end": s.beta_end,
      "beta_schedule": s.beta_schedule,
      "trained_betas": None,
      "clip_sample": s.clip_sample,
      "clip_sample_range": s.clip_sample_range,
      "set_alpha_to_one": s.set_alpha_to_one,
      "steps_offset": s.steps_offset,
      "prediction_type": "epsilon",
      "thresholding": False,
      "timestep_spacing": "leading",
      "rescale_betas_zero_snr": False,
  }


# ------------------------------------------------------------------------------- loading
def layout_of(directory: pathlib.Path) -> dict:
  """The file table of the layout `directory` uses; FileNotFoundError when it is neither."""
  if (directory / "unet").is_dir() or (directory / "model_index.json").is_file():
    return DIFFUSERS_LAYOUT
  if (directory / FLAT_LAYOUT["unet"][0]).is_file():
    return FLAT_LAYOUT
  if not directory.is_dir():
    raise FileNotFoundError(f"Stable Diffusion directory not found: {directory}")
  raise FileNotFoundError(
      f"{directory} is not a Stable Diffusion directory: neither {DIFFUSERS_LAYOUT['unet'][0]} "
      f"(diffusers layout) nor {FLAT_LAYOUT['unet'][0]} (flat golden layout) is there"
  )


def read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"missing file: {path}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_weights(directory: pathlib.Path, names: Sequence[str]) -> dict[str, np.ndarray]:
  """The state dict of the first of `names` present (float16 upcast to float32)."""
  for name in names:
    if (directory / name).is_file():
      sd = load_state_dict(directory / name)
      return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in sd.items()}
  raise FileNotFoundError(
      f"missing weights: none of {', '.join(str(directory / n) for n in names)} exists"
  )


def check_tokenizer_dir(directory: pathlib.Path) -> None:
  missing = [str(directory / f) for f in TOKENIZER_FILES if not (directory / f).is_file()]
  if missing:
    raise FileNotFoundError(f"missing tokenizer file(s): {', '.join(missing)}")


@functools.lru_cache(maxsize=8)
def jitted_vae_encode(config: vae.VAEConfig, dtype):
  """params, frames01 (n,H,W,3) -> latents (n,h,w,4) = posterior mean × 0.18215."""
  model = vae.AutoencoderKL(config, dtype=dtype)

  def encode(params, frames01):
    mean, _ = model.apply({"params": params}, 2 * frames01 - 1, method=vae.AutoencoderKL.encode)
    return mean.astype(frames01.dtype) * LATENT_SCALE

  return jax.jit(encode)


@functools.lru_cache(maxsize=8)
def jitted_vae_decode(config: vae.VAEConfig, dtype):
  """params, latents -> frames01 = clamp(D(z / 0.18215) / 2 + 0.5, 0, 1)."""
  model = vae.AutoencoderKL(config, dtype=dtype)

  def decode(params, z):
    x = model.apply({"params": params}, z / LATENT_SCALE, method=vae.AutoencoderKL.decode)
    return jnp.clip(x.astype(z.dtype) / 2 + 0.5, 0, 1)

  return jax.jit(decode)


@functools.lru_cache(maxsize=8)
def jitted_text_encoder(config: clip.CLIPTextConfig, dtype):
  model = clip.CLIPTextModel(config, dtype=dtype)
  return jax.jit(lambda params, ids: model.apply({"params": params}, ids)[0])


@functools.lru_cache(maxsize=16)
def jitted_ddim_path(
    unet_module: unet.SDUNet, n_saved: int, frame_chunk: Optional[int], mesh: Optional[Mesh]
):
  """params, x, cond, path -> (final x, saved latents): `tokenflow.ddim_path`, compiled once per
  UNet, buffer size and path length (inversion and reconstruction alike)."""
  apply = tokenflow.unet_apply(unet_module)

  def run(params, x, cond, path):
    eps_fn = lambda x, t, c: apply(params, x, t, c)  # noqa: E731
    return tokenflow.ddim_path(eps_fn, x, cond, path, n_saved, frame_chunk, mesh)

  return jax.jit(run)


def random_params(abstract, seed: int):
  """float32 numpy params of the shapes in `abstract` (ShapeDtypeStructs), without compiling an
  init: kernels N(0, 1/fan_in), embeddings N(0, 0.02²), norm scales 1 + 0.1 N(0,1), biases
  0.1 N(0,1) (no trivial value, as the golden tiny models)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    z = rng.standard_normal(a.shape).astype(np.float32)
    if name == "scale":
      return 1 + 0.1 * z
    if name == "bias":
      return 0.1 * z
    if name == "embedding":
      return 0.02 * z
    return z / np.float32(np.sqrt(max(1, int(np.prod(a.shape[:-1])))))

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def batched(fn, x, batch: int):
  """fn over `x` in batches of `batch` rows (the last one padded, so one compiled shape)."""
  n = x.shape[0]
  outs = []
  for i in range(0, n, batch):
    part = x[i : i + batch]
    pad = batch - part.shape[0] if n > batch else 0
    if pad:
      part = jnp.concatenate([part, jnp.repeat(part[-1:], pad, axis=0)], axis=0)
    out = fn(part)
    outs.append(out[: out.shape[0] - pad] if pad else out)
  return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


@dataclasses.dataclass
class StableDiffusion:
  """UNet, VAE, CLIP text encoder (float32 params), tokenizer and DDIM scheduler of one SD-1.x
  model. `dtype` is the compute dtype of the three networks."""

  unet_config: unet.SDUNetConfig
  unet_params: Any
  vae_config: vae.VAEConfig
  vae_params: Any
  text_config: clip.CLIPTextConfig
  text_params: Any
  tokenizer: CLIPTokenizer
  scheduler: SDScheduler
  tokenizer_dir: Optional[pathlib.Path] = None
  dtype: Any = jnp.float32
  # Parity only: an oracle float32 timestep sinusoid (see SDUNet.timestep_sinusoid_fn).
  timestep_sinusoid_fn: Optional[Callable] = None

  # ----------------------------------------------------------------------- construction
  @classmethod
  def load(cls, directory, dtype=jnp.float32) -> "StableDiffusion":
    """Read a diffusers-layout or flat golden-layout directory (see the module docstring).
    FileNotFoundError names a missing file; ValueError an unsupported config."""
    d = pathlib.Path(directory)
    layout = layout_of(d)
    unet_config = unet.SDUNetConfig.from_diffusers(read_json(d / layout["unet"][0]))
    vae_config = vae.VAEConfig.from_diffusers(read_json(d / layout["vae"][0]))
    text_config = clip.CLIPTextConfig.from_transformers(read_json(d / layout["text_encoder"][0]))
    scheduler = SDScheduler.from_diffusers(read_json(d / layout["scheduler"][0]))
    tokenizer_dir = d / "tokenizer"
    check_tokenizer_dir(tokenizer_dir)
    weights = {k: read_weights(d, layout[k][1]) for k in ("unet", "vae", "text_encoder")}
    return cls(
        unet_config=unet_config,
        unet_params=unet_params_from_state_dict(weights["unet"], unet_config),
        vae_config=vae_config,
        vae_params=vae_params_from_state_dict(weights["vae"], vae_config),
        text_config=text_config,
        text_params=clip_text_params_from_state_dict(weights["text_encoder"], text_config),
        tokenizer=CLIPTokenizer.from_dir(tokenizer_dir),
        scheduler=scheduler,
        tokenizer_dir=tokenizer_dir,
        dtype=dtype,
    )

  @classmethod
  def random(
      cls,
      unet_config: unet.SDUNetConfig,
      vae_config: vae.VAEConfig,
      text_config: clip.CLIPTextConfig,
      tokenizer_dir,
      scheduler: Optional[SDScheduler] = None,
      seed: int = 0,
  ) -> "StableDiffusion":
    """Random weights (`random_params`) for tests and demos; the tokenizer is read from
    `tokenizer_dir` (its vocabulary must fit text_config.vocab_size)."""
    check_tokenizer_dir(pathlib.Path(tokenizer_dir))
    return cls(
        unet_config=unet_config,
        unet_params=random_params(unet.abstract_params(unet_config), seed),
        vae_config=vae_config,
        vae_params=random_params(abstract_vae_params(vae_config), seed + 1),
        text_config=text_config,
        text_params=random_params(abstract_clip_text_params(text_config), seed + 2),
        tokenizer=CLIPTokenizer.from_dir(tokenizer_dir),
        scheduler=scheduler or SDScheduler(),
        tokenizer_dir=pathlib.Path(tokenizer_dir),
    )

  def unet_module(self) -> unet.SDUNet:
    """The SDUNet this bundle runs (compute dtype, optional oracle sinusoid)."""
    extra = {}
    if self.timestep_sinusoid_fn is not None:
      extra["timestep_sinusoid_fn"] = self.timestep_sinusoid_fn
    return unet.SDUNet(self.unet_config, dtype=jnp.dtype(self.dtype), **extra)

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def resolution(self) -> int:
    """The native image size: the UNet's sample_size times the VAE's down-sampling."""
    return self.unet_config.sample_size * self.vae_scale_factor

  # ---------------------------------------------------------------------------- the models
  def encode_frames(self, frames01, batch_size: int = VAE_BATCH) -> jax.Array:
    """Frames (N,H,W,3) in [0,1] -> latents (N,H/f,W/f,4): posterior mean × 0.18215."""
    fn = jitted_vae_encode(self.vae_config, self.dtype)
    frames01 = jnp.asarray(frames01, jnp.result_type(float))
    return batched(lambda x: fn(self.vae_params, x), frames01, batch_size)

  def decode_latents(self, latents, batch_size: int = VAE_BATCH) -> jax.Array:
    """Latents -> frames (N,H,W,3) in [0,1]: clamp(D(z / 0.18215) / 2 + 0.5, 0, 1)."""
    fn = jitted_vae_decode(self.vae_config, self.dtype)
    return batched(lambda z: fn(self.vae_params, z), jnp.asarray(latents), batch_size)

  def text_embeds(self, prompts: Sequence[str]) -> jax.Array:
    """CLIP last_hidden_state (n, 77, C) of the prompts (tokenized with truncation to 77)."""
    ids = self.tokenizer(list(prompts), max_length=self.text_config.max_position_embeddings)
    return jitted_text_encoder(self.text_config, self.dtype)(self.text_params, jnp.asarray(ids))

  def invert(
      self,
      latents_x0,
      cond,
      n_steps: int,
      save_timesteps,
      frame_chunk: Optional[int] = None,
      mesh: Optional[Mesh] = None,
  ):
    """DDIM inversion (SPEC §4), one jitted scan -> (saved timesteps (k,) ascending, latents
    (k, N,h,w,4)); the noisiest is always saved, last."""
    path, saved_t = tokenflow.inversion_path(self.scheduler, n_steps, save_timesteps)
    run = jitted_ddim_path(self.unet_module(), len(saved_t), frame_chunk, mesh)
    _, saved = run(self.unet_params, jnp.asarray(latents_x0), jnp.asarray(cond), path)
    return saved_t, saved

  def reconstruct(self, latents_t, cond, n_steps: int, n_saved: int = 0) -> jax.Array:
    """The reference's preview: n_steps unclipped DDIM steps down from the noisiest latent.
    (`n_saved` only picks the compiled scan: that of an inversion saving n_saved latents.)"""
    path = tokenflow.reconstruction_path(self.scheduler, n_steps, n_saved)
    run = jitted_ddim_path(self.unet_module(), n_saved, None, None)
    x, _ = run(self.unet_params, jnp.asarray(latents_t), jnp.asarray(cond), path)
    return x

  # ------------------------------------------------------------------------------ the edit
  def edit_video(
      self,
      frames01,
      prompt: str,
      source_prompt: str,
      negative_prompt: str = NEGATIVE_PROMPT,
      n_inversion_steps: int = 500,
      n_timesteps: int = 50,
      guidance_scale: float = 7.5,
      pnp_f_t: float = 0.8,
      pnp_attn_t: float = 0.5,
      batch_size: int = 8,
      seed: int = 1,
      pivots=None,
      frame_chunk: Optional[int] = None,
      inversion_frame_chunk: Optional[int] = None,
      mesh: Optional[Mesh] = None,
  ) -> np.ndarray:
    """IP-FaceDiff's edit of a clip: frames (N,H,W,3) in [0,1] -> edited frames in [0,1],
    (N',H,W,3) with N' = N rounded down to a multiple of batch_size (as the reference).

    DDIM inversion of the frames under `source_prompt` with `n_inversion_steps`, saving at
    the edit schedule (SPEC §4 note), then TokenFlow-PnP under `prompt` (SPEC §5). Keyframes
    come from PRNGKey(seed) (the reference's torch draw cannot be reproduced) unless
    `pivots` (n_timesteps, N'/B) gives them. frame_chunk: batches per UNet call in the edit;
    inversion_frame_chunk: frames per UNet call in the inversion; mesh: shard the frames.
    """
    frames01 = np.asarray(frames01, np.float32)
    n = tokenflow.usable_frames(frames01.shape[0], batch_size)
    r_edit = self.scheduler.step_ratio(n_timesteps)
    if r_edit % self.scheduler.step_ratio(n_inversion_steps):
      raise ValueError(
          f"the inversion ({n_inversion_steps} steps) must pass every edit timestep "
          f"({n_timesteps} steps): 1000//{n_timesteps} must be a multiple of "
          f"1000//{n_inversion_steps}"
      )
    x0 = self.encode_frames(frames01[:n])
    cond_src = self.text_embeds([source_prompt])
    timesteps = self.scheduler.timesteps(n_timesteps)
    saved_t, saved = self.invert(
        x0, cond_src, n_inversion_steps, timesteps, inversion_frame_chunk, mesh
    )
    eps_star = tokenflow.ddim_eps(self.scheduler, saved[-1], x0, int(saved_t[-1]))
    uncond, cond = jnp.split(self.text_embeds([negative_prompt, prompt]), 2, axis=0)
    latents = tokenflow.edit(
        self.unet_params,
        self.unet_config,
        self.scheduler,
        x0,
        tokenflow.saved_latents_for(saved_t, saved, timesteps),
        eps_star,
        (uncond, cond, cond_src),
        n_timesteps=n_timesteps,
        guidance_scale=guidance_scale,
        pnp_f_t=pnp_f_t,
        pnp_attn_t=pnp_attn_t,
        batch_size=batch_size,
        pivots=jax.random.PRNGKey(seed) if pivots is None else pivots,
        frame_chunk=frame_chunk,
        mesh=mesh,
        unet_module=self.unet_module(),
    )
    return np.asarray(self.decode_latents(latents))


# --------------------------------------------------------------------------------- saving
def save_sd_dir(directory, sd: StableDiffusion) -> pathlib.Path:
  """Write `sd` in the diffusers layout (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/ copied from sd.tokenizer_dir, scheduler/); `StableDiffusion.load` and diffusers'
  / transformers' `from_pretrained` of each folder read it."""
  if sd.tokenizer_dir is None:
    raise ValueError("save_sd_dir needs sd.tokenizer_dir (the tokenizer files to copy)")
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)

  def write_json(rel: str, obj: dict) -> None:
    path = d / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")

  def write_weights(rel: str, state_dict: dict) -> None:
    sd_np = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_dict.items()}
    safetensors_np.save_file(sd_np, str(d / rel), metadata={"format": "pt"})

  write_json(
      "model_index.json",
      {
          "_class_name": "StableDiffusionPipeline",
          "unet": ["diffusers", "UNet2DConditionModel"],
          "vae": ["diffusers", "AutoencoderKL"],
          "text_encoder": ["transformers", "CLIPTextModel"],
          "tokenizer": ["transformers", "CLIPTokenizer"],
          "scheduler": ["diffusers", "DDIMScheduler"],
          "safety_checker": [None, None],
          "feature_extractor": [None, None],
          "requires_safety_checker": False,
      },
  )
  write_json("unet/config.json", unet_config_to_diffusers(sd.unet_config))
  write_weights(
      f"unet/{DIFFUSERS_WEIGHTS[0]}", unet_state_dict_from_params(sd.unet_params, sd.unet_config)
  )
  write_json("vae/config.json", sd.vae_config.to_diffusers())
  write_weights(f"vae/{DIFFUSERS_WEIGHTS[0]}", vae_state_dict_from_params(sd.vae_params))
  save_clip_dir(d / "text_encoder", sd.text_params, sd.text_config)
  write_json("scheduler/scheduler_config.json", scheduler_config_to_diffusers(sd.scheduler))
  tok = d / "tokenizer"
  tok.mkdir(exist_ok=True)
  src = pathlib.Path(sd.tokenizer_dir)
  for name in TOKENIZER_FILES + TOKENIZER_OPTIONAL:
    if (src / name).is_file() and (src / name).resolve() != (tok / name).resolve():
      shutil.copyfile(src / name, tok / name)
  return d
