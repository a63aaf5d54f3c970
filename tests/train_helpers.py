"""Tiny DVA configs and CLI runners shared by the tests and their subprocesses."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `configs` is importable from a checkout (also in subprocesses)
  sys.path.insert(0, str(REPO))

import configs  # noqa: E402


def tiny_dva_config(data_dir, total_steps=6, **overrides):
  """A 32 px two-level UNet on the sample data: compiles in seconds, trains in ms/step."""
  c = configs.get("voxceleb:demo")
  c.data.data_dir = str(data_dir)
  c.data.image_size = 32
  c.data.batch_size = 4
  c.data.frames_per_item = 2
  c.model.unet.update(
      dict(
          image_size=32,
          model_channels=32,
          channel_mult=(1, 2),
          num_res_blocks=1,
          attention_resolutions=(16,),
      )
  )
  c.diffusion.eval_steps = 10
  c.num_sample_rows = 2
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = 3
  c.sample_every = 10_000
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# The smallest UNet the DVA accepts (16 px, two levels): for tests of loading, export and the CLIs.
TINY_UNET = dict(
    image_size=16,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    embed_channels=512,
    num_heads=1,
    dropout=0.0,
    resblock_updown=True,
)


def run_module(module, *args, timeout=900) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repo root: each app keeps its absl flags in its own process."""
  return subprocess.run(
      [sys.executable, "-m", module, *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def run_convert(*args, timeout=900) -> subprocess.CompletedProcess:
  """`python -m s3jax.convert ARGS`."""
  return run_module("s3jax.convert", *args, timeout=timeout)
