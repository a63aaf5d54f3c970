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

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)


def get_config(arg: str = ""):
  """`arg` is '' (CelebA-HQ, 40 attributes) or 'demo' (measured labels on the sample)."""
  if arg not in ("", "demo"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'demo'")
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
          build_sample_if_missing=False,
      )
  )
  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0))
  c.ema_decay = 0.0  # the classifier is convex; EMA off (ema_params = params)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.total_steps = 5000
  c.log_every = 250
  c.checkpoint_every = 5000
  c.keep_checkpoints = 1
  c.sample_every = 5000  # evaluates AUC and writes classifier.{json,npz}
  if arg == "demo":
    c.dva_workdir = "runs/demo"
    c.data.data_dir = ""  # from runs/demo/config.json
    c.data.labels = "measured"
    c.data.attribute_names = ()  # MEASURED_ATTRIBUTES
    c.data.batch_size = 32
    c.optim.lr = 1e-2
    c.total_steps = 300
    c.log_every = 50
    c.checkpoint_every = 300
    c.sample_every = 300
  return c
