"""S3Editor on the GAN backbone: routed, region-sparse transformations of StyleGAN2's W+.

The paper presents S3Editor as model-agnostic (DVA and GAN). This is the GAN task
(``config.trainer = 's3editor_gan'``), in the shared loop, built from the DVA task's pieces
(:mod:`s3jax.training.s3editor`, :mod:`s3jax.models.editor`): the same ``Editor`` (K residual
MLPs routed by the cluster of the attribute), cosine k-means of the directions, neuron groups
tied to landmark regions, the group-lasso prox in the optimizer (``optim.make_optimizer``),
the attribution-tied lambda and the EMA with exact-zero groups. The generator is loaded
(``porting.stylegan2_keys.load_generator``) and frozen: this task never trains it.

One train step (all inside one jitted function):

1. Pseudo-edits: per row a base latent ``w`` (num_ws, w_dim): the mapping of a random z
   (``generator.truncation_psi``), or a stored W+ pivot (``latents.pivots``, e4e inversions);
   an attribute a uniform over the pool and a strength gamma = +-U(strength.min, strength.max).
2. ``w_hat = T_k(w + gamma * d_a)`` on the *flattened* W+ (num_ws * w_dim), ``d_a`` the
   attribute's direction (an InterFaceGAN ``.npy`` file, or a seeded random unit vector) on
   every layer. With T = identity this is STIT's InterFaceGAN edit ``w + (factor / 2) * d``,
   strength = factor / 2, and T starts as the identity.
3. Render ``G(w)`` and ``G(w + gamma * d_a)`` (the plain edit) without gradient and
   ``G(w_hat)`` with it: ``stylegan2.synthesis``, noise_mode 'const', fused modconv by default.
4. Loss = l_id * L_id + l_faith * L_faith + l_gen * L_gen + l_loc * L_loc:
   * L_faith = mean(relu(1 - r)^2), r = <w_hat - w, d_a> / (|d_a|^2 gamma): the fraction of the
     requested strength the edit reaches along its own direction (reference-free; an image
     attribute classifier can replace it: ``attribute_loss_fn``);
   * L_id = mean(1 - cos(E(G(w_hat)), E(G(w)))) with E the identity stand-in
     (``idnet_dir``), else the W-space proxy mean_layers(1 - cos(w_hat_l - w_avg, w_l - w_avg));
   * L_gen = mean_layers |delta_l - mean_layers(delta)|^2 / w_dim, delta = w_hat - w: the
     layer-specific part of the edit (e4e's "stay near W" prior; 0 for the plain edit);
   * L_loc = mean |G(w_hat) - G(w)| over the pixels outside a's target regions. Regions are
     fixed: the generator's crops are FFHQ-aligned, so the mean face lands on one layout
     (:func:`ffhq_mean_landmarks`), whose nearest-landmark cells give one region map.
5. Adam, then the group-lasso prox; every ``sparsity.attribution_every`` steps the K x G x R
   attribution table (``editor.measure_group_attribution``, decoded by the generator) sets the
   per-group lambda, as in the DVA task.

See docs/s3editor.md, "S3Editor on the GAN backbone", for the choices and measured numbers.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np

from s3jax import alignment, gan_edit, images, input_pipeline, loading, losses, optim
from s3jax.checkpointing import TrainState, new_train_state
from s3jax.models import editor as E
from s3jax.models import stylegan2
from s3jax.porting import stylegan2_keys
from s3jax.training import state as state_lib
from s3jax.training.s3editor import (
    EditorTaskBase,
    attribution_edits,
    draw_edits,
    editor_ema_fn,
    make_group_spec,
    sparsity_metrics,
)

__all__ = [
    "INTERFACEGAN_PARTS",
    "GanPrereqs",
    "ffhq_mean_landmarks",
    "random_directions",
    "load_prerequisites",
    "make_latent_iterator",
    "render",
    "locality",
    "direction_reached",
    "w_identity_distance",
    "layer_spread",
    "S3EditorGanTask",
]

_ALL = ("jaw", "brows", "nose", "eyes", "mouth")
# Target parts of STIT's InterFaceGAN directions (editings/w_directions/*.npy). Pose and
# global attributes use every part; landmarks do not cover hair, so nothing here is hair.
INTERFACEGAN_PARTS = {
    "age": _ALL,
    "gender": _ALL,
    "pitch": _ALL,
    "roll": _ALL,
    "yaw": _ALL,
    "smile": ("mouth", "eyes", "jaw"),
    "eyes_open": ("eyes",),
    "eye_ratio": ("eyes",),
    "eye_distance": ("eyes",),
    "eye_eyebrow_distance": ("eyes", "brows"),
    "mouth_open": ("mouth", "jaw"),
    "mouth_ratio": ("mouth",),
    "lip_ratio": ("mouth",),
    "nose_ratio": ("nose",),
    "nose_tip": ("nose",),
    "nose_mouth_distance": ("nose", "mouth"),
}
RANDOM_PREFIX = "random_"
_TEMPLATE_SCALE = 1000.0  # the mean face is placed at this size before aligning (pixel maths)


# ---------------------------------------------------------------------------
# Prerequisites: the generator, the directions, pivots, the identity stand-in
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class GanPrereqs:
  """What the GAN S3Editor trains against; loaded, never trained here."""

  generator_config: stylegan2.GeneratorConfig
  generator_variables: Any
  names: list  # every direction's name (the pool and the held-out ones)
  directions: np.ndarray  # (A, w_dim) float32, one per name
  pivots: Optional[np.ndarray] = None  # (M, num_ws, w_dim) W+ pivots, or None: random z
  id_model: Any = None  # an IdentityNet, or None: the W-space identity proxy
  id_params: Any = None
  id_report: dict = dataclasses.field(default_factory=dict)
  sources: dict = dataclasses.field(default_factory=dict)


def ffhq_mean_landmarks() -> np.ndarray:
  """The mean face's 68 landmarks in an FFHQ-aligned crop, (68, 2) in [0, 1] of the crop.

  ``editor.MEAN_LANDMARKS_68`` (a mean frontal face) aligned with the FFHQ/STIT alignment
  (``alignment.ffhq_quad``): every crop the generator makes (or e4e inverts) has this layout,
  up to the face's own variation. Eyes land at (0.375, 0.473) and (0.625, 0.473), the mouth
  corners at y = 0.745.
  """
  lm = E.MEAN_LANDMARKS_68.astype(np.float64) * _TEMPLATE_SCALE
  crop = alignment.landmarks_in_crop(lm, alignment.ffhq_quad(lm), int(_TEMPLATE_SCALE))
  return ((crop + 0.5) / _TEMPLATE_SCALE).astype(np.float32)


def random_directions(n: int, w_dim: int, seed: int = 0):
  """``n`` seeded unit directions in W, named ``random_0`` ... (tests and the tiny demo)."""
  d = np.random.default_rng(seed).normal(size=(n, w_dim))
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  return [f"{RANDOM_PREFIX}{i}" for i in range(n)], d.astype(np.float32)


def _missing(what: str, path, hint: str) -> FileNotFoundError:
  return FileNotFoundError(f"the GAN S3Editor needs {what} at {path}, which is missing; {hint}")


def load_prerequisites(config) -> GanPrereqs:
  """Loads the generator, the attribute directions, the pivots and the identity stand-in."""
  path = pathlib.Path(config.generator.path)
  if not path.exists():
    raise _missing(
        "a StyleGAN2 generator", path, "set generator.path (an NVIDIA .pkl or a state dict)"
    )
  gen_config, variables = stylegan2_keys.load_generator(path)
  sources = {"generator": str(path)}
  if int(config.random_directions) > 0:
    names, dirs = random_directions(
        int(config.random_directions), gen_config.w_dim, int(config.direction_seed)
    )
    sources["directions"] = f"{len(names)} random (seed {int(config.direction_seed)})"
  else:
    names = sorted(config.directions.keys())
    if not names:
      raise ValueError("set directions (name -> InterFaceGAN .npy) or random_directions > 0")
    dirs = []
    for n in names:
      p = pathlib.Path(config.directions[n])
      if not p.exists():
        raise _missing(f"the direction {n!r}", p, "STIT ships them in editings/w_directions/")
      dirs.append(gan_edit.load_interfacegan_direction(p)[0])
    dirs = np.stack(dirs).astype(np.float32)
    sources["directions"] = {n: str(config.directions[n]) for n in names}
  pivots = None
  if config.latents.pivots:
    p = pathlib.Path(config.latents.pivots)
    if not p.exists():
      raise _missing("W+ pivots", p, "save e4e inversions as an (M, num_ws, w_dim) .npy")
    pivots = np.load(p, allow_pickle=False).astype(np.float32)
    sources["pivots"] = str(p)
  id_model = id_params = None
  id_report = {}
  if config.idnet_dir:
    d = pathlib.Path(config.idnet_dir)
    if not (d / "checkpoints").is_dir():
      raise _missing(
          "the identity stand-in",
          d,
          f"make it with `python -m s3jax.train --config configs/id_standin.py:demo "
          f"--workdir {d}` (or set idnet_dir='' for the W-space identity proxy)",
      )
    id_model, id_params, id_report = loading.load_id_standin(d)
    sources["id_standin"] = str(d)
  return GanPrereqs(
      gen_config, variables, names, dirs, pivots, id_model, id_params, id_report, sources
  )


# ---------------------------------------------------------------------------
# Latents in, images out, and the measures the loss and the evaluation share
# ---------------------------------------------------------------------------


def make_latent_iterator(config, num_pivots: Optional[int] = None):
  """Checkpointable grain iterator of batches ``{'index': (B,) int32}``.

  Random z (``num_pivots`` None): index i is the i-th latent of the stream
  ``z_i = N(0, I)`` drawn from ``fold_in(key(latents.seed), i)`` inside the step, so the
  iterator position is the whole data state. Pivots: a shuffled (per epoch) index into them.
  """
  n = jax.process_count()
  if config.latents.batch_size % n:
    raise ValueError(f"latents.batch_size={config.latents.batch_size} is not divisible by {n}")
  if num_pivots:
    ds = grain.MapDataset.range(num_pivots).shuffle(seed=int(config.latents.seed)).repeat(None)
  else:
    ds = grain.MapDataset.range(2**31 - 1)
  ds = ds[jax.process_index() :: n].map(lambda i: {"index": np.int32(i)})
  return iter(ds.to_iter_dataset().batch(config.latents.batch_size // n))


def render(gen_config, variables, x, fused_modconv: bool = True, precision: str = "highest"):
  """Flattened W+ (B, num_ws * w_dim) -> G's images (B, R, R, 3), noise_mode 'const'."""
  ws = x.reshape(x.shape[0], gen_config.num_ws, gen_config.w_dim)
  return stylegan2.synthesis(
      gen_config,
      variables,
      ws,
      noise_mode="const",
      fused_modconv=fused_modconv,
      precision=precision,
  )


