"""e4e (Encoder4Editing over pSp, IR-SE50) in Flax: 256 px images -> StyleGAN2 W+ codes.

The reference is e4e's ``models/encoders/psp_encoders.py`` (``Encoder4Editing(50, 'ir_se')``)
and ``models/psp.py``, as STIT runs it (``golden/stit/README.md`` section 3, quirks 15-19):

* input layer Conv3x3 (no bias) + BN + PReLU, then the 24 IR-SE50 units of
  :mod:`s3jax.models.face_encoders` (the first unit of every stage has stride 2);
  ``c1``/``c2``/``c3`` are the outputs of units 6, 20 and 23 (64, 32 and 16 px at 256 px in);
* ``n_styles = 2*log2(stylegan_size) - 2`` GradualStyleBlocks: log2(spatial) x [Conv3x3
  stride 2 pad 1 with bias + LeakyReLU(0.01)] then EqualLinear(512, 512); blocks
  ``< coarse_ind`` read ``c3`` (16 px), ``< middle_ind`` the FPN level ``p2`` (32 px), the
  rest ``p1`` (64 px), with ``p2 = up(c3) + latlayer1(c2)``, ``p1 = up(p2) + latlayer2(c1)``
  (bilinear, align_corners=True);
* progressive styles at the ``Inference`` stage: ``w0 = styles[0](c3)`` repeated to every
  style, plus every delta ``styles[i]``, i >= 1;
* pSp adds ``latent_avg`` (n_styles, 512) row by row afterwards (:func:`w_plus`).

Images are NHWC float32 in [-1, 1] (``Normalize(0.5, 0.5)``), 256x256. BatchNorm uses its
running statistics (``batch_stats``); the parameter names follow
:mod:`s3jax.porting.e4e_keys`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s3jax.models.face_encoders import (
    IRSE50_UNITS,
    BottleneckIRSE,
    PReLU,
    batch_norm,
    conv2d,
    resize_bilinear_align_corners,
)

Dtype = Any

STYLE_DIM = 512
INPUT_SIZE = 256
# Body units whose outputs feed the FPN (c1, c2, c3).
C1_UNIT, C2_UNIT, C3_UNIT = 6, 20, 23
# GradualStyleBlock input size (before its stride-2 convs) per FPN level.
LEVEL_SPATIAL = {"c3": 16, "p2": 32, "p1": 64}
LEAKY_SLOPE = 0.01  # nn.LeakyReLU() default, not StyleGAN's 0.2


@dataclasses.dataclass(frozen=True)
class E4EConfig:
  """What an e4e checkpoint fixes: the generator size (hence n_styles) and the FPN split."""

  stylegan_size: int = 1024
  coarse_ind: int = 3
  middle_ind: int = 7

  def __post_init__(self):
    log_size = math.log2(self.stylegan_size)
    if self.stylegan_size < 4 or log_size != int(log_size):
      raise ValueError(f"stylegan_size must be a power of 2 >= 4, got {self.stylegan_size}")

  @property
  def n_styles(self) -> int:
    return 2 * int(math.log2(self.stylegan_size)) - 2

  def level_of_style(self, i: int) -> str:
    """The feature map style ``i`` reads: 'c3' (coarse), 'p2' (middle) or 'p1' (fine)."""
    if i < self.coarse_ind:
      return "c3"
    return "p2" if i < self.middle_ind else "p1"

  def num_style_convs(self, i: int) -> int:
    return int(math.log2(LEVEL_SPATIAL[self.level_of_style(i)]))


class EqualLinear(nn.Module):
  """rosinality's EqualLinear (lr_mul 1, no activation): ``x @ (W / sqrt(in)).T + b``.

  ``kernel`` is the raw (in, out) weight; the gain multiplies the kernel before the matmul,
  in the reference's order.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(1.0), (fan_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    kernel = (kernel * (1.0 / math.sqrt(fan_in))).astype(self.dtype)
    return jnp.dot(x.astype(self.dtype), kernel) + bias.astype(self.dtype)


class GradualStyleBlock(nn.Module):
  """log2(spatial) x [Conv3x3 s2 p1 + LeakyReLU(0.01)] down to 1x1, then EqualLinear."""

  num_convs: int
  features: int = STYLE_DIM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_convs):
      x = conv2d(self.features, 3, 2, 1, dtype=self.dtype, name=f"convs_{j}", use_bias=True)(x)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
    if x.shape[1:3] != (1, 1):
      raise ValueError(
          f"GradualStyleBlock ends at {x.shape[1:3]}, not 1x1: the encoder input must be "
          f"{INPUT_SIZE}x{INPUT_SIZE}"
      )
    x = x.reshape(x.shape[0], self.features)
    return EqualLinear(self.features, dtype=self.dtype, name="linear")(x)


class Encoder4Editing(nn.Module):
  """e4e encoder: (B, 256, 256, 3) in [-1, 1] -> codes (B, n_styles, 512), without latent_avg.

  ``return_features=True`` also returns ``{'c1', 'c2', 'c3'}`` (NHWC) for debugging/parity.
  """

  config: E4EConfig = E4EConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    cfg, dt = self.config, self.dtype
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"e4e takes (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) NHWC, got {x.shape}")
    x = x.astype(dt)
    x = conv2d(64, 3, 1, 1, dtype=dt, name="input_conv")(x)
    x = batch_norm(dtype=dt, name="input_bn")(x)
    x = PReLU(64, dtype=dt, name="input_prelu")(x)
    feats = {}
    for i, (cin, depth, stride) in enumerate(IRSE50_UNITS):
      x = BottleneckIRSE(cin, depth, stride, dtype=dt, name=f"body_{i}")(x)
      if i == C1_UNIT:
        feats["c1"] = x
      elif i == C2_UNIT:
        feats["c2"] = x
      elif i == C3_UNIT:
        feats["c3"] = x

    def lateral(name, c):
      return conv2d(STYLE_DIM, 1, dtype=dt, name=name, use_bias=True)(c)

    def upsample_add(top, lat):  # e4e's _upsample_add
      return resize_bilinear_align_corners(top, lat.shape[1:3]) + lat

    # The reference always holds both laterals; an unused level is dropped by XLA.
    levels = {"c3": feats["c3"]}
    levels["p2"] = upsample_add(levels["c3"], lateral("latlayer1", feats["c2"]))
    levels["p1"] = upsample_add(levels["p2"], lateral("latlayer2", feats["c1"]))

    styles = []
    for i in range(cfg.n_styles):
      block = GradualStyleBlock(cfg.num_style_convs(i), dtype=dt, name=f"styles_{i}")
      styles.append(block(levels[cfg.level_of_style(i)]))
    # w0 repeated to every style, each later style adds its own delta (Inference stage).
    w0 = styles[0]
    codes = jnp.stack([w0] + [w0 + d for d in styles[1:]], axis=1).astype(jnp.float32)
    if return_features:
      return codes, {k: v.astype(jnp.float32) for k, v in feats.items()}
    return codes


def w_plus(codes: jax.Array, latent_avg: jax.Array) -> jax.Array:
  """pSp's W+: ``codes + latent_avg``, latent_avg (n_styles, 512) added row by row."""
  return codes + jnp.asarray(latent_avg, codes.dtype)[None]


@functools.lru_cache(maxsize=4)
def jitted_encoder(config: E4EConfig, return_features: bool = False):
  """``jit(Encoder4Editing(config).apply)``: codes, or (codes, {'c1', 'c2', 'c3'})."""
  model = Encoder4Editing(config)
  return jax.jit(functools.partial(model.apply, return_features=return_features))
