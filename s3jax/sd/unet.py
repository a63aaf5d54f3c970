"""The Stable Diffusion 1.x UNet (diffusers' `UNet2DConditionModel`) in Flax, with TokenFlow-PnP.

Plain mode is diffusers' forward: sinusoidal timestep embedding (float32, then cast; cos first
with `flip_sin_to_cos`), ResnetBlock2D, Transformer2DModel with conv `proj_in`/`proj_out`,
BasicTransformerBlock (self-attention, cross-attention, GEGLU), skips concatenated as
`cat([h, skip])`. Images are NHWC; tokens are row-major `(y, x)` as in diffusers.

TokenFlow modes (golden/ipfacediff SPEC.md §6-§7) take the 3-branch batch
`concat([source, uncond, cond])` of n frames each:
- "keyframe": every self-attention is the extended attention (source per frame; uncond/cond
  over all keyframes of their branch, one softmax), with the PnP Q/K injection in the 8
  decoder blocks of `QK_INJECTION_BLOCKS`; returns the `store` the batch passes propagate.
- "batch": self-attention is not evaluated; each token takes the stored keyframe attention
  output of its nearest source-branch neighbour (cosine), blended between keyframes b and b-1.
In both, the PnP conv injection copies the source residual branch of `CONV_INJECTION_RESNET`.
The injection switches are traced booleans, so one compiled function serves every step.

The parameter tree mirrors diffusers' module paths with `_<i>` for `.<i>`
(`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q`); `s3jax.porting.sd_keys` maps it
to and from diffusers state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s3jax.sd import vae  # the layers both SD networks share: conv, Upsample

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms
MAX_PERIOD = 10000.0  # timestep sinusoid

# PnP injection sites (SPEC §6), as diffusers module paths.
CONV_INJECTION_RESNET = "up_blocks.1.resnets.1"
QK_INJECTION_BLOCKS = frozenset(
    ["up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    + [f"up_blocks.{i}.attentions.{j}" for i in (2, 3) for j in range(3)]
)

# diffusers config keys this port implements only at these values (an absent key is fine).
REQUIRED_DIFFUSERS_VALUES = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
}


def _single_value(key: str, value):
  """A per-block list whose entries are all equal -> that entry (diffusers accepts both)."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"unsupported UNet config: {key}={value!r} (per-block values differ)")
    return value[0]
  return value


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
  """diffusers `UNet2DConditionModel` options of the SD-1.x family (defaults: SD-1.4/1.5)."""

  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  cross_attention_dim: int = 768
  attention_head_dim: int = 8  # SD-1.x: the HEAD COUNT (diffusers' historical naming)
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  sample_size: int = 64

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
          f"{n} block_out_channels but {len(self.down_block_types)} down / "
          f"{len(self.up_block_types)} up block types"
      )
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"unsupported down block type {t!r}; supported: {DOWN_BLOCK_TYPES}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"unsupported up block type {t!r}; supported: {UP_BLOCK_TYPES}")
    for c in self.block_out_channels:
      if c % self.attention_head_dim or c % self.norm_num_groups:
        raise ValueError(
            f"block channels {c} not divisible by the {self.attention_head_dim} heads or the "
            f"{self.norm_num_groups} groups"
        )

  @classmethod
  def from_diffusers(cls, config: dict) -> "SDUNetConfig":
    """Read a diffusers unet `config.json` dict; ValueError on options this port lacks."""
    bad = {}
    for key, want in REQUIRED_DIFFUSERS_VALUES.items():
      if key in config:
        values = config[key] if isinstance(config[key], (list, tuple)) else [config[key]]
        if any(v != want for v in values):
          bad[key] = config[key]
    if bad:
      raise ValueError(f"unsupported UNet config options (this port needs {{key: value}}): {bad}")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name not in config:
        continue
      v = config[f.name]
      if f.name in ("block_out_channels", "down_block_types", "up_block_types"):
        v = tuple(v)
      elif f.name in ("attention_head_dim", "cross_attention_dim", "layers_per_block"):
        v = int(_single_value(f.name, v))
      elif f.name == "norm_num_groups" and v is None:
        raise ValueError("unsupported UNet config: norm_num_groups=None")
      kwargs[f.name] = v
    return cls(**kwargs)

  @property
  def heads(self) -> int:
    return self.attention_head_dim


