"""Whole-DVA checkpoints between s3jax (orbax workdirs) and the reference's PyTorch layout.

Export (``python -m s3jax.convert export``) turns the train state of a workdir into the
reference's state-dict names:

* ``encoder.linear.weight`` (512, D+102) / ``encoder.linear.bias``: the z_face fusion layer
  (``D`` = 512 on the ``official`` feature path, 128 on the ``dlib`` path; only a 614-wide
  layer loads into the published code);
* every UNet key at the top level (``time_embed.*``, ``input_blocks.*``, ``middle_block.*``,
  ``output_blocks.*``, ``out.*``), torch tensor layouts;
* ``encoder.idnet|lndnet|bgnet.backbone.*`` when the workdir holds frozen-encoder variables
  (written by import from an official checkpoint; see :func:`save_frozen_encoders`).

``lightning=True`` writes what the reference's ``LitModel`` saves and loads:
``{'state_dict': {'model.<key>': params, 'ema_model.<key>': EMA params}, 'global_step': step}``
(for ``.safetensors`` the two prefixed sets are stored flat, without the wrapper).
Otherwise one set is written bare: the EMA weights with ``ema=True``, else the raw params.

Import (``python -m s3jax.convert import``) reads a bare or Lightning file
(.pt/.pth/.ckpt/.safetensors, ``torch.load(weights_only=True)`` only) and writes an orbax
checkpoint (its config saved with the step) that the trainer resumes from and
``s3jax.loading.load_dva`` / the editor load. Keys and shapes
are checked against the model the config builds; an error names the parameter.

Round trip: ``import(export(ckpt))`` gives the params and EMA params bit for bit (the
conversions are transposes only; everything stays float32). The optimizer state is not
exported; import starts it fresh (``tx.init``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file as save_safetensors

from s3jax import checkpointing, loading, optim
from s3jax.models.autoencoder import LND_DIM, id_dim, make_dva
from s3jax.models.face_encoders import init_variables as init_encoder_variables
from s3jax.porting import state_dict as sdlib
from s3jax.porting.encoder_keys import encoders_params_from_torch, encoders_params_to_torch
from s3jax.porting.unet_keys import KeyMismatchError, unet_params_from_torch, unet_params_to_torch

LINEAR_W = "encoder.linear.weight"
LINEAR_B = "encoder.linear.bias"
ENCODER_PREFIX = "encoder."
FROZEN_ENCODERS_DIR = "frozen_encoders"
_FROZEN_NETS = ("idnet.", "lndnet.", "bgnet.")
ID_DIMS = {128: "dlib", 512: "official"}


class DVACheckpointError(ValueError):
  """A DVA checkpoint cannot be exported or imported; the message names the parameter."""


# ------------------------------------------------------------------------------ params <-> sd
def unet_config_of(model_config):
  return make_dva(model_config).unet_config


def params_to_torch(params: Mapping[str, Any], model_config) -> dict[str, np.ndarray]:
  """DVA Flax params ``{'encoder': {'linear'}, 'unet'}`` -> reference names (numpy, f32)."""
  if set(params) != {"encoder", "unet"}:
    raise DVACheckpointError(f"DVA params must hold 'encoder' and 'unet', got {sorted(params)}")
  lin = params["encoder"]["linear"]
  kernel = np.asarray(jax.device_get(lin["kernel"]), np.float32)
  bias = np.asarray(jax.device_get(lin["bias"]), np.float32)
  out = {LINEAR_W: np.ascontiguousarray(kernel.T), LINEAR_B: np.ascontiguousarray(bias)}
  out.update(unet_params_to_torch(params["unet"], unet_config_of(model_config)))
  return out


def _as_np(v) -> np.ndarray:
  if hasattr(v, "detach"):
    return v.detach().cpu().numpy()
  return np.asarray(v)


def split_state_dict(sd: Mapping[str, Any]) -> tuple[dict, dict, dict]:
  """-> (encoder.linear keys, UNet keys, frozen encoder keys without 'encoder.')."""
  linear, unet, frozen = {}, {}, {}
  for k, v in sd.items():
    if k.startswith(ENCODER_PREFIX):
      rest = k[len(ENCODER_PREFIX) :]
      if rest.startswith("linear."):
        linear[k] = v
      elif rest.startswith(_FROZEN_NETS):
        frozen[rest] = v
      else:
        raise DVACheckpointError(
            f"unexpected parameter {k!r} (the DVA encoder holds "
            "linear, idnet, lndnet and bgnet only)"
        )
    else:
      unet[k] = v
  return linear, unet, frozen


def infer_face_features(sd: Mapping[str, Any]) -> str:
  """'dlib' or 'official' from the width of ``encoder.linear.weight``."""
  if LINEAR_W not in sd:
    raise DVACheckpointError(f"missing parameter {LINEAR_W!r} (the z_face fusion layer)")
  shape = tuple(_as_np(sd[LINEAR_W]).shape)
  if len(shape) != 2 or shape[1] - LND_DIM not in ID_DIMS:
    raise DVACheckpointError(
        f"parameter {LINEAR_W!r} has shape {shape}; expected (embed, 512+{LND_DIM}) for the "
        f"official ArcFace features or (embed, 128+{LND_DIM}) for the dlib path"
    )
  return ID_DIMS[shape[1] - LND_DIM]


def params_from_torch(sd: Mapping[str, Any], model_config) -> dict:
  """Reference-named DVA state dict (no frozen-encoder keys) -> Flax params (float32 numpy).

  Raises :class:`DVACheckpointError` / ``KeyMismatchError`` naming a missing, unexpected or
  wrongly shaped parameter.
  """
  linear, unet, frozen = split_state_dict(sd)
  if frozen:
    raise DVACheckpointError(
        "frozen-encoder keys (encoder.idnet/lndnet/bgnet.*) are not DVA "
        "params; split them off with split_state_dict first"
    )
  for k in (LINEAR_W, LINEAR_B):
    if k not in linear:
      raise DVACheckpointError(f"missing parameter {k!r} (the z_face fusion layer)")
  ucfg = unet_config_of(model_config)
  want_w = (ucfg.embed_channels, id_dim(model_config) + LND_DIM)
  w = _as_np(linear[LINEAR_W]).astype(np.float32)
  b = _as_np(linear[LINEAR_B]).astype(np.float32)
  if tuple(w.shape) != want_w:
    raise DVACheckpointError(
        f"shape mismatch for {LINEAR_W}: state dict has {tuple(w.shape)}, the config "
        f"(face_features={model_config.face_features!r}, embed_channels="
        f"{ucfg.embed_channels}) expects {want_w}"
    )
  if tuple(b.shape) != (ucfg.embed_channels,):
    raise DVACheckpointError(
        f"shape mismatch for {LINEAR_B}: state dict has "
        f"{tuple(b.shape)}, the config expects ({ucfg.embed_channels},)"
    )
  unet_params = unet_params_from_torch({k: _as_np(v) for k, v in unet.items()}, ucfg)
  return {
      "encoder": {"linear": {"kernel": np.ascontiguousarray(w.T), "bias": b}},
      "unet": unet_params,
  }


# ---------------------------------------------------------------------------- frozen encoders
def frozen_encoders_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / FROZEN_ENCODERS_DIR


def save_frozen_encoders(workdir, variables: Mapping) -> pathlib.Path:
  """Stores OfficialEncoders variables (``{'params', 'batch_stats'}``) in ``workdir``."""
  path = frozen_encoders_dir(workdir)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, jax.tree.map(np.asarray, dict(variables)), force=True)
  ckptr.wait_until_finished()
  return path


def load_frozen_encoders(workdir) -> Optional[dict]:
  """The frozen-encoder variables of ``workdir`` for the ``official`` path, or None."""
  path = frozen_encoders_dir(workdir)
  if not path.exists():
    return None
  abstract = init_encoder_variables()
  restored = ocp.StandardCheckpointer().restore(path, abstract)
  return jax.tree.map(np.asarray, restored)


# ----------------------------------------------------------------------------------- export
@dataclasses.dataclass
class ExportResult:
  path: pathlib.Path
  step: int
  num_keys: int
  lightning: bool
  ema: bool
  face_features: str
  frozen_encoders: bool


def checkpoint_state_dicts(checkpoint_dir, step: Optional[int] = None):
  """(config, step, params sd, EMA sd, frozen-encoder sd) of a workdir, reference names."""
  _, state, config, step = loading.restore_dva_state(checkpoint_dir, step)
  params_sd = params_to_torch(state.params, config.model)
  ema_sd = params_to_torch(state.ema_params, config.model)
  frozen = load_frozen_encoders(checkpoint_dir)
  frozen_sd = {}
  if frozen is not None:
    frozen_sd = encoders_params_to_torch(frozen, prefix=ENCODER_PREFIX)
  return config, int(step), params_sd, ema_sd, frozen_sd


def export_checkpoint(
    checkpoint_dir, out, *, ema: bool = False, lightning: bool = False, step: Optional[int] = None
) -> ExportResult:
  """Writes the workdir's DVA as a reference-named ``.pt``/``.pth``/``.ckpt``/``.safetensors``."""
  out = pathlib.Path(out)
  config, step, params_sd, ema_sd, frozen_sd = checkpoint_state_dicts(checkpoint_dir, step)
  suffix = out.suffix.lower()
  if lightning:
    sd = {}
    for prefix, part in (("model.", params_sd), ("ema_model.", ema_sd)):
      sd.update({prefix + k: v for k, v in part.items()})
      sd.update({prefix + k: v for k, v in frozen_sd.items()})
    _save(sd, out, lightning_step=step)
  else:
    sd = dict(ema_sd if ema else params_sd)
    sd.update(frozen_sd)
    if suffix in sdlib.CKPT_SUFFIXES:
      raise DVACheckpointError(
          f"{out}: a .ckpt file is a Lightning checkpoint; pass "
          "--lightning or write .pt/.safetensors"
      )
    _save(sd, out)
  return ExportResult(
      path=out,
      step=step,
      num_keys=len(sd),
      lightning=lightning,
      ema=ema,
      face_features=config.model.face_features,
      frozen_encoders=bool(frozen_sd),
  )


