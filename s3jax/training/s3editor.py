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
5. Adam, then the group-lasso prox (``optim.group_lasso_prox``) with
   lambda_g = lam_in for a cluster's target regions, lam_out elsewhere. The
   EMA copy gets the exact sparsity pattern (``optim.zero_groups_like``).

See docs/s3editor.md for the choices and measured numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s3jax import diffusion, input_pipeline, losses, optim
from s3jax.models import editor as E
from s3jax.models import id_standin
from s3jax.training import state as state_lib
from s3jax.training.dva import flatten_frames, make_grid, save_png
from s3jax.training.state import TrainState

BATCH_KEYS = ("image", "mask", "z_id", "z_lnd", "landmarks")
META_FILE = "editor_meta.npz"
DONE_FILE = "PREREQ_DONE"
REPO = pathlib.Path(__file__).resolve().parents[2]

# Target parts of the attributes the classifier demo *measures* on the sample
# (s3jax.training.classifier.MEASURED_ATTRIBUTES); photometric ones are global.
MEASURED_ATTRIBUTE_PARTS = {
    "Bright_Face": E._ALL,
    "Warm_Tint": E._ALL,
    "Lit_From_Left": E._ALL,  # pylint: disable=protected-access
    "Mouth_Wide": ("mouth",),
    "Eyes_Open": ("eyes",),
}
PART_TABLE = {**E.DEFAULT_ATTRIBUTE_PARTS, **MEASURED_ATTRIBUTE_PARTS}

__all__ = [
    "Prereqs",
    "prepare_prerequisites",
    "S3EditorTask",
    "load_editor",
    "region_map",
    "decode_from_noised",
    "synthetic_classifier",
    "load_classifier",
]


# ---------------------------------------------------------------------------
# Prerequisites: DVA, attribute classifier, identity stand-in
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Prereqs:
  dva_model: Any
  dva_params: Any
  dva_config: Any
  classifier: dict  # names, weight (D, A), bias, mean, std, auc
  id_model: Any
  id_params: Any
  id_report: dict
  sources: dict = dataclasses.field(default_factory=dict)  # where each came from


def load_classifier(path) -> dict:
  with np.load(path, allow_pickle=False) as f:
    out = {k: f[k] for k in f.files}
  out["names"] = np.asarray([str(n) for n in out["names"]])
  return out


def synthetic_classifier(mean, std, names=E.CELEBA_ATTRIBUTES, seed: int = 0) -> dict:
  """Random unit directions standing in for trained classifiers (plumbing only).

  Only used when no classifier trainer exists (``prereq.classifier_fallback =
  'synthetic'``); ``auc`` is NaN and the key ``synthetic`` is set.
  """
  d = np.asarray(mean).shape[-1]
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d, len(names))).astype(np.float32)
  w /= np.linalg.norm(w, axis=0, keepdims=True)
  return {
      "names": np.asarray(names),
      "weight": w,
      "bias": np.zeros(len(names), np.float32),
      "mean": np.asarray(mean, np.float32),
      "std": np.asarray(std, np.float32),
      "auc": np.full(len(names), np.nan, np.float32),
      "synthetic": np.asarray(True),
  }


def _load_config_module(name: str, arg: str):
  path = REPO / "configs" / f"{name}.py"
  if not path.exists():
    return None
  spec = importlib.util.spec_from_file_location(f"_s3jax_configs_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _has_checkpoint(workdir) -> bool:
  d = pathlib.Path(workdir)
  ck = d / "checkpoints"
  return (
      (d / "config.json").exists() and ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir())
  )


def _ensure_data(data_config):
  from data_prep.sample import ensure_sample_for  # pylint: disable=g-import-not-at-top

  ensure_sample_for(data_config)


def _dataset_z_stats(data_config, max_records: int = 512):
  """Mean/std of z_id over (up to max_records of) the training records."""
  src = input_pipeline.open_split(data_config.data_dir, "train")
  idx = np.linspace(0, len(src) - 1, min(len(src), max_records)).astype(int)
  z = np.stack([np.asarray(src[int(i)]["z_id"], np.float32) for i in idx])
  return z.mean(0), np.maximum(z.std(0), 1e-4)


