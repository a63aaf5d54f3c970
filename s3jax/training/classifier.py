"""The attribute-classifier trainer: linear classifiers on the normalised z_id (BCE).

docs/design.md "Classifier editing": one linear classifier per attribute on
``(z_id - mean) / std``, trained with binary cross-entropy; the edit direction
of an attribute is its weight column (``s3jax.loading.Classifier.edit``). ``mean`` and
``std`` are the train split's per-dimension statistics. Works on any z_id
width: 128 (dlib descriptor) or 512 (ArcFace), taken from the records.

Outputs, written by ``write_samples`` (every ``sample_every`` steps and at the
last step) into the workdir:

* ``classifier.npz`` -- ``names`` (A,) str, ``weight`` (D, A) f32, ``bias`` (A,)
  f32, ``mean`` (D,) f32, ``std`` (D,) f32, ``auc`` (A,) f32 (test split; NaN
  when the test split holds one class only). Logits are
  ``((z - mean) / std) @ weight + bias``.
* ``classifier.json`` -- per-attribute test/train AUC, positive rates, the
  label source (and the measured-label thresholds), sizes, step.

Labels: ``data.labels='attributes'`` uses the records' 40 CelebA-HQ labels
({-1, 1}); ``'measured'`` computes ``MEASURED_ATTRIBUTES`` from each aligned
frame (see ``configs/celebahq_classifier.py`` for what they are).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata

from s3jax import checkpointing, input_pipeline, loading, optim
from s3jax.checkpointing import TrainState, new_train_state
from s3jax.models.autoencoder import id_dim
from s3jax.training import state as state_lib

MEASURED_ATTRIBUTES = ("Bright_Face", "Warm_Tint", "Lit_From_Left", "Mouth_Wide", "Eyes_Open")
STD_FLOOR = 1e-6


# ---------------------------------------------------------------------------
# Measured labels
# ---------------------------------------------------------------------------
def _eye_aspect_ratio(eye: np.ndarray) -> float:
  """(|p1-p5| + |p2-p4|) / (2 |p0-p3|) over the 6 dlib eye points."""
  v = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
  return float(v / max(2.0 * np.linalg.norm(eye[0] - eye[3]), 1e-6))


def measure_properties(image: np.ndarray, mask: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """The raw values behind ``MEASURED_ATTRIBUTES`` for one aligned frame.

  image (H, W, 3) uint8 RGB, mask (H, W) or (H, W, 1) face mask (>0 = face),
  landmarks (68, 2) crop pixel coordinates. Returns (5,) float64.
  """
  img = np.asarray(image, np.float64)
  m = np.asarray(mask).reshape(img.shape[:2]) > 0
  if not m.any():
    m = np.ones(img.shape[:2], bool)
  lm = np.asarray(landmarks, np.float64)
  luma = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
  bright = luma[m].mean()
  warm = (img[..., 0] - img[..., 2])[m].mean()
  split = lm[27:31, 0].mean()
  xs = np.arange(img.shape[1])[None, :].repeat(img.shape[0], 0)
  left, right = m & (xs < split), m & (xs >= split)
  lit_left = (luma[left].mean() if left.any() else bright) - (
      luma[right].mean() if right.any() else bright
  )
  eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
  iod = max(np.linalg.norm(eye_r - eye_l), 1e-6)
  mouth = np.linalg.norm(lm[54] - lm[48]) / iod
  ear = 0.5 * (_eye_aspect_ratio(lm[36:42]) + _eye_aspect_ratio(lm[42:48]))
  return np.array([bright, warm, lit_left, mouth, ear], np.float64)


def otsu_threshold(values) -> float:
  """Otsu's threshold of 1-D values: the cut maximising the between-class variance.

  Candidates are midpoints between consecutive distinct sorted values; with a
  single distinct value the value itself is returned.
  """
  v = np.sort(np.asarray(values, np.float64))
  uniq = np.unique(v)
  if len(uniq) < 2:
    return float(uniq[0]) if len(uniq) else 0.0
  cuts = 0.5 * (uniq[1:] + uniq[:-1])
  best, best_cut = -1.0, cuts[0]
  n = len(v)
  for c in cuts:
    lo, hi = v[v <= c], v[v > c]
    w0, w1 = len(lo) / n, len(hi) / n
    between = w0 * w1 * (lo.mean() - hi.mean()) ** 2
    if between > best:
      best, best_cut = between, c
  return float(best_cut)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class FeatureSet:
  z: np.ndarray  # (N, D) float32 z_id
  y: np.ndarray  # (N, A) float32 in {0, 1}
  raw: np.ndarray | None  # (N, P) measured properties (measured labels only)


def read_split(data_dir, split: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
  """(z_id (N, D), labels) of a split: records' attributes ({-1,1}) or measured properties."""
  src = input_pipeline.open_split(data_dir, split)
  zs, ys = [], []
  for i in range(len(src)):
    rec = src[i]
    zs.append(np.asarray(rec["z_id"], np.float32))
    if labels == "attributes":
      if "attributes" not in rec:
        raise ValueError(
            f"{src.version_dir} ({split}) has no 'attributes' in its records; "
            "use data.labels='measured' or a data_prep.celebahq dataset"
        )
      ys.append(np.asarray(rec["attributes"], np.float64))
    elif labels == "measured":
      ys.append(
          measure_properties(
              input_pipeline.decode_image(rec["image"], 3),
              input_pipeline.decode_image(rec["mask"], 1),
              rec["landmarks"],
          )
      )
    else:
      raise ValueError(f"data.labels must be 'attributes' or 'measured', got {labels!r}")
  if not zs:
    raise ValueError(f"split {split!r} of {data_dir} is empty")
  return np.stack(zs), np.stack(ys)


