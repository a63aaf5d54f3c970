"""The two-condition BeatGANs/DiffAE UNet of Diffusion Video Autoencoders, in Flax linen.

Layout facts (from the reference `model/unet.py`, `model/blocks.py`):
- time: sinusoidal(model_channels, cos first) -> Linear(embed) -> SiLU -> Linear(embed);
- ResBlock: GN -> SiLU -> [up/down] -> conv3x3; then GN, h*(1+s_t)+b_t, SiLU, conv3x3, GN,
  h*(1+s_z)+b_z, SiLU, dropout, conv3x3; skip is identity or a 1x1 conv;
- decoder blocks concatenate [h, skip] on channels (h first);
- attention: GN, 1x1 qkv with the legacy head split (per head: q, k, v), 1x1 proj_out.

Submodule names mirror the PyTorch state-dict names with `.` before an index turned into
`_` (`input_blocks.4.0.in_layers.2` -> `input_blocks_4_0` / `in_layers_2`), so that
`s3jax.porting.unet_keys` maps keys mechanically. Inputs and outputs are NHWC.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import lift


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
  image_size: int
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  embed_channels: int = 512
  num_heads: int = 1
  dropout: float = 0.0
  resblock_updown: bool = True
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
    object.__setattr__(
        self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
    )
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"UNetConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  @classmethod
  def from_json(cls, cfg: Mapping[str, Any] | str, **overrides) -> "UNetConfig":
    """Build from the golden `config` JSON (a dict or a JSON string).

    Keys that are not fields are ignored (e.g. `dropout_eval`); `overrides` win.
    """
    if isinstance(cfg, (str, bytes, np.ndarray)):
      cfg = json.loads(str(cfg))
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(cfg).items() if k in names}
    if cfg.get("dropout_eval"):
      kwargs.setdefault("dropout", 0.0)
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def paper(cls, **overrides) -> "UNetConfig":
    """The 256 px model of the DVA paper (Kim et al., CVPR 2023)."""
    kwargs = dict(
        image_size=256,
        model_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        embed_channels=512,
        num_heads=1,
        dropout=0.1,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Block plan: one description of the layer sequence, used by the Flax model (and mirrored by
# the torch twin). Each entry: (container_name, kind, kwargs).
# kinds: 'conv_in', 'res', 'attn', 'down' (pool/conv), 'up' (nearest/conv).
# ---------------------------------------------------------------------------------------
def block_plan(c: UNetConfig) -> dict[str, list[list[tuple[str, dict]]]]:
  """Returns {'input_blocks': [[layers...]...], 'middle_block': [[...]], 'output_blocks': ...}.

  Each layer is (kind, kwargs) with kwargs holding channel counts and up/down flags.
  """
  mc = c.model_channels
  ch = int(c.channel_mult[0] * mc)
  inputs = [[("conv_in", dict(cin=c.in_channels, cout=ch))]]
  chans = [[] for _ in c.channel_mult]
  chans[0].append(ch)
  res = c.image_size
  nlev = len(c.channel_mult)
  for level, mult in enumerate(c.channel_mult):
    for _ in range(c.num_res_blocks):
      out = int(mult * mc)
      layers = [("res", dict(cin=ch, cout=out))]
      ch = out
      if res in c.attention_resolutions:
        layers.append(("attn", dict(ch=ch)))
      inputs.append(layers)
      chans[level].append(ch)
    if level != nlev - 1:
      res //= 2
      if c.resblock_updown:
        inputs.append([("res", dict(cin=ch, cout=ch, down=True))])
      else:
        inputs.append([("down", dict(ch=ch))])
      chans[level + 1].append(ch)
  middle = [[("res", dict(cin=ch, cout=ch)), ("attn", dict(ch=ch)), ("res", dict(cin=ch, cout=ch))]]
  outputs = []
  for level in reversed(range(nlev)):
    mult = c.channel_mult[level]
    for i in range(c.num_res_blocks + 1):
      ich = chans[level].pop()
      out = int(mc * mult)
      layers = [("res", dict(cin=ch + ich, cout=out))]
      ch = out
      if res in c.attention_resolutions:
        layers.append(("attn", dict(ch=ch)))
      if level and i == c.num_res_blocks:
        res *= 2
        if c.resblock_updown:
          layers.append(("res", dict(cin=ch, cout=ch, up=True)))
        else:
          layers.append(("up", dict(ch=ch)))
      outputs.append(layers)
  return {
      "input_blocks": inputs,
      "middle_block": middle,
      "output_blocks": outputs,
      "out_channels_in": int(c.channel_mult[0] * mc),
  }


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos | sin], frequencies computed in float32 like the reference."""
  half = dim // 2
  freqs = np.exp(
      np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  ).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _gn(name):
  return _GN(name=name)


