"""Loading trained artefacts for inference: the DVA, the attribute classifier and S3Editor.

Editing, evaluation and porting load weights only through this module; none
of them imports a trainer. Every loader reads the config saved with the
checkpoint step it restores (`checkpointing.read_config`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from s3jax import checkpointing, optim
from s3jax.models import autoencoder
from s3jax.models import editor as editor_lib
from s3jax.models import id_standin

CLASSIFIER_FILE = "classifier.npz"
CLASSIFIER_KEYS = ("names", "weight", "bias", "mean", "std", "auc")
# Optional since the import of the reference's classifier; older files lack them.
CLASSIFIER_OPTIONAL_KEYS = ("ema_weight", "ema_bias", "edit_weights")
EDIT_WEIGHTS = ("classifier", "ema")  # which probe edits and logits use
EDITOR_META_FILE = "editor_meta.npz"


# ---------------------------------------------------------------------------
# DVA
# ---------------------------------------------------------------------------
def init_dva_state(model, tx, config, rng) -> checkpointing.TrainState:
  """Fresh DVA params and optimizer state (the trainer's init and the loaders' template)."""
  return checkpointing.new_train_state(autoencoder.init_params(model, config.model, rng), tx)


def restore_dva_state(workdir, step: Optional[int] = None):
  """(model, train state, config, step) of a DVA workdir; the newest step by default.

  The config is the one saved with the restored step, so no flags are needed.
  A newest step that cannot be read falls back to the one before (with a warning).
  """
  step = checkpointing.latest_step(workdir) if step is None else int(step)
  config = checkpointing.read_config(workdir, step)
  model = autoencoder.make_dva(config.model)
  tx = optim.make_optimizer(config.optim)
  abstract = jax.eval_shape(lambda rng: init_dva_state(model, tx, config, rng), jax.random.key(0))
  state, step = checkpointing.restore_state_only(workdir, abstract, step)
  return model, state, config, step


def load_dva(workdir, step: Optional[int] = None, ema: bool = True):
  """(model, params, config, step); `ema=True` gives the EMA weights (editing, evaluation)."""
  model, state, config, step = restore_dva_state(workdir, step)
  return model, (state.ema_params if ema else state.params), config, step


# ---------------------------------------------------------------------------
# Attribute classifier
# ---------------------------------------------------------------------------
class UnknownAttributeError(ValueError):
  """The attribute is not one the classifier (or editor) knows; the message lists valid names."""


@dataclasses.dataclass
class Classifier:
  """Linear attribute classifiers on normalised z_id: logits = ((z - mean) / std) @ weight + bias.

  ``weight``/``bias`` are the probe (the reference's ``classifier.*``);
  ``ema_weight``/``ema_bias`` its EMA copy when known (``ema_classifier.*``).
  ``edit_weights`` names the set that ``direction``, ``logits`` and ``edit`` use:
  ``'classifier'`` (the reference's choice for edits) or ``'ema'``.
  """

  names: list
  weight: np.ndarray  # (D, A)
  bias: np.ndarray  # (A,)
  mean: np.ndarray  # (D,)
  std: np.ndarray  # (D,)
  auc: np.ndarray  # (A,) test AUC (NaN: undefined)
  path: Optional[str] = None
  ema_weight: Optional[np.ndarray] = None  # (D, A)
  ema_bias: Optional[np.ndarray] = None  # (A,)
  edit_weights: str = "classifier"

  def __post_init__(self):
    if self.edit_weights not in EDIT_WEIGHTS:
      raise ValueError(f"edit_weights must be one of {EDIT_WEIGHTS}, got {self.edit_weights!r}")
    if self.edit_weights == "ema" and (self.ema_weight is None or self.ema_bias is None):
      raise ValueError("edit_weights='ema' needs ema_weight and ema_bias")

  @property
  def dim(self) -> int:
    return int(self.weight.shape[0])

  @property
  def edit_weight(self) -> np.ndarray:
    """(D, A): the weights edits and logits use (``edit_weights``)."""
    return self.ema_weight if self.edit_weights == "ema" else self.weight

  @property
  def edit_bias(self) -> np.ndarray:
    return self.ema_bias if self.edit_weights == "ema" else self.bias

  def index(self, attribute: str) -> int:
    try:
      return list(self.names).index(attribute)
    except ValueError:
      raise UnknownAttributeError(
          f"unknown attribute {attribute!r}; valid attributes: {', '.join(self.names)}"
      ) from None

  def direction(self, attribute: str) -> np.ndarray:
    """The weight column of ``attribute`` (in normalised z space), (D,)."""
    return np.asarray(self.edit_weight[:, self.index(attribute)], np.float64)

  def logits(self, z_id) -> np.ndarray:
    z = np.asarray(z_id, np.float64)
    return ((z - self.mean) / self.std) @ self.edit_weight + self.edit_bias

  def edit(self, z_id, attribute: str, strength: float) -> np.ndarray:
    """docs/design.md's edit ``l2norm(denorm(norm(z) + s·√D·w/‖w‖))``: (D,) or (N, D) -> f32.

    Computed in float64 with ``models.editor.classifier_edit``; ``w`` is the
    weight column of ``attribute`` (from ``edit_weights``). Raises
    ``UnknownAttributeError``. Its signature is that of every
    ``edit_fn(z, attribute, strength)``.
    """
    z = np.asarray(z_id, np.float64)
    if z.shape[-1] != self.dim:
      raise ValueError(
          f"z_id has width {z.shape[-1]} but the classifier was trained on {self.dim}-d "
          "features (dlib 128 / ArcFace 512): use a classifier of the same path"
      )
    direction = editor_lib.edit_direction(self.direction(attribute))
    edited = editor_lib.classifier_edit(
        z, direction, float(strength), self.mean, self.std, normalize=True
    )
    return edited.astype(np.float32)


def classifier_path(directory) -> pathlib.Path:
  """``classifier.npz`` of a classifier workdir, or the given file itself."""
  p = pathlib.Path(directory)
  return p / CLASSIFIER_FILE if p.is_dir() or not p.suffix else p


def load_classifier(directory) -> Classifier:
  """Loads ``classifier.npz`` from a classifier workdir (or the npz path itself)."""
  f = classifier_path(directory)
  if not f.exists():
    raise FileNotFoundError(
        f"no classifier at {f}; train one with `python -m s3jax.train --config "
        f"configs/celebahq_classifier.py:demo --workdir {f.parent}` (or pass --classifier)"
    )
  with np.load(f, allow_pickle=False) as z:
    missing = set(CLASSIFIER_KEYS) - set(z.files)
    if missing:
      raise ValueError(f"{f} lacks {sorted(missing)}")
    has_ema = "ema_weight" in z.files and "ema_bias" in z.files
    return Classifier(
        names=[str(n) for n in z["names"]],
        weight=np.asarray(z["weight"], np.float64),
        bias=np.asarray(z["bias"], np.float64),
        mean=np.asarray(z["mean"], np.float64),
        std=np.asarray(z["std"], np.float64),
        auc=np.asarray(z["auc"], np.float64),
        path=str(f),
        ema_weight=np.asarray(z["ema_weight"], np.float64) if has_ema else None,
        ema_bias=np.asarray(z["ema_bias"], np.float64) if has_ema else None,
        edit_weights=str(z["edit_weights"]) if "edit_weights" in z.files else "classifier",
    )


def save_classifier(
    path,
    names,
    weight,
    bias,
    mean,
    std,
    auc,
    ema_weight=None,
    ema_bias=None,
    edit_weights: str = "classifier",
) -> None:
  """Writes the classifier file (float32), atomically.

  Always ``CLASSIFIER_KEYS``; ``ema_weight``/``ema_bias`` (D, A)/(A,) and
  ``edit_weights`` only when an EMA copy is given, so files without one read
  as before.
  """
  names = np.asarray([str(n) for n in names])
  weight = np.asarray(weight, np.float32)
  d, a = weight.shape
  if len(names) != a:
    raise ValueError(f"{len(names)} names for {a} weight columns")
  if edit_weights not in EDIT_WEIGHTS:
    raise ValueError(f"edit_weights must be one of {EDIT_WEIGHTS}, got {edit_weights!r}")
  if (ema_weight is None) != (ema_bias is None):
    raise ValueError("give both ema_weight and ema_bias, or neither")
  if edit_weights == "ema" and ema_weight is None:
    raise ValueError("edit_weights='ema' needs ema_weight and ema_bias")
  arrays = dict(
      names=names,
      weight=weight,
      bias=np.asarray(bias, np.float32).reshape(a),
      mean=np.asarray(mean, np.float32).reshape(d),
      std=np.asarray(std, np.float32).reshape(d),
      auc=np.asarray(auc, np.float32).reshape(a),
  )
  if ema_weight is not None:
    ema_weight = np.asarray(ema_weight, np.float32)
    if ema_weight.shape != (d, a):
      raise ValueError(f"ema_weight has shape {ema_weight.shape}, weight {(d, a)}")
    arrays.update(
        ema_weight=ema_weight,
        ema_bias=np.asarray(ema_bias, np.float32).reshape(a),
        edit_weights=np.asarray(edit_weights),
    )
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **arrays)
  tmp.replace(path)


# ---------------------------------------------------------------------------
# Identity stand-in
# ---------------------------------------------------------------------------
def load_id_standin(workdir, step: Optional[int] = None):
  """(IdentityNet, params, report) of an ``id_standin`` workdir (EMA-free: plain params)."""
  step = checkpointing.latest_step(workdir) if step is None else int(step)
  config = checkpointing.read_config(workdir, step)
  model = id_standin.make_identity_net(config.model)
  state = checkpointing.restore_saved_state(workdir, step)
  params = jax.tree.map(jnp.asarray, state["params"])
  checkpointing.check_tree_matches(
      jax.eval_shape(lambda r: id_standin.init_params(model, r), jax.random.key(0)),
      params,
      what=f"identity stand-in {workdir} step {step}",
  )
  report_path = pathlib.Path(workdir) / id_standin.REPORT_FILE
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  return model, params, report


# ---------------------------------------------------------------------------
# S3Editor
# ---------------------------------------------------------------------------
def save_editor_meta(
    directory,
    pool_names,
    stats,
    region_of_landmark,
    attr_targets,
    mean_landmarks,
    hparams: dict,
    holdout_names=(),
    holdout_directions=None,
    holdout_targets=None,
) -> None:
  """What ``load_editor`` needs besides the checkpoint: the pool, directions, clusters, and
  the attributes held out of self-training (their directions and target regions)."""
  d_dim = np.asarray(stats.directions).shape[1]
  r_dim = np.asarray(attr_targets).shape[1]
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  np.savez(
      d / EDITOR_META_FILE,
      names=np.asarray(pool_names),
      mean=np.asarray(stats.mean),
      std=np.asarray(stats.std),
      directions=np.asarray(stats.directions),
      assignments=np.asarray(stats.assignments),
      centroids=np.asarray(stats.centroids),
      region_of_landmark=np.asarray(region_of_landmark),
      attr_targets=np.asarray(attr_targets),
      mean_landmarks=np.asarray(mean_landmarks),
      hparams=np.asarray(json.dumps(hparams)),
      holdout_names=np.asarray([str(n) for n in holdout_names], dtype=str),
      holdout_directions=np.asarray(
          np.zeros((0, d_dim)) if holdout_directions is None else holdout_directions, np.float32
      ),
      holdout_targets=np.asarray(
          np.zeros((0, r_dim)) if holdout_targets is None else holdout_targets, bool
      ),
  )


def load_editor_meta(directory) -> dict:
  """The arrays ``save_editor_meta`` wrote; ``names`` as a list, ``hparams`` as a dict."""
  d = pathlib.Path(directory)
  meta_path = d / EDITOR_META_FILE
  if not meta_path.exists():
    raise FileNotFoundError(
        f"no S3Editor at {d} ({EDITOR_META_FILE} missing); train one with `python -m s3jax.train "
        f"--config configs/s3editor.py:demo --workdir {d}`"
    )
  with np.load(meta_path, allow_pickle=False) as f:
    meta = {k: f[k] for k in f.files}
  meta["hparams"] = json.loads(str(meta["hparams"]))
  meta["names"] = [str(n) for n in meta["names"]]
  # Written before held-out attributes existed: none.
  meta["holdout_names"] = [str(n) for n in meta.get("holdout_names", ())]
  meta.setdefault("holdout_directions", np.zeros((0, meta["directions"].shape[1]), np.float32))
  meta.setdefault("holdout_targets", np.zeros((0, meta["attr_targets"].shape[1]), bool))
  return meta


EditFn = Callable[[np.ndarray, str, float], np.ndarray]


def load_editor(directory, step: Optional[int] = None, ema: bool = True) -> EditFn:
  """``edit_fn(z_id (N, D), attribute: str, strength: float) -> (N, D)`` from a trained run.

  ``directory`` is an s3editor workdir (``editor_meta.npz`` + checkpoints).
  The edit is ``T_k(denorm(norm(z_id) + strength * d_a))`` with the run's
  directions, clusters and routing (L2-normalised when the run was). The
  function carries ``.attributes`` (the pool) and ``.step``.

  A GAN-backbone run (``s3editor_gan``; its hparams hold ``latent_shape``
  ``(num_ws, w_dim)``) edits W+: ``edit_fn(w_plus (N, num_ws, w_dim), attribute,
  strength) -> (N, num_ws, w_dim)``, ``T_k(w + strength * d_a)`` on the flattened W+ with
  ``d_a`` the attribute's direction on every layer (strength in STIT's units: its
  InterFaceGAN edit ``w + (factor / 2) * d`` is strength = factor / 2).
  """
  d = pathlib.Path(directory)
  meta = load_editor_meta(d)
  hp = meta["hparams"]
  names = meta["names"]
  stats = editor_lib.EditStats(
      mean=jnp.asarray(meta["mean"]),
      std=jnp.asarray(meta["std"]),
      directions=jnp.asarray(meta["directions"]),
      assignments=jnp.asarray(meta["assignments"]),
      centroids=jnp.asarray(meta["centroids"]),
  )
  editor = editor_lib.Editor(
      num_clusters=hp["num_clusters"],
      num_regions=hp["num_regions"],
      neurons_per_region=hp["neurons_per_region"],
      routing=hp["routing"],
      temperature=hp["temperature"],
      normalize_output=hp["normalize_output"],
  )
  step = checkpointing.latest_step(d) if step is None else int(step)
  state = checkpointing.restore_saved_state(d, step)
  params = jax.tree.map(jnp.asarray, state["ema_params" if ema else "params"]["editor"])

  held = meta["holdout_names"]

  @jax.jit
  def apply(z, a, s):
    # `a`: an attribute index of the pool, or a held-out attribute's direction (routed to
    # the cluster of the nearest centroid).
    return editor.apply({"params": params}, z, a, s, stats=stats)

  latent_shape = tuple(int(v) for v in hp.get("latent_shape", ()))

  def edit_fn(z_id, attribute: str, strength: float):
    z = jnp.asarray(z_id, jnp.float32)
    if latent_shape:  # W+ (N, num_ws, w_dim): the transformations act on it flattened
      if z.shape[1:] != latent_shape:
        want = ", ".join(str(v) for v in latent_shape)
        raise ValueError(f"this editor edits (N, {want}) latents (W+), got {z.shape}")
      z = z.reshape(z.shape[0], -1)
    if attribute in names:
      out = apply(z, jnp.int32(names.index(attribute)), jnp.float32(strength))
    elif attribute in held:
      direction = jnp.asarray(meta["holdout_directions"][held.index(attribute)])
      out = apply(z, direction, jnp.float32(strength))
    else:
      raise UnknownAttributeError(
          f"unknown attribute {attribute!r}; the S3Editor's pool: {', '.join(names)}"
          + (f"; held out: {', '.join(held)}" if held else "")
      )
    return out.reshape(out.shape[0], *latent_shape) if latent_shape else out

  edit_fn.attributes = tuple(names)
  edit_fn.held_out = tuple(held)
  edit_fn.latent_shape = latent_shape  # () for z_id; (num_ws, w_dim) for a GAN run's W+
  edit_fn.step = step
  edit_fn.params = params
  return edit_fn
