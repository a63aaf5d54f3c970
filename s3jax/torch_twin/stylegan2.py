"""A compact PyTorch twin of the stylegan2-ada-pytorch Generator (STIT's copy), float32, NCHW.

It rebuilds `training/networks.py`'s `Generator` (mapping + synthesis, 'skip' architecture) with
the reference's module nesting, so `state_dict()` has exactly the reference's keys (buffers
`resample_filter`, `noise_const`, `w_avg` included) and a reference / golden state dict loads
with `strict=True`. The custom CUDA ops are replaced by the reference's own pure-PyTorch paths
(`_upfirdn2d_ref`, `_bias_act_ref`, `conv2d_resample`), written here in plain torch:

- fused modulated conv (eval mode: one grouped conv of per-sample kernels) and non-fused (train
  mode: `x * s`, conv with the raw weight, `x * dcoef + noise`), picked like the reference:
  `fused_modconv = not self.training` unless the caller says otherwise;
- conv0 (up=2) is a stride-2 transposed conv followed by the 4x4 FIR (`upfirdn2d`, gain 4);
  the ToRGB skip is `upsample2d` (zero insertion, pad (2, 1), same FIR);
- `bias_act` with lrelu gain sqrt(2) and `conv_clamp`; noise modes 'const' and 'none'.

float16 blocks (`num_fp16_res`) always run in float32 here: STIT calls synthesis with
`force_fp32=True` everywhere. Only torch and numpy are needed.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = float(np.sqrt(2.0))
RESAMPLE_FILTER = (1, 3, 3, 1)
NOISE_MODES = ("const", "none")


# ----------------------------------------------------------------------------------------
# Ops (the reference's pure-PyTorch paths).
# ----------------------------------------------------------------------------------------
def setup_filter(taps=RESAMPLE_FILTER) -> torch.Tensor:
  """`upfirdn2d.setup_filter`: 1-D taps -> normalised non-separable 2-D filter (< 8 taps)."""
  f = torch.as_tensor(taps, dtype=torch.float32)
  f = torch.outer(f, f)
  return f / f.sum()


def upfirdn2d(x, f, up: int = 1, padding=(0, 0, 0, 0), gain: float = 1.0):
  """Upsample (zeros after each pixel), pad (x0, x1, y0, y1), convolve with `f` (flipped)."""
  n, c, h, w = x.shape
  px0, px1, py0, py1 = padding
  if up > 1:
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
    x = x.reshape(n, c, h * up, w * up)
  x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
  x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
  f = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])
  f = f[None, None].repeat(c, 1, 1, 1)
  return F.conv2d(x, f, groups=c)


def upsample2d(x, f, up: int = 2):
  """`upfirdn2d.upsample2d`: pads ((fw + up - 1) // 2, (fw - up) // 2) = (2, 1) for 4 taps."""
  fw = f.shape[-1]
  p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
  return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def bias_act(x, b=None, act: str = "linear", gain: Optional[float] = None, clamp=None):
  """`bias_act._bias_act_ref` for 'linear' (gain 1) and 'lrelu' (slope 0.2, gain sqrt(2))."""
  if b is not None:
    x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
  if act == "lrelu":
    x = F.leaky_relu(x, LRELU_SLOPE)
    gain = LRELU_GAIN if gain is None else gain
  elif act != "linear":
    raise ValueError(f"unsupported activation {act!r}")
  gain = 1.0 if gain is None else float(gain)
  if gain != 1:
    x = x * gain
  if clamp is not None and clamp >= 0:
    x = x.clamp(-clamp, clamp)
  return x


def conv2d_resample(x, w, f=None, up: int = 1, padding: int = 0, groups: int = 1, flip_weight=True):
  """`conv2d_resample` for up in {1, 2}, no downsampling (all the generator uses)."""
  out_ch, in_per_group, kh, kw = w.shape
  if up == 1:
    if not flip_weight:
      w = w.flip([2, 3])
    return F.conv2d(x, w, padding=padding, groups=groups)
  fw, fh = f.shape[-1], f.shape[0]
  px0 = padding + (fw + up - 1) // 2 - (kw - 1)
  px1 = padding + (fw - up) // 2 - (kw - up)
  py0 = padding + (fh + up - 1) // 2 - (kh - 1)
  py1 = padding + (fh - up) // 2 - (kh - up)
  # Transposed conv: swap in/out per group.
  if groups == 1:
    w = w.transpose(0, 1)
  else:
    w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_ch // groups, kh, kw)
  pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
  if flip_weight:  # the transposed conv gets flip_weight=(not flip_weight)
    w = w.flip([2, 3])
  x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
  return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(
    x,
    weight,
    styles,
    noise=None,
    up: int = 1,
    padding: int = 0,
    resample_filter=None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
):
  n = x.shape[0]
  out_ch, in_ch, kh, kw = weight.shape
  w = dcoefs = None
  if demodulate or fused_modconv:
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)
  if demodulate:
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
  if demodulate and fused_modconv:
    w = w * dcoefs.reshape(n, -1, 1, 1, 1)
  if not fused_modconv:
    x = x * styles.reshape(n, -1, 1, 1)
    x = conv2d_resample(x, weight, resample_filter, up, padding, flip_weight=flip_weight)
    if demodulate and noise is not None:
      return torch.addcmul(noise, x, dcoefs.reshape(n, -1, 1, 1))
    if demodulate:
      return x * dcoefs.reshape(n, -1, 1, 1)
    if noise is not None:
      return x + noise
    return x
  x = x.reshape(1, -1, *x.shape[2:])
  w = w.reshape(-1, in_ch, kh, kw)
  x = conv2d_resample(x, w, resample_filter, up, padding, groups=n, flip_weight=flip_weight)
  x = x.reshape(n, -1, *x.shape[2:])
  if noise is not None:
    x = x + noise
  return x


