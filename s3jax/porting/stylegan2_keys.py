"""stylegan2-ada-pytorch ``Generator`` state dicts <-> Flax variables of
:mod:`s3jax.models.stylegan2`, and loading a generator from a file.

Key rule: the torch key ``synthesis.b8.conv0.affine.weight`` is the Flax path
``synthesis/b8/conv0/affine/kernel``; buffers (``noise_const``, ``resample_filter``,
``mapping.w_avg``) live in the ``buffers`` collection, everything else in ``params``.
Layouts: conv ``weight`` (out, in, kh, kw) <-> ``kernel`` (kh, kw, in, out); fully connected
``weight`` (out, in) <-> ``kernel`` (in, out); ``b4.const`` (C, R, R) <-> (R, R, C); the rest
as is. Values are stored raw (before the equalized-learning-rate gains) on both sides, so the
round trip is exact. Key order on export is the reference's ``G.state_dict()`` order.

Files (:func:`load_generator`):
- ``.pkl``: an NVIDIA network pickle, read by :mod:`s3jax.porting.nvidia_pickle` without
  running its code; the config is the pickle's ``_init_kwargs``.
- ``.pt`` / ``.pth`` / ``.safetensors`` / golden ``.npz``: a bare ``G.state_dict()``. A state
  dict does not say ``channel_base`` or ``conv_clamp``, so the config comes from the
  ``config`` argument (a :class:`GeneratorConfig` or an init_kwargs dict) or, failing that,
  from the sidecar ``<file without suffix>.json`` holding the init_kwargs, which
  :func:`save_generator` writes.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Iterator, Mapping, Optional, Union

import flax
import jax
import numpy as np

from s3jax.models.stylegan2 import GeneratorConfig, abstract_variables
from s3jax.porting import nvidia_pickle
from s3jax.porting.state_dict import StateDictError, load_state_dict, save_state_dict
from s3jax.porting.unet_keys import KeyMismatchError

PICKLE_SUFFIXES = (".pkl",)


class GeneratorShapeError(StateDictError):
  """A generator tensor has the wrong shape for the config (the message names it)."""


def _layer_layout(prefix: str, path: tuple, use_noise: bool, torgb: bool = False):
  yield f"{prefix}.weight", "params", path + ("kernel",), "conv"
  if use_noise and not torgb:
    yield f"{prefix}.noise_strength", "params", path + ("noise_strength",), "same"
  yield f"{prefix}.bias", "params", path + ("bias",), "same"
  if not torgb:
    yield f"{prefix}.resample_filter", "buffers", path + ("resample_filter",), "same"
    if use_noise:
      yield f"{prefix}.noise_const", "buffers", path + ("noise_const",), "same"
  yield f"{prefix}.affine.weight", "params", path + ("affine", "kernel"), "linear"
  yield f"{prefix}.affine.bias", "params", path + ("affine", "bias"), "same"


def layout(config: GeneratorConfig) -> Iterator[tuple[str, str, tuple, str]]:
  """(torch key, collection, Flax path, kind) in ``G.state_dict()`` order."""
  for res in config.block_resolutions:
    t, f = f"synthesis.b{res}", ("synthesis", f"b{res}")
    if res == 4:
      yield f"{t}.const", "params", f + ("const",), "const"
    yield f"{t}.resample_filter", "buffers", f + ("resample_filter",), "same"
    for conv in ("conv1",) if res == 4 else ("conv0", "conv1"):
      yield from _layer_layout(f"{t}.{conv}", f + (conv,), config.use_noise)
    yield from _layer_layout(f"{t}.torgb", f + ("torgb",), config.use_noise, torgb=True)
  if config.w_avg_beta is not None:
    yield "mapping.w_avg", "buffers", ("mapping", "w_avg"), "same"
  fcs = (["embed"] if config.c_dim > 0 else []) + [
      f"fc{i}" for i in range(config.mapping_num_layers)
  ]
  for fc in fcs:
    yield f"mapping.{fc}.weight", "params", ("mapping", fc, "kernel"), "linear"
    yield f"mapping.{fc}.bias", "params", ("mapping", fc, "bias"), "same"


def to_flax_layout(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(w, (2, 3, 1, 0))
  if kind == "linear":
    return w.T
  if kind == "const":
    return np.transpose(w, (1, 2, 0))
  return w


def to_torch_layout(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(w, (3, 2, 0, 1))
  if kind == "linear":
    return w.T
  if kind == "const":
    return np.transpose(w, (2, 0, 1))
  return w


def key_table(config: GeneratorConfig) -> dict[str, tuple[str, tuple, str, tuple]]:
  """{torch key: (collection, Flax path, kind, torch shape)} in ``G.state_dict()`` order."""
  return dict(_key_table(config))


@functools.lru_cache(maxsize=16)  # tracing the model for its shapes takes about a second
def _key_table(config: GeneratorConfig) -> dict[str, tuple[str, tuple, str, tuple]]:
  shapes = flax.traverse_util.flatten_dict(abstract_variables(config))
  table = {}
  for key, collection, path, kind in layout(config):
    flax_shape = tuple(shapes[(collection,) + path].shape)
    torch_shape = to_torch_layout(kind, np.empty(flax_shape, np.uint8)).shape
    table[key] = (collection, path, kind, tuple(torch_shape))
  if len(table) != len(shapes):  # the layout must cover every variable of the model
    covered = {(c,) + p for c, p, _, _ in table.values()}
    raise AssertionError(f"key layout misses {sorted(set(shapes) - covered)}")
  return table


def _check_keys(names, table, what: str):
  missing = [k for k in table if k not in names]
  unexpected = sorted(set(names) - set(table))
  if missing or unexpected:
    msg = [f"{what}: tensor names do not match the generator config"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
      if keys:
        more = " ..." if len(keys) > 20 else ""
        msg.append(f"{label} {len(keys)}: {', '.join(keys[:20])}{more}")
    raise KeyMismatchError("; ".join(msg))


def variables_from_state_dict(sd: Mapping[str, Any], config: GeneratorConfig) -> dict:
  """Reference ``G.state_dict()`` (torch names and layouts) -> ``{'params', 'buffers'}``
  (float32 numpy). Missing/unexpected keys raise ``KeyMismatchError``, wrong shapes
  :class:`GeneratorShapeError`."""
  table = key_table(config)
  _check_keys(set(sd), table, "stylegan2 variables_from_state_dict")
  flat = {}
  for key, (collection, path, kind, torch_shape) in table.items():
    v = sd[key]
    w = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
    if tuple(w.shape) != torch_shape:
      raise GeneratorShapeError(
          f"shape mismatch for {key}: the state dict has {tuple(w.shape)}, the generator "
          f"config expects {torch_shape}"
      )
    # np.array, not np.ascontiguousarray, which turns 0-d noise_strength into shape (1,).
    flat[(collection,) + path] = np.array(to_flax_layout(kind, w), np.float32, order="C")
  return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_variables(variables: Mapping[str, Any], config: GeneratorConfig) -> dict:
  """``{'params', 'buffers'}`` -> {reference key: numpy array in torch layout}, in the
  reference's order."""
  table = key_table(config)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
  by_key = {}
  lookup = {(c,) + p: k for k, (c, p, _, _) in table.items()}
  for path, v in flat.items():
    by_key[lookup.get(path, "/".join(path))] = v
  _check_keys(set(by_key), table, "stylegan2 state_dict_from_variables")
  out = {}
  for key, (collection, path, kind, torch_shape) in table.items():
    w = np.asarray(jax.device_get(by_key[key]))
    t = np.array(to_torch_layout(kind, w), np.float32, order="C")
    if tuple(t.shape) != torch_shape:
      raise GeneratorShapeError(
          f"shape mismatch for {key} ({collection}/{'/'.join(path)}): the variables give "
          f"{tuple(t.shape)}, the generator config expects {torch_shape}"
      )
    out[key] = t
  return out


