"""Golden-vector check of the frozen face encoders (``golden/dva/encoders_*.npz``).

``check(golden_dir, backend='jax'|'torch')`` returns one dict per output:
``{'name', 'rel_err', 'tol', 'ok'}``. ``id_feats``, ``lnd_feats`` and ``z_face`` use
``||out - ref|| / ||ref||`` (tol 1e-4); ``face_mask`` and ``face_mask_video`` use the
fraction of differing pixels (tol 0.001). ``z_face = cat(id, lnd) @ W.T + b`` with the
golden ``linear.*`` weights (the fusion layer itself lives in the DVA model).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import numpy as np

from s3jax.models.face_encoders import OfficialEncoders
from s3jax.porting.encoder_keys import encoders_params_from_torch
from s3jax.porting.state_dict import load_state_dict

# The torch backend needs torch, an optional extra (pip install s3jax[torch]): it and the
# PyTorch twin are imported inside `run_torch` only.

STATE_DICT_FILE = "encoders_state_dict.npz"
IO_FILE = "encoders_io.npz"
FEATURE_TOL = 1e-4
MASK_TOL = 1e-3
FEATURES = ("id_feats", "lnd_feats", "z_face")
MASKS = ("face_mask", "face_mask_video")


def load_golden_state_dict(path) -> dict[str, np.ndarray]:
  """The golden encoders' state dict (q::/s::/f:: encoded npz) as float32 numpy arrays."""
  return load_state_dict(path)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def mask_diff(out, ref) -> float:
  return float(np.mean(np.asarray(out) != np.asarray(ref)))


def z_face(id_feats, lnd_feats, sd) -> np.ndarray:
  feats = np.concatenate([np.asarray(id_feats), np.asarray(lnd_feats)], axis=1)
  return feats @ np.asarray(sd["linear.weight"]).T + np.asarray(sd["linear.bias"])


@functools.lru_cache(maxsize=2)
def _jax_forward(dtype: str = "float32"):
  return jax.jit(OfficialEncoders(dtype=dtype).apply)


def run_jax(sd: dict, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """JAX outputs in the golden (NCHW) layout."""
  variables = encoders_params_from_torch(sd)
  out = _jax_forward()(variables, np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
  res = {k: np.asarray(v) for k, v in out.items()}
  for k in MASKS:
    res[k] = res[k].transpose(0, 3, 1, 2)
  res["z_face"] = z_face(res["id_feats"], res["lnd_feats"], sd)
  return res


def run_torch(sd: dict, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  import torch  # Lazy: optional extra.

  from s3jax.torch_twin.encoders import load_official_encoders  # imports torch

  model = load_official_encoders(sd, with_linear=True)
  with torch.no_grad():
    out = model(torch.as_tensor(x_nchw))
  return {k: v.numpy() for k, v in out.items()}


def compare(outputs: dict[str, Any], io: dict[str, Any]) -> list[dict]:
  rows = []
  for name in FEATURES:
    e = rel_err(outputs[name], io[name])
    rows.append({"name": name, "rel_err": e, "tol": FEATURE_TOL, "ok": bool(e <= FEATURE_TOL)})
  for name in MASKS:
    e = mask_diff(outputs[name], io[name])
    rows.append({"name": name, "rel_err": e, "tol": MASK_TOL, "ok": bool(e <= MASK_TOL)})
  return rows


BACKENDS = ("jax", "torch")


def check(golden_dir, backend: str = "jax") -> list[dict]:
  """Run the encoders on ``encoders_io.npz['x']`` and compare with the golden outputs."""
  golden_dir = pathlib.Path(golden_dir)
  sd = load_golden_state_dict(golden_dir / STATE_DICT_FILE)
  with np.load(golden_dir / IO_FILE) as z:
    io = {k: z[k] for k in z.files}
  if backend == "jax":
    outputs = run_jax(sd, io["x"])
  elif backend == "torch":
    outputs = run_torch(sd, io["x"])
  else:
    raise ValueError(f"backend must be 'jax' or 'torch', got {backend!r}")
  return compare(outputs, io)
