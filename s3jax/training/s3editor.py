"""S3Editor self-training: pseudo-edits, K routed transformations, region-grouped sparsity.

One train step (per frame f of the batch, all inside one jitted function):

1. Draw an attribute a uniformly from the pool and a strength gamma = s * m,
   s = +-1, m ~ U(strength.min, strength.max).
2. x_hat = T_k(denorm(norm(z_id) + gamma * d_a))      (``Editor``, hard routing
   by the cluster of a; L2-normalised like z_id when ``normalize_output``).
3. Decode cheaply: x_t = q_sample(f, t, eps) for a fixed ``decode.t``, then
   ``decode.steps`` deterministic DDIM steps to t=0 conditioned on
   z_face(x_hat, z_lnd) (one step = the x0 prediction). The reconstruction
   f_rec uses the *same* x_t with the frame's own z_id, so f_hat - f_rec is
   the change caused by the edit alone.
4. Loss = l_id * L_id + l_faith * L_faith + l_gen * L_gen + l_loc * L_loc
   * L_id    = mean(1 - cos(E(f_hat), E(f))), E the identity net
               (the distilled stand-in, ``s3jax.models.id_standin``);
   * L_faith = mean(softplus(-s * logit_a(E(f_hat)))), the attribute
               classifier on the re-encoded edit, signed by the edit direction;
   * L_gen   = the DVA loss (``losses.dva_loss``) on the real frames; it only
               has a gradient when ``finetune_unet``; otherwise reported;
   * L_loc   = mean |f_hat - f_rec| over the pixels outside a's target regions
               (regions: nearest-landmark cells of the frame's 68 landmarks).
5. Adam, then the group-lasso prox (``optim.group_lasso_prox``). Its per-group
   lambda lives in the optimizer state and comes from measurement
   (``sparsity.lam_from='attribution'``): every ``sparsity.attribution_every``
   steps, each neuron group of each T_k is switched off in turn on a batch of
   pseudo-edits routed to k, and the decoded change tells which facial regions
   the group moves (the K x G x R table) and what share of it lands outside the
   edits' target regions; lambda grows from lam_in to lam_out with that share
   (``editor.attribution_lambda``). ``lam_from='index'`` is the comparison:
   group g of T_k "belongs" to landmark region g, lam_in if that region is one
   of k's targets, else lam_out. The EMA copy gets the exact sparsity pattern
   (``optim.zero_groups_like``).

See docs/s3editor.md for the choices and measured numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from s3jax import diffusion, images, input_pipeline, loading, losses, optim
from s3jax.checkpointing import TrainState, new_train_state
from s3jax.models import editor as E
from s3jax.training import state as state_lib
from s3jax.training.dva import flatten_frames

BATCH_KEYS = ("image", "mask", "z_id", "z_lnd", "landmarks")

__all__ = [
    "Prereqs",
    "load_prerequisites",
    "S3EditorTask",
    "EditorTaskBase",
    "draw_edits",
    "attribution_edits",
    "make_group_spec",
    "editor_ema_fn",
    "sparsity_metrics",
    "sparsity_summary",
    "attribution_table_image",
]


# ---------------------------------------------------------------------------
# Prerequisites: DVA, attribute classifier, identity stand-in
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Prereqs:
  """What S3Editor trains on top of; loaded, never trained here."""

  dva_model: Any
  dva_params: Any
  dva_config: Any
  classifier: loading.Classifier
  id_model: Any
  id_params: Any
  id_report: dict
  sources: dict = dataclasses.field(default_factory=dict)  # where each came from


def mean_landmarks_of_data(data_config, max_records: int = 512) -> np.ndarray:
  """Mean 68-point layout over the training records, in [0, 1] of the crop."""
  src = input_pipeline.open_split(data_config.data_dir, "train")
  idx = np.linspace(0, len(src) - 1, min(len(src), max_records)).astype(int)
  lm = np.stack([np.asarray(src[int(i)]["landmarks"], np.float32) for i in idx])
  return (lm.mean(0) + 0.5) / float(data_config.image_size)


def _missing(what: str, path, command: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"S3Editor needs {what} at {path}, which is missing; make it with `{command}`"
  )


def load_prerequisites(config) -> Prereqs:
  """Loads the DVA (EMA), the attribute classifier and the identity stand-in.

  Each is trained by its own task first (`make demo-s3editor` does all three);
  a missing one is an error naming the command that makes it.
  """
  dva_dir = pathlib.Path(config.dva_workdir)
  if not (dva_dir / "checkpoints").is_dir():
    raise _missing(
        "a DVA",
        dva_dir,
        f"python -m s3jax.train --config configs/voxceleb.py:demo --workdir {dva_dir}",
    )
  dva_model, dva_params, dva_config, dva_step = loading.load_dva(dva_dir)
  cls_path = loading.classifier_path(config.classifier_dir)
  if not cls_path.exists():
    raise _missing(
        "an attribute classifier",
        cls_path,
        f"python -m s3jax.train --config configs/celebahq_classifier.py:demo --workdir "
        f"{cls_path.parent}",
    )
  classifier = loading.load_classifier(cls_path)
  id_dir = pathlib.Path(config.idnet_dir)
  if not (id_dir / "checkpoints").is_dir():
    raise _missing(
        "the identity stand-in",
        id_dir,
        f"python -m s3jax.train --config configs/id_standin.py:demo --workdir {id_dir}",
    )
  id_model, id_params, id_report = loading.load_id_standin(id_dir)
  sources = {
      "dva": f"{dva_dir} (step {dva_step}, EMA)",
      "classifier": str(cls_path),
      "id_standin": str(id_dir),
  }
  return Prereqs(
      dva_model, dva_params, dva_config, classifier, id_model, id_params, id_report, sources
  )


# ---------------------------------------------------------------------------
# Pieces every S3Editor task shares (the DVA one here, the GAN one in s3editor_gan)
# ---------------------------------------------------------------------------


def draw_edits(rng, n: int, num_attributes: int, strength_min: float, strength_max: float):
  """Pseudo-edits: a uniform attribute of the pool and gamma = +-U(min, max), each sign p=1/2."""
  r_a, r_m, r_s = jax.random.split(rng, 3)
  attr = jax.random.randint(r_a, (n,), 0, num_attributes)
  mag = jax.random.uniform(r_m, (n,), minval=float(strength_min), maxval=float(strength_max))
  sign = jnp.where(jax.random.bernoulli(r_s, 0.5, (n,)), 1.0, -1.0)
  return attr, sign * mag


def attribution_edits(rng, n: int, assignments, strength_min: float, strength_max: float):
  """`n` pseudo-edits per cluster (rows k*n ... k*n+n-1 use attributes of cluster k)."""
  assign = np.asarray(assignments)
  num_clusters = int(assign.max()) + 1
  members = [np.flatnonzero(assign == k) for k in range(num_clusters)]
  width = max(len(m) for m in members)
  table = np.stack([np.resize(m, width) for m in members])  # (K, width), cycled
  counts = np.array([len(m) for m in members])
  r_a, r_g = jax.random.split(rng)
  pick = jax.random.randint(r_a, (num_clusters, n), 0, counts[:, None])
  attr = jnp.take_along_axis(jnp.asarray(table), pick, axis=1).reshape(-1)
  _, gamma = draw_edits(r_g, num_clusters * n, len(assign), strength_min, strength_max)
  return attr, gamma


def make_group_spec(sparsity_config, editor: E.Editor, abstract_params, cluster_targets):
  """``(lam_from, GroupSpec)`` of an Editor's neuron groups, from the ``sparsity`` block.

  ``lam_from='index'``: lam_in on each cluster's target regions, lam_out elsewhere;
  ``'attribution'``: every group starts at lam_in and the measurement raises the lambda of the
  malicious ones (group_info's on_target keeps the index reading, for the comparison metrics).
  """
  lam_from = str(sparsity_config.lam_from)
  if lam_from not in ("attribution", "index"):
    raise ValueError(f"sparsity.lam_from must be 'attribution' or 'index', got {lam_from!r}")
  spec = E.group_spec_for_editor(
      abstract_params,
      editor.region_of_neuron(),
      float(sparsity_config.lam_in),
      float(sparsity_config.lam_out),
      cluster_targets,
  )
  if lam_from == "attribution":
    spec = dataclasses.replace(
        spec, group_lam=np.full(spec.num_groups, float(sparsity_config.lam_in))
    )
  return lam_from, spec


def editor_ema_fn(group_spec):
  """``apply_gradients``'s ema_fn: the EMA gets the exact sparsity pattern of the params."""
  return lambda ema, params: optim.zero_groups_like(ema, params, group_spec)


def sparsity_metrics(params, group_lam, group_spec, num_clusters: int) -> dict:
  """Per-step scalars: zero groups (all, on/off target, per cluster) and the lambdas."""
  zero = (optim.group_norms(params, group_spec) == 0).astype(jnp.float32)
  info = group_spec.group_info
  on = np.array([g["on_target"] for g in info])
  cl = np.array([g["cluster"] for g in info])
  m = {
      "zero_groups": jnp.sum(zero),
      "zero_groups_on_target": jnp.sum(zero * on),
      "zero_groups_off_target": jnp.sum(zero * (~on)),
      "group_lam_mean": jnp.mean(group_lam),
      "group_lam_max": jnp.max(group_lam),
  }
  for k in range(num_clusters):
    m[f"zero_groups_c{k}"] = jnp.sum(zero * (cl == k))
  return m


def sparsity_summary(
    state, group_spec, assignments, pool_names, cluster_targets, lam_from, last_attribution, step
):
  """``sparsity.json``'s content (without ``eval``) and the attribution table image (or None).

  ``state``: the train state (params ``{'editor': ...}``); ``last_attribution``: the host copy
  of the latest measurement (``{'table', 'off_share', 'step'}``) or None.
  """
  assign = np.asarray(assignments)
  num_clusters = int(assign.max()) + 1
  params = jax.device_get(state.params)
  rep = optim.sparsity_report(params, group_spec)
  lam = np.asarray(jax.device_get(optim.group_lam_of(state.opt_state)))
  used = E.attribute_regions_used(params, group_spec, assign, pool_names)
  summary = {
      "step": int(step),
      "num_groups": rep["num_groups"],
      "num_zero": rep["num_zero"],
      "per_cluster": {str(k): v for k, v in rep["per_cluster"].items()},
      "cluster_attributes": {
          str(k): [a for a, c in zip(pool_names, assign) if int(c) == k]
          for k in range(num_clusters)
      },
      "cluster_target_regions": {
          str(k): sorted(int(r) for r in s) for k, s in enumerate(cluster_targets)
      },
      "attribute_regions_used": {a: list(r) for a, r in used.items()},
      "lam_from": lam_from,
      "group_lam": lam.reshape(num_clusters, -1).tolist(),
  }
  image = None
  if last_attribution is not None:
    a = last_attribution
    summary["attribution"] = {
        "step": a["step"],
        "what": (
            "[k][g][r]: mean change of region r's pixels (decoded as in training) when"
            " neuron group g of T_k is switched off, per unit of the group's mean"
            " activation, over pseudo-edits routed to k"
        ),
        "table": np.asarray(a["table"]).tolist(),
        "off_target_share": np.where(
            np.isnan(a["off_share"]), None, np.asarray(a["off_share"])
        ).tolist(),
    }
    image = attribution_table_image(np.asarray(a["table"]))
  return summary, image


class EditorTaskBase:
  """The schedule every S3Editor task shares: before a step, when due, measure the attribution
  and put its lambdas into the optimizer state; then the task's jitted step.

  A subclass sets ``config`` (with ``sparsity.attribution_every``), ``lam_from``, ``frozen``,
  ``_jit_step(state, batch, frozen)`` and ``_attribution_jit(params, batch, frozen,
  previous_lam, step) -> {'table', 'off_share', 'lam'}``; ``write_report`` also needs
  ``group_spec``, ``stats``, ``pool_names``, ``cluster_targets`` and ``workdir``.
  """

  last_attribution = None  # host copy of the latest measurement, for sparsity.json
  grid_name = "rows"  # TensorBoard name of the sample grid: what its rows show
  _last_out = None  # (state returned by train_step, its step): no device sync per step

  def train_step(self, state, batch):
    """One jitted step; first, when due, re-measure the attribution and set the lambdas."""
    if self._last_out is not None and state is self._last_out[0]:
      step = self._last_out[1]
    else:
      step = int(jax.device_get(state.step))
    every = int(self.config.sparsity.attribution_every)
    if self.lam_from == "attribution" and every > 0 and step > 0 and step % every == 0:
      state = self.update_attribution(state, batch, step)
    new_state, metrics = self._jit_step(state, batch, self.frozen)
    self._last_out = (new_state, step + 1)
    return new_state, metrics

  def update_attribution(self, state, batch, step: int):
    """Measure the K x G x R table on `batch` and put the resulting lambdas into the state."""
    out = self._attribution_jit(
        state.params, batch, self.frozen, optim.group_lam_of(state.opt_state), step
    )
    self.last_attribution = dict(jax.device_get(out), step=int(step))
    return state.replace(opt_state=optim.with_group_lam(state.opt_state, out["lam"]))

  # ---------------------------------------------------------------------------
  # The task
  # ---------------------------------------------------------------------------

  def write_report(self, state, step, writer, grid, scalars, attr, gamma):
    """The sample grid (TensorBoard ``samples/<grid_name>`` and ``samples/step_N.png``),
    the eval scalars, the attribution image and ``sparsity.json``, and one log line."""
    summary, attribution_image = sparsity_summary(
        state,
        self.group_spec,
        self.stats.assignments,
        self.pool_names,
        self.cluster_targets,
        self.lam_from,
        self.last_attribution,
        step,
    )
    summary.update(
        eval=scalars,
        sample_attributes=[self.pool_names[i] for i in attr],
        sample_strength=float(gamma[0]),
    )
    if jax.process_index() != 0:
      return
    writer.write_scalars(step, scalars)
    writer.write_images(step, {f"samples/{self.grid_name}": grid[None]})
    images.save_png(self.workdir / "samples" / f"step_{step:07d}.png", grid)
    if attribution_image is not None:
      writer.write_images(step, {"sparsity/attribution_k_rows_g_by_r": attribution_image[None]})
    (self.workdir / "sparsity.json").write_text(json.dumps(summary, indent=2))
    logging.info(
        "%s step %d: zero groups %d/%d per cluster %s; %s",
        self.config.trainer,
        step,
        summary["num_zero"],
        summary["num_groups"],
        [v["zero"] for v in summary["per_cluster"].values()],
        " ".join(f"{k}={v:.4f}" for k, v in scalars.items()),
    )

  def meta_hparams(self) -> dict:
    """What ``load_editor`` rebuilds the Editor from (a task adds its backbone's)."""
    return {
        "num_clusters": self.num_clusters,
        "num_regions": int(self.config.editor.num_regions),
        "neurons_per_region": int(self.config.editor.neurons_per_region),
        "routing": str(self.config.editor.routing),
        "temperature": float(self.config.editor.temperature),
        # the GAN task's config has no such field: its T never normalises (it overrides)
        "normalize_output": bool(self.config.editor.get("normalize_output", False)),
        "sources": self.prereqs.sources,
        "id_standin_report": self.prereqs.id_report,
    }

  def write_meta(self):
    """``editor_meta.npz`` for ``loading.load_editor``."""
    loading.save_editor_meta(
        self.workdir,
        self.pool_names,
        self.stats,
        self.region_of_landmark,
        self.attr_target_table,
        self.mean_landmarks,
        self.meta_hparams(),
        holdout_names=self.holdout_names,
        holdout_directions=self.holdout_directions,
        holdout_targets=self.holdout_target_table,
    )


class S3EditorTask(EditorTaskBase):
  """The S3Editor trainer task for ``s3jax.training.loop.train``.

  Args:
    config: ``configs/s3editor.py`` config.
    mesh, workdir: as every task.
    data_iterator: optional checkpointable iterator of pipeline batches
      (default: ``input_pipeline.make_train_iterator(config.data)``).
    prereqs: optional :class:`Prereqs` (default: :func:`prepare_prerequisites`).
    mean_landmarks: optional (68, 2) mean layout in [0, 1] (default: from the data).
  """

  grid_name = "frame_recon_plain_edit_T_edit"

  def __init__(
      self,
      config,
      mesh,
      workdir,
      data_iterator=None,
      prereqs: Optional[Prereqs] = None,
      mean_landmarks=None,
      sample_batch=None,
  ):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.mesh = mesh
    self.prereqs = prereqs if prereqs is not None else load_prerequisites(config)
    p = self.prereqs
    self.dva = p.dva_model
    self.idnet = p.id_model
    self.size = int(p.dva_config.model.unet.image_size)
    self.finetune = bool(config.finetune_unet)
    self.rng = jax.random.key(config.seed)

    # -- attribute pool, directions, clusters ------------------------------
    cls = p.classifier
    names = list(cls.names)
    holdout = [str(a) for a in config.editor.holdout_attributes]
    for a in holdout:
      if a not in names or a not in E.PART_TABLE:
        raise KeyError(
            f"editor.holdout_attributes: {a!r} must be a classifier attribute with a part-table"
            f" entry (classifier: {names})"
        )
    want = list(config.editor.attributes) or [n for n in names if n in E.PART_TABLE]
    want = [a for a in want if a not in holdout]  # unseen in self-training
    auc = np.asarray(cls.auc, np.float64)
    pool = []
    for a in want:
      if a not in names:
        raise KeyError(f"attribute {a!r} is not among the classifier's {names}")
      i = names.index(a)
      if not np.isnan(auc[i]) and auc[i] < float(config.editor.min_auc):
        continue
      pool.append(i)
    if not pool:
      raise ValueError("empty attribute pool")
    self.pool_names = [names[i] for i in pool]
    w = np.asarray(cls.weight, np.float32)[:, pool]  # (D, P)
    self.num_clusters = min(int(config.editor.num_clusters), len(pool))
    scale = float(config.editor.direction_scale) or None
    self.stats = E.make_edit_stats(
        w.T,
        cls.mean,
        cls.std,
        self.num_clusters,
        seed=int(config.editor.kmeans_seed),
        scale=scale,
    )
    # Held-out attributes: never drawn in training; edited through the transform of the
    # cluster whose centroid is nearest (Editor's routing of a raw direction).
    self.holdout_names = holdout
    self.holdout_directions = E.edit_direction(
        np.asarray(cls.weight, np.float32)[:, [names.index(a) for a in holdout]].T, scale
    )
    d = w.shape[0]
    if p.id_model.features != d:
      raise ValueError(f"identity stand-in gives {p.id_model.features}-d, classifier wants {d}")

    # -- regions ---------------------------------------------------------------
    if mean_landmarks is None:
      mean_landmarks = mean_landmarks_of_data(config.data)
    self.mean_landmarks = np.asarray(mean_landmarks, np.float32)
    R = int(config.editor.num_regions)
    self.region_of_landmark = E.landmark_regions(self.mean_landmarks, R, seed=config.seed)
    self.attr_targets = E.attribute_target_regions(
        self.region_of_landmark,
        self.pool_names,
        table=E.PART_TABLE,
        min_fraction=float(config.editor.region_min_fraction),
    )
    self.attr_target_table = E.target_table(self.attr_targets, R)
    self.holdout_target_table = E.target_table(
        E.attribute_target_regions(
            self.region_of_landmark,
            holdout,
            table=E.PART_TABLE,
            min_fraction=float(config.editor.region_min_fraction),
        ),
        R,
    )
    assign = np.asarray(self.stats.assignments)
    self.cluster_targets = E.cluster_target_regions(assign, self.attr_targets, self.num_clusters)

    # -- model, optimizer, group spec -----------------------------------------
    self.editor = E.Editor(
        num_clusters=self.num_clusters,
        num_regions=R,
        neurons_per_region=int(config.editor.neurons_per_region),
        routing=config.editor.routing,
        temperature=float(config.editor.temperature),
        normalize_output=bool(config.editor.normalize_output),
    )
    abstract_params = jax.eval_shape(self._init_params, self.rng)
    self.lam_from, self.group_spec = make_group_spec(
        config.sparsity, self.editor, abstract_params, self.cluster_targets
    )
    self.tx = self._make_tx()

    frozen = {
        "stats": self.stats,
        "id": p.id_params,
        "cls_w": jnp.asarray(w),
        "cls_b": jnp.asarray(np.asarray(cls.bias, np.float32)[pool]),
        "cls_mean": jnp.asarray(cls.mean, jnp.float32),
        "cls_std": jnp.asarray(cls.std, jnp.float32),
        "targets": jnp.asarray(self.attr_target_table),
        "rol": jnp.asarray(self.region_of_landmark),
    }
    if not self.finetune:
      frozen["dva"] = p.dva_params
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
    self.data_iterator = (
        data_iterator
        if data_iterator is not None
        else (input_pipeline.make_train_iterator(config.data, seed=config.seed))
    )
    self._fixed_sample_batch = sample_batch
    self._sample_fn = None
    self._attribution_jit = jax.jit(
        self._measure_attribution, out_shardings=state_lib.replicated(mesh)
    )
    if jax.process_index() == 0:
      self.write_meta()

  # -- state -------------------------------------------------------------------
  def _init_params(self, rng):
    d = self.prereqs.classifier.dim
    z = jnp.zeros((1, d))
    params = {
        "editor": self.editor.init(rng, z, jnp.zeros((1,), jnp.int32), 0.0, stats=self.stats)[
            "params"
        ]
    }
    if self.finetune:
      params["dva"] = self.prereqs.dva_params
    return params

  def _make_tx(self):
    cfg = self.config.optim
    return optim.make_optimizer(
        cfg,
        group_spec=self.group_spec,
        group_lam=1.0,
        lr_by_key={"dva": float(cfg.unet_lr)} if self.finetune else None,
    )

  def _init(self, rng):
    return new_train_state(self._init_params(rng), self.tx)

  def global_batch(self, batch):
    local = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    return input_pipeline.to_global_arrays(local, self.mesh)

  def attribution_edits(self, rng, n: int):
    """`n` pseudo-edits per cluster (rows k*n ... k*n+n-1 use attributes of cluster k)."""
    st = self.config.strength
    return attribution_edits(rng, n, self.stats.assignments, st.min, st.max)

  def _measure_attribution(self, params, batch, frozen, previous_lam, step):
    cfg = self.config
    frames = flatten_frames(batch)
    n = min(int(cfg.sparsity.attribution_frames), frames["image"].shape[0])
    k_total, g_total = self.num_clusters, int(cfg.editor.num_regions)
    rows = {k: jnp.concatenate([v[:n]] * k_total) for k, v in frames.items()}
    rng = jax.random.fold_in(jax.random.fold_in(self.rng, step), 1)
    r_edit, r_noise = jax.random.split(rng)
    attr, gamma = self.attribution_edits(r_edit, n)
    dva_params = params["dva"] if self.finetune else frozen["dva"]
    noise = jax.random.normal(r_noise, rows["image"].shape)
    # One decode per variant (the full edit, then each group off), all from the same x_t.
    return E.measure_group_attribution(
        params["editor"],
        rows["z_id"],
        attr,
        gamma,
        stats=frozen["stats"],
        decode_fn=lambda z: self._decode(dva_params, rows, z, noise),
        region_map=E.region_map(rows["landmarks"], frozen["rol"], rows["image"].shape[1]),
        targets=frozen["targets"],
        num_groups=g_total,
        neurons_per_group=int(cfg.editor.neurons_per_region),
        normalize_output=bool(cfg.editor.normalize_output),
        previous_lam=previous_lam,
        lam_in=float(cfg.sparsity.lam_in),
        lam_out=float(cfg.sparsity.lam_out),
        threshold=float(cfg.sparsity.attribution_threshold),
    )

  # -- the loss ------------------------------------------------------------------
  def draw_edits(self, rng, n):
    """Uniform attribute of the pool and gamma = +-U(min, max)."""
    st = self.config.strength
    return draw_edits(rng, n, len(self.pool_names), st.min, st.max)

  def _eps_fn(self, dva_params, train=False, rngs=None):
    def eps_fn(x, t, z_face):
      return self.dva.apply(
          {"params": dva_params}, x, t, z_face, train, method="denoise", rngs=rngs
      )

    return eps_fn

  def _decode(self, dva_params, frames, z_id, noise):
    zf = self.dva.apply({"params": dva_params}, z_id, frames["z_lnd"], method="z_face")
    return diffusion.decode_from_noised(
        self._eps_fn(dva_params),
        frames["image"],
        int(self.config.decode.t),
        noise,
        zf,
        int(self.config.decode.steps),
    )

  def _faith(self, frozen, emb, attr, gamma):
    logits = ((emb - frozen["cls_mean"]) / frozen["cls_std"]) @ frozen["cls_w"] + frozen["cls_b"]
    la = jnp.take_along_axis(logits, attr[:, None], axis=1)[:, 0]
    s = jnp.sign(gamma)
    return jax.nn.softplus(-s * la), (s * la > 0).astype(jnp.float32)

  def loss_fn(self, params, frames, frozen, rng, attr=None, gamma=None, f_rec=None):
    """The self-training loss on flattened frames. Returns (loss, metrics)."""
    cfg = self.config
    w = cfg.loss
    f = frames["image"]
    n = f.shape[0]
    r_edit, r_noise, r_gen = jax.random.split(rng, 3)
    if attr is None:
      attr, gamma = self.draw_edits(r_edit, n)
    noise = jax.random.normal(r_noise, f.shape)
    dva_params = params["dva"] if self.finetune else frozen["dva"]
    regmap = E.region_map(frames["landmarks"], frozen["rol"], f.shape[1])
    inside = frozen["targets"][attr[:, None, None], regmap].astype(jnp.float32)
    outside = 1.0 - inside

    x_hat = self.editor.apply(
        {"params": params["editor"]}, frames["z_id"], attr, gamma, stats=frozen["stats"]
    )
    if f_rec is None or self.finetune:
      both = self._decode(
          dva_params,
          {k: jnp.concatenate([v, v]) for k, v in frames.items()},
          jnp.concatenate([x_hat, frames["z_id"]]),
          jnp.concatenate([noise, noise]),
      )
      f_hat, f_rec = both[:n], both[n:]
    else:
      f_hat = self._decode(dva_params, frames, x_hat, noise)
    diff = jnp.mean(jnp.abs(f_hat - f_rec), axis=-1)
    loc_out, has_out = losses.masked_mean(diff, outside)
    loc_in, has_in = losses.masked_mean(diff, inside)
    l_loc = jnp.mean(loc_out)

    id_fn = lambda x: self.idnet.apply({"params": frozen["id"]}, x)  # noqa: E731
    e_real = jax.lax.stop_gradient(id_fn(f))
    e_hat = id_fn(f_hat)
    l_id = jnp.mean(1.0 - jnp.sum(e_hat * e_real, axis=-1))
    faith, acc = self._faith(frozen, e_hat, attr, gamma)
    l_faith = jnp.mean(faith)

    if self.finetune and float(w.gen) > 0:
      t = jax.random.randint(r_gen, (n,), 0, diffusion.NUM_TIMESTEPS)
      k1, k2, k3 = jax.random.split(r_gen, 3)
      z2 = jnp.concatenate([frames["z_id"]] * 2)
      l2 = jnp.concatenate([frames["z_lnd"]] * 2)
      l_gen, _ = losses.dva_loss(
          lambda xt, tt: self.dva.apply(
              {"params": dva_params}, xt, tt, z2, l2, train=True, rngs={"dropout": k3}
          ),
          f,
          t,
          frames["mask"],
          jax.random.normal(k1, f.shape),
          jax.random.normal(k2, f.shape),
          float(w.reg_coef),
      )
    else:
      l_gen = jnp.zeros((), jnp.float32)
    loss = (
        float(w.id) * l_id + float(w.faith) * l_faith + float(w.gen) * l_gen + float(w.loc) * l_loc
    )
    metrics = {
        "loss": loss,
        "l_id": l_id,
        "l_faith": l_faith,
        "l_gen": l_gen,
        "l_loc": l_loc,
        "faith_acc": jnp.mean(acc),
        "loc_in": jnp.sum(loc_in) / jnp.maximum(jnp.sum(has_in), 1),
        "loc_out": jnp.sum(loc_out) / jnp.maximum(jnp.sum(has_out), 1),
        "edit_norm": jnp.mean(jnp.linalg.norm(x_hat - frames["z_id"], axis=-1)),
    }
    return loss, metrics

  def reference_metrics(self, frozen, frames, rng):
    """f_rec, plus metrics of the plain classifier edit (T = identity), no gradient."""
    f = frames["image"]
    n = f.shape[0]
    r_edit, r_noise, r_gen = jax.random.split(rng, 3)
    attr, gamma = self.draw_edits(r_edit, n)
    noise = jax.random.normal(r_noise, f.shape)
    st = frozen["stats"]
    x_plain = E.classifier_edit(
        frames["z_id"],
        st.directions[attr],
        gamma[:, None],
        st.mean,
        st.std,
        bool(self.config.editor.normalize_output),
    )
    both = self._decode(
        frozen["dva"],
        {k: jnp.concatenate([v, v]) for k, v in frames.items()},
        jnp.concatenate([x_plain, frames["z_id"]]),
        jnp.concatenate([noise, noise]),
    )
    f_plain, f_rec = both[:n], both[n:]
    regmap = E.region_map(frames["landmarks"], frozen["rol"], f.shape[1])
    inside = frozen["targets"][attr[:, None, None], regmap].astype(jnp.float32)
    loc_out, has_out = losses.masked_mean(jnp.mean(jnp.abs(f_plain - f_rec), -1), 1.0 - inside)
    e = self.idnet.apply({"params": frozen["id"]}, f_plain)
    e_real = self.idnet.apply({"params": frozen["id"]}, f)
    _, acc = self._faith(frozen, e, attr, gamma)
    m = {
        "plain_loc_out": jnp.sum(loc_out) / jnp.maximum(jnp.sum(has_out), 1),
        "plain_faith_acc": jnp.mean(acc),
        "plain_l_id": jnp.mean(1.0 - jnp.sum(e * e_real, -1)),
    }
    if bool(self.config.loss.report_gen):
      t = jax.random.randint(r_gen, (n,), 0, diffusion.NUM_TIMESTEPS)
      k1, k2 = jax.random.split(r_gen)
      z2 = jnp.concatenate([frames["z_id"]] * 2)
      l2 = jnp.concatenate([frames["z_lnd"]] * 2)
      _, gm = losses.dva_loss(
          lambda xt, tt: self.dva.apply({"params": frozen["dva"]}, xt, tt, z2, l2),
          f,
          t,
          frames["mask"],
          jax.random.normal(k1, f.shape),
          jax.random.normal(k2, f.shape),
          float(self.config.loss.reg_coef),
      )
      m["l_gen_frozen"] = gm["loss"]
    return (attr, gamma, noise, f_rec), m

  # -- the pure train step ---------------------------------------------------
  def _train_step(self, state: TrainState, batch, frozen):
    cfg = self.config
    frames = flatten_frames(batch)
    rng = jax.random.fold_in(self.rng, state.step)
    r_loss, r_ref = jax.random.split(rng)
    extra = {}
    if self.finetune:
      (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state.params, frames, frozen, r_loss
      )
    else:
      # The same edits and noise as the loss (r_loss's split), so f_rec is shared.
      (attr, gamma, noise, f_rec), extra = self.reference_metrics(frozen, frames, r_loss)
      (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state.params, frames, frozen, r_loss, attr, gamma, f_rec
      )
    new_state, tail = state_lib.apply_gradients(
        state,
        grads,
        metrics["loss"],
        self.tx,
        cfg.ema_decay,
        ema_fn=editor_ema_fn(self.group_spec),
    )
    metrics = dict(
        metrics,
        **extra,
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

  # -- evaluation and sample grids -----------------------------------------
  def evaluate(self, editor_params, frames, attr, gamma, seed: int = 0, dva_params=None):
    """Train-style decode of fixed edits: locality/faith/id for T and the plain edit.

    ``dva_params``: the DVA to decode with; required with ``finetune_unet`` (pass the
    state's EMA ``dva``), otherwise the frozen one."""
    if dva_params is None:
      if self.finetune:
        raise ValueError("with finetune_unet, pass dva_params (the trained UNet)")
      dva_params = self.frozen["dva"]
    f = jnp.asarray(frames["image"])
    noise = jax.random.normal(jax.random.key(seed), f.shape)
    return self._evaluate_jit(
        editor_params,
        dva_params,
        self.frozen,
        {k: jnp.asarray(v) for k, v in frames.items()},
        jnp.asarray(attr, jnp.int32),
        jnp.asarray(gamma, jnp.float32),
        noise,
    )

  @functools.cached_property
  def _evaluate_jit(self):
    def ev(editor_params, dva_params, frozen, frames, attr, gamma, noise):
      st = frozen["stats"]
      n = attr.shape[0]
      x_t = self.editor.apply({"params": editor_params}, frames["z_id"], attr, gamma, stats=st)
      x_p = E.classifier_edit(
          frames["z_id"],
          st.directions[attr],
          gamma[:, None],
          st.mean,
          st.std,
          bool(self.config.editor.normalize_output),
      )
      rep = lambda v: jnp.concatenate([v, v, v])  # noqa: E731
      out = self._decode(
          dva_params,
          {k: rep(v) for k, v in frames.items()},
          jnp.concatenate([x_t, x_p, frames["z_id"]]),
          rep(noise),
      )
      f_t, f_p, f_r = out[:n], out[n : 2 * n], out[2 * n :]
      regmap = E.region_map(frames["landmarks"], frozen["rol"], f_r.shape[1])
      inside = frozen["targets"][attr[:, None, None], regmap].astype(jnp.float32)
      e_real = self.idnet.apply({"params": frozen["id"]}, frames["image"])
      res = {}
      for name, fe in (("T", f_t), ("plain", f_p)):
        diff = jnp.mean(jnp.abs(fe - f_r), -1)
        lo, ho = losses.masked_mean(diff, 1.0 - inside)
        li, hi = losses.masked_mean(diff, inside)
        e = self.idnet.apply({"params": frozen["id"]}, fe)
        _, acc = self._faith(frozen, e, attr, gamma)
        res[f"{name}/loc_out"] = jnp.sum(lo) / jnp.maximum(jnp.sum(ho), 1)
        res[f"{name}/loc_in"] = jnp.sum(li) / jnp.maximum(jnp.sum(hi), 1)
        res[f"{name}/faith_acc"] = jnp.mean(acc)
        res[f"{name}/id_cos"] = jnp.mean(jnp.sum(e * e_real, -1))
      return res

    return jax.jit(ev)

  def _sample_batch(self):
    if self._fixed_sample_batch is None:
      it = input_pipeline.make_eval_iterator(
          self.config.data, seed=self.config.seed, batch_size=self.config.num_sample_rows
      )
      b = next(it)
      self._fixed_sample_batch = {k: np.asarray(b[k][:, :1]) for k in BATCH_KEYS}
    return flatten_frames(self._fixed_sample_batch)

  def sample_edits(self, n):
    names = [a for a in self.config.sample_attributes if a in self.pool_names] or self.pool_names
    attr = np.array([self.pool_names.index(names[i % len(names)]) for i in range(n)], np.int32)
    gamma = np.full(n, float(self.config.sample_strength), np.float32)
    return attr, gamma

  def _build_sample_fn(self):
    steps = int(self.config.eval_steps)

    def sample(editor_params, dva_p, frozen, image, z_id, z_lnd, attr, gamma):
      eps_fn = self._eps_fn(dva_p)
      zf = lambda z: self.dva.apply({"params": dva_p}, z, z_lnd, method="z_face")  # noqa: E731
      st = frozen["stats"]
      x_t = diffusion.ddim_invert(eps_fn, image, zf(z_id), steps)
      rec = diffusion.ddim_sample(eps_fn, x_t, zf(z_id), steps)
      x_p = E.classifier_edit(
          z_id,
          st.directions[attr],
          gamma[:, None],
          st.mean,
          st.std,
          bool(self.config.editor.normalize_output),
      )
      plain = diffusion.ddim_sample(eps_fn, x_t, zf(x_p), steps)
      x_e = self.editor.apply({"params": editor_params}, z_id, attr, gamma, stats=st)
      edited = diffusion.ddim_sample(eps_fn, x_t, zf(x_e), steps)
      return jnp.stack([image, rec, plain, edited])

    return jax.jit(sample)

  def write_samples(self, state, step, writer):
    """Grid rows: frame, reconstruction, plain classifier edit, edit with T (EMA params);
    plus eval scalars and the sparsity report (``sparsity.json``)."""
    frames = self._sample_batch()
    n = frames["image"].shape[0]
    attr, gamma = self.sample_edits(n)
    params = state.ema_params["editor"]
    # With finetune_unet every row decodes with the UNet being trained (its EMA).
    dva_params = state.ema_params["dva"] if self.finetune else self.frozen["dva"]
    if self._sample_fn is None:
      self._sample_fn = self._build_sample_fn()
    rows = self._sample_fn(
        params,
        dva_params,
        self.frozen,
        jnp.asarray(frames["image"]),
        jnp.asarray(frames["z_id"]),
        jnp.asarray(frames["z_lnd"]),
        jnp.asarray(attr),
        jnp.asarray(gamma),
    )
    grid = images.make_grid(np.asarray(jax.device_get(rows)))
    ev = jax.device_get(self.evaluate(params, frames, attr, gamma, dva_params=dva_params))
    scalars = {f"eval/{k}": float(v) for k, v in ev.items()}
    self.write_report(state, step, writer, grid, scalars, attr, gamma)


def attribution_table_image(table, cell: int = 8):
  """The K x G x R table as an image: one row of cells per (k, g), one column per region,
  each T_k's block scaled to its own maximum, K blocks separated by a dark line."""
  table = np.nan_to_num(np.asarray(table, np.float32))
  blocks = []
  for t in table:
    t = t / max(float(t.max()), 1e-12)
    blocks.append(np.kron(t, np.ones((cell, cell), np.float32)))
    blocks.append(np.zeros((2, t.shape[1] * cell), np.float32))
  img = np.concatenate(blocks[:-1])
  return np.repeat(img[..., None], 3, axis=-1)
