"""The stylegan2-ada-pytorch generator (``training/networks.py``, 'skip' architecture) in Flax.

This is the generator STIT inverts and tunes (``ffhq.pkl``'s ``G_ema``). Parity targets are
the reference's pure-PyTorch paths of ``bias_act``, ``upfirdn2d`` and ``conv2d_resample`` in
float32 (``../shared/golden/stit/README.md``, "Reference quirks" 1-14).

Layout: images and feature maps are NHWC; ``ws`` is ``(N, num_ws, w_dim)``. Output images are
the raw synthesis output (the reference's ``[-1, 1]`` range only holds for trained weights).

Variables are ``{'params': ..., 'buffers': ...}``:
- ``params`` is exactly what the reference's ``G.parameters()`` holds (what torch Adam updates
  in stitching tuning), stored *raw* (before the equalized-learning-rate gains), in Flax
  layouts: conv ``kernel`` (kh, kw, in, out), fully connected ``kernel`` (in, out), ``const``
  (R, R, C), ``bias``, ``noise_strength`` () ;
- ``buffers`` holds the reference's buffers (``noise_const`` (R, R), ``resample_filter``,
  ``mapping/w_avg``); they are read, never trained, so ``jax.grad`` over ``params`` alone
  covers what the reference optimises.
Names mirror the reference modules (``synthesis/b8/conv0/affine/kernel`` is
``synthesis.b8.conv0.affine.weight``); :mod:`s3jax.porting.stylegan2_keys` maps them.

Entry points: :func:`mapping`, :func:`synthesis`, :func:`generate`, :func:`init_variables`,
:func:`abstract_variables`. They are pure functions of ``(config, variables, ...)``, so they
jit (config static) and vmap over per-frame copies of ``params``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any

NOISE_MODES = ("const", "none", "random")
# bias_act's activations used by the generator: (slope of the negative part, default gain).
ACTIVATIONS = {
    "linear": (1.0, 1.0),
    "relu": (0.0, float(np.sqrt(2))),
    "lrelu": (0.2, float(np.sqrt(2))),
}
# Keys of the reference's mapping_kwargs / synthesis_kwargs and their defaults.
MAPPING_DEFAULTS = dict(
    num_layers=8,
    embed_features=None,
    layer_features=None,
    activation="lrelu",
    lr_multiplier=0.01,
    w_avg_beta=0.995,
)
SYNTHESIS_DEFAULTS = dict(
    channel_base=32768,
    channel_max=512,
    num_fp16_res=0,
    conv_clamp=None,
    architecture="skip",
    resample_filter=(1, 3, 3, 1),
    use_noise=True,
    kernel_size=3,
    activation="lrelu",
    fp16_channels_last=False,
)
# Always written by `to_init_kwargs` (the reference's training loop always passes them).
MAPPING_ALWAYS = ("num_layers",)
SYNTHESIS_ALWAYS = ("channel_base", "channel_max", "num_fp16_res", "conv_clamp")
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}


class GeneratorConfigError(ValueError):
  """init_kwargs that this port does not implement (the message says which)."""


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """The reference's ``Generator(**init_kwargs)`` settings (flattened, hashable).

  ``num_fp16_res`` and ``fp16_channels_last`` are kept for round trips only: STIT runs
  synthesis with ``force_fp32=True``, so float16 never runs (``conv_clamp`` still applies).
  """

  z_dim: int
  c_dim: int
  w_dim: int
  img_resolution: int
  img_channels: int
  mapping_num_layers: int = 8
  mapping_embed_features: Optional[int] = None
  mapping_layer_features: Optional[int] = None
  mapping_activation: str = "lrelu"
  mapping_lr_multiplier: float = 0.01
  w_avg_beta: Optional[float] = 0.995
  channel_base: int = 32768
  channel_max: int = 512
  num_fp16_res: int = 0
  conv_clamp: Optional[float] = None
  architecture: str = "skip"
  resample_filter: tuple = (1, 3, 3, 1)
  use_noise: bool = True
  kernel_size: int = 3
  activation: str = "lrelu"
  fp16_channels_last: bool = False

  def __post_init__(self):
    res = self.img_resolution
    if res < 4 or res & (res - 1):
      raise GeneratorConfigError(f"img_resolution must be a power of two >= 4, got {res}")
    if self.architecture != "skip":
      raise GeneratorConfigError(
          f"architecture {self.architecture!r} is not implemented (only 'skip', which "
          "ffhq.pkl and every StyleGAN2 config STIT uses have)"
      )
    for what in (self.mapping_activation, self.activation):
      if what not in ACTIVATIONS:
        raise GeneratorConfigError(f"activation {what!r} not implemented; use {list(ACTIVATIONS)}")
    if self.kernel_size % 2 != 1:
      raise GeneratorConfigError(f"kernel_size must be odd, got {self.kernel_size}")
    object.__setattr__(self, "resample_filter", tuple(self.resample_filter))

  @classmethod
  def from_init_kwargs(cls, init_kwargs: Mapping[str, Any]) -> "GeneratorConfig":
    """From the reference's ``G.init_kwargs`` dict; unknown keys are refused by name."""
    kw = dict(init_kwargs)
    mapping_kwargs = dict(kw.pop("mapping_kwargs", None) or {})
    synthesis_kwargs = dict(kw.pop("synthesis_kwargs", None) or {})
    top = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
    missing = [k for k in top if k not in kw]
    # The reference's Generator(**kwargs) forwards unknown keyword arguments to synthesis.
    extra = {k: kw.pop(k) for k in list(kw) if k not in top}
    synthesis_kwargs.update(extra)
    if missing:
      raise GeneratorConfigError(f"init_kwargs lack {missing}")
    layer_kwargs = dict(synthesis_kwargs.pop("layer_kwargs", None) or {})
    synthesis_kwargs.update(layer_kwargs)
    bad = sorted(set(mapping_kwargs) - set(MAPPING_DEFAULTS)) + sorted(
        set(synthesis_kwargs) - set(SYNTHESIS_DEFAULTS)
    )
    if bad:
      raise GeneratorConfigError(f"init_kwargs has settings this port does not implement: {bad}")
    values = {k: kw[k] for k in top}
    for k, v in mapping_kwargs.items():
      values[k if k == "w_avg_beta" else f"mapping_{k}"] = v
    values.update(synthesis_kwargs)
    return cls(**values)

  def to_init_kwargs(self) -> dict:
    """The reference's init_kwargs (non-default settings plus the ones always written)."""
    out = {
        "z_dim": self.z_dim,
        "c_dim": self.c_dim,
        "w_dim": self.w_dim,
        "img_resolution": self.img_resolution,
        "img_channels": self.img_channels,
    }
    mapping_kwargs = {}
    for k, default in MAPPING_DEFAULTS.items():
      v = getattr(self, k if k == "w_avg_beta" else f"mapping_{k}")
      if k in MAPPING_ALWAYS or v != default:
        mapping_kwargs[k] = v
    synthesis_kwargs = {}
    for k, default in SYNTHESIS_DEFAULTS.items():
      v = getattr(self, k)
      if k in SYNTHESIS_ALWAYS or v != default:
        synthesis_kwargs[k] = list(v) if k == "resample_filter" else v
    out["mapping_kwargs"] = mapping_kwargs
    out["synthesis_kwargs"] = synthesis_kwargs
    return out

  @property
  def block_resolutions(self) -> tuple[int, ...]:
    return tuple(2**i for i in range(2, int(np.log2(self.img_resolution)) + 1))

  @property
  def block_channels(self) -> dict[int, int]:
    """{resolution: channels} = ``min(channel_base // res, channel_max)``."""
    return {r: min(self.channel_base // r, self.channel_max) for r in self.block_resolutions}

  @property
  def num_ws(self) -> int:
    """conv1 of b4, conv0 + conv1 of every other block, plus the last ToRGB's w."""
    return 2 * len(self.block_resolutions)

  def block_w_index(self, res: int) -> int:
    """Index of the first w block ``b{res}`` reads (quirk 5: ToRGB shares the next conv0's)."""
    return 0 if res == 4 else 2 * self.block_resolutions.index(res) - 1


# ----------------------------------------------------------------------------------------
# The reference's ops (pure-PyTorch paths), NHWC.
# ----------------------------------------------------------------------------------------
def setup_filter(taps: Sequence[float]) -> np.ndarray:
  """``upfirdn2d.setup_filter``: outer product (below 8 taps), normalised to sum 1."""
  f = np.asarray(taps, np.float32)
  if f.ndim == 1 and f.size < 8:
    f = np.outer(f, f)
  return (f / f.sum()).astype(np.float32)


def bias_act(x, b=None, act="linear", gain=None, clamp=None):
  """``bias_act``: ``act(x + b) * gain``, then a clamp to ``±clamp``; ``b`` on the last axis."""
  alpha, def_gain = ACTIVATIONS[act]
  gain = def_gain if gain is None else gain
  if b is not None:
    x = x + b
  if act != "linear":
    x = jnp.where(x >= 0, x, x * alpha)
  if gain != 1:
    x = x * gain
  if clamp is not None and clamp >= 0:
    x = jnp.clip(x, -clamp, clamp)
  return x


def upfirdn2d(x, f, up: int = 1, padding=(0, 0, 0, 0), gain: float = 1.0, precision="highest"):
  """``upfirdn2d`` (up and pad only): insert ``up-1`` zeros after every pixel, pad by
  ``(x0, x1, y0, y1)``, convolve each channel with ``f`` (2-D, or 1-D applied along W then H)
  times ``gain``. ``x`` is NHWC."""
  px0, px1, py0, py1 = padding
  c = x.shape[-1]
  f = jnp.asarray(f, jnp.float32) * jnp.float32(gain ** (np.ndim(f) / 2))
  f = jnp.flip(f)  # a true convolution, like the reference
  dn = ("NHWC", "HWIO", "NHWC")
  prec = PRECISIONS[precision]

  def depthwise(x, kernel, pad_h, pad_w, dil_h, dil_w):
    kernel = jnp.broadcast_to(kernel[:, :, None, None], kernel.shape + (1, c))
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        (pad_h, pad_w),
        lhs_dilation=(dil_h, dil_w),
        dimension_numbers=dn,
        feature_group_count=c,
        precision=prec,
    )

  # lax pads after dilating (up*(H-1)+1), so the reference's trailing zeros join the pad.
  pad_h, pad_w = (py0, py1 + up - 1), (px0, px1 + up - 1)
  if f.ndim == 2:
    return depthwise(x, f, pad_h, pad_w, up, up)
  x = depthwise(x, f[None, :], (0, 0), pad_w, 1, up)  # the reference filters W first
  return depthwise(x, f[:, None], pad_h, (0, 0), up, 1)


def upsample2d(x, f, precision="highest"):
  """``upfirdn2d.upsample2d`` by 2: pads ``(fw+1)//2`` before, ``(fw-2)//2`` after (2, 1 for
  the 4-tap filter), gain 4."""
  fw = np.shape(f)[-1]
  p0, p1 = (fw + 1) // 2, (fw - 2) // 2
  return upfirdn2d(x, f, up=2, padding=(p0, p1, p0, p1), gain=4.0, precision=precision)


def conv2d_resample(
    x, kernel, f=None, up: int = 1, padding: int = 0, groups: int = 1, precision="highest"
):
  """``conv2d_resample``: ``kernel`` is HWIO (I per group, O group-major). ``up > 1`` runs the
  reference's order: a transposed strided convolution, *then* the FIR filter with gain
  ``up**2``."""
  dn = ("NHWC", "HWIO", "NHWC")
  prec = PRECISIONS[precision]
  kh, kw = kernel.shape[:2]
  if up == 1:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((padding, padding),) * 2,
        dimension_numbers=dn,
        feature_group_count=groups,
        precision=prec,
    )
  fh, fw = np.shape(f)[0], np.shape(f)[-1]
  px0 = padding + (fw + up - 1) // 2 - (kw - 1)
  px1 = padding + (fw - up) // 2 - (kw - up)
  py0 = padding + (fh + up - 1) // 2 - (kh - 1)
  py1 = padding + (fh - up) // 2 - (kh - up)
  pxt = max(min(-px0, -px1), 0)
  pyt = max(min(-py0, -py1), 0)
  # conv_transpose2d(stride=up, padding=pt) == dilate x by `up`, pad k-1-pt, correlate with
  # the kernel flipped in both spatial axes.
  x = jax.lax.conv_general_dilated(
      x,
      jnp.flip(kernel, (0, 1)),
      (1, 1),
      ((kh - 1 - pyt,) * 2, (kw - 1 - pxt,) * 2),
      lhs_dilation=(up, up),
      dimension_numbers=dn,
      feature_group_count=groups,
      precision=prec,
  )
  pad = (px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt)
  return upfirdn2d(x, f, padding=pad, gain=float(up * up), precision=precision)


