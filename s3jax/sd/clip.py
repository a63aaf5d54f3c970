"""CLIP text and vision transformers (transformers' `CLIPModel` layout) in Flax.

`CLIPTextModel` (SD's text encoder: causal pre-LN transformer, final LayerNorm, pooled at the
eos token), `CLIPVisionModel` (ViT: patch conv, class token, pre/post LayerNorm), `CLIPModel`
(both plus `text_projection`/`visual_projection` and `logit_scale`), their configs read from
transformers `config.json` dicts, and `clip_preprocess` (CLIPImageProcessor's resize, centre
crop and normalisation on [-1, 1] NHWC images). Submodule names follow transformers' paths
with `.N` written `_N`, so `s3jax.porting.sd_vae_clip_keys` maps state dicts mechanically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from s3jax.sd.vae import init_key, precision

# OpenAI CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' PR #24773 rule: an eos_token_id of 2 marks old configs pooled at argmax(ids).
LEGACY_EOS_TOKEN_ID = 2
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def check_activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; expected one of {ACTIVATIONS}")
  return name


def activation(name: str, x):
  """transformers' ACT2FN for the activations CLIP checkpoints use."""
  if check_activation(name) == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=name != "gelu")  # gelu_new, gelu_pytorch_tanh: tanh form


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers CLIPTextConfig (the defaults are transformers'; SD-1.x uses width 768)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """Reads a `clip_text_model` config dict, or the `text_config` of a `clip` one."""
    if config.get("model_type") == "clip" or "text_config" in config:
      config = sub_config(config, "text_config")
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

  def __post_init__(self):
    check_activation(self.hidden_act)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} % heads {self.num_attention_heads} != 0")

  def to_transformers(self) -> dict:
    """The `clip_text_model` config dict (transformers' CLIPTextConfig reads it)."""
    return dict(model_type="clip_text_model", **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers CLIPVisionConfig (square images and patches)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """Reads a `clip_vision_model` config dict, or the `vision_config` of a `clip` one."""
    if config.get("model_type") == "clip" or "vision_config" in config:
      config = sub_config(config, "vision_config")
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    for key in ("image_size", "patch_size"):
      if isinstance(values.get(key), (list, tuple)):
        if len(set(values[key])) != 1:
          raise ValueError(f"only square {key} is supported, got {values[key]}")
        values[key] = int(values[key][0])
    return cls(**values)

  def __post_init__(self):
    check_activation(self.hidden_act)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} % patch_size {self.patch_size} != 0")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  def to_transformers(self) -> dict:
    return dict(model_type="clip_vision_model", **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers CLIPConfig: a text and a vision config, the projection width, logit scale."""

  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPConfig":
    """Reads a `clip` config dict (`text_config`/`vision_config`, or the old `*_dict` keys)."""
    return cls(
        text=CLIPTextConfig.from_transformers(sub_config(config, "text_config")),
        vision=CLIPVisionConfig.from_transformers(sub_config(config, "vision_config")),
        projection_dim=int(config.get("projection_dim", 512)),
        logit_scale_init_value=float(config.get("logit_scale_init_value", 2.6592)),
    )

  def to_transformers(self) -> dict:
    """The `clip` config dict that `transformers.CLIPModel.from_pretrained` reads."""
    return dict(
        model_type="clip",
        architectures=["CLIPModel"],
        text_config=self.text.to_transformers(),
        vision_config=self.vision.to_transformers(),
        projection_dim=self.projection_dim,
        logit_scale_init_value=self.logit_scale_init_value,
    )


def sub_config(config: Mapping[str, Any], key: str) -> dict:
  """`config[key]` updated with the pre-4.x `config[key + '_dict']` when present."""
  out = dict(config.get(key) or {})
  out.update(config.get(key + "_dict") or {})
  return out


def dense(features: int, name: str, dtype, use_bias: bool = True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class LayerNorm(nn.Module):
  """torch LayerNorm over the last axis, in float32 or float64 (two-pass variance), cast back.

  Params `scale` and `bias` (torch: weight, bias) sit directly under the module's name.
  """

  epsilon: float

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(precision(x.dtype))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""

  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, causal: bool):
    b, n, c = x.shape
    d = c // self.num_heads
    split = lambda t: t.reshape(b, n, self.num_heads, d)  # noqa: E731
    q = split(dense(c, "q_proj", self.dtype)(x))
    k = split(dense(c, "k_proj", self.dtype)(x))
    v = split(dense(c, "v_proj", self.dtype)(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(precision(q.dtype)) * (d**-0.5)
    if causal:
      mask = jnp.tril(jnp.ones((n, n), bool))
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    # float32 softmax whatever the dtype, as transformers' eager attention (softmax(dtype=
    # float32)), the path that wrote the float64 golden vectors.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c)
    return dense(c, "out_proj", self.dtype)(out)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN1(x)), then x + fc2(act(fc1(LN2(x))))."""

  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, causal: bool):
    h = LayerNorm(self.layer_norm_eps, name="layer_norm1")(x)
    x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, causal)
    h = LayerNorm(self.layer_norm_eps, name="layer_norm2")(x)
    h = CLIPMLP(self.intermediate_size, self.hidden_size, self.hidden_act, self.dtype, name="mlp")(
        h
    )
    return x + h


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = activation(self.hidden_act, dense(self.intermediate_size, "fc1", self.dtype)(x))
    return dense(self.hidden_size, "fc2", self.dtype)(h)