def auc_score(scores, labels) -> float:
  """ROC AUC (Mann-Whitney, ties count 1/2); NaN if only one class is present."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels) > 0.5
  npos, nneg = int(y.sum()), int((~y).sum())
  if npos == 0 or nneg == 0:
    return float("nan")

  r = rankdata(s)
  return float((r[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


@dataclasses.dataclass(frozen=True)
class _Lookup:
  z: np.ndarray
  y: np.ndarray

  def __call__(self, i):
    return {"z_id": self.z[int(i)], "labels": self.y[int(i)]}


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------
class ClassifierTask:
  """Trainer task for `s3jax.training.loop.train` (see the module docstring)."""

  def __init__(self, config, mesh, workdir, features=None):
    """`features`: optional (train FeatureSet, test FeatureSet, names) to skip reading data."""
    self.config = config
    self.mesh = mesh
    self.workdir = pathlib.Path(workdir)
    self.meta = {}
    if features is None:
      features = self._load_features()
    self.train_set, self.test_set, self.names = features
    z = self.train_set.z
    self.dim = int(z.shape[1])
    self.mean = z.mean(0).astype(np.float32)
    self.std = np.maximum(z.std(0), STD_FLOOR).astype(np.float32)
    self.num_attributes = len(self.names)
    self.tx = optim.make_optimizer(config.optim)
    self.rng = jax.random.key(int(config.seed))

    self.abstract_state = jax.eval_shape(self._init)
    repl = state_lib.replicated(mesh)
    self.state_sharding = jax.tree.map(lambda _: repl, self.abstract_state)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state,
        self.state_sharding,
    )
    self.init_state = jax.jit(self._init, out_shardings=self.state_sharding)
    batch_sharding = state_lib.batch_sharding(mesh)
    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, batch_sharding),
        out_shardings=(self.state_sharding, repl),
        donate_argnums=0,
    )
    self.data_iterator = self._make_iterator()

  # -- data ------------------------------------------------------------------
  def _load_features(self):
    cfg = self.config
    data_dir = cfg.data.data_dir
    dva_workdir = cfg.get("dva_workdir", "")
    expected_dim = None
    if dva_workdir:
      dva_cfg = checkpointing.read_config(dva_workdir)
      if not data_dir:
        data_dir = dva_cfg.data.data_dir
      expected_dim = id_dim(dva_cfg.model)
      self.meta["dva_workdir"] = str(dva_workdir)
      self.meta["face_features"] = str(dva_cfg.model.face_features)
    if not data_dir:
      raise ValueError("config.data.data_dir is empty and no dva_workdir gives one")
    labels = cfg.data.labels
    splits = input_pipeline.available_splits(data_dir)
    test_split = cfg.data.test_split
    if test_split not in splits:
      logging.warning(
          "no %r split in %s; evaluating on %r", test_split, data_dir, cfg.data.train_split
      )
      test_split = cfg.data.train_split
    z_tr, v_tr = read_split(data_dir, cfg.data.train_split, labels)
    z_te, v_te = read_split(data_dir, test_split, labels)
    if expected_dim is not None and z_tr.shape[1] != expected_dim:
      raise ValueError(
          f"{data_dir} holds z_id of width {z_tr.shape[1]} but the DVA in "
          f"{dva_workdir} uses {expected_dim} ({self.meta['face_features']})"
      )
    if labels == "measured":
      names = list(MEASURED_ATTRIBUTES)
      thr = np.array([otsu_threshold(v_tr[:, k]) for k in range(v_tr.shape[1])])
      y_tr, y_te = (v_tr > thr).astype(np.float32), (v_te > thr).astype(np.float32)
      self.meta["thresholds"] = {n: float(t) for n, t in zip(names, thr)}
      raw_tr, raw_te = v_tr, v_te
    else:
      names = list(cfg.data.attribute_names)
      if len(names) != v_tr.shape[1]:
        raise ValueError(f"{len(names)} attribute names for {v_tr.shape[1]} labels")
      y_tr, y_te = (v_tr > 0).astype(np.float32), (v_te > 0).astype(np.float32)
      raw_tr = raw_te = None
    self.meta.update(data_dir=str(data_dir), labels=labels, test_split=test_split)
    return FeatureSet(z_tr, y_tr, raw_tr), FeatureSet(z_te, y_te, raw_te), names

  def _make_iterator(self):
    n = len(self.train_set.z)
    pc, pi = jax.process_count(), jax.process_index()
    gb = int(self.config.data.batch_size)
    if gb % pc:
      raise ValueError(f"data.batch_size={gb} is not divisible by {pc} processes")
    ds = grain.MapDataset.range(n).shuffle(seed=int(self.config.data.shuffle_seed)).repeat(None)
    ds = ds[pi::pc].map(_Lookup(self.train_set.z, self.train_set.y))
    return iter(ds.to_iter_dataset().batch(gb // pc, drop_remainder=True))

  def global_batch(self, batch):
    local = {k: np.asarray(batch[k], np.float32) for k in ("z_id", "labels")}
    return input_pipeline.to_global_arrays(local, self.mesh)

  # -- model -----------------------------------------------------------------
  def _init(self):
    params = {
        "weight": jnp.zeros((self.dim, self.num_attributes), jnp.float32),
        "bias": jnp.zeros((self.num_attributes,), jnp.float32),
    }
    return new_train_state(params, self.tx)

  def logits(self, params, z):
    zn = (z - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return zn @ params["weight"] + params["bias"]

  def _train_step(self, state: TrainState, batch):
    def loss_fn(params):
      logits = self.logits(params, batch["z_id"])
      loss = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()
      acc = jnp.mean((logits > 0) == (batch["labels"] > 0.5))
      return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, tail = state_lib.apply_gradients(
        state, grads, loss, self.tx, float(self.config.get("ema_decay", 0.0))
    )
    return new_state, {"loss": loss, "accuracy": acc, "finite": tail["finite"]}

  # -- evaluation and export -------------------------------------------------
  def evaluate(self, params) -> dict:
    """Per-attribute AUC (test and train) of ``params`` (host numpy)."""
    w = np.asarray(jax.device_get(params["weight"]), np.float64)
    b = np.asarray(jax.device_get(params["bias"]), np.float64)

    def scores(z):
      return ((z - self.mean) / self.std) @ w + b

    s_te, s_tr = scores(self.test_set.z), scores(self.train_set.z)
    out = {}
    for k, name in enumerate(self.names):
      out[name] = {
          "auc": auc_score(s_te[:, k], self.test_set.y[:, k]),
          "train_auc": auc_score(s_tr[:, k], self.train_set.y[:, k]),
          "test_positive_rate": float(self.test_set.y[:, k].mean()),
          "train_positive_rate": float(self.train_set.y[:, k].mean()),
          "test_accuracy": float(np.mean((s_te[:, k] > 0) == (self.test_set.y[:, k] > 0.5))),
      }
    return out

  def export(self, params, step: int) -> dict:
    """Writes classifier.npz and classifier.json; returns the json content."""
    per = self.evaluate(params)
    auc = np.array([per[n]["auc"] for n in self.names], np.float32)
    loading.save_classifier(
        self.workdir / "classifier.npz",
        self.names,
        jax.device_get(params["weight"]),
        jax.device_get(params["bias"]),
        self.mean,
        self.std,
        auc,
    )
    finite = auc[np.isfinite(auc)]
    summary = {
        "step": int(step),
        "names": list(self.names),
        "dim": self.dim,
        "num_train": int(len(self.train_set.z)),
        "num_test": int(len(self.test_set.z)),
        "mean_auc": float(finite.mean()) if len(finite) else None,
        "attributes": {
            n: {
                k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in d.items()
            }
            for n, d in per.items()
        },
        **self.meta,
    }
    (self.workdir / "classifier.json").write_text(json.dumps(summary, indent=2))
    return summary

  def write_samples(self, state, step, writer):
    params = state.ema_params
    summary = self.export(params, step) if jax.process_index() == 0 else None
    if summary is not None:
      scalars = {
          f"auc/{n}": d["auc"] for n, d in summary["attributes"].items() if d["auc"] is not None
      }
      if summary["mean_auc"] is not None:
        scalars["auc/mean"] = summary["mean_auc"]
      writer.write_scalars(step, scalars)
      logging.info(
          "classifier step %d: mean test AUC %s; wrote %s",
          step,
          summary["mean_auc"],
          self.workdir / "classifier.npz",
      )
