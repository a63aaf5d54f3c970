"""Stable Diffusion's AutoencoderKL (diffusers layout) in Flax.

`VAEConfig` (read from a diffusers `config.json` with `VAEConfig.from_diffusers`),
`AutoencoderKL` with `encode(x) -> (mean, logvar)` and `decode(z) -> x`, and `init_params`.
Images and latents are NHWC; images in [-1, 1]. Every GroupNorm uses eps 1e-6 (diffusers
hard-codes it for the VAE). Norms, the attention softmax and the outputs are float32 for
float32/bfloat16 compute (`precision`), float64 for a float64 run (jax_enable_x64, params
cast). Submodule names follow diffusers' paths with `.N` written `_N`
(`encoder.down_blocks.0.resnets.1` is `encoder/down_blocks_0/resnets_1`), so
`s3jax.porting.sd_vae_clip_keys` maps state dicts mechanically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# diffusers' AutoencoderKL.__init__ defaults: what an absent config key means.
DIFFUSERS_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=(DOWN_BLOCK,),
    up_block_types=(UP_BLOCK,),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL hyper-parameters; the defaults are SD-1.x's VAE."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  sample_size: int = 512

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Reads a diffusers AutoencoderKL config dict; ValueError on options this port lacks."""
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    blocks = tuple(int(b) for b in c["block_out_channels"])
    problems = []
    if c["act_fn"] != "silu":
      problems.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    if tuple(c["down_block_types"]) != (DOWN_BLOCK,) * len(blocks):
      problems.append(f"down_block_types={c['down_block_types']} (only {DOWN_BLOCK})")
    if tuple(c["up_block_types"]) != (UP_BLOCK,) * len(blocks):
      problems.append(f"up_block_types={c['up_block_types']} (only {UP_BLOCK})")
    for key in ("shift_factor", "latents_mean", "latents_std"):
      if c[key] is not None:
        problems.append(f"{key}={c[key]} (SD-1.x has none)")
    if problems:
      raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
    return cls(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]),
        block_out_channels=blocks,
        layers_per_block=int(c["layers_per_block"]),
        norm_num_groups=int(c["norm_num_groups"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        scaling_factor=float(c["scaling_factor"]),
        sample_size=int(c["sample_size"]),
    )

  def to_diffusers(self) -> dict:
    """The diffusers `config.json` dict of this VAE (AutoencoderKL.from_config reads it)."""
    n = len(self.block_out_channels)
    return dict(
        _class_name="AutoencoderKL",
        in_channels=self.in_channels,
        out_channels=self.out_channels,
        down_block_types=[DOWN_BLOCK] * n,
        up_block_types=[UP_BLOCK] * n,
        block_out_channels=list(self.block_out_channels),
        layers_per_block=self.layers_per_block,
        act_fn="silu",
        latent_channels=self.latent_channels,
        norm_num_groups=self.norm_num_groups,
        sample_size=self.sample_size,
        scaling_factor=self.scaling_factor,
        use_quant_conv=self.use_quant_conv,
        use_post_quant_conv=self.use_post_quant_conv,
        mid_block_add_attention=self.mid_block_add_attention,
    )


def precision(dtype):
  """Where norms, softmax and outputs are computed: float32, or float64 for a float64 run."""
  return jnp.promote_types(dtype, jnp.float32)


def conv(features: int, name: str, dtype, kernel: int = 3, stride: int = 1, padding="SAME"):
  """torch Conv2d(k, stride, padding=k//2) as a Flax conv with float32 params."""
  if padding == "SAME":
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def linear(features: int, name: str, dtype):
  """torch Linear (with bias) as a Flax Dense with float32 params."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class GroupNorm(nn.Module):
  """torch GroupNorm(groups, C, eps) over NHWC, in float32 (or float64) with a two-pass variance.

  Params `scale` and `bias` (torch: weight, bias) sit directly under the module's name.
  """

  groups: int
  epsilon: float = NORM_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xg = x.astype(precision(x.dtype)).reshape(x.shape[:-1] + (self.groups, c // self.groups))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without a time embedding (the VAE's)."""

  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(GroupNorm(self.groups, name="norm1")(x))
    h = conv(self.out_channels, "conv1", self.dtype)(h)
    h = nn.silu(GroupNorm(self.groups, name="norm2")(h))
    h = conv(self.out_channels, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, "conv_shortcut", self.dtype, kernel=1)(x)
    return x + h


class Downsample(nn.Module):
  """diffusers Downsample2D(padding=0): pad right/bottom by one, 3x3 conv of stride 2."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """diffusers Upsample2D: nearest x2, then a 3x3 conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, "conv", self.dtype)(x)


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block Attention: GroupNorm, one head over the H*W tokens, residual add."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = GroupNorm(self.groups, name="group_norm")(x).reshape(b, h * w, c)
    q, k, v = (linear(c, name, self.dtype)(tokens) for name in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c**-0.5)
    weights = jax.nn.softmax(logits.astype(precision(logits.dtype)), axis=-1).astype(v.dtype)
    out = linear(c, "to_out_0", self.dtype)(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D of the VAE: resnet, (attention), resnet."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """diffusers DownEncoderBlock2D: `layers` resnets, then a downsampler unless last."""

  out_channels: int
  layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """diffusers UpDecoderBlock2D: `layers` resnets, then an upsampler unless last."""

  out_channels: int
  layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image (B,H,W,in) -> moments (B,H/2^(n-1),W/2^(n-1),2*latent) before quant_conv."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    blocks, groups = c.block_out_channels, c.norm_num_groups
    x = conv(blocks[0], "conv_in", self.dtype)(x.astype(self.dtype))
    for i, ch in enumerate(blocks):
      last = i == len(blocks) - 1
      x = DownEncoderBlock(
          ch, c.layers_per_block, groups, not last, self.dtype, name=f"down_blocks_{i}"
      )(x)
    x = MidBlock(blocks[-1], groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(GroupNorm(groups, name="conv_norm_out")(x))
    return conv(2 * c.latent_channels, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent (B,h,w,latent) after post_quant_conv -> image (B,h*2^(n-1),w*2^(n-1),out)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    c = self.config
    blocks, groups = tuple(reversed(c.block_out_channels)), c.norm_num_groups
    x = conv(blocks[0], "conv_in", self.dtype)(z.astype(self.dtype))
    x = MidBlock(blocks[0], groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
    for i, ch in enumerate(blocks):
      last = i == len(blocks) - 1
      x = UpDecoderBlock(
          ch, c.layers_per_block + 1, groups, not last, self.dtype, name=f"up_blocks_{i}"
      )(x)
    x = nn.silu(GroupNorm(groups, name="conv_norm_out")(x))
    return conv(c.out_channels, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL.

  `model.apply({"params": params}, x, method=AutoencoderKL.encode)` (or `.decode`).
  """

  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    if c.use_quant_conv:
      self.quant_conv = conv(2 * c.latent_channels, "quant_conv", self.dtype, kernel=1)
    if c.use_post_quant_conv:
      self.post_quant_conv = conv(c.latent_channels, "post_quant_conv", self.dtype, kernel=1)

  def encode(self, x):
    """x (B,H,W,in) in [-1,1] -> posterior (mean, logvar), float32, logvar clamped.

    (float64 when `dtype` is float64, under jax_enable_x64 with float64 params.)
    """
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(precision(self.dtype))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """z (B,h,w,latent), unscaled -> image (B,H,W,out), float32, not clamped."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(precision(self.dtype))

  def __call__(self, x):
    """Reconstruction through the posterior mean (used to create every parameter)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def init_key(rng: jax.Array | int) -> jax.Array:
  """An "rbg" key seeded from `rng` (an int, a typed key or a raw uint32 PRNGKey).

  Flax init with threefry compiles one threefry circuit per parameter, 20-70 s for a tiny
  model on a loaded 2-core CPU; XLA's RngBitGenerator compiles in a few seconds.
  """
  if isinstance(rng, int):
    return jax.random.key(rng, impl="rbg")
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  words = jnp.resize(jnp.asarray(rng, jnp.uint32).reshape(-1), (4,))  # rbg keys are 4 words
  return jax.random.wrap_key_data(words, impl="rbg")


def init_params(config: VAEConfig, rng: jax.Array | int = 0) -> dict:
  """Random float32 params of `AutoencoderKL(config)`; apply with `{"params": params}`."""
  rng = init_key(rng)
  side = 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
  return jax.jit(AutoencoderKL(config).init)(rng, x)["params"]