def modulated_conv2d(
    x,
    kernel,
    styles,
    noise=None,
    up: int = 1,
    padding: int = 0,
    resample_filter=None,
    demodulate: bool = True,
    fused_modconv: bool = True,
    precision="highest",
):
  """The reference's ``modulated_conv2d``: ``x`` (N,H,W,I), raw ``kernel`` (kh,kw,I,O),
  ``styles`` (N,I), ``noise`` broadcastable to the output.

  fused (eval): per-sample kernels ``W*s`` (demodulated), one grouped conv.
  non-fused (train): ``x*s``, conv with the raw W, then ``x*dcoef + noise``.
  """
  w = dcoefs = None
  if demodulate or fused_modconv:
    w = kernel[None] * styles[:, None, None, :, None]  # (N, kh, kw, I, O)
  if demodulate:
    dcoefs = jax.lax.rsqrt(jnp.sum(jnp.square(w), axis=(1, 2, 3)) + 1e-8)  # (N, O)
  if not fused_modconv:
    x = x * styles[:, None, None, :]
    x = conv2d_resample(x, kernel, resample_filter, up, padding, precision=precision)
    if demodulate:
      x = x * dcoefs[:, None, None, :]
    if noise is not None:
      x = x + noise
    return x
  if demodulate:
    w = w * dcoefs[:, None, None, None, :]
  # One grouped conv over the batch, as the reference: samples become channel groups.
  n, h, wd, i = x.shape
  kh, kw, _, o = w.shape[1:]
  x = x.transpose(1, 2, 0, 3).reshape(1, h, wd, n * i)
  w = w.transpose(1, 2, 3, 0, 4).reshape(kh, kw, i, n * o)
  x = conv2d_resample(x, w, resample_filter, up, padding, groups=n, precision=precision)
  x = x.reshape(x.shape[1], x.shape[2], n, o).transpose(2, 0, 1, 3)
  if noise is not None:
    x = x + noise
  return x


