"""A compact, self-contained PyTorch twin of the DVA two-condition UNet (NCHW, eval mode).

It holds exactly the reference's state-dict names, so `load_state_dict(sd, strict=True)` works
on a reference checkpoint's non-`encoder.` keys and on `unet_params_to_torch` output. It needs
only torch: `config` is any object with the `UNetConfig` attributes (or a dict).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class _Norm32(nn.GroupNorm):
  """GroupNorm computed in float32 (like the reference's GroupNorm32)."""

  def forward(self, x):
    return super().forward(x.float()).type(x.dtype)


def norm(ch: int) -> nn.GroupNorm:
  return _Norm32(min(32, ch), ch, eps=1e-5)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None].to(t.device)
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


class ResBlock(nn.Module):

  def __init__(self, cin, cout, emb_ch, dropout=0.0, up=False, down=False):
    super().__init__()
    self.up, self.down = up, down
    self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
    self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * cout))
    self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * cout))
    self.out_layers = nn.Sequential(
        norm(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        norm(cout),
        nn.SiLU(),
        nn.Dropout(dropout),
        nn.Conv2d(cout, cout, 3, padding=1),
    )
    self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

  @staticmethod
  def _resample(x, up, down):
    if up:
      return F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
      return F.avg_pool2d(x, 2, 2)
    return x

  def forward(self, x, emb, cond):
    h = self.in_layers[1](self.in_layers[0](x))
    h = self._resample(h, self.up, self.down)
    x = self._resample(x, self.up, self.down)
    h = self.in_layers[2](h)
    s_t, b_t = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
    s_z, b_z = self.cond_emb_layers(cond)[..., None, None].chunk(2, dim=1)
    o = self.out_layers
    h = o[0](h) * (1 + s_t) + b_t
    h = o[3](o[2](o[1](h))) * (1 + s_z) + b_z
    h = o[6](o[5](o[4](h)))
    return self.skip_connection(x) + h


class AttentionBlock(nn.Module):

  def __init__(self, ch, num_heads=1):
    super().__init__()
    self.num_heads = num_heads
    self.norm = norm(ch)
    self.qkv = nn.Conv1d(ch, 3 * ch, 1)
    self.proj_out = nn.Conv1d(ch, ch, 1)

  def forward(self, x, emb=None, cond=None):
    b, c, hh, ww = x.shape
    xs = x.reshape(b, c, -1)
    qkv = self.qkv(self.norm(xs))
    ch = c // self.num_heads
    q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, -1).split(ch, dim=1)
    s = 1.0 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1).type(q.dtype)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (xs + self.proj_out(a)).reshape(b, c, hh, ww)


class Downsample(nn.Module):

  def __init__(self, ch):
    super().__init__()
    self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

  def forward(self, x, emb=None, cond=None):
    return self.op(x)


class Upsample(nn.Module):

  def __init__(self, ch):
    super().__init__()
    self.conv = nn.Conv2d(ch, ch, 3, padding=1)

  def forward(self, x, emb=None, cond=None):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.ModuleList):
  """TimestepEmbedSequential: passes (emb, cond) to the layers that take them."""

  def forward(self, x, emb, cond):
    for layer in self:
      x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb, cond)
    return x


class _TimeEmbed(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.time_embed = nn.Sequential(nn.Linear(cin, cout), nn.SiLU(), nn.Linear(cout, cout))


def _cfg(config):
  if isinstance(config, dict):
    config = SimpleNamespace(**config)
  d = dict(
      in_channels=3,
      out_channels=3,
      embed_channels=512,
      num_heads=1,
      dropout=0.0,
      resblock_updown=True,
  )
  d.update(
      {
          k: getattr(config, k)
          for k in (
              "image_size",
              "model_channels",
              "channel_mult",
              "num_res_blocks",
              "attention_resolutions",
              "in_channels",
              "out_channels",
              "embed_channels",
              "num_heads",
              "dropout",
              "resblock_updown",
          )
          if hasattr(config, k)
      }
  )
  return SimpleNamespace(**d)


class TorchUNet(nn.Module):
  """forward(x NCHW, t int (B,), cond (B, embed)) -> eps NCHW."""

  def __init__(self, config):
    super().__init__()
    c = self.c = _cfg(config)
    mc, E = c.model_channels, c.embed_channels
    res_kw = dict(emb_ch=E, dropout=c.dropout)
    self.time_embed = _TimeEmbed(mc, E)
    ch = in_ch = int(c.channel_mult[0] * mc)
    self.input_blocks = nn.ModuleList([Block([nn.Conv2d(c.in_channels, ch, 3, padding=1)])])
    chans = [[] for _ in c.channel_mult]
    chans[0].append(ch)
    res = c.image_size
    last = len(c.channel_mult) - 1
    for level, mult in enumerate(c.channel_mult):
      for _ in range(c.num_res_blocks):
        layers = [ResBlock(ch, int(mult * mc), **res_kw)]
        ch = int(mult * mc)
        if res in c.attention_resolutions:
          layers.append(AttentionBlock(ch, c.num_heads))
        self.input_blocks.append(Block(layers))
        chans[level].append(ch)
      if level != last:
        res //= 2
        self.input_blocks.append(
            Block([ResBlock(ch, ch, down=True, **res_kw) if c.resblock_updown else Downsample(ch)])
        )
        chans[level + 1].append(ch)
    self.middle_block = Block(
        [ResBlock(ch, ch, **res_kw), AttentionBlock(ch, c.num_heads), ResBlock(ch, ch, **res_kw)]
    )
    self.output_blocks = nn.ModuleList()
    for level in reversed(range(len(c.channel_mult))):
      mult = c.channel_mult[level]
      for i in range(c.num_res_blocks + 1):
        layers = [ResBlock(ch + chans[level].pop(), int(mc * mult), **res_kw)]
        ch = int(mc * mult)
        if res in c.attention_resolutions:
          layers.append(AttentionBlock(ch, c.num_heads))
        if level and i == c.num_res_blocks:
          res *= 2
          layers.append(ResBlock(ch, ch, up=True, **res_kw) if c.resblock_updown else Upsample(ch))
        self.output_blocks.append(Block(layers))
    self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(in_ch, c.out_channels, 3, padding=1))
    self.eval()

  def forward(self, x, t, cond):
    emb = self.time_embed.time_embed(timestep_embedding(t, self.c.model_channels))
    h, hs = x, []
    for blk in self.input_blocks:
      h = blk(h, emb, cond)
      hs.append(h)
    h = self.middle_block(h, emb, cond)
    for blk in self.output_blocks:
      h = blk(torch.cat([h, hs.pop()], dim=1), emb, cond)
    return self.out(h)


def from_state_dict(config, sd, dtype=torch.float32) -> TorchUNet:
  """Build a TorchUNet in eval mode and load `sd` ({name: array|tensor}) with strict=True."""
  model = TorchUNet(config)
  tensors = {k: torch.as_tensor(v) for k, v in sd.items()}
  model.load_state_dict(tensors, strict=True)
  return model.to(dtype).eval()