def normalize_2nd_moment(x, dim: int = 1, eps: float = 1e-8):
  return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------------------
# Layers (registration order = the reference's, so state_dict() key order matches).
# ----------------------------------------------------------------------------------------
class FullyConnectedLayer(nn.Module):

  def __init__(self, in_features, out_features, activation="linear", lr_multiplier=1.0):
    super().__init__()
    self.activation = activation
    self.weight = nn.Parameter(torch.zeros(out_features, in_features))
    self.bias = nn.Parameter(torch.zeros(out_features))
    self.weight_gain = lr_multiplier / np.sqrt(in_features)
    self.bias_gain = lr_multiplier

  def forward(self, x):
    w = self.weight * self.weight_gain
    b = self.bias
    if self.bias_gain != 1:
      b = b * self.bias_gain
    if self.activation == "linear":
      return torch.addmm(b.unsqueeze(0), x, w.t())
    return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):

  def __init__(
      self,
      z_dim,
      c_dim,
      w_dim,
      num_ws,
      num_layers=8,
      embed_features=None,
      layer_features=None,
      activation="lrelu",
      lr_multiplier=0.01,
      w_avg_beta=0.995,
  ):
    super().__init__()
    self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
    self.num_layers = num_layers
    embed_features = w_dim if embed_features is None else embed_features
    embed_features = 0 if c_dim == 0 else embed_features
    layer_features = w_dim if layer_features is None else layer_features
    features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
    if c_dim > 0:
      self.embed = FullyConnectedLayer(c_dim, embed_features)
    for i in range(num_layers):
      layer = FullyConnectedLayer(
          features[i], features[i + 1], activation=activation, lr_multiplier=lr_multiplier
      )
      setattr(self, f"fc{i}", layer)
    if w_avg_beta is not None:
      self.register_buffer("w_avg", torch.zeros([w_dim]))

  def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None):
    # w_avg is used as stored (the reference tracks it only while training the GAN).
    x = None
    if self.z_dim > 0:
      x = normalize_2nd_moment(z.to(torch.float32))
    if self.c_dim > 0:
      y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
      x = torch.cat([x, y], dim=1) if x is not None else y
    for i in range(self.num_layers):
      x = getattr(self, f"fc{i}")(x)
    x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
    if truncation_psi != 1:
      if truncation_cutoff is None:
        x = self.w_avg.lerp(x, truncation_psi)
      else:
        x = x.clone()
        x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
    return x