def normalize_2nd_moment(x, eps: float = 1e-8):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True) + eps)


def lerp(a, b, t):
  """``torch.lerp`` (its two-branch formula): ``a + t*(b-a)`` for |t| < 0.5, else
  ``b - (b-a)*(1-t)``."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.where(jnp.abs(t) < 0.5, a + t * (b - a), b - (b - a) * (1 - t))


# ----------------------------------------------------------------------------------------
# Modules. Initialisers follow the reference (randn weights, zero biases, affine bias 1).
# ----------------------------------------------------------------------------------------
def _randn(key, shape, scale=1.0):
  return jax.random.normal(key, shape, jnp.float32) * scale


class FullyConnected(nn.Module):
  """``FullyConnectedLayer``: ``act(x @ (kernel*lr/sqrt(in)) + bias*lr)``; linear uses addmm."""

  features: int
  activation: str = "linear"
  lr_multiplier: float = 1.0
  bias_init: float = 0.0
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    n_in = x.shape[-1]
    lr = self.lr_multiplier
    kernel = self.param("kernel", lambda k, s: _randn(k, s, 1.0 / lr), (n_in, self.features))
    bias = self.param(
        "bias", lambda k, s: jnp.full(s, self.bias_init, jnp.float32), (self.features,)
    )
    w = kernel * float(lr / np.sqrt(n_in))  # python floats stay float32 in JAX
    b = bias * lr if lr != 1 else bias
    x = jnp.matmul(x, w, precision=PRECISIONS[self.precision])
    return bias_act(x, b, act=self.activation)


class MappingNetwork(nn.Module):
  """z (N, z_dim) [, c] -> ws (N, num_ws, w_dim), with truncation towards ``w_avg``."""

  config: GeneratorConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None):
    cfg = self.config
    embed = cfg.mapping_embed_features if cfg.mapping_embed_features is not None else cfg.w_dim
    layer = cfg.mapping_layer_features if cfg.mapping_layer_features is not None else cfg.w_dim
    x = None
    if cfg.z_dim > 0:
      x = normalize_2nd_moment(jnp.asarray(z, jnp.float32))
    if cfg.c_dim > 0:
      if c is None:
        raise ValueError(f"this generator is conditional (c_dim {cfg.c_dim}); pass c")
      y = FullyConnected(embed, precision=self.precision, name="embed")(jnp.asarray(c, jnp.float32))
      y = normalize_2nd_moment(y)
      x = jnp.concatenate([x, y], axis=1) if x is not None else y
    for i in range(cfg.mapping_num_layers):
      out = cfg.w_dim if i == cfg.mapping_num_layers - 1 else layer
      x = FullyConnected(
          out,
          activation=cfg.mapping_activation,
          lr_multiplier=cfg.mapping_lr_multiplier,
          precision=self.precision,
          name=f"fc{i}",
      )(x)
    x = jnp.repeat(x[:, None], cfg.num_ws, axis=1)
    if cfg.w_avg_beta is None:
      if not _is_one(truncation_psi):
        raise ValueError("truncation needs w_avg, which a config with w_avg_beta=None lacks")
      return x
    w_avg = self.variable("buffers", "w_avg", lambda: jnp.zeros((cfg.w_dim,), jnp.float32)).value
    if _is_one(truncation_psi):  # the reference skips the lerp at psi 1
      return x
    if truncation_cutoff is None:
      return lerp(w_avg, x, truncation_psi)
    return x.at[:, :truncation_cutoff].set(lerp(w_avg, x[:, :truncation_cutoff], truncation_psi))


def _is_one(psi) -> bool:
  return isinstance(psi, (int, float, np.number)) and float(psi) == 1.0


def _filter_buffer(module: nn.Module, taps) -> Array:
  return module.variable(
      "buffers", "resample_filter", lambda: jnp.asarray(setup_filter(taps))
  ).value


class SynthesisLayer(nn.Module):
  """``SynthesisLayer``: modulated conv (up 1 or 2) + noise + ``bias_act`` (lrelu, clamp)."""

  out_channels: int
  resolution: int
  config: GeneratorConfig
  up: int = 1
  precision: str = "highest"

  @nn.compact
  def __call__(self, x, w, noise_mode="const", fused_modconv=True):
    cfg, res, k = self.config, self.resolution, self.config.kernel_size
    in_channels = x.shape[-1]
    styles = FullyConnected(in_channels, bias_init=1.0, precision=self.precision, name="affine")(w)
    kernel = self.param("kernel", _randn, (k, k, in_channels, self.out_channels))
    f = _filter_buffer(self, cfg.resample_filter)
    noise = None
    if cfg.use_noise:
      noise_const = self.variable(
          "buffers", "noise_const", lambda: _randn(self.make_rng("params"), (res, res))
      ).value
      strength = self.param("noise_strength", nn.initializers.zeros, ())
      if noise_mode == "const":
        noise = (noise_const * strength)[None, :, :, None]
      elif noise_mode == "random":
        shape = (x.shape[0], res, res, 1)
        noise = jax.random.normal(self.make_rng("noise"), shape, jnp.float32) * strength
    bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
    x = modulated_conv2d(
        x,
        kernel,
        styles,
        noise=noise,
        up=self.up,
        padding=k // 2,
        resample_filter=f,
        fused_modconv=fused_modconv,
        precision=self.precision,
    )
    return bias_act(x, bias, act=cfg.activation, clamp=cfg.conv_clamp)


class ToRGB(nn.Module):
  """``ToRGBLayer``: 1x1 modulated conv, ``styles = affine(w)/sqrt(in)``, no demodulation,
  linear ``bias_act`` with the clamp and no gain."""

  config: GeneratorConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, x, w, fused_modconv=True):
    cfg, in_channels = self.config, x.shape[-1]
    styles = FullyConnected(in_channels, bias_init=1.0, precision=self.precision, name="affine")(w)
    styles = styles * float(1 / np.sqrt(in_channels))
    kernel = self.param("kernel", _randn, (1, 1, in_channels, cfg.img_channels))
    bias = self.param("bias", nn.initializers.zeros, (cfg.img_channels,))
    x = modulated_conv2d(
        x, kernel, styles, demodulate=False, fused_modconv=fused_modconv, precision=self.precision
    )
    return bias_act(x, bias, clamp=cfg.conv_clamp)


class SynthesisBlock(nn.Module):
  """``SynthesisBlock`` ('skip'): [const | conv0 up 2], conv1, ``img = upsample2d(img) + torgb``."""

  resolution: int
  config: GeneratorConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, x, img, ws, noise_mode="const", fused_modconv=True):
    cfg, res = self.config, self.resolution
    channels = cfg.block_channels[res]
    layer = lambda name, up: SynthesisLayer(
        channels, res, cfg, up=up, precision=self.precision, name=name
    )
    f = _filter_buffer(self, cfg.resample_filter)
    if res == 4:
      const = self.param("const", _randn, (res, res, channels))
      x = jnp.broadcast_to(const[None], (ws.shape[0],) + const.shape)
      x = layer("conv1", 1)(x, ws[:, 0], noise_mode, fused_modconv)
      w_rgb = ws[:, 1]
    else:
      x = layer("conv0", 2)(x, ws[:, 0], noise_mode, fused_modconv)
      x = layer("conv1", 1)(x, ws[:, 1], noise_mode, fused_modconv)
      w_rgb = ws[:, 2]
    if img is not None:
      img = upsample2d(img, f, precision=self.precision)
    y = ToRGB(cfg, precision=self.precision, name="torgb")(x, w_rgb, fused_modconv)
    img = y if img is None else img + y
    return x, img


class SynthesisNetwork(nn.Module):
  """ws (N, num_ws, w_dim) -> img (N, R, R, img_channels) [, {res: block output x}]."""

  config: GeneratorConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, ws, noise_mode="const", fused_modconv=True, return_features=False):
    cfg = self.config
    if noise_mode not in NOISE_MODES:
      raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    ws = jnp.asarray(ws, jnp.float32)
    if ws.ndim != 3 or ws.shape[1:] != (cfg.num_ws, cfg.w_dim):
      raise ValueError(f"ws must be (N, {cfg.num_ws}, {cfg.w_dim}), got {ws.shape}")
    x = img = None
    features = {}
    for res in cfg.block_resolutions:
      i = cfg.block_w_index(res)
      n = 2 if res == 4 else 3  # num_conv + num_torgb
      block = SynthesisBlock(res, cfg, precision=self.precision, name=f"b{res}")
      x, img = block(x, img, ws[:, i : i + n], noise_mode, fused_modconv)
      features[res] = x
    return (img, features) if return_features else img


class Generator(nn.Module):
  """``Generator``: ``mapping`` then ``synthesis`` (submodule names as in the reference)."""

  config: GeneratorConfig
  precision: str = "highest"

  def setup(self):
    self.mapping = MappingNetwork(self.config, precision=self.precision)
    self.synthesis = SynthesisNetwork(self.config, precision=self.precision)

  def __call__(
      self,
      z,
      c=None,
      truncation_psi=1.0,
      truncation_cutoff=None,
      noise_mode="const",
      fused_modconv=True,
  ):
    ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
    return self.synthesis(ws, noise_mode, fused_modconv)

  def map_latents(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None):
    return self.mapping(z, c, truncation_psi, truncation_cutoff)

  def synthesize(self, ws, noise_mode="const", fused_modconv=True, return_features=False):
    return self.synthesis(ws, noise_mode, fused_modconv, return_features)


# ----------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------
def _dummy_inputs(config: GeneratorConfig):
  z = jnp.zeros((1, config.z_dim), jnp.float32)
  c = jnp.zeros((1, config.c_dim), jnp.float32) if config.c_dim else None
  return z, c


def init_variables(config: GeneratorConfig, rng=None) -> dict:
  """Fresh ``{'params', 'buffers'}`` with the reference's initialisers (``w_avg`` zero)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  z, c = _dummy_inputs(config)
  return dict(Generator(config).init({"params": rng}, z, c))


