"""Golden-vector check of STIT's InterFaceGAN editor (``golden/stit/latent_edit_io.npz``).

``check(golden_dir, backend='jax')`` returns ``{'name', 'rel_err', 'tol', 'ok'}`` rows for
``direction`` (row 0 of ``direction_file``, :func:`s3jax.gan_edit.interfacegan_direction`),
``factors`` (``edit_factors(config['edit_range'])``) and ``w_edits``
(:func:`s3jax.gan_edit.interfacegan_edits`), each with ``||out - ref|| / ||ref|| <= 1e-12``.
The edit is computed in **numpy float64**, as the reference computes it in torch (float32 w +
float64 direction); a row is also failed when an output is not float64. ``backend`` is
accepted for the common ``check`` signature: the math is numpy whichever backend is named.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from s3jax import gan_edit
from s3jax.parity.unet import rel_row

IO_FILE = "latent_edit_io.npz"
TOL = 1e-12


def float64_row(name, out, ref) -> dict:
  row = rel_row(name, out, ref, TOL)
  if np.asarray(out).dtype != np.float64:
    row.update(ok=False, error=f"dtype {np.asarray(out).dtype}, the reference's is float64")
  return row


BACKENDS = ("jax",)  # numpy float64 math, as the reference does


def check(golden_dir, backend: str = "jax") -> list[dict]:
  if backend not in ("jax", "torch"):
    raise ValueError(f"backend must be 'jax' or 'torch', got {backend!r}")
  with np.load(pathlib.Path(golden_dir) / IO_FILE, allow_pickle=False) as z:
    io = {k: z[k] for k in z.files}
  config = json.loads(str(io["config"]))
  direction = gan_edit.interfacegan_direction(io["direction_file"])
  factors = gan_edit.edit_factors(config["edit_range"])
  w_edits = gan_edit.interfacegan_edits(io["w_pivots"], direction, factors)
  return [
      float64_row("direction", direction, io["direction"]),
      float64_row("factors", factors, io["factors"]),
      float64_row("w_edits", w_edits, io["w_edits"]),
  ]
