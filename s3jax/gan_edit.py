"""STIT's latent editor: InterFaceGAN directions added to W+ (``editings/latent_editor.py``).

The reference (``LatentEditor.get_interfacegan_edits``) loads ``editings/w_directions/*.npy``
(float64, (18, 512), every row the same unit vector), keeps row 0 as a (1, 512) direction
and, for every ``factor in np.linspace(*edit_range)``, returns

    w_edit = w + (factor / 2) * direction

Two things a port gets wrong:

* the **factor is halved**: ``_apply_interfacegan(w, direction, factor / 2)``;
* the **sum is float64**: ``w`` is float32 and the direction float64, so torch promotes the
  edit to float64. STIT passes that tensor to the generator (which casts it to float32) and to
  the stitching tuning. The functions here compute in numpy, whose promotion is the same, so
  edits match the reference bit for bit; cast to float32 where a JAX generator takes them.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

DEFAULT_EDIT_RANGE = (2, 20, 10)  # STIT's --edit_range default: np.linspace(2, 20, 10)


def interfacegan_direction(direction_file: np.ndarray) -> np.ndarray:
  """The direction the editor keeps from a direction file's array: row 0, shape (1, w_dim).

  The dtype is kept (the shipped files are float64). Later rows are ignored, as in the
  reference; a warning is logged when they differ from row 0.
  """
  a = np.asarray(direction_file)
  if a.ndim != 2 or a.shape[0] < 1 or not np.issubdtype(a.dtype, np.floating):
    raise ValueError(
        f"an InterFaceGAN direction is a float (num_ws, w_dim) array, e.g. (18, 512); got "
        f"{a.dtype} {a.shape}"
    )
  if not np.array_equal(a, np.broadcast_to(a[:1], a.shape)):
    logging.warning("InterFaceGAN direction rows differ; only row 0 is used, as in STIT")
  return a[0, None].copy()


def load_interfacegan_direction(path) -> np.ndarray:
  """Read a STIT ``w_directions/*.npy`` file: row 0 as (1, w_dim), float64 for shipped files."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"InterFaceGAN direction file not found: {path}")
  try:
    a = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"{path}: not a plain .npy array ({e})") from e
  try:
    return interfacegan_direction(a)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def edit_factors(edit_range=DEFAULT_EDIT_RANGE) -> np.ndarray:
  """``np.linspace(*edit_range)``: STIT's edit factors (float64), before the halving."""
  start, stop, num = edit_range
  return np.linspace(start, stop, int(num))


def interfacegan_edits(w_pivots, direction, factors) -> np.ndarray:
  """``w + (factor / 2) * direction`` for every factor: (len(factors), *w_pivots.shape).

  ``w_pivots`` (..., num_ws, w_dim) and ``direction`` (1, w_dim); the direction is added to
  every layer. Computed in numpy with the reference's promotion (float32 w + float64
  direction -> float64) and its order of operations (the scaled direction first).
  """
  w = np.asarray(w_pivots)
  d = np.asarray(direction)
  if d.ndim != 2 or d.shape[0] != 1 or d.shape[1] != w.shape[-1]:
    raise ValueError(f"direction must be (1, {w.shape[-1]}), got {d.shape}")
  return np.stack([w + (f / 2) * d for f in np.asarray(factors)])