class CLIPEncoder(nn.Module):
  """The stack of encoder layers (`encoder.layers.N`)."""

  config: Any  # CLIPTextConfig | CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, causal: bool):
    c = self.config
    for i in range(c.num_hidden_layers):
      x = CLIPEncoderLayer(
          c.hidden_size,
          c.intermediate_size,
          c.num_attention_heads,
          c.hidden_act,
          c.layer_norm_eps,
          self.dtype,
          name=f"layers_{i}",
      )(x, causal)
    return x


def embed(num: int, features: int, name: str):
  return nn.Embed(num, features, param_dtype=jnp.float32, name=name)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    n = input_ids.shape[-1]
    if n > c.max_position_embeddings:
      raise ValueError(f"{n} tokens > max_position_embeddings {c.max_position_embeddings}")
    tokens = embed(c.vocab_size, c.hidden_size, "token_embedding")(input_ids)
    return tokens + embed(c.max_position_embeddings, c.hidden_size, "position_embedding")(
        jnp.arange(n)
    )


def eos_positions(input_ids, eos_token_id: int):
  """Where transformers pools: argmax of the ids for legacy eos id 2, else the first eos."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
  """input_ids (N,L) int -> (last_hidden_state (N,L,C) after final LayerNorm, pooled (N,C))."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    h = CLIPTextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
    h = CLIPEncoder(c, self.dtype, name="encoder")(h, causal=True)
    h = LayerNorm(c.layer_norm_eps, name="final_layer_norm")(h).astype(precision(self.dtype))
    pooled = jnp.take_along_axis(h, eos_positions(input_ids, c.eos_token_id)[:, None, None], 1)
    return h, pooled[:, 0]


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b, hh, ww, _ = pixel_values.shape
    if hh != c.image_size or ww != c.image_size:
      raise ValueError(f"image {hh}x{ww} != model size {c.image_size}x{c.image_size}")
    class_embedding = self.param(
        "class_embedding", nn.initializers.normal(c.hidden_size**-0.5), (c.hidden_size,)
    )
    patches = nn.Conv(
        c.hidden_size,
        (c.patch_size, c.patch_size),
        strides=(c.patch_size, c.patch_size),
        padding="VALID",
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, c.hidden_size)  # row-major (y, x), as torch's flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, c.hidden_size))
    h = jnp.concatenate([cls, patches], axis=1)
    return h + embed(c.num_positions, c.hidden_size, "position_embedding")(
        jnp.arange(c.num_positions)
    ).astype(h.dtype)