def _save(sd: Mapping[str, np.ndarray], out: pathlib.Path, lightning_step: Optional[int] = None):
  """Atomic write of a torch (.pt/.pth/.ckpt) or .safetensors file; shapes kept exactly
  (0-d buffers such as ``num_batches_tracked`` stay 0-d)."""
  suffix = out.suffix.lower()
  arrays = {k: np.array(_as_np(v), order="C", copy=True) for k, v in sd.items()}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  if suffix in sdlib.PT_SUFFIXES + sdlib.CKPT_SUFFIXES:
    import torch  # Lazy: torch is an optional extra (pip install s3jax[torch]).

    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    obj = (
        tensors
        if lightning_step is None
        else {"state_dict": tensors, "global_step": int(lightning_step), "epoch": 0}
    )
    torch.save(obj, str(tmp))
  elif suffix in sdlib.SAFETENSORS_SUFFIXES:
    meta = None if lightning_step is None else {"global_step": str(int(lightning_step))}
    save_safetensors(arrays, str(tmp), metadata=meta)
  else:
    raise DVACheckpointError(f"cannot write {out}: use .pt, .pth, .ckpt or .safetensors")
  os.replace(tmp, out)


# ----------------------------------------------------------------------------------- import
def _read_sets(src, which: Optional[str]):
  """-> (params sd, EMA sd) from ``src``; a bare file fills both with its one set."""
  if which is not None:
    sd = sdlib.load_state_dict(src, which=which)
    return sd, sd
  sets = {}
  for w in ("model", "ema"):
    try:
      sets[w] = sdlib.load_state_dict(src, which=w)
    except sdlib.StateDictError as e:
      if "no '" not in str(e):
        raise
  if not sets:
    raise DVACheckpointError(f"{src}: neither model.* nor ema_model.* keys")
  model_sd = sets.get("model", sets.get("ema"))
  ema_sd = sets.get("ema", model_sd)
  return model_sd, ema_sd