@flax.struct.dataclass
class TokenFlowCall:
  """How one SDUNet call takes part in TokenFlow-PnP (SPEC §6-§7); a pytree, so it can be traced."""

  mode: str = flax.struct.field(pytree_node=False)  # "keyframe" | "batch"
  inject_conv: jax.Array  # bool scalar: PnP conv injection in CONV_INJECTION_RESNET
  inject_qk: jax.Array  # bool scalar: PnP Q/K injection in QK_INJECTION_BLOCKS (keyframe mode)
  store: Any = None  # batch mode: the keyframe pass's store of the same step
  batch_index: Any = None  # batch mode: int32 scalar b
  blend_weights: Any = None  # batch mode: (B,) weight of keyframe b per frame
  return_nn: bool = flax.struct.field(pytree_node=False, default=False)


# ----------------------------------------------------------------------------- pure functions
def timestep_sinusoid(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """diffusers' `get_timestep_embedding`, always in float32 (SPEC §13 island): (B,) -> (B, dim).

  The frequencies are trace-time constants: the float32 exponent as torch computes it, then a
  correctly rounded exp (torch's agrees on ~99% of them; XLA's float32 exp on ~65%, and one ulp
  of a frequency moves sin(t·f) by up to 1e3 ulp).
  """
  half = dim // 2
  exponent = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def dot_product_attention(q, k, v):
  """softmax(q kᵀ / √d) v per head; q (..., Sq, heads, d), k/v (..., Sk, heads, d)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("...hqk,...khd->...qhd", weights, v)


def copy_source_branch(x, inject):
  """PnP injection: where `inject`, branches [n:2n] and [2n:3n] of x become copies of [0:n]."""
  n = x.shape[0] // 3
  injected = jnp.concatenate([x[:n]] * 3, axis=0)
  return jnp.where(inject, injected, x)


def extended_attention(q, k, v, heads: int):
  """TokenFlow's extended self-attention (SPEC §7), before `to_out`.

  q, k, v: (3n, S, C) projections of the branches [source | uncond | cond] (after any Q/K
  injection). The source branch attends within each frame; each uncond/cond frame attends to
  the keys/values of all n frames of its branch, frame order, one joint softmax. Returns
  (3n, S, C). The edit branches run one query frame at a time (lax.map) to bound memory.
  """
  three_n, s, c = q.shape
  n = three_n // 3
  split = lambda a: a.reshape(3, n, s, heads, c // heads)  # noqa: E731
  q, k, v = split(q), split(k), split(v)
  source = dot_product_attention(q[0], k[0], v[0])  # (n, S, h, d)
  keys = k[1:].reshape(2, n * s, heads, c // heads)
  values = v[1:].reshape(2, n * s, heads, c // heads)
  edit = jax.lax.map(
      lambda q_frame: dot_product_attention(q_frame, keys, values), jnp.swapaxes(q[1:], 0, 1)
  )  # (n, 2, S, h, d)
  out = jnp.concatenate([source[None], jnp.swapaxes(edit, 0, 1)], axis=0)
  return out.reshape(three_n, s, c)


def blend_weights_for_batch(batch_index, batch_size: int, dtype=jnp.float32):
  """SPEC §7 weight w of keyframe b for the frames of batch b: sigmoid(d2 / (d1 + d2)), with d1,
  d2 the distances to the centres of batches b and b-1; exactly 1.0 for b == 0. (B,) `dtype`."""
  b = jnp.asarray(batch_index, jnp.int32)
  frames = b * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  d1 = jnp.abs(frames - (b * batch_size + batch_size // 2))
  d2 = jnp.abs(frames - ((b - 1) * batch_size + batch_size // 2))
  w = jax.nn.sigmoid(d2.astype(dtype) / (d1 + d2).astype(dtype))
  return jnp.where(b == 0, jnp.ones_like(w), w)


def nearest_keyframe_tokens(frame_feats, keyframe_feats, batch_index):
  """Per token of the batch, the index of its most cosine-similar token in keyframe b (chunk 0)
  and keyframe b-1 (chunk 1; keyframe 0 again when b == 0). First index on ties.

  frame_feats (n, S, C), keyframe_feats (n_kf, S, C) -> int32 (2, n*S).
  """
  n, s, c = frame_feats.shape
  b = jnp.asarray(batch_index, jnp.int32)
  x = frame_feats.reshape(n * s, c)
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  y = jnp.take(keyframe_feats, jnp.stack([b, jnp.maximum(b - 1, 0)]), axis=0)  # (2, S, C)
  y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  # HIGHEST: the best/second-best margins go down to ~5e-5 (README); no TF32/bf16 passes here.
  sim = jnp.einsum("ic,kjc->kij", x, y, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def propagate_keyframe_attention(
    frame_feats,
    keyframe_feats,
    keyframe_attn_out,
    batch_index,
    blend_weights,
    return_nn: bool = False,
):
  """TokenFlow's batch-pass replacement of self-attention (SPEC §7).

  frame_feats (n, S, C): source-branch LN1 features of the batch; keyframe_feats (n_kf, S, C):
  the keyframes' source-branch LN1 features; keyframe_attn_out (3, n_kf, S, C): their
  extended-attention outputs per branch; blend_weights (n,): w of keyframe b (1.0 for b == 0).
  Returns (3n, S, C) = w·O_b + (1-w)·O_{b-1} gathered with the same indices for all branches,
  and the int32 (2, n*S) indices too when `return_nn`.
  """
  n, s, c = frame_feats.shape
  b = jnp.asarray(batch_index, jnp.int32)
  idx = nearest_keyframe_tokens(frame_feats, keyframe_feats, b)
  gathered = []
  for chunk, keyframe in enumerate((b, jnp.maximum(b - 1, 0))):
    out = jnp.take(keyframe_attn_out, keyframe, axis=1)  # (3, S, C)
    gathered.append(jnp.take(out, idx[chunk], axis=1).reshape(3, n, s, c))
  w = jnp.asarray(blend_weights).astype(gathered[0].dtype)[None, :, None, None]
  out = (w * gathered[0] + (1 - w) * gathered[1]).reshape(3 * n, s, c)
  return (out, idx) if return_nn else out


# ----------------------------------------------------------------------------- modules
def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(
      num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name
  )


def conv3x3(features: int, dtype, name: str, stride: int = 1) -> nn.Conv:
  return vae.conv(features, name, dtype, stride=stride)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D (output scale 1), with the optional PnP residual injection."""

  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, inject_conv=None):
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
    temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + temb[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
    if inject_conv is not None:  # the residual branch only, before the skip add (SPEC §6)
      h = copy_source_branch(h, inject_conv)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """diffusers Attention: q/k/v without bias, `to_out.0` with bias, `heads` heads of C/heads."""

  features: int
  heads: int
  dtype: Any = jnp.float32

  def setup(self):
    proj = functools.partial(nn.Dense, self.features, use_bias=False, dtype=self.dtype)
    self.to_q, self.to_k, self.to_v = proj(), proj(), proj()
    self.to_out_0 = nn.Dense(self.features, dtype=self.dtype)

  def split_heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

  def __call__(self, x, context=None):
    context = x if context is None else context
    q, k, v = (
        self.split_heads(f(a))
        for f, a in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
    )
    out = dot_product_attention(q, k, v)
    return self.to_out_0(out.reshape(*out.shape[:-2], self.features))

  def extended(self, x, inject_qk=None):
    """TokenFlow keyframe self-attention of the 3-branch batch x (3n, S, C), incl. `to_out`.
    `inject_qk` (bool, may be traced): copy the source Q and K into both edit branches."""
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    if inject_qk is not None:
      q, k = copy_source_branch(q, inject_qk), copy_source_branch(k, inject_qk)
    return self.to_out_0(extended_attention(q, k, v, self.heads))


class GEGLU(nn.Module):
  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(4 * self.features, self.dtype, name="net_0")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="net_2")(x)


