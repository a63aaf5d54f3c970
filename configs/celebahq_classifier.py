"""Linear attribute classifiers on the normalised z_id (the `classifier` trainer).

  python -m s3jax.train --config configs/celebahq_classifier.py --workdir runs/classifier
  python -m s3jax.train --config configs/celebahq_classifier.py:demo --workdir runs/demo/classifier

'' (default): CelebA-HQ with its 40 attributes, as written by
`python -m data_prep.celebahq --out data/celebahq` (records carry z_id and
`attributes` in {-1, 1}). The classifier's width follows the records' z_id:
128 on the dlib path, 512 with ArcFace (`face_features='official'`).

':demo': the embedded sample dataset the demo DVA was trained on. Its data
dir and face-feature path are read from `<dva_workdir>/config.json`
(default `runs/demo`, the DVA demo's workdir). The sample has no attribute
annotations, so its labels are *measured* on every aligned frame
(`s3jax.training.classifier.MEASURED_ATTRIBUTES`):

  Bright_Face    mean luma (Rec.601) inside the face mask
  Warm_Tint      mean (R - B) inside the face mask
  Lit_From_Left  luma of the image-left half of the face mask minus the
                 right half (split at the nose bridge, landmarks 27-30)
  Mouth_Wide     mouth-corner distance (landmarks 48, 54) / inter-ocular
                 distance (eye centres)
  Eyes_Open      eye aspect ratio (mean of both eyes, landmarks 36-47)

Each property is thresholded at Otsu's threshold over the train split
(the cut that maximises the between-class variance); values above it are
+1, the rest -1. The same thresholds label the test split. The sample holds
two identities, so Mouth_Wide and Eyes_Open mostly separate the two people,
and the photometric labels follow the synthetic lighting, which the dlib
descriptor is built to ignore: expect AUCs near 1 for the former and lower
ones for the latter (`<workdir>/classifier.json` has the measured figures).
"""

import ml_collections

from s3jax import config_blocks
from s3jax.models.editor import CELEBA_ATTRIBUTES


def get_config(arg: str = ""):
  """`arg` is '' (CelebA-HQ, 40 attributes) or 'demo' (measured labels on the sample)."""
  arg = config_blocks.parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.trainer = "classifier"
  c.seed = 0
  # A DVA workdir whose config.json gives data.data_dir (when data.data_dir is '') and
  # model.face_features (checked against the records' z_id width). '' = none.
  c.dva_workdir = ""
  c.data = ml_collections.ConfigDict(
      dict(
          data_dir="data/celebahq",  # output of `python -m data_prep.celebahq`
          labels="attributes",  # 'attributes' (records' 40 labels) | 'measured'
          attribute_names=CELEBA_ATTRIBUTES,
          train_split="train",
          test_split="test",  # falls back to train (with a warning) when absent
          batch_size=256,  # global batch of z_id vectors
          shuffle_seed=0,
      )
  )
  c.optim = config_blocks.adam(1e-3, grad_clip=0.0, weight_decay=0.0)  # no clipping: convex
  c.ema_decay = 0.0  # the classifier is convex; EMA off (ema_params = params)
  c.mesh = config_blocks.mesh()
  # sample_every: evaluates AUC and writes classifier.{json,npz}.
  config_blocks.loop(
      c, 5000, log_every=250, checkpoint_every=5000, sample_every=5000, keep_checkpoints=1
  )
  if arg == "demo":
    c.dva_workdir = "runs/demo"
    c.data.data_dir = ""  # from the config of the DVA checkpoint in runs/demo
    c.data.labels = "measured"
    c.data.attribute_names = ()  # MEASURED_ATTRIBUTES
    c.data.batch_size = 32
    c.optim.lr = 1e-2
    config_blocks.loop(
        c, 300, log_every=50, checkpoint_every=300, sample_every=300, keep_checkpoints=1
    )
  return c
