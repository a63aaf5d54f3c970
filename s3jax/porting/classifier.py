"""Import the reference DVA's CelebA-HQ attribute classifier (a Lightning ``ClsModel`` checkpoint).

The reference's classifier module holds, in its state dict:

- ``conds_mean``, ``conds_std`` (1, D): the z_id statistics it normalises with;
- ``classifier.weight`` (A, D), ``classifier.bias`` (A,): the linear probe, which the
  reference's edit uses (``editing_classifier.py`` reads ``classifier.weight``);
- ``ema_classifier.weight``, ``ema_classifier.bias``: its EMA copy, not used by edits.

Rows follow ``CelebAttrDataset.id_to_cls`` (``ID_TO_CLS``). Anything else in the file (the
autoencoder copies ``model.*``/``ema_model.*`` of some versions, optimizer state) is ignored.
Torch files are read with ``torch.load(weights_only=True)`` only, so a checkpoint whose pickle
would run code is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Optional

import numpy as np

from s3jax import loading
from s3jax.models.editor import CELEBA_ATTRIBUTES
from s3jax.porting import state_dict as state_dict_lib
from s3jax.porting.state_dict import StateDictError

# The reference's CelebAttrDataset.id_to_cls: the classifier's row order (row 31 is Smiling).
ID_TO_CLS = tuple(CELEBA_ATTRIBUTES)
STAT_KEYS = ("conds_mean", "conds_std")
PROBE_KEYS = {"classifier": ("classifier.weight", "classifier.bias")}
PROBE_KEYS["ema"] = tuple("ema_" + k for k in PROBE_KEYS["classifier"])
REQUIRED_KEYS = STAT_KEYS + PROBE_KEYS["classifier"]
CLASSIFIER_KEYS = REQUIRED_KEYS + PROBE_KEYS["ema"]


class ClassifierImportError(StateDictError):
  """The file does not hold a usable reference classifier; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
  path: pathlib.Path
  num_attributes: int
  dim: int
  edit_weights: str
  has_ema: bool
  ignored_keys: int
  epoch: Optional[int]
  global_step: Optional[int]


def read_classifier_state(path) -> tuple[dict[str, np.ndarray], int, dict]:
  """(classifier arrays, number of ignored keys, {'epoch', 'global_step'}) of a checkpoint.

  Reads what ``state_dict.read_state_dict`` reads; unlike ``load_state_dict`` it keeps the
  top-level classifier keys of a file that also holds ``model.*``/``ema_model.*`` (which
  it ignores, like any other key).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"classifier checkpoint not found: {path}")
  sd, meta = state_dict_lib.read_state_dict(path)
  arrays = {k: np.asarray(sd[k], np.float32) for k in CLASSIFIER_KEYS if k in sd}
  return arrays, len(sd) - len(arrays), meta


def check_classifier_state(sd: Mapping[str, np.ndarray], path="the checkpoint") -> int:
  """Validates keys, shapes and values of the classifier arrays; returns the z_id width D."""
  missing = [k for k in REQUIRED_KEYS if k not in sd]
  if missing:
    raise ClassifierImportError(
        f"{path}: missing {', '.join(missing)}; a reference classifier checkpoint holds "
        f"{', '.join(CLASSIFIER_KEYS)}"
    )
  ema = [k for k in PROBE_KEYS["ema"] if k in sd]
  if len(ema) == 1:
    raise ClassifierImportError(f"{path}: has {ema[0]} but not its partner")
  mean = sd["conds_mean"]
  d = mean.shape[-1] if mean.ndim else 0
  a = len(ID_TO_CLS)
  expect = {"conds_mean": (1, d), "conds_std": (1, d)}
  for which in ("classifier", "ema"):
    w, b = PROBE_KEYS[which]
    expect.update({w: (a, d), b: (a,)})
  for k, v in sd.items():
    ok = v.shape == expect[k] or (k in STAT_KEYS and v.shape == (d,))
    if not ok or d == 0:
      raise ClassifierImportError(
          f"{path}: {k} has shape {v.shape}, expected {expect[k]} ({a} CelebA attributes, "
          f"z_id width from conds_mean)"
      )
    if not np.all(np.isfinite(v)):
      raise ClassifierImportError(f"{path}: {k} holds non-finite values")
  if np.any(sd["conds_std"] <= 0):
    raise ClassifierImportError(f"{path}: conds_std has entries <= 0")
  return int(d)


def classifier_from_state(
    sd: Mapping[str, np.ndarray], edit_weights: str = "classifier", path="the checkpoint"
) -> loading.Classifier:
  """A ``loading.Classifier`` (weights transposed to (D, A), AUC unknown) of checked arrays."""
  d = check_classifier_state(sd, path)
  if edit_weights not in loading.EDIT_WEIGHTS:
    raise ValueError(f"edit_weights must be one of {loading.EDIT_WEIGHTS}, got {edit_weights!r}")
  has_ema = PROBE_KEYS["ema"][0] in sd
  if edit_weights == "ema" and not has_ema:
    raise ClassifierImportError(f"{path}: no ema_classifier.* keys to edit with (--weights ema)")
  ema_w, ema_b = PROBE_KEYS["ema"]
  return loading.Classifier(
      names=list(ID_TO_CLS),
      weight=np.asarray(sd["classifier.weight"], np.float64).T,
      bias=np.asarray(sd["classifier.bias"], np.float64),
      mean=np.asarray(sd["conds_mean"], np.float64).reshape(d),
      std=np.asarray(sd["conds_std"], np.float64).reshape(d),
      auc=np.full(len(ID_TO_CLS), np.nan),
      ema_weight=np.asarray(sd[ema_w], np.float64).T if has_ema else None,
      ema_bias=np.asarray(sd[ema_b], np.float64) if has_ema else None,
      edit_weights=edit_weights,
  )


def import_classifier(
    src, out, edit_weights: str = "classifier", overwrite: bool = False
) -> ImportResult:
  """Reference classifier checkpoint ``src`` -> ``classifier.npz`` in ``out`` (dir or .npz).

  ``edit_weights`` picks the probe that edits use: ``'classifier'`` (the reference's
  choice) or ``'ema'``; both sets are stored when the file has the EMA copy.
  """
  dest = loading.classifier_path(out)
  if dest.exists() and not overwrite:
    raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
  sd, ignored, meta = read_classifier_state(src)
  clf = classifier_from_state(sd, edit_weights, path=src)
  loading.save_classifier(
      dest,
      clf.names,
      clf.weight,
      clf.bias,
      clf.mean,
      clf.std,
      clf.auc,
      ema_weight=clf.ema_weight,
      ema_bias=clf.ema_bias,
      edit_weights=clf.edit_weights,
  )
  return ImportResult(
      path=dest,
      num_attributes=len(clf.names),
      dim=clf.dim,
      edit_weights=clf.edit_weights,
      has_ema=clf.ema_weight is not None,
      ignored_keys=ignored,
      epoch=meta.get("epoch"),
      global_step=meta.get("global_step"),
  )
