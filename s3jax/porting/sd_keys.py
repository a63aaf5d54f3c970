"""diffusers `UNet2DConditionModel` state dicts <-> Flax params of `s3jax.sd.unet.SDUNet`.

A Flax path maps to the diffusers key mechanically: every module name `<name>_<i>` is
`<name>.<i>` (`down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj` ->
`down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj`), except the time embedding's
`linear_1`/`linear_2`, which diffusers spells that way; the leaf `kernel`/`scale` is `weight`.
Layouts: Conv2d torch (out, in, kh, kw) <-> Flax (kh, kw, in, out); Linear (out, in) <-> (in,
out); norms as they are. The expected key set comes from the Flax model (`abstract_params`), so a
missing, unexpected or wrong-shape tensor is reported by its diffusers key.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from s3jax.porting.state_dict import StateDictError
from s3jax.sd.unet import SDUNetConfig, abstract_params

# Module names that end in `_<digit>` in diffusers itself.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def diffusers_key(flax_path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *modules, leaf = flax_path
  parts = [m if m in LITERAL_NAMES else re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(parts + [LEAF_NAMES[leaf]])


def torch_layout(flax_array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and flax_array.ndim == 4:
    return np.transpose(flax_array, (3, 2, 0, 1))
  if leaf == "kernel":
    return flax_array.T
  return flax_array


def flax_layout(torch_array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and torch_array.ndim == 4:
    return np.transpose(torch_array, (2, 3, 1, 0))
  if leaf == "kernel":
    return torch_array.T
  return torch_array


@functools.lru_cache(maxsize=8)
def unet_key_table(config: SDUNetConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{diffusers key: (flax path, torch shape)} for every UNet parameter of `config` (cached:
  tracing the model takes seconds; do not mutate the result)."""
  flat = flax.traverse_util.flatten_dict(abstract_params(config))
  table = {}
  for path, leaf in flat.items():
    shape = torch_layout(np.empty(leaf.shape, np.bool_), path[-1]).shape
    table[diffusers_key(path)] = (path, tuple(shape))
  return table


def check_names(names, table: Mapping[str, Any], what: str) -> None:
  """StateDictError naming every missing and unexpected key."""
  missing = sorted(set(table) - set(names))
  unexpected = sorted(set(names) - set(table))
  if not (missing or unexpected):
    return
  msg = [f"{what}: keys do not match the UNet config"]
  for label, keys in (("missing", missing), ("unexpected", unexpected)):
    if keys:
      more = " ..." if len(keys) > 20 else ""
      msg.append(f"{label} {len(keys)}: {', '.join(keys[:20])}{more}")
  raise StateDictError("; ".join(msg))


def unet_params_from_state_dict(state_dict: Mapping[str, Any], config: SDUNetConfig) -> dict:
  """diffusers UNet state dict {key: array} -> Flax params (float32 numpy, bare `params` tree)."""
  table = unet_key_table(config)
  check_names(state_dict, table, "unet_params_from_state_dict")
  flat = {}
  for key, (path, shape) in table.items():
    w = np.asarray(state_dict[key])
    if tuple(w.shape) != shape:
      raise StateDictError(
          f"unet_params_from_state_dict: {key} has shape {tuple(w.shape)}, the UNet config "
          f"expects {shape}"
      )
    flat[path] = np.ascontiguousarray(flax_layout(w, path[-1]).astype(np.float32))
  return flax.traverse_util.unflatten_dict(flat)


def unet_state_dict_from_params(params: Mapping[str, Any], config: SDUNetConfig) -> dict:
  """Flax params (bare `params` tree) -> {diffusers key: float32 numpy in torch layout}."""
  table = unet_key_table(config)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  by_key = {diffusers_key(p): v for p, v in flat.items()}
  check_names(by_key, table, "unet_state_dict_from_params")
  out = {}
  for key, (path, shape) in table.items():
    w = torch_layout(np.asarray(jax.device_get(by_key[key]), np.float32), path[-1])
    if tuple(w.shape) != shape:
      raise StateDictError(
          f"unet_state_dict_from_params: {key} gives shape {tuple(w.shape)}, the UNet config "
          f"expects {shape}"
      )
    out[key] = np.ascontiguousarray(w)
  return out