@dataclasses.dataclass
class ImportResult:
  workdir: pathlib.Path
  step: int
  face_features: str
  lightning_sets: bool
  frozen_encoders: Optional[pathlib.Path]
  num_params: int


def import_checkpoint(
    src, workdir, config, *, which: Optional[str] = None, step: int = 0, overwrite: bool = False
) -> ImportResult:
  """Reads a reference-named DVA file into an orbax checkpoint under ``workdir``.

  ``which=None``: from a Lightning file ``model.*`` become the params and ``ema_model.*`` the
  EMA params; ``which='ema'|'model'`` puts that one set in both. A bare file fills both.
  ``config.model.face_features`` is set from the width of ``encoder.linear.weight``.
  Frozen-encoder keys go to ``workdir/frozen_encoders`` (OfficialEncoders variables).
  """
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; import into a new workdir")
  model_sd, ema_sd = _read_sets(src, which)
  lightning_sets = model_sd is not ema_sd
  features = infer_face_features(model_sd)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.model.face_features != features:
      logging.warning(
          "config.model.face_features=%r but %s is %s-wide: using %r",
          config.model.face_features,
          LINEAR_W,
          _as_np(model_sd[LINEAR_W]).shape[1],
          features,
      )
      config.model.face_features = features

  def convert(sd):
    lin, unet, frozen = split_state_dict(sd)
    return params_from_torch({**lin, **unet}, config.model), frozen

  params, frozen = convert(model_sd)
  ema_params, _ = convert(ema_sd) if lightning_sets else (params, None)

  model = make_dva(config.model)
  tx = optim.make_optimizer(config.optim)
  abstract = jax.eval_shape(
      lambda rng: loading.init_dva_state(model, tx, config, rng), jax.random.key(0)
  )
  checkpointing.check_tree_matches(abstract.params, params, what=f"{src} (params)")
  state = checkpointing.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=jax.tree.map(jnp.asarray, params),
      ema_params=jax.tree.map(jnp.asarray, ema_params),
      opt_state=tx.init(jax.tree.map(jnp.asarray, params)),
  )
  checkpointing.check_tree_matches(abstract, state, what=f"{src} (train state)")

  frozen_path = None
  if frozen:
    variables = encoders_params_from_torch(frozen)
    frozen_path = save_frozen_encoders(workdir, variables)
  checkpointing.write_config(workdir, config)  # for people; loaders read the step's copy
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    ckpt.save(int(step), state, config=config, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return ImportResult(
      workdir=workdir,
      step=int(step),
      face_features=features,
      lightning_sets=lightning_sets,
      frozen_encoders=frozen_path,
      num_params=n,
  )


# ------------------------------------------------------------------------------- torch twin
def torch_dva_from_state_dict(sd: Mapping[str, Any], model_config):
  """A PyTorch DVA twin (eval mode) loaded strictly from reference-named keys.

  ``forward(x NCHW, t, z_id, z_lnd)`` computes ``z_face = encoder.linear(cat(z_id, z_lnd))``
  and the UNet's eps. Frozen-encoder keys, if any, are ignored.
  """
  # Lazy: torch (and the twin built on it) is an optional extra (pip install s3jax[torch]).
  import torch
  from torch import nn

  from s3jax.torch_twin.unet import TorchUNet

  ucfg = unet_config_of(model_config)
  linear, unet, _ = split_state_dict(sd)

  class _Encoder(nn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.linear = nn.Linear(cin, cout)

  class TorchDVA(TorchUNet):

    def __init__(self):
      super().__init__(dataclasses.asdict(ucfg))
      w = _as_np(linear[LINEAR_W])
      self.encoder = _Encoder(w.shape[1], w.shape[0])
      self.eval()

    def z_face(self, z_id, z_lnd):
      return self.encoder.linear(torch.cat([z_id, z_lnd], dim=1))

    def forward(self, x, t, z_id, z_lnd):  # pylint: disable=arguments-differ
      return super().forward(x, t, self.z_face(z_id, z_lnd))

  model = TorchDVA()
  tensors = {
      k: torch.as_tensor(np.ascontiguousarray(_as_np(v))) for k, v in {**linear, **unet}.items()
  }
  model.load_state_dict(tensors, strict=True)
  return model.eval()


__all__ = [
    "DVACheckpointError",
    "KeyMismatchError",
    "params_to_torch",
    "params_from_torch",
    "split_state_dict",
    "infer_face_features",
    "export_checkpoint",
    "import_checkpoint",
    "checkpoint_state_dicts",
    "save_frozen_encoders",
    "load_frozen_encoders",
    "frozen_encoders_dir",
    "torch_dva_from_state_dict",
    "ExportResult",
    "ImportResult",
]
