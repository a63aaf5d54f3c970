"""Evaluation sweeps (`python -m s3jax.evaluate`).

  python -m s3jax.evaluate --config configs/eval.py:demo --workdir runs/demo/eval
  python -m s3jax.evaluate --config configs/eval.py --workdir runs/eval \\
      --config.checkpoints='("runs/dva@all",)' --config.data.videos='("my_clip.mp4",)'

'' (default): the paper-style sweep of a trained DVA on the held-out VoxCeleb
split: CelebA-HQ attribute classifiers, strengths +-0.5/1/1.5, 20 and 100 DDIM steps.
':demo': the demo DVA (`runs/demo`) and its demo classifier (`runs/demo/classifier`,
the measured attributes of the embedded sample) on the sample's test split
(`runs/data/sample`, made by `make sample-data` or `python -m data_prep.sample --out
runs/data/sample --size 64`), 10 and 20 steps: runs in a few minutes on a laptop CPU.
':dva_table1': the figures of the DVA paper's Table 1: reconstruction (no edits) of the
held-out frames at T=100 DDIM steps, with SSIM, LPIPS (AlexNet) and MSE among the
reconstruction metrics. MSE is on [-1, 1] images: 4x the MSE of [0, 1] images.

's3editor_demo': plain classifier edit vs the demo S3Editor (`runs/demo/s3editor`) on the
sample's test split; writes comparison.json (mean and 95% interval of locality outside the
target regions, faithfulness and identity preservation per method, attribute and strength).

Checkpoints are workdirs: 'DIR' (newest step), 'DIR@STEP' or 'DIR@all' (every kept step).
"""

import ml_collections

from s3jax import config_blocks


def get_config(arg: str = ""):
  arg = config_blocks.parse_variant(arg, ("", "demo", "dva_table1", "s3editor_demo"))
  c = ml_collections.ConfigDict()
  c.checkpoints = ("runs/dva",)
  c.classifier = "runs/classifier"  # classifier workdir (classifier.npz); '' = none
  c.attributes = ("Smiling", "Eyeglasses", "Young", "Male")  # () = reconstruction only
  c.strengths = (-1.0, -0.5, 0.5, 1.0, 1.5)
  # Edit methods compared on the same codes: 'plain' (the classifier direction) and/or
  # S3Editor workdirs (each row labelled '<checkpoint>+<workdir name>').
  c.editors = ("plain",)
  c.ddim_steps = (20, 100)  # each must divide 1000 (reference respacing)

  c.data = ml_collections.ConfigDict(
      dict(
          videos=(),  # video files or frame folders; () = the held-out split
          data_dir="data/voxceleb",  # data_prep output (used when `videos` is empty)
          split="test",
          max_videos=8,
          max_frames=16,  # frames per video (the first ones)
          resize_width=480,  # downscale given videos while reading (0 = keep)
      )
  )
  # 'alex' (the DVA paper's LPIPS) | 'vgg' | 'module:function' -> (features_fn,
  # linear_weights) | '' = off. Crops smaller than the net allows (31 px alex) get NaN.
  c.lpips = "alex"
  c.ms_ssim_max_scales = 5  # fewer are used when the crop is too small (s3jax.evaluation)
  c.cache_encodings = True  # keep VideoEditor encodings of given videos in workdir
  c.retry_failed = False  # re-run cells stored as failed
  c.save_samples = True  # input/output strip per cell in workdir/samples
  c.tensorboard = True

  if arg in ("demo", "s3editor_demo"):
    c.checkpoints = ("runs/demo",)
    c.classifier = "runs/demo/classifier"
    c.attributes = ("Mouth_Wide", "Eyes_Open")
    c.strengths = (-1.0, 1.0, 2.0)
    c.ddim_steps = (10, 20)
    c.data.data_dir = "runs/data/sample"
    c.data.max_videos = 2
    c.data.max_frames = 8
  if arg == "s3editor_demo":
    # S3Editor's claims on the demo: the same codes edited plainly and by the S3Editor.
    # Seeds: add more S3Editor workdirs named <name>_seed<N>; they pool into one row.
    c.editors = ("plain", "runs/demo/s3editor")
    c.strengths = (-1.5, 1.5)
    c.ddim_steps = (20,)
    c.data.max_videos = 8
    c.save_samples = True
  if arg == "dva_table1":
    c.classifier = ""
    c.attributes = ()
    c.strengths = ()
    c.ddim_steps = (100,)
  return c
