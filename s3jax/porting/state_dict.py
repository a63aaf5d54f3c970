"""Read and write PyTorch-style state dicts as {name: numpy array}.

Formats (picked by file suffix):
- `.pt` / `.pth` / `.pth.tar` / `.bin`: `torch.load(weights_only=True)` only; arbitrary pickles
  are refused.
- `.ckpt`: a Lightning checkpoint, `{'state_dict': {'model.*', 'ema_model.*'}}`, also read with
  `weights_only=True`.
- `.safetensors`.
- `.npz` in the golden encoding: `q::KEY` int8 codes with `s::KEY` float32 scale (the tensor is
  `codes * scale`), or `f::KEY` stored as is.

Whatever the container, keys prefixed `model.` / `ema_model.` (a Lightning layout) are reduced
to one set with `which='ema'|'model'`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional

import numpy as np
from safetensors import numpy as safetensors_np

# torch (and safetensors.torch, which needs it) is an optional extra (pip install s3jax[torch]):
# it is imported inside the functions that read or write torch files.

# .pth.tar: the published MobileNet landmark file (mobilenet_224_model_best_gdconv_external).
PT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin")
CKPT_SUFFIXES = (".ckpt",)
SAFETENSORS_SUFFIXES = (".safetensors",)
NPZ_SUFFIXES = (".npz",)
PREFIX = {"ema": "ema_model.", "model": "model."}


class StateDictError(ValueError):
  """A state dict could not be read, written or matched."""


def _suffix(path: pathlib.Path) -> str:
  name = path.name.lower()
  return ".pth.tar" if name.endswith(".pth.tar") else path.suffix.lower()


def to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, so torch is installed
    import torch  # Lazy: optional extra, see the note at the top.

    t = v.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()
    return t.numpy()
  return np.asarray(v)


def torch_load(path: pathlib.Path):
  try:
    import torch  # Lazy: optional extra, see the note at the top.
  except ImportError as e:  # pragma: no cover
    raise StateDictError(f"reading {path} needs torch (pip install s3jax[torch])") from e
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError and friends
    raise StateDictError(
        f"cannot read {path} with torch.load(weights_only=True): {e}. s3jax never unpickles "
        "arbitrary objects; re-save the tensors alone (e.g. as .safetensors)."
    ) from e


def _select(sd: Mapping[str, Any], which: str, path) -> dict[str, Any]:
  """Reduce a Lightning-style {model.*, ema_model.*} dict to one set (no-op otherwise)."""
  if which not in PREFIX:
    raise StateDictError(f"which must be 'ema' or 'model', got {which!r}")
  has = {w: any(k.startswith(p) for k in sd) for w, p in PREFIX.items()}
  if not (has["ema"] or has["model"]):
    return dict(sd)
  prefix = PREFIX[which]
  if not has[which]:
    found = sorted(w for w, h in has.items() if h)
    raise StateDictError(
        f"{path}: no '{prefix}*' keys for which={which!r}; it holds "
        f"{', '.join(PREFIX[w] + '*' for w in found)}"
    )
  return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _flatten_tensors(obj: Mapping[str, Any], path) -> dict[str, np.ndarray]:
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach") or isinstance(v, np.ndarray):
      out[k] = to_numpy(v)
    elif isinstance(v, (int, float)):
      out[k] = np.asarray(v)
    else:
      raise StateDictError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
  return out


def read_golden_npz(path) -> dict[str, np.ndarray]:
  """Decode the golden q::/s::/f:: encoding."""
  out = {}
  with np.load(path, allow_pickle=False) as z:
    files = set(z.files)
    for name in z.files:
      kind, sep, key = name.partition("::")
      if not sep or kind not in ("q", "s", "f"):
        raise StateDictError(f"{path}: entry {name!r} is not q::/s::/f:: encoded")
      if kind == "f":
        out[key] = z[name]
      elif kind == "q":
        if f"s::{key}" not in files:
          raise StateDictError(f"{path}: q::{key} has no matching s::{key}")
        out[key] = z[name].astype(np.float32) * np.float32(z[f"s::{key}"])
      elif f"q::{key}" not in files:
        raise StateDictError(f"{path}: s::{key} has no matching q::{key}")
  return out


def _scalar(v) -> Optional[int]:
  try:
    return int(np.asarray(to_numpy(v)))
  except (TypeError, ValueError):
    return None


def read_state_dict(path) -> tuple[dict[str, np.ndarray], dict]:
  """(every tensor of the file as numpy, {'epoch', 'global_step'} where the file has them).

  Reads .pt/.pth/.ckpt (``torch.load(weights_only=True)``), .safetensors and golden .npz.
  Keys are as stored: a Lightning file keeps its ``model.*``/``ema_model.*`` prefixes
  (``load_state_dict`` picks one set).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"state dict not found: {path}")
  suf = _suffix(path)
  meta: dict = {}
  if suf in PT_SUFFIXES or suf in CKPT_SUFFIXES:
    obj = torch_load(path)
    if not isinstance(obj, Mapping):
      raise StateDictError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    meta = {k: _scalar(obj[k]) for k in ("epoch", "global_step") if k in obj}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
      obj = obj["state_dict"]
    elif suf in CKPT_SUFFIXES:
      raise StateDictError(f"{path}: a Lightning checkpoint must hold 'state_dict'")
    sd = _flatten_tensors(obj, path)
  elif suf in SAFETENSORS_SUFFIXES:
    try:
      sd = safetensors_np.load_file(str(path))
    except (TypeError, ValueError):  # e.g. bfloat16, which numpy lacks
      from safetensors.torch import load_file as load_torch  # Lazy: needs torch.

      sd = {k: to_numpy(v) for k, v in load_torch(str(path)).items()}
  elif suf in NPZ_SUFFIXES:
    sd = read_golden_npz(path)
  else:
    raise StateDictError(
        f"unknown state-dict format {suf!r} for {path}; expected one of "
        f"{PT_SUFFIXES + CKPT_SUFFIXES + SAFETENSORS_SUFFIXES + NPZ_SUFFIXES}"
    )
  return sd, meta