ConfigLike = Union[GeneratorConfig, Mapping[str, Any]]


def as_config(config: ConfigLike) -> GeneratorConfig:
  return config if isinstance(config, GeneratorConfig) else GeneratorConfig.from_init_kwargs(config)


def sidecar_path(path) -> pathlib.Path:
  """``ffhq.safetensors`` -> ``ffhq.json``: the init_kwargs of a bare state dict."""
  path = pathlib.Path(path)
  return path.with_name(path.name[: -len(path.suffix)] + ".json") if path.suffix else path


def load_generator(
    path, config: Optional[ConfigLike] = None, which: str = "G_ema"
) -> tuple[GeneratorConfig, dict]:
  """(config, variables) from an NVIDIA ``.pkl`` (network ``which``), or from a state dict
  (``.pt``/``.pth``/``.safetensors``/``.npz``) plus ``config`` or its sidecar JSON.

  With a ``.pkl`` and a ``config``, the two configs must agree.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() in PICKLE_SUFFIXES:
    init_kwargs, sd = nvidia_pickle.read_network_pickle(path, which=which)
    cfg = GeneratorConfig.from_init_kwargs(init_kwargs)
    if config is not None and as_config(config) != cfg:
      raise StateDictError(
          f"{path}: the pickle's config {cfg.to_init_kwargs()} differs from the given "
          f"{as_config(config).to_init_kwargs()}"
      )
    return cfg, variables_from_state_dict(sd, cfg)
  if config is None:
    side = sidecar_path(path)
    if not side.is_file():
      raise StateDictError(
          f"{path} is a bare state dict and says nothing of channel_base or conv_clamp: pass "
          f"config= (a GeneratorConfig or the init_kwargs dict) or write {side} with the "
          "init_kwargs (save_generator does)"
      )
    try:
      config = json.loads(side.read_text())
    except json.JSONDecodeError as e:
      raise StateDictError(f"{side}: not JSON: {e}") from e
  cfg = as_config(config)
  return cfg, variables_from_state_dict(load_state_dict(path), cfg)


def save_generator(config: GeneratorConfig, variables, path) -> pathlib.Path:
  """Write ``G.state_dict()`` (format by suffix, as ``save_state_dict``) and its sidecar
  ``<file without suffix>.json`` with the init_kwargs; ``load_generator`` reads both back."""
  path = save_state_dict(state_dict_from_variables(variables, config), path)
  sidecar_path(path).write_text(json.dumps(config.to_init_kwargs(), indent=1) + "\n")
  return path
