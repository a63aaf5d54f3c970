"""DVA training on VoxCeleb.

  python -m s3jax.train --config configs/voxceleb.py          # the paper's model
  python -m s3jax.train --config configs/voxceleb.py:demo     # tiny CPU demo on the embedded sample
Override any field with --config.<field>=<value>; unknown fields are rejected.
The demo's data is built by `python -m data_prep.sample --out runs/data/sample`.
"""

import ml_collections

from s3jax import config_blocks


def get_config(arg: str = ""):
  """`arg` is '' (paper) or 'demo' (tiny CPU config on the embedded sample dataset)."""
  arg = config_blocks.parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.trainer = "dva"
  c.seed = 0
  c.data = config_blocks.data()
  c.model = ml_collections.ConfigDict(
      dict(
          face_features="dlib",  # 'dlib' (offline default, z_id 128-d) | 'official' (ArcFace, 512-d)
          dtype="float32",  # compute dtype; params stay float32
          remat=False,
          unet=config_blocks.paper_unet(256),
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(num_timesteps=1000, eval_steps=20)  # eval_steps: DDIM steps for the sample grids
  )
  c.loss = ml_collections.ConfigDict(dict(reg_coef=1.0))
  c.optim = config_blocks.adam(1e-4)
  c.ema_decay = 0.9999
  c.mesh = config_blocks.mesh()
  config_blocks.loop(c, 1_000_000, log_every=100, checkpoint_every=5000, sample_every=5000)
  c.num_sample_rows = 4

  if arg == "demo":
    c.data.data_dir = "runs/data/sample"
    c.data.image_size = 64
    # Sized for 2 CPU cores: ~49 GFLOP per step (XLA cost analysis), minutes in all.
    c.data.batch_size = 2
    c.data.frames_per_item = 2
    c.model.unet = config_blocks.demo_unet()
    c.optim.lr = 5e-4
    c.ema_decay = 0.99
    config_blocks.loop(c, 400, log_every=20, checkpoint_every=200, sample_every=200)
  return c