def load_state_dict(path, which: str = "ema") -> dict[str, np.ndarray]:
  """Load a state dict from .pt/.pth/.ckpt/.safetensors/golden .npz as numpy arrays.

  `which` picks `ema_model.*` ('ema') or `model.*` ('model') from Lightning layouts.
  """
  sd, _ = read_state_dict(path)
  return _select(sd, which, path)


def _wrap_lightning(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for prefix in ("model.", "ema_model."):
    out.update({prefix + k: v for k, v in sd.items()})
  return out


def save_state_dict(sd: Mapping[str, Any], path, lightning: bool = False) -> pathlib.Path:
  """Write {name: array} as .pt/.pth/.ckpt (torch), .safetensors or golden .npz (f:: entries).

  `lightning=True` stores every key twice, as `model.*` and `ema_model.*`; for torch files the
  result is wrapped as `{'state_dict': ...}` like a Lightning checkpoint (`.ckpt` always is).
  """
  path = pathlib.Path(path)
  suf = _suffix(path)
  # np.ascontiguousarray would turn 0-d tensors (num_batches_tracked) into shape (1,).
  arrays = {k: np.require(to_numpy(v), requirements="C") for k, v in sd.items()}
  if lightning:
    arrays = _wrap_lightning(arrays)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  if suf in PT_SUFFIXES or suf in CKPT_SUFFIXES:
    import torch  # Lazy: optional extra, see the note at the top.

    tensors = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    obj = {"state_dict": tensors} if (lightning or suf in CKPT_SUFFIXES) else tensors
    torch.save(obj, str(tmp))
  elif suf in SAFETENSORS_SUFFIXES:
    safetensors_np.save_file(arrays, str(tmp))
  elif suf in NPZ_SUFFIXES:
    with open(tmp, "wb") as f:
      np.savez(f, **{f"f::{k}": v for k, v in arrays.items()})
  else:
    raise StateDictError(
        f"unknown state-dict format {suf!r} for {path}; expected one of "
        f"{PT_SUFFIXES + CKPT_SUFFIXES + SAFETENSORS_SUFFIXES + NPZ_SUFFIXES}"
    )
  os.replace(tmp, path)
  return path
