"""IP-FaceDiff's video edit (TokenFlow + Plug-and-Play on Stable Diffusion 1.x) on diffusers modules.

An independent PyTorch implementation of `golden/ipfacediff/SPEC.md` sections 3-8, written from
that specification; it keeps the reference's loop structure, so it is also the baseline of
`benchmarks/ipfacediff.py`:

- models: diffusers `UNet2DConditionModel` and `AutoencoderKL`, transformers `CLIPTextModel` and
  `CLIPTokenizer`, built from their configs and loaded from local files (the golden flat layout
  `unet.safetensors` + `unet_config.json`, ... or a diffusers pipeline folder); the scheduler is
  diffusers' `DDIMScheduler.from_config(scheduler_config.json)`;
- `invert`: DDIM inversion (SPEC 4), one UNet call per step and batch of `inversion_batch_size`
  frames (40, the reference's default);
- `edit`: the TokenFlow-PnP loop (SPEC 5): per step, new keyframes, one keyframe pass of
  3*n_kf samples (extended attention, PnP conv + Q/K injection; its result is discarded), then
  one UNet call of 3B samples per batch, one batch after the other (attention outputs
  propagated from the keyframes by nearest neighbours, SPEC 7), classifier-free guidance and
  the clipping DDIM step;
- `edit_video`: encode, invert, edit, decode with the reference's defaults (SPEC 8).

The TokenFlow parts are installed on a diffusers UNet by `register_tokenflow`: a forward that
replaces every `BasicTransformerBlock`'s, an attention processor on every `attn1`, and a forward
hook on the conv2 of `up_blocks.1.resnets.1`; all read one `TokenFlowController`. With the
controller's mode None the UNet is the plain diffusers UNet (the inversion uses that).

Tensors are NCHW (the reference's layout); public functions take and return numpy arrays.
`dtype` 'float64' casts the models to float64; diffusers keeps its float32 islands (timestep
sinusoid, the alpha-bar table and its square roots), as in `io_f64.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from s3jax.porting.state_dict import load_state_dict

# torch, diffusers and transformers are test extras (pip install s3jax[torch]); they are imported
# inside the functions that need them.

LATENT_SCALE = 0.18215  # hard-coded in the reference (the config's scaling_factor is not read)
NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
TEXT_LENGTH = 77
# TokenFlow's configs/config_pnp.yaml and preprocess.py defaults (SPEC 8).
N_TIMESTEPS = 50
N_INVERSION_STEPS = 500
GUIDANCE_SCALE = 7.5
PNP_F_T = 0.8
PNP_ATTN_T = 0.5
BATCH_SIZE = 8
INVERSION_BATCH_SIZE = 40
ENCODE_BATCH_SIZE = 10
SEED = 1
# SPEC 6: where the PnP injections act.
CONV_INJECTION_RESNET = "up_blocks.1.resnets.1"
QK_INJECTION_ATTENTIONS = (
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)
ALWAYS_INJECTED_TIMESTEP = 1000  # the reference's `t == 1000` clause (never hit by its schedules)


def torch_dtype(dtype: str):
  import torch  # test extra

  return {"float32": torch.float32, "float64": torch.float64}[dtype]


# ----------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TwinModels:
  """The diffusers / transformers modules of one Stable Diffusion folder, in eval mode."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  scheduler_config: dict
  dtype: str = "float32"

  def scheduler(self, n_steps: int):
    """A fresh `DDIMScheduler` from the folder's config with `set_timesteps(n_steps)`."""
    from diffusers import DDIMScheduler  # test extra

    scheduler = DDIMScheduler.from_config(self.scheduler_config)
    scheduler.set_timesteps(n_steps)
    return scheduler