def mean_landmarks_of_data(data_config, max_records: int = 512) -> np.ndarray:
  """Mean 68-point layout over the training records, in [0, 1] of the crop."""
  src = input_pipeline.open_split(data_config.data_dir, "train")
  idx = np.linspace(0, len(src) - 1, min(len(src), max_records)).astype(int)
  lm = np.stack([np.asarray(src[int(i)]["landmarks"], np.float32) for i in idx])
  return (lm.mean(0) + 0.5) / float(data_config.image_size)


def _train_prereq(config, workdir):
  _ensure_data(config.data)
  workdir = pathlib.Path(workdir)
  logging.info("training prerequisite %s into %s", config.trainer, workdir)
  print(
      f"s3editor: training prerequisite '{config.trainer}' into {workdir} "
      f"({config.total_steps} steps)",
      flush=True,
  )
  from s3jax.training import runner  # pylint: disable=g-import-not-at-top

  runner.run(config, str(workdir))
  (workdir / DONE_FILE).write_text("done\n")


def prepare_prerequisites(config, workdir) -> Prereqs:
  """Finds (or, with ``prereq.train_missing``, trains) the DVA, classifier and id stand-in."""
  from s3jax.training.dva import restore_dva  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  pre = workdir / "prereq"
  train_missing = bool(config.prereq.train_missing)
  sources = {}

  # -- DVA ------------------------------------------------------------------
  dva_dir = pathlib.Path(config.dva_workdir)
  if not _has_checkpoint(dva_dir):
    dva_dir = pre / "dva"
    if not (dva_dir / DONE_FILE).exists():
      if not train_missing:
        raise FileNotFoundError(
            f"no DVA checkpoint in {config.dva_workdir} (set "
            "prereq.train_missing=True to train a demo-size one)"
        )
      c = _load_config_module("voxceleb", "demo")
      c.data = config.data.copy_and_resolve_references()
      c.data.frames_per_item = 2
      c.total_steps = int(config.prereq.dva_steps)
      c.checkpoint_every = c.total_steps
      c.sample_every = c.total_steps
      c.log_every = min(c.log_every, max(1, c.total_steps // 5))
      _train_prereq(c, dva_dir)
  dva_model, dva_params, dva_config, dva_step = restore_dva(str(dva_dir))
  sources["dva"] = f"{dva_dir} (step {dva_step}, EMA)"

  # -- classifier -------------------------------------------------------------
  cls_path = pathlib.Path(config.classifier_dir) / "classifier.npz"
  if not cls_path.exists():
    cls_path = pre / "classifier" / "classifier.npz"
  if not cls_path.exists():
    if not train_missing:
      raise FileNotFoundError(f"no classifier.npz in {config.classifier_dir}")
    c = _load_config_module("celebahq_classifier", "demo")
    if c is not None:
      # The demo classifier reads its data dir and z_id width from a DVA workdir.
      if "dva_workdir" in c:
        c.dva_workdir = str(dva_dir)
      if int(config.prereq.classifier_steps):
        c.total_steps = int(config.prereq.classifier_steps)
      _train_prereq(c, cls_path.parent)
      if not cls_path.exists():
        raise FileNotFoundError(f"the classifier trainer did not write {cls_path}")
    elif config.prereq.classifier_fallback == "synthetic":
      logging.warning(
          "no classifier trainer (configs/celebahq_classifier.py) found: using "
          "SYNTHETIC random attribute directions (plumbing only)"
      )
      print(
          "s3editor: WARNING no attribute classifier available; using synthetic random "
          "directions (plumbing only)",
          flush=True,
      )
      _ensure_data(config.data)
      mean, std = _dataset_z_stats(config.data)
      cls_path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(cls_path, **synthetic_classifier(mean, std, seed=config.seed))
    else:
      raise FileNotFoundError("no classifier.npz and no classifier trainer config")
  classifier = load_classifier(cls_path)
  sources["classifier"] = str(cls_path) + (" (SYNTHETIC)" if "synthetic" in classifier else "")

  # -- identity stand-in ------------------------------------------------------
  id_dir = pathlib.Path(config.idnet_dir)
  if not id_standin.exists(id_dir):
    id_dir = pre / "id_standin"
  if not id_standin.exists(id_dir):
    if not train_missing:
      raise FileNotFoundError(f"no identity stand-in in {config.idnet_dir}")
    _ensure_data(config.data)
    print(
        f"s3editor: distilling the identity stand-in into {id_dir} "
        f"({config.prereq.idnet_steps} steps)",
        flush=True,
    )
    it = input_pipeline.make_train_iterator(config.data, seed=config.seed + 17)
    d = int(classifier["weight"].shape[0])
    model, params, curve = id_standin.distill(
        it,
        features=d,
        steps=int(config.prereq.idnet_steps),
        seed=config.seed,
        width=int(config.prereq.idnet_width),
        input_size=min(64, int(config.data.image_size)),
    )
    ev = input_pipeline.make_eval_iterator(config.data, seed=0, batch_size=4)
    report = {
        "test": id_standin.agreement(
            model, params, [next(ev) for _ in range(int(config.prereq.idnet_eval_batches))]
        )
    }
    tr = input_pipeline.make_train_iterator(config.data, seed=config.seed + 99)
    report["train"] = id_standin.agreement(model, params, [next(tr) for _ in range(4)])
    report["final_train_1_minus_cos"] = float(np.mean(curve[-20:]))
    id_standin.save(id_dir, model, params, report)
    print(f"s3editor: id stand-in agreement with dlib: {json.dumps(report)}", flush=True)
  id_model, id_params, id_meta = id_standin.load(id_dir)
  sources["id_standin"] = str(id_dir)
  return Prereqs(
      dva_model,
      dva_params,
      dva_config,
      classifier,
      id_model,
      id_params,
      id_meta.get("report", {}),
      sources,
  )


# ---------------------------------------------------------------------------
# Pieces of the step
# ---------------------------------------------------------------------------


def region_map(landmarks, region_of_landmark, size: int, resolution: int = 64):
  """(n, 68, 2) crop-pixel landmarks -> (n, size, size) region id of the nearest landmark.

  Computed on a ``min(size, resolution)`` grid and repeated up to ``size``
  (nearest-neighbour), which keeps the (pixels x 68) distance table small.
  """
  res = min(size, resolution)
  if size % res:
    res = size
  scale = size / res
  c = (jnp.arange(res, dtype=jnp.float32) + 0.5) * scale - 0.5
  gy, gx = jnp.meshgrid(c, c, indexing="ij")
  grid = jnp.stack([gx, gy], -1).reshape(-1, 2)  # (P, 2) as (x, y)
  lm = jnp.asarray(landmarks, jnp.float32)
  d2 = (
      jnp.sum(grid**2, -1)[None, :, None]
      - 2.0 * jnp.einsum("pc,nlc->npl", grid, lm)
      + jnp.sum(lm**2, -1)[:, None, :]
  )
  nearest = jnp.argmin(d2, axis=-1)
  reg = jnp.asarray(region_of_landmark, jnp.int32)[nearest].reshape(-1, res, res)
  if res != size:
    f = size // res
    reg = jnp.repeat(jnp.repeat(reg, f, axis=1), f, axis=2)
  return reg


def decode_from_noised(eps_fn, x0, t_start: int, noise, cond, steps: int = 1):
  """Noise ``x0`` to ``t_start`` and run ``steps`` deterministic DDIM steps to x0.

  The timesteps are ``linspace(t_start, 0, steps + 1)[:-1]`` (original indices);
  no clipping, so the gradient reaches every pixel. ``steps=1`` is the
  one-step x0 prediction. Returns the final x0 estimate.
  """
  ac = diffusion.alphas_cumprod()
  n = x0.shape[0]
  ts = np.round(np.linspace(t_start, 0, steps + 1)).astype(np.int32)
  x = diffusion.q_sample(x0, jnp.full((n,), ts[0], jnp.int32), noise)
  x0_hat = None
  for i in range(steps):
    t = jnp.full((n,), ts[i], jnp.int32)
    eps = eps_fn(x, t, cond).astype(jnp.float32)
    x0_hat = diffusion.pred_x0_from_eps(x, t, eps)
    if i + 1 < steps:
      a_next = float(ac[ts[i + 1]]) if ts[i + 1] > 0 else 1.0
      x = np.sqrt(a_next) * x0_hat + np.sqrt(1.0 - a_next) * eps
  return x0_hat


def _plain_edit(z, d, gamma, mean, std, normalize: bool):
  x = ((z - mean) / std + gamma[:, None] * d) * std + mean
  if normalize:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def _masked_mean(diff, mask):
  """Per-frame mean of diff (n,H,W) over mask (n,H,W); 0 where the mask is empty."""
  num = jnp.sum(diff * mask, axis=(1, 2))
  den = jnp.sum(mask, axis=(1, 2))
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0), den > 0


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------


class S3EditorTask:
  """The S3Editor trainer task for ``s3jax.training.loop.train``.

  Args:
    config: ``configs/s3editor.py`` config.
    mesh, workdir: as every task.
    data_iterator: optional checkpointable iterator of pipeline batches
      (default: ``input_pipeline.make_train_iterator(config.data)``).
    prereqs: optional :class:`Prereqs` (default: :func:`prepare_prerequisites`).
    mean_landmarks: optional (68, 2) mean layout in [0, 1] (default: from the data).
  """

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
    if config.data.get("build_sample_if_missing") and (
        data_iterator is None or mean_landmarks is None
    ):
      _ensure_data(config.data)
    self.prereqs = prereqs if prereqs is not None else prepare_prerequisites(config, workdir)
    p = self.prereqs
    self.dva = p.dva_model
    self.idnet = p.id_model
    self.size = int(p.dva_config.model.unet.image_size)
    self.finetune = bool(config.finetune_unet)
    self.rng = jax.random.key(config.seed)

    # -- attribute pool, directions, clusters ------------------------------
    cls = p.classifier
    names = [str(n) for n in cls["names"]]
    want = list(config.editor.attributes) or [n for n in names if n in PART_TABLE]
    auc = np.asarray(cls.get("auc", np.full(len(names), np.nan)), np.float64)
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
    w = np.asarray(cls["weight"], np.float32)[:, pool]  # (D, P)
    self.num_clusters = min(int(config.editor.num_clusters), len(pool))
    scale = float(config.editor.direction_scale) or None
    self.stats = E.make_edit_stats(
        w.T,
        cls["mean"],
        cls["std"],
        self.num_clusters,
        seed=int(config.editor.kmeans_seed),
        scale=scale,
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
        table=PART_TABLE,
        min_fraction=float(config.editor.region_min_fraction),
    )
    self.attr_target_table = np.zeros((len(pool), R), bool)
    for i, s in enumerate(self.attr_targets):
      self.attr_target_table[i, sorted(s)] = True
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
    self.group_spec = E.group_spec_for_editor(
        abstract_params,
        self.editor.region_of_neuron(),
        float(config.sparsity.lam_in),
        float(config.sparsity.lam_out),
        self.cluster_targets,
    )
    self.tx = self._make_tx()

    frozen = {
        "stats": self.stats,
        "id": p.id_params,
        "cls_w": jnp.asarray(w),
        "cls_b": jnp.asarray(np.asarray(cls["bias"])[pool]),
        "cls_mean": jnp.asarray(cls["mean"], jnp.float32),
        "cls_std": jnp.asarray(cls["std"], jnp.float32),
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
    if jax.process_index() == 0:
      self.write_meta()

  # -- state -------------------------------------------------------------------
  def _init_params(self, rng):
    d = int(self.prereqs.classifier["weight"].shape[0])
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
    sched = optim.learning_rate_schedule(cfg)
    adam = lambda lr: optax.adam(lr, b1=float(cfg.b1), b2=float(cfg.b2))  # noqa: E731
    if self.finetune:
      inner = optax.multi_transform(
          {"editor": adam(sched), "dva": adam(float(cfg.unet_lr))},
          lambda p: {k: jax.tree.map(lambda _: k, v) for k, v in p.items()},
      )
    else:
      inner = adam(sched)
    parts = [optax.clip_by_global_norm(float(cfg.grad_clip))] if cfg.grad_clip else []
    parts += [inner, optim.group_lasso_prox(self.group_spec, 1.0, sched)]
    return optax.chain(*parts)

  def _init(self, rng):
    params = self._init_params(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=self.tx.init(params),
    )

  def global_batch(self, batch):
    local = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    return input_pipeline.to_global_arrays(local, self.mesh)

  def train_step(self, state, batch):
    return self._jit_step(state, batch, self.frozen)

  # -- the loss ------------------------------------------------------------------
  def draw_edits(self, rng, n):
    """Uniform attribute of the pool and gamma = +-U(min, max)."""
    r_a, r_m, r_s = jax.random.split(rng, 3)
    attr = jax.random.randint(r_a, (n,), 0, len(self.pool_names))
    mag = jax.random.uniform(
        r_m, (n,), minval=float(self.config.strength.min), maxval=float(self.config.strength.max)
    )
    sign = jnp.where(jax.random.bernoulli(r_s, 0.5, (n,)), 1.0, -1.0)
    return attr, sign * mag

  def _eps_fn(self, dva_params, train=False, rngs=None):
    def eps_fn(x, t, z_face):
      return self.dva.apply(
          {"params": dva_params}, x, t, z_face, train, method="denoise", rngs=rngs
      )

    return eps_fn

  def _decode(self, dva_params, frames, z_id, noise):
    zf = self.dva.apply({"params": dva_params}, z_id, frames["z_lnd"], method="z_face")
    return decode_from_noised(
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
    regmap = region_map(frames["landmarks"], frozen["rol"], f.shape[1])
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
    loc_out, has_out = _masked_mean(diff, outside)
    loc_in, has_in = _masked_mean(diff, inside)
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

  def _reference_metrics(self, frozen, frames, rng):
    """f_rec, plus metrics of the plain classifier edit (T = identity), no gradient."""
    f = frames["image"]
    n = f.shape[0]
    r_edit, r_noise, r_gen = jax.random.split(rng, 3)
    attr, gamma = self.draw_edits(r_edit, n)
    noise = jax.random.normal(r_noise, f.shape)
    st = frozen["stats"]
    x_plain = _plain_edit(
        frames["z_id"],
        st.directions[attr],
        gamma,
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
    regmap = region_map(frames["landmarks"], frozen["rol"], f.shape[1])
    inside = frozen["targets"][attr[:, None, None], regmap].astype(jnp.float32)
    loc_out, has_out = _masked_mean(jnp.mean(jnp.abs(f_plain - f_rec), -1), 1.0 - inside)
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
      (attr, gamma, noise, f_rec), extra = self._reference_metrics(frozen, frames, r_loss)
      (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state.params, frames, frozen, r_loss, attr, gamma, f_rec
      )
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(jnp.add, state.params, updates)
    new_ema = state_lib.ema_update(state.ema_params, new_params, cfg.ema_decay)
    new_ema = optim.zero_groups_like(new_ema, new_params, self.group_spec)
    finite = state_lib.all_finite(grads) & jnp.isfinite(metrics["loss"])
    new_state = state_lib.keep_if_finite(
        finite,
        TrainState(step=state.step + 1, params=new_params, ema_params=new_ema, opt_state=new_opt),
        state,
    )
    metrics = dict(
        metrics,
        **extra,
        **self._sparsity_metrics(new_state.params),
        grad_norm=optax.tree.norm(grads),
        lr=optim.learning_rate_at(cfg.optim, state.step),
        finite=finite.astype(jnp.float32),
    )
    return new_state, metrics

  def _sparsity_metrics(self, params):
    zero = (optim.group_norms(params, self.group_spec) == 0).astype(jnp.float32)
    info = self.group_spec.group_info
    on = np.array([g["on_target"] for g in info])
    cl = np.array([g["cluster"] for g in info])
    m = {
        "zero_groups": jnp.sum(zero),
        "zero_groups_on_target": jnp.sum(zero * on),
        "zero_groups_off_target": jnp.sum(zero * (~on)),
    }
    for k in range(self.num_clusters):
      m[f"zero_groups_c{k}"] = jnp.sum(zero * (cl == k))
    return m

  # -- evaluation and sample grids -----------------------------------------
  def evaluate(self, editor_params, frames, attr, gamma, seed: int = 0):
    """Train-style decode of fixed edits: locality/faith/id for T and the plain edit."""
    frozen = self.frozen
    if self.finetune:
      raise NotImplementedError("evaluate() uses the frozen DVA")
    f = jnp.asarray(frames["image"])
    noise = jax.random.normal(jax.random.key(seed), f.shape)
    return self._evaluate_jit(
        editor_params,
        frozen,
        {k: jnp.asarray(v) for k, v in frames.items()},
        jnp.asarray(attr, jnp.int32),
        jnp.asarray(gamma, jnp.float32),
        noise,
    )

  @functools.cached_property
  def _evaluate_jit(self):
    def ev(editor_params, frozen, frames, attr, gamma, noise):
      st = frozen["stats"]
      n = attr.shape[0]
      x_t = self.editor.apply({"params": editor_params}, frames["z_id"], attr, gamma, stats=st)
      x_p = _plain_edit(
          frames["z_id"],
          st.directions[attr],
          gamma,
          st.mean,
          st.std,
          bool(self.config.editor.normalize_output),
      )
      rep = lambda v: jnp.concatenate([v, v, v])  # noqa: E731
      out = self._decode(
          frozen["dva"],
          {k: rep(v) for k, v in frames.items()},
          jnp.concatenate([x_t, x_p, frames["z_id"]]),
          rep(noise),
      )
      f_t, f_p, f_r = out[:n], out[n : 2 * n], out[2 * n :]
      regmap = region_map(frames["landmarks"], frozen["rol"], f_r.shape[1])
      inside = frozen["targets"][attr[:, None, None], regmap].astype(jnp.float32)
      e_real = self.idnet.apply({"params": frozen["id"]}, frames["image"])
      res = {}
      for name, fe in (("T", f_t), ("plain", f_p)):
        diff = jnp.mean(jnp.abs(fe - f_r), -1)
        lo, ho = _masked_mean(diff, 1.0 - inside)
        li, hi = _masked_mean(diff, inside)
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

    def sample(editor_params, frozen, image, z_id, z_lnd, attr, gamma):
      dva_p = frozen["dva"]
      eps_fn = self._eps_fn(dva_p)
      zf = lambda z: self.dva.apply({"params": dva_p}, z, z_lnd, method="z_face")  # noqa: E731
      st = frozen["stats"]
      x_t = diffusion.ddim_invert(eps_fn, image, zf(z_id), steps)
      rec = diffusion.ddim_sample(eps_fn, x_t, zf(z_id), steps)
      x_p = _plain_edit(
          z_id,
          st.directions[attr],
          gamma,
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
    scalars = {}
    if not self.finetune:
      if self._sample_fn is None:
        self._sample_fn = self._build_sample_fn()
      rows = self._sample_fn(
          params,
          self.frozen,
          jnp.asarray(frames["image"]),
          jnp.asarray(frames["z_id"]),
          jnp.asarray(frames["z_lnd"]),
          jnp.asarray(attr),
          jnp.asarray(gamma),
      )
      grid = make_grid(np.asarray(jax.device_get(rows)))
      ev = jax.device_get(self.evaluate(params, frames, attr, gamma))
      scalars = {f"eval/{k}": float(v) for k, v in ev.items()}
    rep = optim.sparsity_report(jax.device_get(state.params), self.group_spec)
    used = E.attribute_regions_used(
        jax.device_get(state.params),
        self.group_spec,
        np.asarray(self.stats.assignments),
        self.pool_names,
    )
    summary = {
        "step": int(step),
        "num_groups": rep["num_groups"],
        "num_zero": rep["num_zero"],
        "per_cluster": {str(k): v for k, v in rep["per_cluster"].items()},
        "cluster_attributes": {
            str(k): [
                a
                for a, c in zip(self.pool_names, np.asarray(self.stats.assignments))
                if int(c) == k
            ]
            for k in range(self.num_clusters)
        },
        "cluster_target_regions": {
            str(k): sorted(int(r) for r in s) for k, s in enumerate(self.cluster_targets)
        },
        "attribute_regions_used": {a: list(r) for a, r in used.items()},
        "eval": scalars,
        "sample_attributes": [self.pool_names[i] for i in attr],
        "sample_strength": float(gamma[0]),
    }
    if jax.process_index() == 0:
      if scalars:
        writer.write_scalars(step, scalars)
        writer.write_images(step, {"samples/frame_recon_plain_edit_T_edit": grid[None]})
        path = self.workdir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, grid)
        logging.info("wrote sample grid %s", path)
      (self.workdir / "sparsity.json").write_text(json.dumps(summary, indent=2))
      print(
          f"s3editor step {step}: zero groups {rep['num_zero']}/{rep['num_groups']} "
          f"per cluster {[v['zero'] for v in rep['per_cluster'].values()]}; "
          + " ".join(f"{k}={v:.4f}" for k, v in scalars.items()),
          flush=True,
      )

  # -- metadata for load_editor -----------------------------------------------
  def write_meta(self):
    self.workdir.mkdir(parents=True, exist_ok=True)
    hp = {
        "num_clusters": self.num_clusters,
        "num_regions": int(self.config.editor.num_regions),
        "neurons_per_region": int(self.config.editor.neurons_per_region),
        "routing": str(self.config.editor.routing),
        "temperature": float(self.config.editor.temperature),
        "normalize_output": bool(self.config.editor.normalize_output),
        "sources": self.prereqs.sources,
        "id_standin_report": self.prereqs.id_report,
    }
    st = self.stats
    np.savez(
        self.workdir / META_FILE,
        names=np.asarray(self.pool_names),
        mean=np.asarray(st.mean),
        std=np.asarray(st.std),
        directions=np.asarray(st.directions),
        assignments=np.asarray(st.assignments),
        centroids=np.asarray(st.centroids),
        region_of_landmark=self.region_of_landmark,
        attr_targets=self.attr_target_table,
        mean_landmarks=self.mean_landmarks,
        hparams=np.asarray(json.dumps(hp)),
    )


# ---------------------------------------------------------------------------
# Editing with a trained S3Editor
# ---------------------------------------------------------------------------


def _restore_raw_state(workdir, step=None):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from s3jax.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top

  ck = Checkpointer(workdir, async_save=False)
  try:
    steps = ck.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {ck.directory}")
    step = steps[-1] if step is None else int(step)
    out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"], step
  finally:
    ck.close()


def load_editor(directory, step: Optional[int] = None, ema: bool = True):
  """``edit_fn(z_id (N, D), attribute: str, strength: float) -> (N, D)`` from a trained run.

  ``directory`` is an s3editor workdir (``editor_meta.npz`` + checkpoints).
  The edit is ``T_k(denorm(norm(z_id) + strength * d_a))`` with the run's
  directions, clusters and routing (L2-normalised when the run was). The
  function carries ``.attributes`` (the pool) and ``.step``.
  """
  d = pathlib.Path(directory)
  with np.load(d / META_FILE, allow_pickle=False) as f:
    meta = {k: f[k] for k in f.files}
  hp = json.loads(str(meta["hparams"]))
  names = [str(n) for n in meta["names"]]
  stats = E.EditStats(
      mean=jnp.asarray(meta["mean"]),
      std=jnp.asarray(meta["std"]),
      directions=jnp.asarray(meta["directions"]),
      assignments=jnp.asarray(meta["assignments"]),
      centroids=jnp.asarray(meta["centroids"]),
  )
  editor = E.Editor(
      num_clusters=hp["num_clusters"],
      num_regions=hp["num_regions"],
      neurons_per_region=hp["neurons_per_region"],
      routing=hp["routing"],
      temperature=hp["temperature"],
      normalize_output=hp["normalize_output"],
  )
  state, step = _restore_raw_state(d, step)
  params = jax.tree.map(jnp.asarray, state["ema_params" if ema else "params"]["editor"])

  @jax.jit
  def _apply(z, a, s):
    return editor.apply({"params": params}, z, a, s, stats=stats)

  def edit_fn(z_id, attribute: str, strength: float):
    if attribute not in names:
      raise KeyError(f"attribute {attribute!r} not in the trained pool {names}")
    z = jnp.asarray(z_id, jnp.float32)
    return _apply(z, jnp.int32(names.index(attribute)), jnp.float32(strength))

  edit_fn.attributes = tuple(names)
  edit_fn.step = step
  edit_fn.params = params
  return edit_fn