class CLIPVisionModel(nn.Module):
  """pixel_values (N,S,S,3) CLIP-normalised -> (last_hidden_state (N,P+1,C), pooled (N,C)).

  last_hidden_state is the encoder output (no post LayerNorm); pooled is
  post_layernorm(class token), as transformers' CLIPVisionModel.
  """

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    h = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    h = LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(h)
    h = CLIPEncoder(c, self.dtype, name="encoder")(h, causal=False).astype(precision(self.dtype))
    pooled = LayerNorm(c.layer_norm_eps, name="post_layernorm")(h[:, 0])
    return h, pooled


class CLIPModel(nn.Module):
  """transformers CLIPModel: `text_model`, `vision_model`, the two projections, logit_scale.

  `params["text_model"]` are the params of `CLIPTextModel(config.text)` and likewise for the
  vision tower. `__call__` returns transformers' CLIPOutput fields as a dict.
  """

  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.text_model = CLIPTextModel(c.text, self.dtype)
    self.vision_model = CLIPVisionModel(c.vision, self.dtype)
    self.text_projection = dense(c.projection_dim, "text_projection", self.dtype, use_bias=False)
    self.visual_projection = dense(
        c.projection_dim, "visual_projection", self.dtype, use_bias=False
    )
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(c.logit_scale_init_value), ()
    )

  def text_features(self, input_ids):
    """text_projection(pooled text state): (N, projection_dim), float32, not normalised."""
    _, pooled = self.text_model(input_ids)
    return self.text_projection(pooled.astype(self.dtype)).astype(precision(self.dtype))

  def image_features(self, pixel_values):
    """visual_projection(pooled image state): (N, projection_dim), float32, not normalised."""
    _, pooled = self.vision_model(pixel_values)
    return self.visual_projection(pooled.astype(self.dtype)).astype(precision(self.dtype))

  def __call__(self, input_ids, pixel_values):
    """{text_embeds, image_embeds (unit norm), logits_per_image (Ni,Nt), logits_per_text}."""
    text = self.text_features(input_ids)
    image = self.image_features(pixel_values)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits_per_text = (text @ image.T) * jnp.exp(self.logit_scale)
    return dict(
        text_embeds=text,
        image_embeds=image,
        logits_per_text=logits_per_text,
        logits_per_image=logits_per_text.T,
    )


def clip_preprocess(images, size: int):
  """[-1,1] NHWC images -> CLIP pixel_values (N, size, size, C).

  CLIPImageProcessor's steps on float images: bicubic resize of the shorter side to `size`
  (antialiased when shrinking, Keys a=-0.5 like PIL), centre crop to `size` x `size`, then
  (x - mean) / std with OpenAI's statistics on [0, 1] values.
  """
  images = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
  n, h, w, ch = images.shape
  # transformers' shortest-edge rule: the long side becomes int(size * long / short).
  new_h, new_w = (size, int(size * w / h)) if w >= h else (int(size * h / w), size)
  if (new_h, new_w) != (h, w):
    images = jax.image.resize(images, (n, new_h, new_w, ch), method="bicubic", antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  images = images[:, top : top + size, left : left + size]
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)
  std = jnp.asarray(CLIP_STD, jnp.float32)
  return (images - mean) / std


def init_text_params(config: CLIPTextConfig, rng: jax.Array | int = 0) -> dict:
  """Random float32 params of `CLIPTextModel(config)`; apply with `{"params": params}`."""
  rng = init_key(rng)
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return jax.jit(CLIPTextModel(config).init)(rng, ids)["params"]


def init_params(config: CLIPConfig, rng: jax.Array | int = 0) -> dict:
  """Random float32 params of `CLIPModel(config)`; apply with `{"params": params}`."""
  rng = init_key(rng)
  ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
  s = config.vision.image_size
  pixels = jnp.zeros((1, s, s, config.vision.num_channels), jnp.float32)
  return jax.jit(CLIPModel(config).init)(rng, ids, pixels)["params"]
