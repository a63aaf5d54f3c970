"""DVA training on VoxCeleb.

  python -m s3jax.train --config configs/voxceleb.py          # the paper's model
  python -m s3jax.train --config configs/voxceleb.py:demo     # tiny CPU demo on the embedded sample
Override any field with --config.<field>=<value>; unknown fields are rejected.
"""

import ml_collections


def paper_unet(image_size: int = 256):
  return ml_collections.ConfigDict(
      dict(
          image_size=image_size,
          in_channels=3,
          out_channels=3,
          model_channels=128,
          channel_mult=(1, 1, 2, 2, 4, 4),
          num_res_blocks=2,
          attention_resolutions=(16,),
          embed_channels=512,
          num_heads=1,
          dropout=0.1,
          resblock_updown=True,
      )
  )


def get_config(arg: str = ""):
  """`arg` is '' (paper) or 'demo' (tiny CPU config on the embedded sample dataset)."""
  if arg not in ("", "demo"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'demo'")
  c = ml_collections.ConfigDict()
  c.trainer = "dva"
  c.seed = 0

  c.data = ml_collections.ConfigDict(
      dict(
          data_dir="data/voxceleb",  # output of `python -m data_prep.voxceleb`
          build_sample_if_missing=False,  # the demo builds the embedded sample here
          image_size=256,
          batch_size=8,  # items per global batch
          frames_per_item=2,  # frames of one video per item: 16 frames per step
          shuffle_seed=0,
          num_workers=0,
          skip_corrupt=False,
      )
  )

  c.model = ml_collections.ConfigDict(
      dict(
          face_features="dlib",  # 'dlib' (offline default, z_id 128-d) | 'official' (ArcFace, 512-d)
          dtype="float32",  # compute dtype; params stay float32
          remat=False,
          unet=paper_unet(256),
      )
  )

  c.diffusion = ml_collections.ConfigDict(
      dict(
          num_timesteps=1000,
          eval_steps=20,  # DDIM steps for the sample grids
      )
  )
  c.loss = ml_collections.ConfigDict(dict(reg_coef=1.0))
  c.optim = ml_collections.ConfigDict(
      dict(lr=1e-4, grad_clip=1.0, b1=0.9, b2=0.999, warmup_steps=0)
  )
  c.ema_decay = 0.9999
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices

  c.total_steps = 1_000_000
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.sample_every = 5000
  c.num_sample_rows = 4

  if arg == "demo":
    c.data.data_dir = "runs/data/sample"
    c.data.build_sample_if_missing = True
    c.data.image_size = 64
    # Sized for 2 CPU cores: ~49 GFLOP per step (XLA cost analysis), minutes in all.
    c.data.batch_size = 2
    c.data.frames_per_item = 2
    c.model.unet = ml_collections.ConfigDict(
        dict(
            image_size=64,
            in_channels=3,
            out_channels=3,
            model_channels=32,
            channel_mult=(1, 1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(16,),
            embed_channels=512,
            num_heads=1,
            dropout=0.0,
            resblock_updown=True,
        )
    )
    c.optim.lr = 5e-4
    c.ema_decay = 0.99
    c.total_steps = 400
    c.log_every = 20
    c.checkpoint_every = 200
    c.sample_every = 200
  return c
