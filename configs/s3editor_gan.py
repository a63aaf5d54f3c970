"""S3Editor on the GAN backbone: routed sparse transformations of a frozen StyleGAN2's W+.

  python -m s3jax.train --config configs/s3editor_gan.py --workdir runs/s3editor_gan \\
      --config.generator.path=pretrained_models/ffhq.pkl --config.latents.pivots=pivots.npy
  python -m s3jax.train --config configs/s3editor_gan.py:tiny --workdir runs/s3editor_gan_tiny

'' (paper scale): STIT's FFHQ 1024 generator (`ffhq.pkl`, 18 ws), STIT's 16 InterFaceGAN
directions (`editings/w_directions/*.npy`) and, optionally, e4e W+ inversions of real frames
as pivots (an (M, 18, 512) .npy; '' = mapped random z). These paths are inputs: nothing is
downloaded. The identity loss uses the distilled stand-in (`configs/id_standin.py`).
':tiny': the golden tiny generator (../shared/golden/stit, 64 px, w_dim 64, 10 ws), four
seeded random directions, K = 2, the W-space identity proxy; a CPU run of a minute.
`load_editor(workdir)` then edits W+ (`edit_fn(w_plus, attribute, strength)`).
See docs/s3editor.md, "S3Editor on the GAN backbone".
"""

import ml_collections

from s3jax import config_blocks

# STIT's InterFaceGAN directions (rotemtzaban/STIT, editings/w_directions/).
STIT_DIRECTIONS = (
    "age",
    "eye_distance",
    "eye_eyebrow_distance",
    "eye_ratio",
    "eyes_open",
    "gender",
    "lip_ratio",
    "mouth_open",
    "mouth_ratio",
    "nose_mouth_distance",
    "nose_ratio",
    "nose_tip",
    "pitch",
    "roll",
    "smile",
    "yaw",
)


def get_config(arg: str = ""):
  """`arg` is '' (FFHQ 1024, paper scale) or 'tiny' (the golden tiny generator, CPU)."""
  arg = config_blocks.parse_variant(arg, ("", "tiny"))
  c = ml_collections.ConfigDict()
  c.trainer = "s3editor_gan"
  c.seed = 0

  # The frozen generator (an NVIDIA .pkl, or a state dict with its sidecar .json).
  c.generator = ml_collections.ConfigDict(
      dict(
          path="pretrained_models/ffhq.pkl",
          truncation_psi=0.7,  # for mapped random z
          truncation_cutoff=0,  # 0: every ws
          fused_modconv=True,  # the reference's eval path; False: the train path (same maths)
          precision="highest",
      )
  )
  # Pseudo-edit bases: e4e W+ pivots ((M, num_ws, w_dim) .npy) or, if '', mapped random z.
  c.latents = ml_collections.ConfigDict(dict(pivots="", batch_size=8, seed=0))
  # Attribute directions: name -> InterFaceGAN .npy (row 0 is kept, as STIT does), or
  # random_directions > 0 seeded unit vectors named random_0 ... (direction_seed).
  c.directions = ml_collections.ConfigDict(
      {n: f"editings/w_directions/{n}.npy" for n in STIT_DIRECTIONS}
  )
  c.random_directions = 0
  c.direction_seed = 0
  c.idnet_dir = "runs/id_standin"  # '' = the W-space identity proxy

  # K routed residual MLPs on the flattened W+, hidden = R * neurons_per_region.
  c.editor = ml_collections.ConfigDict(
      dict(
          num_clusters=4,
          num_regions=6,
          neurons_per_region=32,
          routing="hard",
          temperature=0.1,
          attributes=(),  # the pool; () = every direction
          holdout_attributes=(),
          region_min_fraction=0.25,
          kmeans_seed=0,
          # Target parts (editor.SEMANTIC_PARTS) of directions the built-in tables lack
          # (s3editor_gan.INTERFACEGAN_PARTS, editor.PART_TABLE); overrides them.
          parts=ml_collections.ConfigDict(),
      )
  )
  # gamma = +-U(min, max) in STIT's units (its edit w + (factor/2) d, factors 2..20).
  c.strength = ml_collections.ConfigDict(dict(min=1.0, max=5.0))

  c.loss = ml_collections.ConfigDict(
      dict(
          id=1.0,
          faith=1.0,
          gen=0.1,
          loc=1.0,
          image_size=256,  # losses on box-downsampled images (0: the generator's resolution)
      )
  )
  # A group stays at zero under Adam only if lam is of order sqrt(group size)
  # = sqrt(neurons_per_region * (2 * num_ws * w_dim + 1)): 32 * 18433 -> ~770.
  c.sparsity = ml_collections.ConfigDict(
      dict(
          lam_in=1.0,
          lam_out=800.0,
          lam_from="attribution",
          attribution_every=500,
          attribution_frames=2,
          attribution_threshold=0.5,
      )
  )
  c.optim = config_blocks.adam(1e-3)
  c.ema_decay = 0.999
  c.mesh = config_blocks.mesh()
  config_blocks.loop(c, 20_000, log_every=100, checkpoint_every=2000, sample_every=2000)
  c.num_sample_rows = 4
  c.sample_strength = 3.0
  c.sample_attributes = ("smile", "eyes_open", "mouth_open", "age")

  if arg == "tiny":
    c.generator.path = "../shared/golden/stit/stylegan2_ada_tiny.pkl"
    c.generator.truncation_psi = 1.0
    # XLA CPU differentiates the fused (grouped) modulated conv ~6x slower (1.4 s vs 0.23 s
    # per step, measured); the non-fused path is the same maths.
    c.generator.fused_modconv = False
    c.latents.batch_size = 4
    c.directions = ml_collections.ConfigDict()
    c.random_directions = 4
    c.idnet_dir = ""
    c.editor.num_clusters = 2
    c.editor.num_regions = 4
    c.editor.neurons_per_region = 4
    # Regions of the R = 4 mean-face map: 0-1 eyes/brows (left, right), 2 nose + mouth,
    # 3 jaw + mouth; every cluster's targets lie in {2, 3}, so 0-1 are off target for all.
    c.editor.parts = ml_collections.ConfigDict(
        dict(random_0=("mouth",), random_1=("nose",), random_2=("jaw",), random_3=("mouth",))
    )
    c.strength.min, c.strength.max = 1.0, 3.0
    c.loss.image_size = 0
    c.sparsity.lam_in = 0.5
    c.sparsity.lam_out = 100.0  # sqrt(4 * (2 * 640 + 1)) ~ 72
    c.sparsity.attribution_every = 10
    c.optim.lr = 1e-3  # 3e-3 and 1e-2 made the fixed-batch loss noisy, rising at first
    c.ema_decay = 0.9
    config_blocks.loop(c, 60, log_every=10, checkpoint_every=30, sample_every=60)
    c.num_sample_rows = 4
    c.sample_strength = 2.0
    c.sample_attributes = ()
  return c
