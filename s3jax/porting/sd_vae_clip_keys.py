"""State dicts of diffusers' AutoencoderKL and transformers' CLIP <-> Flax params of `s3jax.sd`.

The Flax modules (`s3jax.sd.vae`, `s3jax.sd.clip`) name their submodules after the torch paths
with `.N` written `_N`, so one rule maps every leaf (`flax_leaf_to_torch`): `kernel` -> `weight`
(Linear (out,in) <-> (in,out), Conv2d OIHW <-> HWIO), `scale`/`embedding` -> `weight`, `bias`
-> `bias`, and raw params (`class_embedding`, `logit_scale`) keep their names. The importers
build the expected key set from the model's abstract params and raise
`s3jax.porting.state_dict.StateDictError` naming missing, unexpected and wrong-shape keys.

Layouts read:
- VAE: diffusers `AutoencoderKL` keys (`encoder.*`, `decoder.*`, `quant_conv.*`, ...); the
  deprecated mid-block attention names (`query`/`key`/`value`/`proj_attn`, as some old
  checkpoints store them) are renamed like diffusers does when loading.
- CLIP text: `text_model.*` (SD's `text_encoder`, transformers `CLIPTextModel`); keys without
  the prefix are accepted too. `position_ids` buffers are dropped (they are `arange`).
- CLIP: transformers `CLIPModel` (`text_model.*`, `vision_model.*`, `text_projection.weight`,
  `visual_projection.weight`, `logit_scale`).
Directories: `load_vae_dir` (diffusers: config.json + diffusion_pytorch_model.safetensors),
`load_clip_text_dir` / `load_clip_dir` / `save_clip_dir` (transformers: config.json +
model.safetensors).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import flax
import jax
import numpy as np
from safetensors import numpy as safetensors_np

from s3jax.porting.state_dict import StateDictError, load_state_dict
from s3jax.sd import clip, vae

TEXT_PREFIX = "text_model."
BUFFER_SUFFIXES = ("position_ids",)
# diffusers' _convert_deprecated_attention_blocks renames.
DEPRECATED_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
CONFIG_FILE = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MAX_LISTED = 12


def torch_module_path(path: tuple[str, ...]) -> str:
  """('encoder', 'down_blocks_0', 'resnets_1') -> 'encoder.down_blocks.0.resnets.1'."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def flax_leaf_to_torch(path: tuple[str, ...]) -> str:
  """The torch state-dict key of the Flax leaf at `path`."""
  module, leaf = torch_module_path(path[:-1]), path[-1]
  name = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
  return f"{module}.{name}" if module else name