# One compiled synthesis per (config, shape) for the sample grids of every task in a process.
_render_jit = jax.jit(render, static_argnames=("gen_config", "fused_modconv", "precision"))


def box_downsample(img, size: int):
  """(B, R, R, C) -> (B, size, size, C) by mean over R/size blocks (R a multiple of size)."""
  r = img.shape[1]
  if r == size:
    return img
  f = r // size
  if f * size != r:
    raise ValueError(f"loss.image_size={size} must divide the generator resolution {r}")
  return img.reshape(img.shape[0], size, f, size, f, img.shape[-1]).mean(axis=(2, 4))


def locality(img_edit, img_base, inside):
  """Mean |edit - base| (over RGB) per row outside and inside the target regions.

  Returns ``(out (B,), has_out (B,), in (B,), has_in (B,))``; ``inside`` (B, H, W) in {0, 1}.
  """
  diff = jnp.mean(jnp.abs(img_edit - img_base), axis=-1)
  out, has_out = losses.masked_mean(diff, 1.0 - inside)
  inn, has_in = losses.masked_mean(diff, inside)
  return out, has_out, inn, has_in


def direction_reached(x_edit, w, direction, gamma):
  """(B,) fraction of the requested strength the edit reaches along its direction:
  ``<x_edit - w, d> / (|d|^2 gamma)`` (1 for the plain edit ``w + gamma d``)."""
  along = jnp.sum((x_edit - w) * direction, axis=-1) / jnp.sum(direction * direction, axis=-1)
  return along / gamma


