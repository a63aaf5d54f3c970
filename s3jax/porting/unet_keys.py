"""PyTorch state-dict names <-> Flax params for `s3jax.models.unet.UNet`.

The rule is mechanical: a Flax module name `input_blocks_4_0` / `in_layers_2` is the torch path
`input_blocks.4.0` / `in_layers.2` (every `_<digits>` becomes `.<digits>`), and the leaf maps
`kernel`/`scale` -> `weight`, `bias` -> `bias`. Tensor layouts:
- Conv2d   torch (out, in, kh, kw) <-> Flax (kh, kw, in, out);
- Linear   torch (out, in)         <-> Flax Dense (in, out);
- Conv1d 1x1 (attention `qkv`, `proj_out`) torch (out, in, 1) <-> Flax Dense (in, out);
- GroupNorm weight/bias <-> scale/bias.
The expected key set comes from the Flax model itself (`jax.eval_shape`), so a missing key,
an unexpected key or a wrong shape is reported by name.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from s3jax.models.unet import UNetConfig, abstract_params

_CONV1D_MODULES = ("qkv", "proj_out")


class KeyMismatchError(KeyError):
  """Torch and Flax parameter sets disagree; the message names every offending key."""

  def __str__(self):  # KeyError quotes its message; keep it readable
    return str(self.args[0]) if self.args else ""


def torch_name(flax_path: tuple[str, ...]) -> str:
  """('input_blocks_4_0', 'in_layers_2', 'kernel') -> 'input_blocks.4.0.in_layers.2.weight'."""
  *mods, leaf = flax_path
  parts = [re.sub(r"_(\d+)", r".\1", m) for m in mods]
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(parts)


def _kind(flax_path: tuple[str, ...], ndim: int) -> str:
  leaf = flax_path[-1]
  if leaf != "kernel":
    return "vector"
  if ndim == 4:
    return "conv2d"
  return "conv1d" if flax_path[-2] in _CONV1D_MODULES else "linear"


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "conv2d":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "conv1d":
    return (shape[1], shape[0], 1)
  return tuple(shape)


def _to_flax(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv2d":
    return np.transpose(w, (2, 3, 1, 0))
  if kind == "linear":
    return w.T
  if kind == "conv1d":
    return w[:, :, 0].T
  return w


def _to_torch(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv2d":
    return np.transpose(w, (3, 2, 0, 1))
  if kind == "linear":
    return w.T
  if kind == "conv1d":
    return w.T[:, :, None]
  return w


def key_table(config: UNetConfig) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """{torch_name: (flax_path, kind, torch_shape)} for every UNet parameter of `config`."""
  table = {}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params(config)))
  for path, leaf in flat.items():
    kind = _kind(path, len(leaf.shape))
    table[torch_name(path)] = (path, kind, _torch_shape(kind, tuple(leaf.shape)))
  return table


def _check_keys(names: set[str], table: Mapping[str, Any], what: str):
  missing = sorted(set(table) - names)
  unexpected = sorted(names - set(table))
  if missing or unexpected:
    msg = [f"{what}: parameter names do not match the UNet config"]
    if missing:
      msg.append(
          f"missing {len(missing)}: {', '.join(missing[:20])}"
          + (" ..." if len(missing) > 20 else "")
      )
    if unexpected:
      msg.append(
          f"unexpected {len(unexpected)}: {', '.join(unexpected[:20])}"
          + (" ..." if len(unexpected) > 20 else "")
      )
    raise KeyMismatchError("; ".join(msg))


def unet_params_from_torch(sd: Mapping[str, Any], config: UNetConfig) -> dict:
  """Torch UNet state dict (reference names, no `encoder.`) -> Flax params (float32 numpy)."""
  table = key_table(config)
  _check_keys(set(sd), table, "unet_params_from_torch")
  flat = {}
  for name, (path, kind, tshape) in table.items():
    w = np.asarray(sd[name].detach().cpu().numpy() if hasattr(sd[name], "detach") else sd[name])
    if tuple(w.shape) != tshape:
      raise ValueError(
          f"shape mismatch for {name}: state dict has {tuple(w.shape)}, the "
          f"UNet config expects {tshape}"
      )
    flat[path] = np.ascontiguousarray(_to_flax(kind, w).astype(np.float32))
  return flax.traverse_util.unflatten_dict(flat)


def unet_params_to_torch(params: Mapping[str, Any], config: UNetConfig) -> dict[str, np.ndarray]:
  """Flax params -> {reference torch name: numpy array in torch layout}."""
  table = key_table(config)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  by_name = {torch_name(p): (p, v) for p, v in flat.items()}
  _check_keys(set(by_name), table, "unet_params_to_torch")
  out = {}
  for name, (path, kind, tshape) in table.items():
    w = np.asarray(jax.device_get(by_name[name][1]))
    t = np.ascontiguousarray(_to_torch(kind, w).astype(np.float32))
    if tuple(t.shape) != tshape:
      raise ValueError(
          f"shape mismatch for {name} (flax {'/'.join(path)}): params give "
          f"{tuple(t.shape)}, the UNet config expects {tshape}"
      )
    out[name] = t
  return out
