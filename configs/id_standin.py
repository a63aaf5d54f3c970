"""The identity stand-in: a small CNN distilled from the dlib descriptor (S3Editor's L_id).

  python -m s3jax.train --config configs/id_standin.py --workdir runs/id_standin
  python -m s3jax.train --config configs/id_standin.py:demo --workdir runs/demo/id_standin

It learns `1 - cos(net(frame), z_id)` on the shards' frames and cached z_id, so
`model.features` must equal the records' z_id width (128 dlib, 512 ArcFace).
`<workdir>/id_standin_report.json` holds its agreement with dlib.
"""

import ml_collections

from s3jax import config_blocks


def get_config(arg: str = ""):
  """`arg` is '' (VoxCeleb shards) or 'demo' (the embedded sample at 64 px)."""
  arg = config_blocks.parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.trainer = "id_standin"
  c.seed = 0
  c.data = config_blocks.data()
  c.model = ml_collections.ConfigDict(dict(features=128, width=32, depth=4, input_size=64))
  total_steps = 2000
  c.optim = config_blocks.adam(2e-3, decay="cosine", decay_steps=total_steps, decay_alpha=0.05)
  c.ema_decay = 0.0  # a frozen teacher for S3Editor: the last params are used
  c.mesh = config_blocks.mesh()
  config_blocks.loop(
      c, total_steps, log_every=50, checkpoint_every=1000, sample_every=1000, keep_checkpoints=1
  )
  c.eval_batches = 4  # held-out batches of 4 items for the agreement report
  if arg == "demo":
    c.data.data_dir = "runs/data/sample"
    c.data.image_size = 64
    c.data.batch_size = 4
    c.data.frames_per_item = 2
    c.optim.decay_steps = 200
    config_blocks.loop(
        c, 200, log_every=50, checkpoint_every=200, sample_every=200, keep_checkpoints=1
    )
  return c
