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

import numpy as np

STATE_DICT_FILE = "encoders_state_dict.npz"
IO_FILE = "encoders_io.npz"
FEATURE_TOL = 1e-4
MASK_TOL = 1e-3
FEATURES = ("id_feats", "lnd_feats", "z_face")
MASKS = ("face_mask", "face_mask_video")


def _read_golden_npz(path) -> dict[str, np.ndarray]:
  """Fallback reader of the golden encoding (q::KEY int8 * s::KEY scale, f::KEY raw)."""
  z = np.load(path)
  out = {}
  for f in z.files:
    kind, key = f.split("::", 1)
    if kind == "q":
      out[key] = z[f].astype(np.float32) * np.float32(z["s::" + key])
    elif kind == "f":
      out[key] = z[f]
  return out


def load_golden_state_dict(path) -> dict[str, np.ndarray]:
  try:
    from s3jax.porting.state_dict import load_state_dict
  except ImportError:  # the shared reader is not available
    return _read_golden_npz(path)
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
  import jax

  from s3jax.models.face_encoders import OfficialEncoders

  return jax.jit(OfficialEncoders(dtype=dtype).apply)


def run_jax(sd: dict, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """JAX outputs in the golden (NCHW) layout."""
  from s3jax.porting.encoder_keys import encoders_params_from_torch

  variables = encoders_params_from_torch(sd)
  out = _jax_forward()(variables, np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
  res = {k: np.asarray(v) for k, v in out.items()}
  for k in MASKS:
    res[k] = res[k].transpose(0, 3, 1, 2)
  res["z_face"] = z_face(res["id_feats"], res["lnd_feats"], sd)
  return res


def run_torch(sd: dict, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  import torch

  from s3jax.torch_twin.encoders import load_official_encoders

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


if __name__ == "__main__":  # pragma: no cover
  import sys

  gd = (
      sys.argv[1]
      if len(sys.argv) > 1
      else str(pathlib.Path(__file__).resolve().parents[3] / "shared" / "golden" / "dva")
  )
  for be in ("jax", "torch"):
    for r in check(gd, be):
      print(
          f"{be:5s} {r['name']:16s} {r['rel_err']:.3e} (tol {r['tol']:g}) {'ok' if r['ok'] else 'FAIL'}"
      )
