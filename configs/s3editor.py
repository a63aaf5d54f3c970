"""S3Editor self-training on top of a trained DVA and attribute classifiers.

  python -m s3jax.train --config configs/s3editor.py --workdir runs/s3editor
  python -m s3jax.train --config configs/s3editor.py:demo --workdir runs/demo/s3editor

The DVA comes from `dva_workdir`, the classifiers from `classifier_dir`
(`classifier.npz`), the differentiable identity stand-in from `idnet_dir`
(`configs/id_standin.py`). Each is trained by its own task first (`make
demo-s3editor` runs all of them); a missing one is an error naming the
command that makes it.
See docs/s3editor.md for every loss, default and choice.
"""

import ml_collections

from s3jax import config_blocks


def get_config(arg: str = ""):
  """`arg` is '' (paper-scale settings) or 'demo' (tiny CPU run on the embedded sample)."""
  arg = config_blocks.parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.trainer = "s3editor"
  c.seed = 0

  # Prerequisites.
  c.dva_workdir = "runs/dva"
  c.classifier_dir = "runs/classifier"
  c.idnet_dir = "runs/id_standin"  # the distilled identity stand-in (no ArcFace weights)

  c.data = config_blocks.data()

  # The editor: K routed residual MLPs on z_id, hidden = R * neurons_per_region.
  c.editor = ml_collections.ConfigDict(
      dict(
          num_clusters=8,
          num_regions=6,
          neurons_per_region=32,
          routing="hard",  # 'hard' | 'soft'
          temperature=0.1,
          normalize_output=True,  # x_hat is L2-normalised like z_id
          attributes=(),  # the pool; () = every classifier attribute with a part table entry
          holdout_attributes=(),  # never drawn in training; routed by nearest centroid
          min_auc=0.0,  # drop attributes whose classifier AUC is below this
          direction_scale=0.0,  # 0: sqrt(D), as docs/design.md's classifier edit
          region_min_fraction=0.25,  # editor.part_regions(min_fraction=...)
          kmeans_seed=0,
      )
  )
  c.strength = ml_collections.ConfigDict(dict(min=0.3, max=1.0))  # |gamma| ~ U(min, max), sign +-1

  # Decoding inside the train step: noise the real frame to t, then `steps`
  # deterministic DDIM steps to t=0 (steps=1: one x0 prediction).
  c.decode = ml_collections.ConfigDict(dict(t=500, steps=1))

  c.loss = ml_collections.ConfigDict(
      dict(
          id=1.0,
          faith=1.0,
          gen=1.0,
          loc=1.0,
          reg_coef=1.0,  # L_reg weight inside L_gen (the DVA loss)
          report_gen=True,  # compute L_gen as a metric when the UNet is frozen
      )
  )
  c.finetune_unet = False
  # With Adam a group only stays at zero when lr*lam exceeds Adam's step for it,
  # about lr*sqrt(group size): lam must be of order sqrt(npr * (2D + 1)).
  # lam_from='attribution': every attribution_every steps, measure on attribution_frames
  # frames per cluster which regions each neuron group moves; a group's lambda rises from
  # lam_in to lam_out as its off-target share exceeds attribution_threshold.
  # lam_from='index' (the comparison): group g is landmark region g's, lam_out off target.
  c.sparsity = ml_collections.ConfigDict(
      dict(
          lam_in=1.0,
          lam_out=100.0,
          lam_from="attribution",
          attribution_every=500,
          attribution_frames=4,
          attribution_threshold=0.5,
      )
  )

  c.optim = ml_collections.ConfigDict(
      dict(lr=1e-3, grad_clip=1.0, b1=0.9, b2=0.999, warmup_steps=0, unet_lr=1e-5)
  )
  c.ema_decay = 0.999
  c.mesh = config_blocks.mesh()

  config_blocks.loop(c, 20_000, log_every=100, checkpoint_every=2000, sample_every=2000)
  c.num_sample_rows = 4
  c.eval_steps = 20  # DDIM steps (invert + decode) for the sample grids
  c.sample_strength = 1.0
  c.sample_attributes = ("Smiling", "Eyeglasses", "Blond_Hair", "Male")

  if arg == "demo":
    c.dva_workdir = "runs/demo"
    c.classifier_dir = "runs/demo/classifier"
    c.idnet_dir = "runs/demo/id_standin"
    c.data.data_dir = "runs/data/sample"
    c.data.image_size = 64
    c.data.batch_size = 4
    c.data.frames_per_item = 1
    c.editor.num_clusters = 3
    c.editor.num_regions = 6
    c.editor.neurons_per_region = 8
    c.optim.lr = 3e-3
    c.sparsity.lam_in = 1.0
    c.sparsity.lam_out = 48.0
    c.sparsity.attribution_every = 10
    c.ema_decay = 0.9
    # The loss.loc sweep on the demo (docs/s3editor.md): 30 is the weight at which the
    # S3Editor's off-target change falls below the plain edit's at equal faithfulness.
    c.loss.loc = 30.0
    config_blocks.loop(c, 60, log_every=10, checkpoint_every=30, sample_every=60)
    c.eval_steps = 10
    # The demo classifier's attributes are measured on the sample (see
    # configs/celebahq_classifier.py).
    c.sample_attributes = ("Mouth_Wide", "Eyes_Open", "Bright_Face", "Smiling")
  return c