class SynthesisLayer(nn.Module):

  def __init__(
      self,
      in_channels,
      out_channels,
      w_dim,
      resolution,
      kernel_size=3,
      up=1,
      use_noise=True,
      resample_filter=RESAMPLE_FILTER,
      conv_clamp=None,
  ):
    super().__init__()
    self.resolution, self.up, self.use_noise, self.conv_clamp = (
        resolution,
        up,
        use_noise,
        conv_clamp,
    )
    self.register_buffer("resample_filter", setup_filter(resample_filter))
    self.padding = kernel_size // 2
    self.affine = FullyConnectedLayer(w_dim, in_channels)
    self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
    if use_noise:
      self.register_buffer("noise_const", torch.zeros([resolution, resolution]))
      self.noise_strength = nn.Parameter(torch.zeros([]))
    self.bias = nn.Parameter(torch.zeros([out_channels]))

  def forward(self, x, w, noise_mode="const", fused_modconv=True):
    if noise_mode not in NOISE_MODES:
      raise ValueError(f"noise_mode must be one of {NOISE_MODES} (random is not reproducible)")
    styles = self.affine(w)
    noise = None
    if self.use_noise and noise_mode == "const":
      noise = self.noise_const * self.noise_strength
    x = modulated_conv2d(
        x,
        self.weight,
        styles,
        noise=noise,
        up=self.up,
        padding=self.padding,
        resample_filter=self.resample_filter,
        flip_weight=(self.up == 1),
        fused_modconv=fused_modconv,
    )
    return bias_act(x, self.bias, act="lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):

  def __init__(self, in_channels, out_channels, w_dim, kernel_size=1, conv_clamp=None):
    super().__init__()
    self.conv_clamp = conv_clamp
    self.affine = FullyConnectedLayer(w_dim, in_channels)
    self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
    self.bias = nn.Parameter(torch.zeros([out_channels]))
    self.weight_gain = 1 / np.sqrt(in_channels * kernel_size**2)

  def forward(self, x, w, fused_modconv=True):
    styles = self.affine(w) * self.weight_gain
    x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
    return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):

  def __init__(
      self,
      in_channels,
      out_channels,
      w_dim,
      resolution,
      img_channels,
      is_last,
      architecture="skip",
      resample_filter=RESAMPLE_FILTER,
      conv_clamp=None,
      **layer_kwargs,
  ):
    super().__init__()
    if architecture != "skip":
      raise NotImplementedError(f"only the 'skip' architecture is twinned, got {architecture!r}")
    self.in_channels, self.resolution = in_channels, resolution
    self.register_buffer("resample_filter", setup_filter(resample_filter))
    self.num_conv = 0
    self.num_torgb = 0
    if in_channels == 0:
      self.const = nn.Parameter(torch.zeros([out_channels, resolution, resolution]))
    else:
      self.conv0 = SynthesisLayer(
          in_channels,
          out_channels,
          w_dim,
          resolution,
          up=2,
          resample_filter=resample_filter,
          conv_clamp=conv_clamp,
          **layer_kwargs,
      )
      self.num_conv += 1
    self.conv1 = SynthesisLayer(
        out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp, **layer_kwargs
    )
    self.num_conv += 1
    self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
    self.num_torgb += 1

  def forward(self, x, img, ws, noise_mode="const", fused_modconv=None):
    if fused_modconv is None:
      fused_modconv = not self.training
    w_iter = iter(ws.unbind(dim=1))
    if self.in_channels == 0:
      x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
    else:
      x = self.conv0(x, next(w_iter), noise_mode, fused_modconv)
    x = self.conv1(x, next(w_iter), noise_mode, fused_modconv)
    if img is not None:
      img = upsample2d(img, self.resample_filter)
    y = self.torgb(x, next(w_iter), fused_modconv)
    return x, (img + y if img is not None else y)


class SynthesisNetwork(nn.Module):

  def __init__(
      self,
      w_dim,
      img_resolution,
      img_channels,
      channel_base=32768,
      channel_max=512,
      num_fp16_res=0,
      **block_kwargs,
  ):
    super().__init__()
    del num_fp16_res  # STIT runs synthesis with force_fp32=True: every block is float32.
    self.w_dim, self.img_resolution = w_dim, img_resolution
    log2 = int(np.log2(img_resolution))
    self.block_resolutions = [2**i for i in range(2, log2 + 1)]
    channels = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
    self.num_ws = 0
    for r in self.block_resolutions:
      block = SynthesisBlock(
          channels[r // 2] if r > 4 else 0,
          channels[r],
          w_dim,
          r,
          img_channels,
          is_last=(r == img_resolution),
          **block_kwargs,
      )
      self.num_ws += block.num_conv
      if r == img_resolution:
        self.num_ws += block.num_torgb
      setattr(self, f"b{r}", block)

  def forward(self, ws, noise_mode="const", fused_modconv=None, return_features=False, **unused):
    # `force_fp32` and the like are accepted and ignored: everything is float32 here.
    ws = ws.to(torch.float32)
    x = img = None
    features = []
    w_idx = 0
    for r in self.block_resolutions:
      block = getattr(self, f"b{r}")
      cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
      w_idx += block.num_conv
      x, img = block(x, img, cur, noise_mode=noise_mode, fused_modconv=fused_modconv)
      features.append(x)
    return (img, features) if return_features else img


class Generator(nn.Module):
  """`Generator(z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, ...)`."""

  def __init__(
      self,
      z_dim,
      c_dim,
      w_dim,
      img_resolution,
      img_channels,
      mapping_kwargs: Optional[Mapping] = None,
      synthesis_kwargs: Optional[Mapping] = None,
  ):
    super().__init__()
    self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
    self.img_resolution, self.img_channels = img_resolution, img_channels
    self.synthesis = SynthesisNetwork(
        w_dim=w_dim,
        img_resolution=img_resolution,
        img_channels=img_channels,
        **dict(synthesis_kwargs or {}),
    )
    self.num_ws = self.synthesis.num_ws
    self.mapping = MappingNetwork(
        z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **dict(mapping_kwargs or {})
    )

  def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, **synthesis_kwargs):
    ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
    return self.synthesis(ws, **synthesis_kwargs)


GENERATOR_KWARGS = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
)


def from_state_dict(config: Mapping, state_dict: Mapping, conv_clamp="config") -> Generator:
  """An eval-mode twin from the reference's init kwargs (`config`) and its state dict.

  `conv_clamp` overrides `synthesis_kwargs['conv_clamp']` when given (a number or None).
  """
  kwargs = {k: config[k] for k in GENERATOR_KWARGS if k in config}
  if conv_clamp != "config":
    kwargs["synthesis_kwargs"] = dict(kwargs.get("synthesis_kwargs") or {}, conv_clamp=conv_clamp)
  g = Generator(**kwargs)
  g.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
  return g.eval().requires_grad_(False)