class TransformerBlock(nn.Module):
  """BasicTransformerBlock; in TokenFlow modes attn1 is extended attention or propagation."""

  features: int
  heads: int
  block_path: str  # diffusers path of the enclosing Transformer2DModel, the `store` key
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, context, tokenflow: Optional[TokenFlowCall] = None):
    layer_norm = functools.partial(
        nn.LayerNorm, epsilon=LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False
    )
    attn1 = Attention(self.features, self.heads, self.dtype, name="attn1")
    nh = layer_norm(name="norm1")(h)
    record = None
    if tokenflow is None:
      a = attn1(nh)
    elif tokenflow.mode == "keyframe":
      inject = tokenflow.inject_qk if self.block_path in QK_INJECTION_BLOCKS else None
      a = attn1.extended(nh, inject)
      n = h.shape[0] // 3
      record = {"feats": nh[:n], "attn_out": a.reshape(3, n, *a.shape[1:])}
    elif tokenflow.mode == "batch":
      stored = tokenflow.store[self.block_path]
      a, idx = propagate_keyframe_attention(
          nh[: h.shape[0] // 3],
          stored["feats"].astype(nh.dtype),
          stored["attn_out"].astype(nh.dtype),
          tokenflow.batch_index,
          tokenflow.blend_weights,
          return_nn=True,
      )
      record = idx if tokenflow.return_nn else None
    else:
      raise ValueError(f"TokenFlowCall.mode must be 'keyframe' or 'batch', got {tokenflow.mode!r}")
    h = h + a
    attn2 = Attention(self.features, self.heads, self.dtype, name="attn2")
    h = h + attn2(layer_norm(name="norm2")(h), context)
    h = h + FeedForward(self.features, self.dtype, name="ff")(layer_norm(name="norm3")(h))
    return h, record


class SpatialTransformer(nn.Module):
  """Transformer2DModel with conv projections and one BasicTransformerBlock; returns (h, record)."""

  heads: int
  groups: int
  block_path: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, tokenflow=None):
    b, height, width, c = x.shape
    h = group_norm(self.groups, TRANSFORMER_GROUP_NORM_EPS, self.dtype, "norm")(x)
    h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(b, height * width, c)
    h, record = TransformerBlock(
        c, self.heads, self.block_path, self.dtype, name="transformer_blocks_0"
    )(h, context, tokenflow)
    h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(b, height, width, c))
    return h + x, record