def component_files(model_dir, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(config, weights) of `name` in the golden flat layout or a diffusers pipeline folder."""
  d = pathlib.Path(model_dir)
  if (d / f"{name}_config.json").exists():
    return d / f"{name}_config.json", d / f"{name}.safetensors"
  weights = {
      "unet": "diffusion_pytorch_model.safetensors",
      "vae": "diffusion_pytorch_model.safetensors",
      "text_encoder": "model.safetensors",
  }[name]
  config = d / name / "config.json"
  if not config.exists():
    raise FileNotFoundError(f"no {name} config in {d} ({name}_config.json or {name}/config.json)")
  return config, d / name / weights


def load_module(
    module, weights: pathlib.Path, optional_missing: Sequence[str] = (), strip_prefix: str = ""
):
  """Loads a {name: array} file into `module` strictly (only `optional_missing` may lack).

  `strip_prefix` is removed from the file's keys when the module's own keys lack it
  (transformers 5's CLIPTextModel has no `text_model.` level; the published files have it).
  """
  import torch  # test extra

  state = {
      k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_state_dict(weights).items()
  }
  own = module.state_dict()
  if strip_prefix and not any(k.startswith(strip_prefix) for k in own):
    state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
  missing, unexpected = module.load_state_dict(state, strict=False)
  missing = [k for k in missing if k not in optional_missing]
  if missing or unexpected:
    raise ValueError(f"{weights}: missing keys {missing}, unexpected keys {unexpected}")
  return module


def load_models(model_dir, dtype: str = "float32") -> TwinModels:
  """UNet, VAE, CLIP text encoder, tokenizer and scheduler config of `model_dir` (local files only)."""
  import diffusers  # test extra
  import transformers  # test extra

  d = pathlib.Path(model_dir)
  read = lambda p: json.loads(pathlib.Path(p).read_text())  # noqa: E731
  unet_config, unet_weights = component_files(d, "unet")
  unet = diffusers.UNet2DConditionModel.from_config(read(unet_config))
  load_module(unet, unet_weights)
  vae_config, vae_weights = component_files(d, "vae")
  vae = diffusers.AutoencoderKL.from_config(read(vae_config))
  load_module(vae, vae_weights)
  text_config, text_weights = component_files(d, "text_encoder")
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**read(text_config)))
  # The eager attention reproduces the reference's float64 run exactly; sdpa is 6e-8 off there.
  text_encoder.set_attn_implementation("eager")
  load_module(
      text_encoder,
      text_weights,
      ("text_model.embeddings.position_ids", "embeddings.position_ids"),
      strip_prefix="text_model.",
  )
  tokenizer = transformers.CLIPTokenizer.from_pretrained(
      str(d / "tokenizer"), local_files_only=True
  )
  scheduler_file = d / "scheduler_config.json"
  if not scheduler_file.exists():
    scheduler_file = d / "scheduler" / "scheduler_config.json"
  models = TwinModels(unet, vae, text_encoder, tokenizer, read(scheduler_file), dtype)
  for m in (unet, vae, text_encoder):
    if dtype != "float32":  # the files are float32; casting them to it again only warns
      m.to(torch_dtype(dtype))
    m.eval()
  return models


def encode_text(models: TwinModels, prompts: Sequence[str], truncation: bool = True):
  """CLIP `last_hidden_state` of `prompts` padded to 77 (the reference's get_text_embeds)."""
  import torch  # test extra

  kwargs = dict(padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
  if truncation:
    kwargs["truncation"] = True
  ids = models.tokenizer(list(prompts), **kwargs).input_ids
  with torch.no_grad():
    return models.text_encoder(ids)[0]


def encode_frames(models: TwinModels, frames01, batch_size: int = ENCODE_BATCH_SIZE):
  """Posterior mean of `2 * frames - 1` times 0.18215, in batches (frames NCHW in [0, 1])."""
  import torch  # test extra

  frames = torch.as_tensor(np.asarray(frames01)).to(torch_dtype(models.dtype))
  out = []
  with torch.no_grad():
    for i in range(0, frames.shape[0], batch_size):
      posterior = models.vae.encode(2 * frames[i : i + batch_size] - 1).latent_dist
      out.append(posterior.mean * LATENT_SCALE)
  return torch.cat(out)


def decode_latents(models: TwinModels, latents, batch_size: int = ENCODE_BATCH_SIZE):
  """`clamp(D(z / 0.18215) / 2 + 0.5, 0, 1)` in batches: NCHW frames in [0, 1]."""
  import torch  # test extra

  latents = torch.as_tensor(np.asarray(latents)).to(torch_dtype(models.dtype))
  out = []
  with torch.no_grad():
    for i in range(0, latents.shape[0], batch_size):
      images = models.vae.decode(latents[i : i + batch_size] / LATENT_SCALE).sample
      out.append((images / 2 + 0.5).clamp(0, 1))
  return torch.cat(out)


# ----------------------------------------------------------------------------------------
# TokenFlow on the diffusers UNet (SPEC 6-7).
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenFlowController:
  """What the patched UNet reads during one call.

  mode None: the plain UNet; 'keyframe': extended attention, the store is filled; 'batch':
  attention outputs propagated from `store` to the frames of batch `batch_index`. The
  injections act when `t` is in their schedule. `nn_log`, when a list, receives
  `(block, chunk, indices)` for every nearest-neighbour search of a batch pass.
  """

  mode: Optional[str] = None
  t: int = -1
  conv_timesteps: frozenset = frozenset()
  qk_timesteps: frozenset = frozenset()
  batch_index: int = 0
  store: dict = dataclasses.field(default_factory=dict)
  nn_log: Optional[list] = None

  def inject_conv(self) -> bool:
    return self.t in self.conv_timesteps or self.t == ALWAYS_INJECTED_TIMESTEP

  def inject_qk(self) -> bool:
    return self.t in self.qk_timesteps or self.t == ALWAYS_INJECTED_TIMESTEP


def attention(q, k, v, scale: float):
  """softmax(q k^T * scale) v over the last two axes."""
  return ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


def extended_attention(q, k, v, heads: int, scale: float):
  """TokenFlow's keyframe attention on projected (3n, S, C) q, k, v -> (3n, S, C), before to_out.

  Branch 0 (source) attends per frame; in branches 1 and 2 every frame attends to the keys and
  values of all n frames of its branch, concatenated in frame order, with one softmax.
  """
  import torch  # test extra

  three_n, tokens, channels = q.shape
  n, d = three_n // 3, channels // heads

  def heads_first(x):  # (3n, S, C) -> (3, n, heads, S, d)
    return x.reshape(3, n, tokens, heads, d).permute(0, 1, 3, 2, 4)

  q, k, v = heads_first(q), heads_first(k), heads_first(v)
  source = attention(q[0], k[0], v[0], scale)
  # (2, n, heads, S, d) -> (2, 1, heads, n*S, d): all frames' tokens of a branch in one sequence.
  k_all = k[1:].permute(0, 2, 1, 3, 4).reshape(2, 1, heads, n * tokens, d)
  v_all = v[1:].permute(0, 2, 1, 3, 4).reshape(2, 1, heads, n * tokens, d)
  edited = attention(q[1:], k_all, v_all, scale)
  out = torch.cat([source[None], edited])  # (3, n, heads, S, d)
  return out.permute(0, 1, 3, 2, 4).reshape(three_n, tokens, channels)


def blend_weights(batch_index: int, batch_size: int, dtype=None):
  """SPEC 7: weight of keyframe b per frame of batch b, sigmoid(d2 / (d1 + d2)); 1 for b == 0.

  `dtype` is a torch dtype (default float32); the patched blocks use their features' dtype.
  """
  import torch  # test extra

  s = torch.arange(batch_size, dtype=dtype or torch.float32)
  if batch_index == 0:
    return torch.ones_like(s)
  d1 = (s - batch_size // 2).abs()  # distance to the centre of batch b
  d2 = (s + batch_size - batch_size // 2).abs()  # ... and of batch b - 1
  return torch.sigmoid(d2 / (d1 + d2))


def cosine_similarity(x, y):
  """(rows of x) . (rows of y) after L2 normalisation of each row."""
  x = x / x.norm(dim=-1, keepdim=True)
  y = y / y.norm(dim=-1, keepdim=True)
  return x @ y.transpose(-1, -2)


def propagate_keyframe_attention(frame_feats, keyframe_feats, keyframe_attn_out, batch_index: int):
  """TokenFlow's batch-pass attention (SPEC 7): -> ((3n, S, C) output, [nn indices per chunk]).

  frame_feats (n, S, C): the batch's source-branch LN1 features; keyframe_feats (n_kf, S, C):
  the keyframes' source-branch LN1 features; keyframe_attn_out (3 n_kf, S, C): the keyframe
  pass's attn1 outputs, branch-major. Chunk 0 is keyframe b, chunk 1 keyframe b - 1 (b > 0);
  each chunk's indices are (n*S,) argmaxes over that keyframe's S tokens.
  """
  import torch  # test extra

  n, tokens, channels = frame_feats.shape
  n_kf = keyframe_feats.shape[0]
  keyframes = [batch_index] if batch_index == 0 else [batch_index, batch_index - 1]
  targets = torch.cat([keyframe_feats[j] for j in keyframes])  # (len * S, C)
  sim = cosine_similarity(frame_feats.reshape(n * tokens, channels), targets)
  attn_out = keyframe_attn_out.reshape(3, n_kf, tokens, channels)
  outputs, indices = [], []
  for chunk, j in enumerate(keyframes):
    idx = sim[:, chunk * tokens : (chunk + 1) * tokens].argmax(dim=-1)
    indices.append(idx)
    outputs.append(attn_out[:, j, idx].reshape(3, n, tokens, channels))
  if batch_index == 0:
    out = outputs[0]
  else:
    w = blend_weights(batch_index, n, frame_feats.dtype)[None, :, None, None]
    out = w * outputs[0] + (1 - w) * outputs[1]
  return out.reshape(3 * n, tokens, channels), indices


class TokenFlowAttnProcessor:
  """attn1 processor: extended attention with PnP Q/K injection; diffusers' own when mode is None."""

  def __init__(self, controller: TokenFlowController, inject: bool):
    from diffusers.models.attention_processor import AttnProcessor2_0  # test extra

    self.controller = controller
    self.inject = inject
    self.plain = AttnProcessor2_0()

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    import torch  # test extra

    if self.controller.mode is None:
      return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask)
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if self.inject and self.controller.inject_qk():
      n = q.shape[0] // 3
      q, k = torch.cat([q[:n]] * 3), torch.cat([k[:n]] * 3)  # V is never injected
    out = extended_attention(q, k, v, attn.heads, attn.scale)
    return attn.to_out[1](attn.to_out[0](out))


def tokenflow_block_forward(
    block,
    name: str,
    controller: TokenFlowController,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    timestep=None,
    cross_attention_kwargs=None,
    class_labels=None,
    added_cond_kwargs=None,
):
  """A `BasicTransformerBlock` (SD layout) as TokenFlow's block: stores or propagates attn1."""
  if controller.mode is None:
    return type(block).forward(
        block,
        hidden_states,
        attention_mask=attention_mask,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        timestep=timestep,
        cross_attention_kwargs=cross_attention_kwargs,
        class_labels=class_labels,
        added_cond_kwargs=added_cond_kwargs,
    )
  normed = block.norm1(hidden_states)
  n = normed.shape[0] // 3
  if controller.mode == "keyframe":
    attn_out = block.attn1(normed)
    controller.store[name] = (normed[:n], attn_out)
  elif controller.mode == "batch":
    keyframe_feats, keyframe_attn_out = controller.store[name]
    attn_out, indices = propagate_keyframe_attention(
        normed[:n], keyframe_feats, keyframe_attn_out, controller.batch_index
    )
    if controller.nn_log is not None:
      controller.nn_log += [(name, chunk, idx) for chunk, idx in enumerate(indices)]
  else:
    raise ValueError(f"unknown TokenFlow mode {controller.mode!r}")
  hidden_states = attn_out + hidden_states
  normed = block.norm2(hidden_states)
  hidden_states = (
      block.attn2(normed, encoder_hidden_states=encoder_hidden_states, attention_mask=None)
      + hidden_states
  )
  return block.ff(block.norm3(hidden_states)) + hidden_states


def conv_injection_hook(controller: TokenFlowController, module, inputs, output):
  """Forward hook on conv2 of the injected resnet: the residual branch of the source, 3 times."""
  import torch  # test extra

  if controller.mode is None or not controller.inject_conv():
    return None
  n = output.shape[0] // 3
  return torch.cat([output[:n]] * 3)


def transformer_block_names(unet) -> list[str]:
  """Paths of the UNet's BasicTransformerBlocks in call order (down, mid, up)."""
  from diffusers.models.attention import BasicTransformerBlock  # test extra

  return [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def register_tokenflow(unet) -> TokenFlowController:
  """Installs TokenFlow + PnP on `unet` (in place) and returns the controller driving it."""
  controller = TokenFlowController()
  modules = dict(unet.named_modules())
  for name in transformer_block_names(unet):
    block = modules[name]
    plain = (
        block.norm_type == "layer_norm"
        and block.pos_embed is None
        and block.attn2 is not None
        and not block.only_cross_attention
        and block._chunk_size is None
    )
    if not plain:
      raise ValueError(f"{name}: not an SD-1.x BasicTransformerBlock")
    attention_path = name.rsplit(".transformer_blocks.", 1)[0]
    inject = attention_path in QK_INJECTION_ATTENTIONS
    block.attn1.set_processor(TokenFlowAttnProcessor(controller, inject))
    block.forward = functools.partial(tokenflow_block_forward, block, name, controller)
  conv2 = modules[CONV_INJECTION_RESNET].conv2
  conv2.register_forward_hook(functools.partial(conv_injection_hook, controller))
  unet.tokenflow_controller = controller
  return controller


def tokenflow_controller(unet) -> TokenFlowController:
  """The controller of `unet`, registering TokenFlow on first use."""
  controller = getattr(unet, "tokenflow_controller", None)
  return controller if controller is not None else register_tokenflow(unet)


# ----------------------------------------------------------------------------------------
# DDIM inversion (SPEC 4) and the edit (SPEC 5).
# ----------------------------------------------------------------------------------------
def invert(
    models: TwinModels,
    x0,
    inversion_prompt: str,
    n_steps: int = N_INVERSION_STEPS,
    save_steps: Optional[int] = N_TIMESTEPS,
    batch_size: int = INVERSION_BATCH_SIZE,
) -> dict[int, np.ndarray]:
  """DDIM inversion of the latents `x0` (N, 4, h, w): {timestep: latents} as the reference saves.

  Saved: every timestep of `set_timesteps(save_steps)` and the last (noisiest) step;
  `save_steps=None` keeps every step. One UNet call per step and batch of `batch_size` frames.
  """
  import torch  # test extra

  controller = getattr(models.unet, "tokenflow_controller", None)
  if controller is not None:
    controller.mode = None
  scheduler = models.scheduler(n_steps)
  ascending = list(reversed([int(t) for t in scheduler.timesteps]))
  if save_steps is None:
    to_save = set(ascending)
  else:
    to_save = {int(t) for t in models.scheduler(save_steps).timesteps}
  alphas = scheduler.alphas_cumprod  # float32, as diffusers keeps it
  cond = encode_text(models, [inversion_prompt])
  latent = torch.as_tensor(np.asarray(x0)).to(torch_dtype(models.dtype)).clone()
  saved = {}
  with torch.no_grad():
    for i, t in enumerate(ascending):
      a_t = alphas[t]
      a_prev = alphas[ascending[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
      for b in range(0, latent.shape[0], batch_size):
        x = latent[b : b + batch_size]
        eps = models.unet(x, t, encoder_hidden_states=cond.repeat(x.shape[0], 1, 1)).sample
        pred_x0 = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        latent[b : b + batch_size] = a_t**0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
      if t in to_save:
        saved[t] = latent.numpy().copy()
  saved[ascending[-1]] = latent.numpy().copy()
  return saved


def reconstruct(
    models: TwinModels,
    latent,
    inversion_prompt: str,
    n_steps: int = N_INVERSION_STEPS,
    batch_size: int = INVERSION_BATCH_SIZE,
) -> np.ndarray:
  """The preprocessing's preview: DDIM without clipping from the noisiest inverted latent.

  Each step evaluates the UNet at t on the latent at t and moves to the next lower timestep
  (the last one to the final alpha-bar); the edit does not use it.
  """
  import torch  # test extra

  controller = getattr(models.unet, "tokenflow_controller", None)
  if controller is not None:
    controller.mode = None
  scheduler = models.scheduler(n_steps)
  descending = [int(t) for t in scheduler.timesteps]
  alphas = scheduler.alphas_cumprod
  cond = encode_text(models, [inversion_prompt])
  latent = torch.as_tensor(np.asarray(latent)).to(torch_dtype(models.dtype)).clone()
  with torch.no_grad():
    for i, t in enumerate(descending):
      a_t = alphas[t]
      a_next = (
          alphas[descending[i + 1]] if i + 1 < len(descending) else scheduler.final_alpha_cumprod
      )
      for b in range(0, latent.shape[0], batch_size):
        x = latent[b : b + batch_size]
        eps = models.unet(x, t, encoder_hidden_states=cond.repeat(x.shape[0], 1, 1)).sample
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        latent[b : b + batch_size] = a_next**0.5 * pred_x0 + (1 - a_next) ** 0.5 * eps
  return latent.numpy()


def injection_timesteps(timesteps: Sequence[int], fraction: float) -> list[int]:
  """The first int(len * fraction) (noisiest) timesteps (a Python float product, truncated)."""
  return list(timesteps[: int(len(timesteps) * fraction)])


@dataclasses.dataclass
class EditResult:
  """What `edit` computed; arrays are numpy, NCHW."""

  latents: np.ndarray  # (N, 4, h, w) after the last step
  trajectory: list  # start latent, then the latents after each step
  eps: np.ndarray  # eps* of the noisiest saved latent
  timesteps: list
  pivots: np.ndarray  # (steps, N / B) keyframe indices
  nn_log: Optional[list] = None  # per step and batch: [(block, chunk, indices)]
  frames: Optional[np.ndarray] = None  # decoded, in [0, 1]


def edit(
    models: TwinModels,
    x0,
    inverted: dict,
    prompt: str,
    inversion_prompt: str,
    negative_prompt: str = NEGATIVE_PROMPT,
    n_timesteps: int = N_TIMESTEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    pnp_f_t: float = PNP_F_T,
    pnp_attn_t: float = PNP_ATTN_T,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    pivot_offsets=None,
    record_nn: bool = False,
    decode: bool = True,
) -> EditResult:
  """TokenFlow-PnP edit of the frames with latents `x0` (N, 4, h, w), N a multiple of batch_size.

  `inverted` is `invert`'s {timestep: latents}; it must hold every edit timestep. Keyframe
  offsets are drawn as the reference draws them (`randint(B, (N/B,))` per step from a generator
  seeded with `seed`) unless `pivot_offsets` (steps, N/B) gives them.
  """
  import torch  # test extra

  dtype = torch_dtype(models.dtype)
  controller = tokenflow_controller(models.unet)
  scheduler = models.scheduler(n_timesteps)
  timesteps = [int(t) for t in scheduler.timesteps]
  missing = [t for t in timesteps if t not in inverted]
  if missing:
    raise ValueError(f"inversion latents missing for edit timesteps {missing}")
  n_frames = (x0.shape[0] // batch_size) * batch_size
  n_batches = n_frames // batch_size
  x0 = torch.as_tensor(np.asarray(x0)[:n_frames]).to(dtype)
  source = {t: torch.as_tensor(np.asarray(v)[:n_frames]).to(dtype) for t, v in inverted.items()}
  t_noisiest = max(inverted)
  a_noisiest = scheduler.alphas_cumprod[t_noisiest]
  eps = (source[t_noisiest] - a_noisiest**0.5 * x0) / (1 - a_noisiest) ** 0.5
  x = scheduler.add_noise(x0, eps, torch.tensor([timesteps[0]]))
  text = encode_text(models, [negative_prompt], truncation=False)
  text = torch.cat([text, encode_text(models, [prompt])])
  source_text = encode_text(models, [inversion_prompt], truncation=False)
  controller.conv_timesteps = frozenset(injection_timesteps(timesteps, pnp_f_t))
  controller.qk_timesteps = frozenset(injection_timesteps(timesteps, pnp_attn_t))
  generator = torch.Generator().manual_seed(seed)

  def denoise(x_b, t, idx, mode, batch_index=0):
    n = len(idx)
    controller.mode, controller.t, controller.batch_index = mode, t, batch_index
    unet_in = torch.cat([source[t][idx], x_b, x_b])
    context = torch.cat([source_text.expand(n, -1, -1), text[:1].expand(n, -1, -1)])
    context = torch.cat([context, text[1:].expand(n, -1, -1)])
    out = models.unet(unet_in, t, encoder_hidden_states=context).sample
    _, eps_uncond, eps_cond = out.chunk(3)
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return scheduler.step(guided, t, x_b).prev_sample

  trajectory, pivots, nn_log = [x.numpy().copy()], [], []
  try:
    with torch.no_grad():
      for step, t in enumerate(timesteps):
        if pivot_offsets is None:
          offsets = torch.randint(batch_size, (n_batches,), generator=generator)
        else:
          offsets = torch.as_tensor(np.asarray(pivot_offsets)[step], dtype=torch.int64)
        piv = offsets + torch.arange(n_batches) * batch_size
        pivots.append(piv.numpy())
        controller.store = {}
        denoise(x[piv], t, piv, "keyframe")  # fills the store; its latents are discarded
        x_new = torch.empty_like(x)
        step_nn = []
        for b in range(n_batches):
          controller.nn_log = [] if record_nn else None
          idx = torch.arange(b * batch_size, (b + 1) * batch_size)
          x_new[idx] = denoise(x[idx], t, idx, "batch", b)
          if record_nn:
            step_nn.append(controller.nn_log)
        nn_log.append(step_nn)
        x = x_new
        trajectory.append(x.numpy().copy())
  finally:
    controller.mode, controller.store, controller.nn_log = None, {}, None
  frames = decode_latents(models, x).numpy() if decode else None
  return EditResult(
      latents=x.numpy(),
      trajectory=trajectory,
      eps=eps.numpy(),
      timesteps=timesteps,
      pivots=np.stack(pivots),
      nn_log=nn_log if record_nn else None,
      frames=frames,
  )


def edit_video(
    frames01,
    prompt: str,
    inversion_prompt: str,
    models: Optional[TwinModels] = None,
    model_dir=None,
    negative_prompt: str = NEGATIVE_PROMPT,
    n_inversion_steps: int = N_INVERSION_STEPS,
    n_timesteps: int = N_TIMESTEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    pnp_f_t: float = PNP_F_T,
    pnp_attn_t: float = PNP_ATTN_T,
    batch_size: int = BATCH_SIZE,
    inversion_batch_size: int = INVERSION_BATCH_SIZE,
    seed: int = SEED,
    pivot_offsets=None,
) -> EditResult:
  """The reference's preprocess + edit of `frames01` (N, 3, H, W) in [0, 1]; `.frames` is the result.

  Frames are used at the size given (the reference resizes square frames to 512 px first).
  The save schedule is the edit schedule, as the reference requires.
  """
  if models is None:
    models = load_models(model_dir)
  x0 = encode_frames(models, frames01).numpy()
  inverted = invert(
      models, x0, inversion_prompt, n_inversion_steps, n_timesteps, inversion_batch_size
  )
  return edit(
      models,
      x0,
      inverted,
      prompt,
      inversion_prompt,
      negative_prompt=negative_prompt,
      n_timesteps=n_timesteps,
      guidance_scale=guidance_scale,
      pnp_f_t=pnp_f_t,
      pnp_attn_t=pnp_attn_t,
      batch_size=batch_size,
      seed=seed,
      pivot_offsets=pivot_offsets,
  )
