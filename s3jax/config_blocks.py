"""Blocks the config files in `configs/` share, and the one parser of their variants.

A config file is `get_config(arg)` in `configs/`; it builds its ConfigDict from
these blocks and overrides what differs. Library code never loads a config
file: entry points take them with `ml_collections.config_flags`.
"""

import dataclasses
from typing import Sequence

import ml_collections

from s3jax.models.unet import UNetConfig


def parse_variant(arg: str, variants: Sequence[str] = ("", "demo")) -> str:
  """Checks a config variant (the part after ':' on the command line)."""
  arg = arg or ""
  if arg not in variants:
    raise ValueError(
        f"unknown config variant {arg!r}; use one of {', '.join(repr(v) for v in variants)}"
    )
  return arg


def data(**overrides) -> ml_collections.ConfigDict:
  """The video-frame pipeline (`s3jax.input_pipeline`) over `data_prep` shards."""
  c = ml_collections.ConfigDict(
      dict(
          data_dir="data/voxceleb",  # output of `python -m data_prep.voxceleb`
          image_size=256,
          batch_size=8,  # items per global batch
          frames_per_item=2,  # frames of one video per item: 16 frames per step
          shuffle_seed=0,
          num_workers=0,
          skip_corrupt=False,
      )
  )
  c.update(overrides)
  return c


def mesh(fsdp: int = 1) -> ml_collections.ConfigDict:
  """A (data, fsdp) device mesh; data=-1 takes every device fsdp leaves."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp))


def loop(
    c: ml_collections.ConfigDict,
    total_steps: int,
    log_every: int,
    checkpoint_every: int,
    sample_every: int,
    keep_checkpoints: int = 3,
) -> None:
  """The shared loop's fields (`s3jax.training.loop.train`), set on `c`."""
  c.total_steps = total_steps
  c.log_every = log_every
  c.checkpoint_every = checkpoint_every
  c.keep_checkpoints = keep_checkpoints
  c.sample_every = sample_every


def adam(lr: float, grad_clip: float = 1.0, **extra) -> ml_collections.ConfigDict:
  """`s3jax.optim.make_optimizer`'s fields: clip, Adam, optional warm-up."""
  return ml_collections.ConfigDict(
      dict(lr=lr, grad_clip=grad_clip, b1=0.9, b2=0.999, warmup_steps=0, **extra)
  )


def paper_unet(image_size: int = 256) -> ml_collections.ConfigDict:
  """The paper's UNet (`UNetConfig.paper`): 128 channels, mult (1,1,2,2,4,4), attention at 16 px.

  `dtype` and `remat` are not UNet fields here: they live in the config's
  `model` block.
  """
  fields = dataclasses.asdict(UNetConfig.paper(image_size=image_size))
  for key in ("dtype", "remat"):
    fields.pop(key)
  return ml_collections.ConfigDict(fields)


def demo_unet() -> ml_collections.ConfigDict:
  """The 64 px CPU demo UNet (~49 GFLOP per demo train step)."""
  c = paper_unet(64)
  c.update(dict(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, dropout=0.0))
  return c