def to_flax_layout(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and a.ndim == 4:
    return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and a.ndim == 2:
    return a.T  # (out, in) -> (in, out)
  return a


def to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if leaf == "kernel" and a.ndim == 2:
    return a.T
  return a


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def listed(keys) -> str:
  keys = list(keys)
  more = f" ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else ""
  return ", ".join(keys[:MAX_LISTED]) + more


def params_from_state_dict(
    sd: Mapping[str, Any], abstract_params, what: str, prefix: str = ""
) -> dict:
  """{torch key: array} -> Flax params shaped like `abstract_params` (ShapeDtypeStructs).

  Every key must be used exactly once with its expected torch shape; otherwise
  StateDictError lists the missing, unexpected and wrong-shape keys.
  """
  flat = flax.traverse_util.flatten_dict(abstract_params)
  table = {prefix + flax_leaf_to_torch(p): (p, s) for p, s in flat.items()}
  missing = [k for k in table if k not in sd]
  unexpected = sorted(k for k in sd if k not in table)
  wrong = []
  for key, (path, struct) in table.items():
    if key in sd:
      want = torch_shape(path[-1], tuple(struct.shape))
      if tuple(np.shape(sd[key])) != want:
        wrong.append(f"{key} {tuple(np.shape(sd[key]))} (expected {want})")
  if missing or unexpected or wrong:
    msg = [f"{what}: the state dict does not match the config"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
      if keys:
        msg.append(f"{label} {len(keys)}: {listed(keys)}")
    raise StateDictError("; ".join(msg))
  out = {}
  for key, (path, struct) in table.items():
    a = to_flax_layout(path[-1], np.asarray(sd[key], np.float32))
    out[path] = np.require(a, struct.dtype, "C")
  return flax.traverse_util.unflatten_dict(out)


def state_dict_from_params(params, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params -> {torch key: float32 array in torch layout} (the inverse mapping)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for path, a in flat.items():
    # np.require keeps 0-d arrays (logit_scale) 0-d; np.ascontiguousarray would not.
    a = to_torch_layout(path[-1], np.asarray(a, np.float32))
    out[prefix + flax_leaf_to_torch(path)] = np.require(a, np.float32, "C")
  return out


def drop_buffers(sd: Mapping[str, Any]) -> dict:
  return {k: v for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES)}


# ----------------------------------------------------------------------------- VAE
def abstract_vae_params(config: vae.VAEConfig):
  return jax.eval_shape(lambda: vae.init_params(config, jax.random.PRNGKey(0)))


def rename_deprecated_attention(sd: Mapping[str, Any]) -> dict:
  """Old VAE attention names (query, key, value, proj_attn) -> to_q, to_k, to_v, to_out.0.

  Their 1x1-conv shaped (C, C, 1, 1) weights become Linear (C, C), as diffusers does.
  """
  out = {}
  for k, v in sd.items():
    parts = k.split(".")
    if ".attentions." in k and len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION_NAMES:
      k = ".".join(parts[:-2] + [DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
      if np.ndim(v) == 4:
        v = np.asarray(v)[:, :, 0, 0]
    out[k] = v
  return out


def vae_params_from_state_dict(sd: Mapping[str, Any], config: vae.VAEConfig) -> dict:
  """diffusers AutoencoderKL state dict -> params of `s3jax.sd.vae.AutoencoderKL(config)`."""
  sd = rename_deprecated_attention(sd)
  return params_from_state_dict(sd, abstract_vae_params(config), "AutoencoderKL")


def vae_state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Params of `AutoencoderKL` -> diffusers AutoencoderKL state dict."""
  return state_dict_from_params(params)


def read_config(directory: pathlib.Path) -> dict:
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise StateDictError(f"{directory}: no {CONFIG_FILE}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise StateDictError(f"{path}: not JSON: {e}") from e


def read_weights(directory: pathlib.Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The first of `names` in `directory`, or the shards its `.index.json` lists."""
  for name in names:
    index = directory / f"{name}.index.json"
    if (directory / name).is_file():
      return load_state_dict(directory / name)
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      sd = {}
      for shard in shards:
        sd.update(load_state_dict(directory / shard))
      return sd
  raise StateDictError(f"{directory}: none of {', '.join(names)} found")


def load_vae_dir(directory) -> tuple[dict, vae.VAEConfig]:
  """A diffusers `vae/` folder -> (params, VAEConfig)."""
  d = pathlib.Path(directory)
  config = vae.VAEConfig.from_diffusers(read_config(d))
  return vae_params_from_state_dict(read_weights(d, DIFFUSERS_WEIGHTS), config), config


# ----------------------------------------------------------------------------- CLIP
def abstract_clip_text_params(config: clip.CLIPTextConfig):
  return jax.eval_shape(lambda: clip.init_text_params(config, jax.random.PRNGKey(0)))


def abstract_clip_params(config: clip.CLIPConfig):
  return jax.eval_shape(lambda: clip.init_params(config, jax.random.PRNGKey(0)))


def clip_text_params_from_state_dict(sd: Mapping[str, Any], config: clip.CLIPTextConfig) -> dict:
  """transformers CLIPTextModel state dict (`text_model.*`, or unprefixed) -> params of
  `s3jax.sd.clip.CLIPTextModel(config)`."""
  sd = drop_buffers(sd)
  prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in sd) else ""
  return params_from_state_dict(sd, abstract_clip_text_params(config), "CLIPTextModel", prefix)


def clip_text_state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Params of `CLIPTextModel` -> transformers CLIPTextModel state dict (`text_model.*`)."""
  return state_dict_from_params(params, TEXT_PREFIX)


def clip_params_from_state_dict(sd: Mapping[str, Any], config: clip.CLIPConfig) -> dict:
  """transformers CLIPModel state dict -> params of `s3jax.sd.clip.CLIPModel(config)`."""
  return params_from_state_dict(drop_buffers(sd), abstract_clip_params(config), "CLIPModel")


def clip_state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Params of `CLIPModel` -> transformers CLIPModel state dict."""
  return state_dict_from_params(params)


def load_clip_text_dir(directory) -> tuple[dict, clip.CLIPTextConfig]:
  """A transformers CLIPTextModel folder (SD's `text_encoder/`) -> (params, config).

  A full CLIPModel folder works too: its text tower is taken and the rest ignored.
  """
  d = pathlib.Path(directory)
  raw = read_config(d)
  config = clip.CLIPTextConfig.from_transformers(raw)
  sd = read_weights(d, TRANSFORMERS_WEIGHTS)
  if raw.get("model_type") == "clip":
    sd = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
  return clip_text_params_from_state_dict(sd, config), config


def load_clip_dir(directory) -> tuple[dict, clip.CLIPConfig]:
  """A transformers CLIPModel folder -> (params, CLIPConfig)."""
  d = pathlib.Path(directory)
  config = clip.CLIPConfig.from_transformers(read_config(d))
  return clip_params_from_state_dict(read_weights(d, TRANSFORMERS_WEIGHTS), config), config


def save_clip_dir(directory, params, config) -> pathlib.Path:
  """Writes config.json + model.safetensors as transformers' `save_pretrained` lays them out.

  `config` is a CLIPConfig (params of CLIPModel) or a CLIPTextConfig (params of
  CLIPTextModel); `from_pretrained(directory)` of the matching transformers class reads it.
  """
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  if isinstance(config, clip.CLIPConfig):
    sd = clip_state_dict_from_params(params)
  elif isinstance(config, clip.CLIPTextConfig):
    sd = clip_text_state_dict_from_params(params)
  else:
    raise TypeError(f"config must be a CLIPConfig or CLIPTextConfig, not {type(config).__name__}")
  (d / CONFIG_FILE).write_text(json.dumps(config.to_transformers(), indent=2) + "\n")
  safetensors_np.save_file(sd, str(d / TRANSFORMERS_WEIGHTS[0]), metadata={"format": "pt"})
  return d
