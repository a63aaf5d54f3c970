"""Tiny random Stable Diffusion and CLIP models for tests (tests/test_sd_finetune.py,
test_clip_edit.py, test_edit.py): random numpy weights from abstract shapes (nothing compiled to
make them) and a byte-level CLIP tokenizer written on the spot, so nothing under ../shared is
needed."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from s3jax.sd import clip as clip_lib
from s3jax.sd import pipeline
from s3jax.sd import unet as unet_lib
from s3jax.sd import vae as vae_lib
from s3jax.sd.scheduler import SDScheduler
from s3jax.sd.tokenizer import CLIPTokenizer

SIZE = 32
BOS, EOS = 512, 513  # the byte-level vocabulary's special tokens


def byte_characters() -> list:
  """GPT-2 / CLIP's printable stand-in character of each of the 256 bytes, in vocab order."""
  bs = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_byte_level_tokenizer(directory) -> pathlib.Path:
  """A CLIP tokenizer dir without merges: the 256 bytes, the same with `</w>`, bos 512, eos 513."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  chars = byte_characters()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
  vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
  (d / "vocab.json").write_text(json.dumps(vocab))
  (d / "merges.txt").write_text("#version: 0.2\n")
  return d


def random_params(abstract, seed: int):
  """Random float32 numpy params of an abstract tree: kernels N(0, 1/fan_in), norm scales 1,
  biases 0, anything else N(0, 0.02^2)."""
  r = np.random.default_rng(seed)
  flat, tree = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, a in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(a.shape)
    if name == "kernel":
      v = r.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      v = np.ones(shape)
    elif name == "bias":
      v = np.zeros(shape)
    else:
      v = 0.02 * r.standard_normal(shape)
    leaves.append(np.asarray(v, np.float32))
  return jax.tree_util.tree_unflatten(tree, leaves)


TEXT_CONFIG = clip_lib.CLIPTextConfig(
    vocab_size=514,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
    projection_dim=16,
)
CLIP_CONFIG = clip_lib.CLIPConfig(
    text=TEXT_CONFIG,
    vision=clip_lib.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=8,
        projection_dim=16,
    ),
    projection_dim=16,
)


def tiny_sd(tokenizer_dir, unet_channels: int = 16) -> pipeline.StableDiffusion:
  unet_config = unet_lib.SDUNetConfig(
      block_out_channels=(unet_channels,),  # one level (cross-attn down, mid, up): compiles fast
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",),
      cross_attention_dim=TEXT_CONFIG.hidden_size,
      attention_head_dim=2,
      norm_num_groups=8,
      sample_size=SIZE // 2,
  )
  vae_config = vae_lib.VAEConfig(
      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIZE
  )
  text_abstract = jax.eval_shape(
      lambda: clip_lib.CLIPTextModel(TEXT_CONFIG).init(
          jax.random.key(0), jnp.zeros((1, 77), jnp.int32)
      )["params"]
  )
  vae_abstract = jax.eval_shape(lambda: vae_lib.init_params(vae_config, jax.random.key(0)))
  return pipeline.StableDiffusion(
      unet_config=unet_config,
      unet_params=random_params(unet_lib.abstract_params(unet_config), 1),
      vae_config=vae_config,
      vae_params=random_params(vae_abstract, 2),
      text_config=TEXT_CONFIG,
      text_params=random_params(text_abstract, 3),
      tokenizer=CLIPTokenizer.from_dir(tokenizer_dir),
      scheduler=SDScheduler(),
      tokenizer_dir=pathlib.Path(tokenizer_dir),
  )
