"""The reference's frozen face encoders (``official`` feature path): loading and extraction.

Loading (:func:`load_encoders`) from either

* ``encoders_dir``: the three published weight files, under their published names
  (``ENCODER_FILES``)::

      model_ir_se50.pth                                   IR-SE50 ArcFace (z_id)
      mobilenet_224_model_best_gdconv_external.pth.tar    MobileNetV2-GDConv (z_lnd)
      79999_iter.pth                                      BiSeNet face parsing (masks)

  each read with ``torch.load(weights_only=True)`` (``porting.state_dict``); a file may
  instead be stored as ``<name without .pth/.pth.tar>.safetensors`` (same keys) to read it
  without torch; or
* ``checkpoint``: a DVA checkpoint holding the frozen encoders as
  ``encoder.idnet|lndnet|bgnet.backbone.*`` (the reference's ``.ckpt``/``.pt``, or a
  ``.safetensors``; the EMA set of a Lightning layout), or an s3jax workdir that
  ``convert import`` gave ``frozen_encoders/``.

:class:`OfficialFeatures` runs the networks on aligned uint8 crops (resized to 256 px), in
batches sharded over a 1-D mesh of the local devices. ``features(crops)`` is one program for
everything data_prep stores: z_id (512, L2-normalised), z_lnd (102), the training mask
(``face_mask``) and the paste-back mask (``face_mask(for_video=True)``), both from one
BiSeNet parsing. ``id_feats`` / ``lnd_feats`` / ``video_masks`` run one network each (the
editor's identity metric needs IR-SE50 alone). :func:`fingerprint` names the weights.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Optional, Sequence

import cv2
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from s3jax import checkpointing, face_features
from s3jax.models import face_encoders
from s3jax.porting import dva_checkpoint, encoder_keys
from s3jax.porting import state_dict as sdlib

CROP_SIZE = 256  # the crop size the encoders' fixed windows are defined on
Z_ID_DIM = 512
Z_LND_DIM = 102
# net -> published file name (as the reference's download script names them).
ENCODER_FILES = dict(encoder_keys.PUBLISHED_FILES)
_NET_WHAT = {
    "idnet": "IR-SE50 ArcFace",
    "lndnet": "MobileNetV2-GDConv landmarks",
    "bgnet": "BiSeNet face parsing",
}


class EncoderLoadError(ValueError):
  """Encoder weights are missing or do not fit; the message names the file and what it wants."""


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def _stem(name: str) -> str:
  for suffix in (".pth.tar", ".pth", ".pt"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def _read_encoder_file(path: pathlib.Path) -> Mapping[str, Any]:
  try:
    return sdlib.load_state_dict(path)
  except sdlib.StateDictError as e:
    # Also when torch is missing or the file is no plain dict of tensors: the twin needs neither.
    raise EncoderLoadError(
        f"{e} (or store its tensors as {_stem(path.name)}.safetensors next to it)"
    ) from e


def encoder_file(encoders_dir, net: str) -> pathlib.Path:
  """The file of ``net`` in ``encoders_dir`` (published name, else its .safetensors twin)."""
  d = pathlib.Path(encoders_dir)
  name = ENCODER_FILES[net]
  for cand in (d / name, d / f"{_stem(name)}.safetensors"):
    if cand.is_file():
      return cand
  raise EncoderLoadError(
      f"{d}: no {_NET_WHAT[net]} weights; expected {name} (or {_stem(name)}.safetensors). "
      f"--encoders DIR must hold all of {sorted(ENCODER_FILES.values())}"
  )


def load_published_encoders(encoders_dir) -> dict:
  """OfficialEncoders variables from the three published files in ``encoders_dir``."""
  d = pathlib.Path(encoders_dir)
  if not d.is_dir():
    raise EncoderLoadError(
        f"encoders dir {d} does not exist; it must hold {sorted(ENCODER_FILES.values())}"
    )
  per_net = {}
  for net in encoder_keys.NETS:
    path = encoder_file(d, net)
    sd = _read_encoder_file(path)
    try:
      per_net[net] = encoder_keys.import_published_encoder(net, sd)
    except encoder_keys.EncoderKeyError as e:
      raise EncoderLoadError(
          f"{path} is not the published {_NET_WHAT[net]} file ({ENCODER_FILES[net]}): {e}"
      ) from e
  return encoder_keys.merge_published(**per_net)


def load_checkpoint_encoders(checkpoint) -> dict:
  """OfficialEncoders variables from a DVA checkpoint file (EMA set) or an s3jax workdir."""
  path = pathlib.Path(checkpoint)
  if path.is_dir():
    variables = dva_checkpoint.load_frozen_encoders(path)
    if variables is None:
      raise EncoderLoadError(
          f"{path} is a directory without {dva_checkpoint.FROZEN_ENCODERS_DIR}/: pass a DVA "
          "checkpoint file with encoder.idnet|lndnet|bgnet.backbone.* keys, a workdir that "
          "`convert import` filled from one, or --encoders DIR with the published files"
      )
    return variables
  if not path.is_file():
    raise EncoderLoadError(f"checkpoint not found: {path}")
  try:
    sd = sdlib.load_state_dict(path, which="ema")
  except sdlib.StateDictError as e:
    raise EncoderLoadError(str(e)) from e
  prefix = dva_checkpoint.ENCODER_PREFIX
  nets = sorted({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})
  if not set(encoder_keys.NETS) <= set(nets):
    raise EncoderLoadError(
        f"{path} holds no frozen encoders (needs {prefix}idnet|lndnet|bgnet.backbone.*; found "
        f"{prefix}{{{','.join(nets)}}}); pass --encoders DIR with the published files instead"
    )
  try:
    return encoder_keys.encoders_params_from_torch(sd, prefix=prefix)
  except encoder_keys.EncoderKeyError as e:
    raise EncoderLoadError(f"{path}: {e}") from e


def load_encoders(encoders_dir=None, checkpoint=None) -> dict:
  """OfficialEncoders variables (numpy) from exactly one of ``encoders_dir`` / ``checkpoint``."""
  if (encoders_dir is None) == (checkpoint is None):
    raise ValueError("give exactly one of encoders_dir (published files) or checkpoint")
  if encoders_dir is not None:
    return load_published_encoders(encoders_dir)
  return load_checkpoint_encoders(checkpoint)


def fingerprint(variables) -> str:
  """Short sha256 (16 hex) of encoder variables (names, shapes, values): which weights made a
  dataset (``encoders_fingerprint``) or an edit-cache entry."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  named = sorted(((jax.tree_util.keystr(path), v) for path, v in flat), key=lambda kv: kv[0])
  checkpointing.hash_named_arrays(h, named)
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------
# program -> the outputs it computes. 'features' is data_prep's all-in-one (one BiSeNet
# parsing for both masks); the others run one network each, for the editor.
PROGRAMS = {
    "features": ("z_id", "z_lnd", "mask", "mask_video"),
    "z_id": ("z_id",),
    "z_lnd": ("z_lnd",),
    "mask_video": ("mask_video",),
}
_EMPTY = {
    "z_id": ((Z_ID_DIM,), np.float32),
    "z_lnd": ((Z_LND_DIM,), np.float32),
    "mask": ((CROP_SIZE, CROP_SIZE), bool),
    "mask_video": ((CROP_SIZE, CROP_SIZE), bool),
}