class _GN(nn.Module):
  """GroupNorm(min(32, C), eps=1e-5) computed in float32, cast back to the input dtype.

  Params are {scale, bias} directly under `name` (torch: weight, bias).
  """

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    g = min(32, c)
    xf = x.astype(jnp.float32)
    shp = xf.shape
    xg = xf.reshape(shp[:-1] + (g, c // g))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(shp)
    return (y * scale + bias).astype(x.dtype)


def _conv(feat, name, dtype, k=3, stride=1, zero=False):
  pad = (k - 1) // 2
  return nn.Conv(
      feat,
      (k, k),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
  )


def _dense(feat, name, dtype, zero=False):
  return nn.Dense(
      feat,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
  )


def _avg_pool2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample2(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """Two-condition ResBlock. `train` is an attribute so `remat` needs no static args."""

  cin: int
  cout: int
  dropout: float = 0.0
  up: bool = False
  down: bool = False
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, cond):
    dt = self.dtype
    h = nn.silu(_gn("in_layers_0")(x))
    if self.up:
      h, x = _upsample2(h), _upsample2(x)
    elif self.down:
      h, x = _avg_pool2(h), _avg_pool2(x)
    h = _conv(self.cout, "in_layers_2", dt)(h)

    e = _dense(2 * self.cout, "emb_layers_1", dt)(nn.silu(emb).astype(dt))
    z = _dense(2 * self.cout, "cond_emb_layers_1", dt)(nn.silu(cond).astype(dt))
    s_t, b_t = jnp.split(e[:, None, None, :], 2, axis=-1)
    s_z, b_z = jnp.split(z[:, None, None, :], 2, axis=-1)

    h = _gn("out_layers_0")(h)
    h = h * (1 + s_t) + b_t
    h = _conv(self.cout, "out_layers_2", dt)(nn.silu(h))
    h = _gn("out_layers_3")(h)
    h = h * (1 + s_z) + b_z
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not self.train)(h)
    h = _conv(self.cout, "out_layers_6", dt, zero=True)(h)
    if self.cin != self.cout:
      x = _conv(self.cout, "skip_connection", dt, k=1)(x)
    return x + h


def _after_cotangent(tree, cotangent):
  """`tree` with its values unchanged but data-dependent on `cotangent`.

  `0 * c` is not folded for floats (NaN), so XLA must wait for the cotangent. A non-finite
  cotangent changes the values, but then the step's gradients are non-finite anyway.
  """
  zero = jax.tree.leaves(cotangent)[0].reshape(-1)[0].astype(jnp.float32) * 0
  nonfinite = zero != 0

  def tie(a):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      data = jax.random.key_data(a)
      return jax.random.wrap_key_data(
          data + nonfinite.astype(data.dtype), impl=jax.random.key_impl(a)
      )
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return a + zero.astype(a.dtype)
    if jnp.issubdtype(a.dtype, jnp.integer):
      return a + nonfinite.astype(a.dtype)
    return a

  return jax.tree.map(tie, tree)


def _recompute_after_cotangent(fn):
  """`fn(variables, *inputs)` that saves only its arguments and recomputes in the backward pass.

  Unlike `jax.checkpoint`, the recomputation reads its inputs through a data dependency on
  the output's cotangent. XLA drops `jax.checkpoint`'s optimization barrier before it
  schedules (CPU), and its schedulers then run the recomputation inside the forward pass,
  where it holds as many activations as no remat at all.
  """

  @jax.custom_vjp
  def call(variables, *inputs):
    return fn(variables, *inputs)

  def forward(variables, *inputs):
    return fn(variables, *inputs), (variables, inputs)

  def backward(saved, cotangent):
    variables, inputs = saved
    inputs = _after_cotangent(inputs, cotangent[0])
    _, vjp = jax.vjp(fn, variables, *inputs)
    return vjp(cotangent)

  call.defvjp(forward, backward)
  return call


def _lifted_remat(scope_fn, variables=True, rngs=True):
  """`flax.core.lift.checkpoint` with `_recompute_after_cotangent` in place of `jax.checkpoint`."""

  def inner(scope_of, repack, variable_groups, rng_groups, *args):
    def run(variable_groups, rng_groups, *args):
      scope = scope_of(variable_groups, rng_groups)
      return scope_fn(scope, *args), repack(scope)

    # rng_groups go with the inputs: dropout's random bits must wait for the cotangent too.
    return _recompute_after_cotangent(run)(variable_groups, rng_groups, *args)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def remat(module_cls):
  """Rematerialise `module_cls`: keep its inputs, recompute the rest when the gradient reaches it.

  The params (and the module's inputs) are all it keeps for the backward pass, like
  `nn.remat` with `nothing_saveable`, but the recomputation cannot be hoisted (see
  `_recompute_after_cotangent`); only `jax.grad`/`jax.vjp` apply (no forward mode).
  """
  return nn.transforms.lift_transform(_lifted_remat, module_cls)


class AttentionBlock(nn.Module):
  """Spatial self-attention with the reference's legacy head split."""

  channels: int
  num_heads: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    nh = self.num_heads
    ch = c // nh
    xs = x.reshape(b, hh * ww, c)
    qkv = _dense(3 * c, "qkv", self.dtype)(_gn("norm")(xs))
    qkv = qkv.reshape(b, hh * ww, nh, 3, ch)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    w = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
    a = jnp.einsum("bhts,bshc->bthc", w, v).reshape(b, hh * ww, c)
    h = _dense(c, "proj_out", self.dtype, zero=True)(a)
    return (xs + h).reshape(b, hh, ww, c)


class _TimeEmbed(nn.Module):
  embed_channels: int

  @nn.compact
  def __call__(self, temb):
    h = _dense(self.embed_channels, "time_embed_0", jnp.float32)(temb)
    return _dense(self.embed_channels, "time_embed_2", jnp.float32)(nn.silu(h))


class UNet(nn.Module):
  """eps = UNet(config)(x NHWC in [-1,1], t int (B,), cond (B, embed) = z_face)."""

  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, cond, train: bool = False):
    c = self.config
    dt = jnp.dtype(c.dtype)
    plan = block_plan(c)
    emb = _TimeEmbed(c.embed_channels, name="time_embed")(timestep_embedding(t, c.model_channels))
    cond = cond.astype(jnp.float32)
    res_cls = remat(ResBlock) if c.remat else ResBlock

    def run(container, idx, layers, h):
      for j, (kind, kw) in enumerate(layers):
        name = f"{container}_{idx}_{j}" if container != "middle_block" else f"{container}_{j}"
        if kind == "conv_in":
          h = _conv(kw["cout"], name, dt)(h)
        elif kind == "res":
          h = res_cls(
              cin=kw["cin"],
              cout=kw["cout"],
              dropout=c.dropout,
              up=kw.get("up", False),
              down=kw.get("down", False),
              train=train,
              dtype=dt,
              name=name,
          )(h, emb, cond)
        elif kind == "attn":
          h = AttentionBlock(kw["ch"], c.num_heads, dt, name=name)(h)
        elif kind == "down":
          h = _Down(kw["ch"], dt, name=name)(h)
        elif kind == "up":
          h = _Up(kw["ch"], dt, name=name)(h)
        else:  # pragma: no cover
          raise AssertionError(kind)
      return h

    h = x.astype(dt)
    skips = []
    for i, layers in enumerate(plan["input_blocks"]):
      h = run("input_blocks", i, layers, h)
      skips.append(h)
    h = run("middle_block", 0, plan["middle_block"][0], h)
    for i, layers in enumerate(plan["output_blocks"]):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = run("output_blocks", i, layers, h)
    h = nn.silu(_gn("out_0")(h))
    h = _conv(c.out_channels, "out_2", dt, zero=True)(h)
    return h.astype(jnp.float32)


class _Down(nn.Module):
  """Downsample with a stride-2 3x3 conv (used when resblock_updown=False)."""

  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.ch, "op", self.dtype, stride=2)(x)


class _Up(nn.Module):
  """Nearest x2 then a 3x3 conv (used when resblock_updown=False)."""

  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.ch, "conv", self.dtype)(_upsample2(x))


def init_params(config: UNetConfig, rng: jax.Array | int = 0, batch: int = 1):
  """Random f32 params for `config` (zero-initialised output convs, like the reference)."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  s = config.image_size
  x = jnp.zeros((batch, s, s, config.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  cond = jnp.zeros((batch, config.embed_channels), jnp.float32)
  return jax.jit(UNet(config).init)(rng, x, t, cond)["params"]


def abstract_params(config: UNetConfig):
  """Param ShapeDtypeStructs via `jax.eval_shape` (no FLOPs, no memory)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