class Downsample(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv3x3(self.features, self.dtype, "conv", stride=2)(x)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D / DownBlock2D; returns (h, skips, records)."""

  config: SDUNetConfig
  index: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context, tokenflow=None):
    cfg, i = self.config, self.index
    out_channels = cfg.block_out_channels[i]
    has_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    skips, records = [], {}
    for j in range(cfg.layers_per_block):
      h = ResnetBlock(
          out_channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=f"resnets_{j}"
      )(h, temb)
      if has_attention:
        path = f"down_blocks.{i}.attentions.{j}"
        h, record = SpatialTransformer(
            cfg.heads, cfg.norm_num_groups, path, self.dtype, name=f"attentions_{j}"
        )(h, context, tokenflow)
        if record is not None:
          records[path] = record
      skips.append(h)
    if i < len(cfg.block_out_channels) - 1:
      h = Downsample(out_channels, self.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips, records


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet; returns (h, records)."""

  config: SDUNetConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context, tokenflow=None):
    cfg = self.config
    resnet = functools.partial(
        ResnetBlock, cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, self.dtype
    )
    h = resnet(name="resnets_0")(h, temb)
    path = "mid_block.attentions.0"
    h, record = SpatialTransformer(
        cfg.heads, cfg.norm_num_groups, path, self.dtype, name="attentions_0"
    )(h, context, tokenflow)
    h = resnet(name="resnets_1")(h, temb)
    return h, ({path: record} if record is not None else {})


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D over its `layers_per_block + 1` skips; returns (h, records)."""

  config: SDUNetConfig
  index: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skips, temb, context, tokenflow=None):
    cfg, i = self.config, self.index
    out_channels = cfg.block_out_channels[::-1][i]
    has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    skips, records = list(skips), {}
    for j in range(cfg.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      inject = None
      if tokenflow is not None and f"up_blocks.{i}.resnets.{j}" == CONV_INJECTION_RESNET:
        inject = tokenflow.inject_conv
      h = ResnetBlock(
          out_channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=f"resnets_{j}"
      )(h, temb, inject)
      if has_attention:
        path = f"up_blocks.{i}.attentions.{j}"
        h, record = SpatialTransformer(
            cfg.heads, cfg.norm_num_groups, path, self.dtype, name=f"attentions_{j}"
        )(h, context, tokenflow)
        if record is not None:
          records[path] = record
    if i < len(cfg.block_out_channels) - 1:
      h = vae.Upsample(out_channels, self.dtype, name="upsamplers_0")(h)
    return h, records


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class SDUNet(nn.Module):
  """diffusers UNet2DConditionModel (SD-1.x); `model.apply({"params": params}, ...)`.

  sample (B, h, w, in) NHWC, timesteps (B,) or scalar, context (B, L, cross_attention_dim).
  Plain: eps (B, h, w, out). tokenflow.mode "keyframe": (eps, store) with store
  {transformer path: {"feats": (n_kf, S, C), "attn_out": (3, n_kf, S, C)}}; "batch": eps, or
  (eps, {transformer path: int32 (2, B*S)}) with `return_nn`, B = the frames per branch.
  """

  config: SDUNetConfig
  dtype: Any = jnp.float32
  # (timesteps, dim, flip_sin_to_cos, freq_shift) -> float32 (B, dim). Replaceable for oracle
  # parity only: torch's float32 sin/cos (MKL VML on x86) differ from XLA's by 1 ulp in a few %
  # of the entries, which shows as ~2e-9 relative in an x64 run; nothing else does.
  timestep_sinusoid_fn: Callable = timestep_sinusoid

  @nn.compact
  def __call__(self, sample, timesteps, context, tokenflow: Optional[TokenFlowCall] = None):
    cfg = self.config
    batch = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    c0 = cfg.block_out_channels[0]
    temb = self.timestep_sinusoid_fn(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(4 * c0, self.dtype, name="time_embedding")(temb)
    context = context.astype(self.dtype)

    h = conv3x3(c0, self.dtype, "conv_in")(sample.astype(self.dtype))
    skips, records = [h], {}
    for i in range(len(cfg.block_out_channels)):
      h, block_skips, block_records = DownBlock(cfg, i, self.dtype, name=f"down_blocks_{i}")(
          h, temb, context, tokenflow
      )
      skips += block_skips
      records.update(block_records)
    h, block_records = MidBlock(cfg, self.dtype, name="mid_block")(h, temb, context, tokenflow)
    records.update(block_records)
    per_block = cfg.layers_per_block + 1
    for i in range(len(cfg.block_out_channels)):
      block_skips, skips = skips[-per_block:], skips[:-per_block]
      h, block_records = UpBlock(cfg, i, self.dtype, name=f"up_blocks_{i}")(
          h, block_skips, temb, context, tokenflow
      )
      records.update(block_records)
    h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(h))
    eps = conv3x3(cfg.out_channels, self.dtype, "conv_out")(h)
    if tokenflow is None:
      return eps
    if tokenflow.mode == "keyframe" or tokenflow.return_nn:
      return eps, records
    return eps


def min_sample_hw(config: SDUNetConfig) -> tuple[int, int]:
  """The smallest latent size the down/up path accepts (2^(levels-1) per side)."""
  side = 2 ** (len(config.block_out_channels) - 1)
  return side, side


def init_inputs(config: SDUNetConfig, sample_hw=None):
  h, w = sample_hw or min_sample_hw(config)
  return (
      jnp.zeros((1, h, w, config.in_channels), jnp.float32),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32),
  )


def init_params(config: SDUNetConfig, rng, sample_hw=None):
  """Random float32 params (flax default initialisers). The latent size does not change the
  params; `sample_hw` defaults to the smallest valid one."""
  return jax.jit(SDUNet(config).init)(rng, *init_inputs(config, sample_hw))["params"]


def abstract_params(config: SDUNetConfig):
  """The params tree as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(
      lambda: SDUNet(config).init(jax.random.PRNGKey(0), *init_inputs(config))["params"]
  )