class OfficialFeatures:
  """IR-SE50 z_id, MobileNet z_lnd and BiSeNet masks of aligned (N, C, C, 3) uint8 crops.

  Crops of another size than 256 px are resized first (``face_features.resize_crops``: the
  encoders' fixed windows assume 256 px). They go through in batches of at most
  ``batch_size`` (rounded up to a multiple of the device count), split over every device
  of ``mesh``; the last batch is padded (repeating its last crop) to the next power-of-two
  multiple of the device count, so any number of crops needs at most
  ``log2(batch_size / devices) + 1`` shapes per program and a short tail does not pay for
  a full batch. Each (program, shape) is compiled once (``compiled_programs``). Crops
  travel to the devices as uint8 and become ``crop * 2/255 - 1`` there (``images.to_model``).

  Args:
    variables: ``OfficialEncoders`` variables (``{'params', 'batch_stats'}``), e.g.
      :func:`load_encoders` or ``porting.dva_checkpoint.load_frozen_encoders(workdir)``.
    batch_size: crops per device call.
    mesh: a mesh whose axes all split the batch; default a 1-D mesh over ``devices``.
    devices: default ``jax.local_devices()`` (crops come from and return to this host).
    dtype: compute dtype of the encoders (float32 matches the reference).
    source: where the weights came from (``info()``).
  """

  def __init__(
      self,
      variables,
      batch_size: int = 16,
      mesh: Optional[Mesh] = None,
      devices: Optional[Sequence[Any]] = None,
      dtype=jnp.float32,
      source: str = "",
  ):
    if mesh is None:
      devs = list(devices) if devices is not None else jax.local_devices()
      mesh = Mesh(np.asarray(devs), ("data",))
    self.mesh = mesh
    self.num_devices = int(mesh.size)
    nd = self.num_devices
    self.batch_size = max(nd, -(-int(batch_size) // nd) * nd)
    self.source = source
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), dict(variables))
    # Of the float32 weights that run: the key of datasets and of the edit cache.
    self.fingerprint = fingerprint(host)
    self.model = face_encoders.OfficialEncoders(dtype=dtype)
    self._repl = NamedSharding(mesh, P())
    self._batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    self.variables = jax.device_put(host, self._repl)
    self._jit = {
        name: jax.jit(
            functools.partial(self._apply, name),
            in_shardings=(self._repl, self._batch),
            out_shardings=self._batch,
        )
        for name in PROGRAMS
    }
    self._compiled = {}

  @classmethod
  def load(cls, encoders_dir=None, checkpoint=None, **kwargs) -> "OfficialFeatures":
    """From the published files or a DVA checkpoint (see :func:`load_encoders`)."""
    variables = load_encoders(encoders_dir, checkpoint)
    where = os.fspath(encoders_dir if encoders_dir is not None else checkpoint)
    return cls(variables, source=where, **kwargs)

  # -- the four entry points -----------------------------------------------------------
  def __call__(self, crops_u8, timings: Optional[dict] = None) -> dict[str, np.ndarray]:
    """All outputs in one program: {z_id (N, 512) f32, z_lnd (N, 102) f32, mask,
    mask_video (N, 256, 256) bool}. Adds compile seconds to ``timings['compile']``."""
    return self._run("features", crops_u8, timings)

  def id_feats(self, crops_u8, timings: Optional[dict] = None) -> np.ndarray:
    """(N, 512) float32 L2-normalised ArcFace (IR-SE50) embeddings: z_id."""
    return self._run("z_id", crops_u8, timings)["z_id"]

  def lnd_feats(self, crops_u8, timings: Optional[dict] = None) -> np.ndarray:
    """(N, 102) float32 landmark features (51 non-jaw points in [0, 1]): z_lnd."""
    return self._run("z_lnd", crops_u8, timings)["z_lnd"]

  def video_masks(
      self, crops_u8, size: Optional[int] = None, timings: Optional[dict] = None
  ) -> np.ndarray:
    """(N, S, S) uint8 {0, 1} BiSeNet paste-back masks (``face_mask(for_video=True)``).

    Computed at 256 px and resized (nearest, as the reference resizes its parsing) to
    ``size`` (default the crops' size).
    """
    crops = _as_crops(crops_u8)
    size = crops.shape[1] if size is None else int(size)
    masks = self._run("mask_video", crops, timings)["mask_video"].astype(np.uint8)
    if size != CROP_SIZE and len(masks):
      masks = np.stack(
          [cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in masks]
      )
    return masks.reshape(len(masks), size, size)

  # -- batching --------------------------------------------------------------------------
  def batch_shape(self, remaining: int) -> int:
    """Crops in the next call when ``remaining`` are left: ``batch_size``, or for the tail
    the smallest power-of-two multiple of the device count that holds it."""
    n = self.num_devices
    while n < remaining and n < self.batch_size:
      n *= 2
    return min(n, self.batch_size)

  def compiled_programs(self) -> set[tuple[str, int]]:
    """The (program, batch) pairs compiled so far."""
    return set(self._compiled)

  def info(self) -> dict:
    """What goes into a dataset's metadata / report."""
    return {
        "face_features": "official",
        "z_id_dim": Z_ID_DIM,
        "encoders_source": self.source,
        "encoders_fingerprint": self.fingerprint,
    }

  def _apply(self, program: str, variables, x_u8):
    x = x_u8.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    model = self.model
    if program == "features":
      out = model.apply(variables, x)
      return {
          "z_id": out["id_feats"].astype(jnp.float32),
          "z_lnd": out["lnd_feats"].astype(jnp.float32),
          "mask": out["face_mask"][..., 0] > 0.5,
          "mask_video": out["face_mask_video"][..., 0] > 0.5,
      }
    if program == "z_id":
      return {"z_id": model.apply(variables, x, method="id_feats").astype(jnp.float32)}
    if program == "z_lnd":
      return {"z_lnd": model.apply(variables, x, method="lnd_feats").astype(jnp.float32)}
    mask = model.apply(variables, x, for_video=True, method="face_mask")
    return {"mask_video": mask[..., 0] > 0.5}

  def _program(self, program: str, batch: int, timings: dict):
    key = (program, batch)
    if key not in self._compiled:
      logging.info("compiling the official encoders (%s) for batches of %d crops", program, batch)
      t0 = time.perf_counter()
      x = jax.ShapeDtypeStruct((batch, CROP_SIZE, CROP_SIZE, 3), np.uint8, sharding=self._batch)
      self._compiled[key] = self._jit[program].lower(self.variables, x).compile()
      timings["compile"] = timings.get("compile", 0.0) + time.perf_counter() - t0
    return self._compiled[key]

  def _run(self, program: str, crops_u8, timings: Optional[dict]) -> dict[str, np.ndarray]:
    timings = {} if timings is None else timings
    x = _as_crops(crops_u8)
    n = len(x)
    if n:
      x = face_features.resize_crops(x, CROP_SIZE)
    results, pending = [], collections.deque()
    start = 0
    while start < n:
      b = self.batch_shape(n - start)
      fn = self._program(program, b, timings)
      part = x[start : start + b]
      k = len(part)
      if k < b:
        part = np.concatenate([part, np.repeat(part[-1:], b - k, 0)])
      # Dispatch ahead; fetch a batch only once the next one is queued.
      pending.append((fn(self.variables, jax.device_put(part, self._batch)), k))
      if len(pending) > 2:
        results.append(_fetch(*pending.popleft()))
      start += k
    while pending:
      results.append(_fetch(*pending.popleft()))
    if not results:
      return {key: np.zeros((0,) + _EMPTY[key][0], _EMPTY[key][1]) for key in PROGRAMS[program]}
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


def _as_crops(crops_u8) -> np.ndarray:
  x = np.asarray(crops_u8)
  if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] != 3 or x.dtype != np.uint8:
    raise ValueError(f"expected (N, C, C, 3) uint8 aligned crops, got {x.shape} {x.dtype}")
  return x


def _fetch(out, k: int) -> dict[str, np.ndarray]:
  host = jax.device_get(out)
  return {key: np.asarray(v)[:k] for key, v in host.items()}