def w_identity_distance(x_edit, w, w_avg, num_ws: int):
  """(B,) mean over layers of ``1 - cos(x_l - w_avg, w_l - w_avg)``: identity in W as the
  latent's direction from the average face (PTI and e4e regularise the same offsets)."""
  a = x_edit.reshape(x_edit.shape[0], num_ws, -1) - w_avg
  b = w.reshape(w.shape[0], num_ws, -1) - w_avg
  return jnp.mean(1.0 - jnp.sum(E.l2_normalize(a) * E.l2_normalize(b), axis=-1), axis=-1)


def layer_spread(delta, num_ws: int):
  """(B,) mean over layers of ``|delta_l - mean_l(delta)|^2 / w_dim``: the layer-specific
  part of an edit (0 for an InterFaceGAN edit, the same on every layer)."""
  d = delta.reshape(delta.shape[0], num_ws, -1)
  return jnp.mean(jnp.square(d - jnp.mean(d, axis=1, keepdims=True)), axis=(1, 2))


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------


class S3EditorGanTask(EditorTaskBase):
  """The GAN-backbone S3Editor trainer task for ``s3jax.training.loop.train``.

  Args:
    config: ``configs/s3editor_gan.py`` config.
    mesh, workdir: as every task.
    data_iterator: optional checkpointable iterator of ``{'index': (B,)}`` batches
      (default: :func:`make_latent_iterator`).
    prereqs: optional :class:`GanPrereqs` (default: :func:`load_prerequisites`).
    attribute_loss_fn: optional ``(images (B, H, W, 3) in [-1, 1], attr (B,), gamma (B,)) ->
      (B,)`` per-row faithfulness loss from an attribute classifier on images (not built
      here); when given, it is L_faith and the direction term is only reported
      (``faith_direction``).
  """

  grid_name = "base_plain_edit_T_edit"

  def __init__(
      self,
      config,
      mesh,
      workdir,
      data_iterator=None,
      prereqs: Optional[GanPrereqs] = None,
      attribute_loss_fn: Optional[Callable] = None,
  ):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.mesh = mesh
    self.prereqs = prereqs if prereqs is not None else load_prerequisites(config)
    p = self.prereqs
    self.gen_config = p.generator_config
    self.num_ws, self.w_dim = int(self.gen_config.num_ws), int(self.gen_config.w_dim)
    self.latent_dim = self.num_ws * self.w_dim
    self.resolution = int(self.gen_config.img_resolution)
    self.loss_size = int(config.loss.image_size) or self.resolution
    self.fused = bool(config.generator.fused_modconv)
    self.precision = str(config.generator.precision)
    self.attribute_loss_fn = attribute_loss_fn
    self.rng = jax.random.key(config.seed)
    self.latent_key = jax.random.key(int(config.latents.seed))
    if p.pivots is not None and p.pivots.shape[1:] != (self.num_ws, self.w_dim):
      raise ValueError(
          f"pivots have shape {p.pivots.shape}; this generator needs (M, {self.num_ws}, "
          f"{self.w_dim})"
      )
    if p.directions.shape[1] != self.w_dim:
      raise ValueError(f"directions are {p.directions.shape[1]}-d, the generator's W {self.w_dim}")

    # -- attribute pool, directions on every layer, clusters ---------------------
    names = list(p.names)
    table = {**E.PART_TABLE, **INTERFACEGAN_PARTS}
    table.update({str(k): tuple(v) for k, v in config.editor.parts.to_dict().items()})
    holdout = [str(a) for a in config.editor.holdout_attributes]
    want = list(config.editor.attributes) or names
    for a in want + holdout:
      if a not in names:
        raise KeyError(f"attribute {a!r} has no direction (directions: {names})")
      if a not in table:
        raise KeyError(f"attribute {a!r} has no target parts: add it to editor.parts")
    self.pool_names = [a for a in want if a not in holdout]
    if not self.pool_names:
      raise ValueError("empty attribute pool")

    def tiled(selected):  # (len(selected), num_ws * w_dim): each direction on every layer
      return np.tile(p.directions[[names.index(a) for a in selected]], (1, self.num_ws))

    dirs = tiled(self.pool_names)
    self.num_clusters = min(int(config.editor.num_clusters), len(self.pool_names))
    assign, cents = E.kmeans(dirs, self.num_clusters, int(config.editor.kmeans_seed))
    # mean 0, std 1: the Editor's classifier_edit is then exactly w + gamma * d.
    self.stats = E.EditStats(
        mean=jnp.zeros(self.latent_dim),
        std=jnp.ones(self.latent_dim),
        directions=jnp.asarray(dirs),
        assignments=jnp.asarray(assign),
        centroids=jnp.asarray(cents),
    )
    self.holdout_names = holdout
    self.holdout_directions = tiled(holdout) if holdout else np.zeros((0, self.latent_dim))

    # -- regions: one fixed map, the FFHQ-aligned mean face ------------------------
    self.mean_landmarks = ffhq_mean_landmarks()
    R = int(config.editor.num_regions)
    self.region_of_landmark = E.landmark_regions(self.mean_landmarks, R, seed=config.seed)

    def targets(selected):
      return E.attribute_target_regions(
          self.region_of_landmark,
          selected,
          table=table,
          min_fraction=float(config.editor.region_min_fraction),
      )

    self.attr_targets = targets(self.pool_names)
    self.attr_target_table = E.target_table(self.attr_targets, R)
    self.holdout_target_table = E.target_table(targets(holdout), R)
    self.cluster_targets = E.cluster_target_regions(assign, self.attr_targets, self.num_clusters)
    lm_px = self.mean_landmarks * self.loss_size - 0.5
    self.region_map = np.asarray(
        E.region_map(lm_px[None], self.region_of_landmark, self.loss_size)[0]
    )

    # -- model, optimizer, group spec -------------------------------------------
    self.editor = E.Editor(
        num_clusters=self.num_clusters,
        num_regions=R,
        neurons_per_region=int(config.editor.neurons_per_region),
        routing=config.editor.routing,
        temperature=float(config.editor.temperature),
        normalize_output=False,
    )
    abstract_params = jax.eval_shape(self._init_params, self.rng)
    self.lam_from, self.group_spec = make_group_spec(
        config.sparsity, self.editor, abstract_params, self.cluster_targets
    )
    self.tx = optim.make_optimizer(config.optim, group_spec=self.group_spec, group_lam=1.0)

    frozen = {
        "stats": self.stats,
        "generator": p.generator_variables,
        "w_avg": jnp.asarray(p.generator_variables["buffers"]["mapping"]["w_avg"]),
        "targets": jnp.asarray(self.attr_target_table),
        "regmap": jnp.asarray(self.region_map),
    }
    if p.pivots is not None:
      frozen["pivots"] = jnp.asarray(p.pivots)
    if p.id_model is not None:
      frozen["id"] = p.id_params
    self.frozen = jax.device_put(frozen, state_lib.replicated(mesh))

    self.abstract_state, self.state_sharding, self.init_state = state_lib.sharded_init(
        self._init, self.rng, mesh
    )
    self._batch_sharding = state_lib.batch_sharding(mesh)
    self._jit_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, self._batch_sharding, None),
        out_shardings=(self.state_sharding, state_lib.replicated(mesh)),
        donate_argnums=0,
    )
    self._attribution_jit = jax.jit(
        self._measure_attribution, out_shardings=state_lib.replicated(mesh)
    )
    self.data_iterator = (
        data_iterator
        if data_iterator is not None
        else make_latent_iterator(config, None if p.pivots is None else len(p.pivots))
    )
    if jax.process_index() == 0:
      self.write_meta()

  # -- state -------------------------------------------------------------------
  def _init_params(self, rng):
    z = jnp.zeros((1, self.latent_dim))
    variables = self.editor.init(rng, z, jnp.zeros((1,), jnp.int32), 0.0, stats=self.stats)
    return {"editor": variables["params"]}

  def _init(self, rng):
    return new_train_state(self._init_params(rng), self.tx)

  def global_batch(self, batch):
    return input_pipeline.to_global_arrays(
        {"index": np.asarray(batch["index"], np.int32)}, self.mesh
    )

  # -- latents and images ---------------------------------------------------------
  def base_latents(self, frozen, index, stream: int = 0):
    """Flattened base W+ (B, num_ws * w_dim) of sample ``index``: a pivot, or the mapping of
    the z drawn from ``fold_in(fold_in(latent key, stream), index)`` (stream 0: training,
    1: sample grids)."""
    if "pivots" in frozen:
      w = frozen["pivots"][index]
    else:
      key = jax.random.fold_in(self.latent_key, stream)
      z = jax.vmap(
          lambda i: jax.random.normal(jax.random.fold_in(key, i), (self.gen_config.z_dim,))
      )(index)
      g = self.config.generator
      w = stylegan2.mapping(
          self.gen_config,
          frozen["generator"],
          z,
          None,
          float(g.truncation_psi),
          int(g.truncation_cutoff) or None,
          self.precision,
      )
    return w.reshape(w.shape[0], -1)

  def render_for_loss(self, frozen, x):
    """G(x) at the loss resolution (``loss.image_size``, box-downsampled)."""
    img = render(self.gen_config, frozen["generator"], x, self.fused, self.precision)
    return box_downsample(img, self.loss_size)

  def plain_edit(self, frozen, w, attr, gamma):
    """The InterFaceGAN edit ``w + gamma * d_a`` (``editor.classifier_edit`` with mean 0, std 1)."""
    st = frozen["stats"]
    return E.classifier_edit(w, st.directions[attr], gamma[:, None], st.mean, st.std)

  def identity_distance(self, frozen, img_edit, img_base, x_edit, w):
    """(B,) L_id per row: the identity stand-in on the images, else the W-space proxy."""
    if "id" in frozen:
      net = lambda x: self.prereqs.id_model.apply({"params": frozen["id"]}, x)  # noqa: E731
      return 1.0 - jnp.sum(net(img_edit) * jax.lax.stop_gradient(net(img_base)), axis=-1)
    return w_identity_distance(x_edit, w, frozen["w_avg"], self.num_ws)

  def inside_targets(self, frozen, attr):
    """(B, S, S) float: 1 on attribute ``attr``'s target regions of the fixed region map."""
    return frozen["targets"][attr[:, None, None], frozen["regmap"][None]].astype(jnp.float32)

  # -- attribution --------------------------------------------------------------
  def _measure_attribution(self, params, batch, frozen, previous_lam, step):
    cfg = self.config
    n = min(int(cfg.sparsity.attribution_frames), batch["index"].shape[0])
    w = self.base_latents(frozen, batch["index"][:n])
    rows = jnp.concatenate([w] * self.num_clusters)
    rng = jax.random.fold_in(jax.random.fold_in(self.rng, step), 1)
    attr, gamma = attribution_edits(
        rng, n, self.stats.assignments, cfg.strength.min, cfg.strength.max
    )
    regmap = jnp.broadcast_to(frozen["regmap"], (rows.shape[0],) + frozen["regmap"].shape)
    return E.measure_group_attribution(
        params["editor"],
        rows,
        attr,
        gamma,
        stats=frozen["stats"],
        decode_fn=lambda x: self.render_for_loss(frozen, x),
        region_map=regmap,
        targets=frozen["targets"],
        num_groups=int(cfg.editor.num_regions),
        neurons_per_group=int(cfg.editor.neurons_per_region),
        normalize_output=False,
        previous_lam=previous_lam,
        lam_in=float(cfg.sparsity.lam_in),
        lam_out=float(cfg.sparsity.lam_out),
        threshold=float(cfg.sparsity.attribution_threshold),
    )

  # -- the loss -------------------------------------------------------------------
  def draw_edits(self, rng, n):
    st = self.config.strength
    return draw_edits(rng, n, len(self.pool_names), st.min, st.max)

  def edit_terms(self, frozen, x_edit, w, attr, gamma, img_edit, img_base):
    """The loss of any edit ``x_edit`` of base latents ``w`` (B, num_ws * w_dim), with their
    images (loss resolution): the trained edit T_k(w + gamma d) or the plain w + gamma d
    (which T starts as). Returns (loss, metrics)."""
    lw = self.config.loss
    loc_out, has_out, loc_in, has_in = locality(
        img_edit, img_base, self.inside_targets(frozen, attr)
    )
    l_loc = jnp.mean(loc_out)
    reached = direction_reached(x_edit, w, frozen["stats"].directions[attr], gamma)
    faith_direction = jnp.mean(jnp.square(jax.nn.relu(1.0 - reached)))
    if self.attribute_loss_fn is not None:
      l_faith = jnp.mean(self.attribute_loss_fn(img_edit, attr, gamma))
    else:
      l_faith = faith_direction
    l_id = jnp.mean(self.identity_distance(frozen, img_edit, img_base, x_edit, w))
    l_gen = jnp.mean(layer_spread(x_edit - w, self.num_ws))
    loss = float(lw.id) * l_id + float(lw.faith) * l_faith + float(lw.gen) * l_gen
    loss = loss + float(lw.loc) * l_loc
    metrics = {
        "loss": loss,
        "l_id": l_id,
        "l_faith": l_faith,
        "l_gen": l_gen,
        "l_loc": l_loc,
        "faith_direction": faith_direction,
        "faith_reached": jnp.mean(reached),
        "loc_out": jnp.sum(loc_out) / jnp.maximum(jnp.sum(has_out), 1),
        "loc_in": jnp.sum(loc_in) / jnp.maximum(jnp.sum(has_in), 1),
        "edit_norm": jnp.mean(jnp.linalg.norm(x_edit - w, axis=-1)),
    }
    return loss, metrics

  def loss_fn(self, params, frozen, w, attr, gamma, img_base):
    """The self-training loss of T's edits (attr, gamma) of ``w``. Returns (loss, metrics)."""
    x_hat = self.editor.apply({"params": params["editor"]}, w, attr, gamma, stats=frozen["stats"])
    img_hat = self.render_for_loss(frozen, x_hat)
    return self.edit_terms(frozen, x_hat, w, attr, gamma, img_hat, img_base)

  def edits_and_references(self, frozen, index, rng):
    """Base latents, edits, the plain edits, and the base and plain-edit images (no gradient)."""
    w = self.base_latents(frozen, index)
    attr, gamma = self.draw_edits(rng, w.shape[0])
    x_plain = self.plain_edit(frozen, w, attr, gamma)
    both = jax.lax.stop_gradient(self.render_for_loss(frozen, jnp.concatenate([w, x_plain])))
    return w, attr, gamma, x_plain, both[: w.shape[0]], both[w.shape[0] :]

  # -- the pure train step ---------------------------------------------------------
  def _train_step(self, state: TrainState, batch, frozen):
    cfg = self.config
    rng = jax.random.fold_in(self.rng, state.step)
    w, attr, gamma, x_plain, img_base, img_plain = self.edits_and_references(
        frozen, batch["index"], rng
    )
    (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state.params, frozen, w, attr, gamma, img_base
    )
    # The same edits done plainly (what T starts as): `loss - plain_loss` is T's gain, paired.
    _, plain = self.edit_terms(frozen, x_plain, w, attr, gamma, img_plain, img_base)
    reference = {f"plain_{k}": v for k, v in plain.items() if k not in ("edit_norm",)}
    new_state, tail = state_lib.apply_gradients(
        state, grads, metrics["loss"], self.tx, cfg.ema_decay, ema_fn=editor_ema_fn(self.group_spec)
    )
    metrics = dict(
        metrics,
        **reference,
        **sparsity_metrics(
            new_state.params,
            optim.group_lam_of(new_state.opt_state),
            self.group_spec,
            self.num_clusters,
        ),
        **tail,
        lr=optim.learning_rate_at(cfg.optim, state.step),
    )
    return new_state, metrics

  # -- evaluation and sample grids ----------------------------------------------
  def sample_edits(self, n):
    names = [a for a in self.config.sample_attributes if a in self.pool_names] or self.pool_names
    attr = np.array([self.pool_names.index(names[i % len(names)]) for i in range(n)], np.int32)
    return attr, np.full(n, float(self.config.sample_strength), np.float32)

  def evaluate(self, editor_params, index, attr, gamma, stream: int = 1):
    """Base, plain-edit and T-edit images (3, n, R, R, 3) of fixed latents and edits, and
    ``{T,plain}/<edit_terms metric>`` for both edits."""
    frozen = self.frozen
    w = self.base_latents(frozen, jnp.asarray(index, jnp.int32), stream)
    attr, gamma = jnp.asarray(attr, jnp.int32), jnp.asarray(gamma, jnp.float32)
    n = w.shape[0]
    x_plain = self.plain_edit(frozen, w, attr, gamma)
    x_t = self.editor.apply({"params": editor_params}, w, attr, gamma, stats=frozen["stats"])
    full = _render_jit(
        self.gen_config,
        frozen["generator"],
        jnp.concatenate([w, x_plain, x_t]),
        fused_modconv=self.fused,
        precision=self.precision,
    )
    small = box_downsample(full, self.loss_size)
    base = small[:n]
    res = {}
    for i, (name, x) in enumerate((("plain", x_plain), ("T", x_t))):
      img = small[(i + 1) * n : (i + 2) * n]
      _, m = self.edit_terms(frozen, x, w, attr, gamma, img, base)
      res.update({f"{name}/{k}": v for k, v in m.items()})
    return full.reshape((3, n) + full.shape[1:]), {k: float(v) for k, v in res.items()}

  def write_samples(self, state, step, writer):
    """Grid rows: G(w), the plain InterFaceGAN edit, the edit with T (EMA params); plus eval
    scalars and the sparsity report (``sparsity.json``)."""
    n = int(self.config.num_sample_rows)
    attr, gamma = self.sample_edits(n)
    rows, ev = self.evaluate(state.ema_params["editor"], np.arange(n), attr, gamma)
    scalars = {f"eval/{k}": v for k, v in ev.items()}
    grid = images.make_grid(np.asarray(jax.device_get(rows)))
    self.write_report(state, step, writer, grid, scalars, attr, gamma)

  # -- metadata for load_editor -----------------------------------------------------
  def meta_hparams(self) -> dict:
    return dict(
        super().meta_hparams(),
        normalize_output=False,
        backbone="stylegan2",
        latent_shape=[self.num_ws, self.w_dim],
        generator=self.gen_config.to_init_kwargs(),
    )