def abstract_variables(config: GeneratorConfig) -> dict:
  """``init_variables``'s shapes and dtypes (``jax.ShapeDtypeStruct``), without compute."""
  z, c = _dummy_inputs(config)
  return jax.eval_shape(
      lambda k: dict(Generator(config).init({"params": k}, z, c)), jax.random.PRNGKey(0)
  )


def mapping(
    config: GeneratorConfig,
    variables,
    z,
    c=None,
    truncation_psi=1.0,
    truncation_cutoff: Optional[int] = None,
    precision: str = "highest",
):
  """``G.mapping(z, c, truncation_psi, truncation_cutoff)`` -> ws (N, num_ws, w_dim).

  ``truncation_psi`` may be traced; a Python 1.0 skips the lerp, as the reference does.
  """
  return Generator(config, precision=precision).apply(
      variables, z, c, truncation_psi, truncation_cutoff, method=Generator.map_latents
  )


def synthesis(
    config: GeneratorConfig,
    variables,
    ws,
    noise_mode: str = "const",
    fused_modconv: bool = True,
    return_features: bool = False,
    noise_rng=None,
    precision: str = "highest",
):
  """``G.synthesis(ws, noise_mode)`` -> img (N, R, R, C), or ``(img, {res: x})`` with
  ``return_features``.

  ``fused_modconv=True`` is the reference's eval path; ``False`` its train path (what
  stitching tuning differentiates). ``noise_mode='random'`` needs ``noise_rng``. Only the
  ``synthesis`` subtrees of ``variables`` are read.
  """
  rngs = {} if noise_rng is None else {"noise": noise_rng}
  if noise_mode == "random" and noise_rng is None:
    raise ValueError("noise_mode='random' needs noise_rng")
  return Generator(config, precision=precision).apply(
      variables,
      ws,
      noise_mode,
      fused_modconv,
      return_features,
      rngs=rngs,
      method=Generator.synthesize,
  )


def generate(
    config: GeneratorConfig,
    variables,
    z,
    c=None,
    truncation_psi=1.0,
    truncation_cutoff: Optional[int] = None,
    noise_mode: str = "const",
    fused_modconv: bool = True,
    noise_rng=None,
    precision: str = "highest",
):
  """``G(z, c, truncation_psi, truncation_cutoff, noise_mode)``: mapping then synthesis."""
  ws = mapping(config, variables, z, c, truncation_psi, truncation_cutoff, precision)
  return synthesis(
      config, variables, ws, noise_mode, fused_modconv, noise_rng=noise_rng, precision=precision
  )
