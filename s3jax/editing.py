"""Editing face videos with a trained DVA: classifier directions, batched DDIM, paste-back.

The procedure (DVA's classifier editing, ``editing_classifier.py``, with STIT's video path):

1. ``align_video`` (dlib, smoothed FFHQ quads) at ``max(size, 256)`` px, the
   size the face features are defined on (as ``data_prep`` does);
   crops, landmarks and masks are then resized to the model size. With
   ``EditOptions.alignment='reference'`` the reference's: detection with
   ``alignment.REFERENCE_DETECT`` (optionally on other decodes of the frames,
   ``detect_frames``) and crops from ``alignment.reference_crop`` (PIL QUAD warp at
   1024 px, JPEG round trip, PIL resize).
2. Per-frame z_lnd and z_id, and the paste-back mask, on the checkpoint's feature path
   (``config.model.face_features``): ``dlib`` (descriptor, landmark geometry, landmark
   hull) or ``official`` (IR-SE50, MobileNet, BiSeNet video mask; ``face_encoding.
   OfficialFeatures`` with the workdir's frozen encoders). z_id is averaged over the
   frames with a detected face: ``z̄_id``, L2-normalised by default
   (``EditOptions.renormalize_identity``; the reference does not renormalise).
3. Batched deterministic DDIM inversion x0 -> x_T conditioned on
   ``z_face(z̄_id, z_lnd_i)``: one jitted ``lax.scan``, frames in fixed-size
   chunks (the last one padded), sharded over all devices, compiled once per
   chunk shape (``DDIMRunner``). Inversion and decoding run the same compiled program
   (``diffusion.ddim_scan``; the step constants are arguments), so one compile serves both.
4. ``Classifier.edit`` (``models.editor.classifier_edit``):
   ``l2norm(denorm(norm(z̄_id) + s·√D·w/‖w‖))`` with the classifier's weight column
   ``w`` and D the z_id width (128 dlib, 512 ArcFace).
5. Batched DDIM decoding from x_T with ``z_face(z̄'_id, z_lnd_i)``.
6. ``video.paste_back`` with the video mask (``alignment.reference_paste``, PIL
   PERSPECTIVE with a hard alpha, for the reference's alignment, crop space and hard blend) (hard / feather / poisson), composited in the
   frame (default) or, as the reference, in the crop (``EditOptions.paste_space``); or
   ``residual_paste_back`` ('residual'): the frame plus the feathered, warped difference
   between the edited decode and the DDIM reconstruction (one extra decode, cached), so the
   frame's own detail survives inside the face.

``EditOptions`` holds every choice where the default deviates from the reference;
``REFERENCE_OPTIONS`` (``VideoEditor(reference=True)``, ``python -m s3jax.edit
--reference``) reproduces the reference's math. docs/editing.md lists them.

The encoding (aligned crops, quads, masks, z_lnd, per-frame and averaged z_id,
x_T) is cached per (video content hash, model parameter hash, steps, size,
alignment options) in ``<checkpoint>/edit_cache`` by default, so further
edits of the same clip skip alignment, features and inversion.

Already aligned inputs (dataset records with their landmarks and z_id) skip
step 1 and the features: ``VideoEditor.encode_aligned``.

``VideoEditor.edit_video`` holds the whole video in memory; ``s3jax.edit_stream`` (what
``python -m s3jax.edit`` runs) streams a video file through the same per-frame and
per-chunk steps (``detect_settings``, ``plan_alignment``, ``crop_frame``,
``frame_features``, ``model_crops``, ``invert_crops``, ``decode_crops``, ``paste_frame``,
``identity_scores``, ``edit_report``) in bounded memory, with the same result.

Public API: ``VideoCode``, ``DDIMRunner``, ``VideoEditor``, ``EditOptions``,
``average_identity``, ``residual_paste_back``, ``crop_composite``, ``dlib_decoded_frames``,
``VideoDigest``, ``video_hash``, ``jsonable``, ``BLENDS``. Weights are loaded by
``s3jax.loading`` (``load_dva``, ``load_classifier``, ``load_editor``) and
``porting.dva_checkpoint.load_frozen_encoders``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Callable, Optional

import dlib
import flax
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from s3jax import alignment, checkpointing, diffusion, face_encoding, face_features, images
from s3jax import loading, metrics, video
from s3jax.loading import Classifier
from s3jax.models.editor import l2_normalize
from s3jax.models import autoencoder
from s3jax.porting import dva_checkpoint

FEATURE_SIZE = 256  # alignment/feature size, as data_prep.common.FEATURE_SIZE
CACHE_VERSION = 1
DEFAULT_CHUNK = 8
PASTE_SPACES = ("frame", "crop")
ALIGN_BORDERS = ("reflect", "constant")
# 'default': align_video's crop_from_quad; 'reference': the reference's detection, crop, paste.
ALIGNMENTS = ("default", "reference")
# video.paste_back's blends; 'residual' also needs the reconstruction (residual_paste_back).
RESIDUAL = "residual"
BLENDS = tuple(video.BLEND_DEFAULTS)
RECON_CACHE_ENTRIES = 2  # reconstructions an editor keeps in memory (one per recent video)

EditFn = Callable[[np.ndarray, str, float], np.ndarray]


# ---------------------------------------------------------------------------
# Options: where the default deviates from the reference
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EditOptions:
  """The editing choices on which the default and the reference differ (docs/editing.md).

  steps: DDIM steps of inversion and decoding. The reference's script runs ``--T 1000``;
    100 is 10x faster.
  renormalize_identity: L2-normalise the averaged z_id. The reference does not (its mean
    has norm < 1); renormalising keeps it on the unit sphere like every training z_id
    and makes strength 0 decode exactly the DDIM reconstruction.
  paste_space: 'frame' composites the decoded crop into the frame inside the warped video
    mask, so pixels outside the mask keep the frame's full resolution. 'crop' is the
    reference's: composite ``where(mask, decoded, crop)`` in the crop, then replace the
    whole quad in the frame with it.
  align_border: how the alignment warp fills parts of the quad outside the frame:
    'reflect' (FFHQ's padded recipe) or 'constant' (black, the reference's
    ``enable_padding=False``).
  blend: paste-back blend (``BLENDS``): ``video.BLEND_DEFAULTS``' hard / feather / poisson,
    or 'residual' (``residual_paste_back``, beyond the reference); 'hard' is the reference's.
  alignment: 'default' (``alignment.align_video``: detection on a 640 px copy, the largest
    face scoring >= 0.5; ``crop_from_quad``; ``video.paste_back``) or 'reference' (the
    reference's, bit for bit: ``alignment.REFERENCE_DETECT``, ``alignment.reference_crop``
    at ``max(size, 256)`` px, always black outside the frame (``align_border`` does not
    apply), and, with ``paste_space='crop'`` and ``blend='hard'``,
    ``alignment.reference_paste``).
  """

  steps: int = 100
  renormalize_identity: bool = True
  paste_space: str = "frame"
  align_border: str = "reflect"
  blend: str = "hard"
  alignment: str = "default"

  def __post_init__(self):
    diffusion.respaced_timesteps(self.steps)  # validates the step count early
    if self.paste_space not in PASTE_SPACES:
      raise ValueError(f"paste_space must be one of {PASTE_SPACES}, got {self.paste_space!r}")
    if self.align_border not in ALIGN_BORDERS:
      raise ValueError(f"align_border must be one of {ALIGN_BORDERS}, got {self.align_border!r}")
    if self.blend not in BLENDS:
      raise ValueError(f"blend must be one of {sorted(BLENDS)}, got {self.blend!r}")
    if self.alignment not in ALIGNMENTS:
      raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")


DEFAULT_OPTIONS = EditOptions()
# editing_classifier.py: --T 1000, the mean z_id as it is, paste in the crop, no padding,
# its detection, PIL crop and PIL paste-back.
REFERENCE_OPTIONS = EditOptions(
    steps=1000,
    renormalize_identity=False,
    paste_space="crop",
    align_border="constant",
    blend="hard",
    alignment="reference",
)


def resolve_options(reference: bool = False, **overrides) -> EditOptions:
  """The reference's or the default options, with every non-None override applied."""
  base = REFERENCE_OPTIONS if reference else DEFAULT_OPTIONS
  given = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(given) - {f.name for f in dataclasses.fields(EditOptions)}
  if unknown:
    raise TypeError(f"unknown edit options {sorted(unknown)}")
  return dataclasses.replace(base, **given)


def average_identity(z_frames, renormalize: bool = True) -> np.ndarray:
  """The video's z_id: the mean of the per-frame z_id (M, D) -> (D,) float32.

  ``renormalize=False`` is the reference's ``torch.mean(cond, 0)``, fed as it is to
  the fusion layer and the edit; ``True`` L2-normalises it.
  """
  z = np.asarray(z_frames, np.float64).mean(0)
  return (l2_normalize(z) if renormalize else z).astype(np.float32)


def dlib_decoded_frames(paths) -> np.ndarray:
  """Image files decoded by ``dlib.load_rgb_image`` (N, H, W, 3) uint8.

  The reference detects its landmarks on this decode but crops and pastes on PIL's
  (quirk 1 of ``golden/edit``): on JPEG frames the two differ by up to 15 grey levels and
  move the landmarks by 2-4 px. Pass the result as ``detect_frames`` to
  ``VideoEditor.encode`` / ``edit_video`` (reference alignment) with the PIL- or
  OpenCV-decoded frames (``video.read_frames``) as the frames.
  """
  return np.stack([dlib.load_rgb_image(str(p)) for p in paths])


def crop_composite(masks, crops, original_crops) -> np.ndarray:
  """``where(mask, crop, original crop)`` for one crop (S, S, 3) or a stack (M, S, S, 3): the
  reference's crop-space composite."""
  return np.where(np.asarray(masks)[..., None].astype(bool), crops, original_crops)


# ---------------------------------------------------------------------------
# Residual paste-back
# ---------------------------------------------------------------------------
def residual_paste_back(
    frame,
    edited_crop,
    reconstruction_crop,
    quad,
    mask_crop,
    dilate: Optional[float] = None,
    blur: Optional[float] = None,
    return_mask: bool = False,
):
  """Adds what the edit changed to ``frame``: ``frame + alpha * warp(edited - reconstruction)``.

  ``edited_crop`` and ``reconstruction_crop`` are (S, S, 3) uint8 decodes of the same x_T
  with the edited and the unedited z_id: ``video.paste_back(blend='residual')``, with
  feather's alpha and support. Where the edit changed nothing the frame keeps its own
  pixels, so a blurry low-resolution decode does not blur the face; pixels outside the
  support are bit-identical to ``frame``. Returns the new frame, or ``(frame, alpha,
  support)`` when ``return_mask``.
  """
  edited = np.asarray(edited_crop)
  if np.shape(reconstruction_crop) != edited.shape or edited.dtype != np.uint8:
    raise ValueError(
        "edited_crop and reconstruction_crop must be uint8 of one shape, got "
        f"{edited.shape} {edited.dtype} and {np.shape(reconstruction_crop)}"
    )
  return video.paste_back(
      frame,
      edited,
      quad,
      mask_crop,
      blend=RESIDUAL,
      dilate=dilate,
      blur=blur,
      return_mask=return_mask,
      reconstruction_crop=reconstruction_crop,
  )


# ---------------------------------------------------------------------------
# Encoded videos
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class VideoCode:
  """What ``VideoEditor.encode`` returns (and caches). ``M`` = edited frames, ``N`` = all."""

  num_frames: int  # N
  frame_shape: tuple  # (H, W, 3)
  frame_indices: np.ndarray  # (M,) frames that are edited (not passthrough)
  quads: np.ndarray  # (N, 4, 2) smoothed quads
  # crops, masks and x_T are None in the streaming editor's code (edit_stream), which
  # holds them one chunk at a time.
  crops: Optional[np.ndarray]  # (M, S, S, 3) uint8 aligned crops at the model size
  masks: Optional[np.ndarray]  # (M, S, S) uint8 {0,1} video face masks
  landmarks: np.ndarray  # (M, 68, 2) landmarks in the pixels of the aligned crops encoded
  # (FEATURE_SIZE px for ``encode``; the given crops' for ``encode_aligned``)
  z_lnd: np.ndarray  # (M, 102)
  z_id_frames: np.ndarray  # (M, D) per-frame z_id
  z_id: np.ndarray  # (D,) averaged, L2-normalised
  x_T: Optional[np.ndarray]  # (M, S, S, 3) float32 inverted noise maps
  has_face: np.ndarray  # (N,) bool detected
  interpolated: np.ndarray  # (N,) bool short gap
  passthrough: list  # frames left unedited (long gaps)
  align_report: dict
  key: str = ""
  cache_hit: bool = False
  cache_path: Optional[str] = None
  timings: dict = dataclasses.field(default_factory=dict)

  _ARRAYS = (
      "frame_indices",
      "quads",
      "crops",
      "masks",
      "landmarks",
      "z_lnd",
      "z_id_frames",
      "z_id",
      "x_T",
      "has_face",
      "interpolated",
  )

  def save(self, path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "num_frames": self.num_frames,
        "frame_shape": list(self.frame_shape),
        "passthrough": [int(i) for i in self.passthrough],
        "align_report": self.align_report,
        "key": self.key,
        "version": CACHE_VERSION,
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        meta=np.asarray(json.dumps(meta)),
        **{k: np.asarray(getattr(self, k)) for k in self._ARRAYS if getattr(self, k) is not None},
    )
    tmp.replace(path)

  @classmethod
  def load(cls, path) -> "VideoCode":
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"cache {path} has version {meta.get('version')}")
      arrays = {k: np.asarray(z[k]) if k in z else None for k in cls._ARRAYS}
    return cls(
        num_frames=int(meta["num_frames"]),
        frame_shape=tuple(meta["frame_shape"]),
        passthrough=list(meta["passthrough"]),
        align_report=meta["align_report"],
        key=meta["key"],
        cache_hit=True,
        cache_path=str(path),
        **arrays,
    )


class VideoDigest:
  """sha256 of a video's decoded frames, fed one frame at a time, then their count, shape
  and dtype: a long video is hashed without holding it (``video_hash``)."""

  def __init__(self):
    self._hash = hashlib.sha256()
    self.count = 0
    self.frame_shape = None  # the first frame's (H, W, 3)
    self._dtype = None

  def update(self, frame) -> None:
    frame = np.ascontiguousarray(frame)
    if self.frame_shape is None:
      self.frame_shape, self._dtype = frame.shape, str(frame.dtype)
    elif (frame.shape, str(frame.dtype)) != (self.frame_shape, self._dtype):
      raise ValueError(
          f"frame {self.count} is {frame.shape} {frame.dtype}, the first was "
          f"{self.frame_shape} {self._dtype}"
      )
    self._hash.update(frame.data)
    self.count += 1

  def hexdigest(self) -> str:
    h = self._hash.copy()
    h.update(repr((self.count, self.frame_shape, self._dtype)).encode())
    return h.hexdigest()


def video_hash(frames) -> str:
  """``VideoDigest`` of frames (N, H, W, 3) or any iterable of frames."""
  digest = VideoDigest()
  for frame in frames:
    digest.update(frame)
  return digest.hexdigest()


def params_hash(params, config=None) -> str:
  """sha256 over the parameter leaves (sorted by path) and the model config."""
  h = hashlib.sha256()
  if config is not None:
    h.update(
        json.dumps(
            config.to_dict() if hasattr(config, "to_dict") else config, sort_keys=True, default=str
        ).encode()
    )
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  checkpointing.hash_named_arrays(h, (("/".join(map(str, k)), flat[k]) for k in sorted(flat)))
  return h.hexdigest()


def _progress(it, desc, total, enabled):
  return tqdm(it, desc=desc, total=total, leave=False) if enabled else it


# ---------------------------------------------------------------------------
# Batched DDIM
# ---------------------------------------------------------------------------
class DDIMRunner:
  """Chunked, padded, sharded DDIM inversion and decoding of frames with a DVA.

  Frames go through in fixed-size chunks (the last one padded by repeating its last
  frame), each split over every device of ``mesh``. One AOT-compiled program per chunk
  size serves both directions: it is ``diffusion.ddim_scan`` with the step constants
  (``diffusion.ddim_constants(steps, kind, pad=True)``) as arguments.

  Args:
    model: the DVA module (``models.autoencoder.DVA``).
    params: its parameters (replicated over the mesh here).
    steps: DDIM steps (must divide 1000, e.g. 20, 100).
    mesh: a ``jax.sharding.Mesh``; frames are split over all of its axes. Default:
      one axis over every device.
    chunk: frames per call (rounded up to a multiple of the device count; fewer
      frames use a smaller chunk).
    progress: a tqdm bar over the chunks.
  """

  def __init__(
      self, model, params, steps: int, mesh=None, chunk: int = DEFAULT_CHUNK, progress=False
  ):
    diffusion.respaced_timesteps(steps)  # validates the step count early
    self.model = model
    self.steps = int(steps)
    self.size = int(model.unet_config.image_size)
    # z_face = Linear(cat(z_id, z_lnd)): the z_id width is what the fusion layer takes.
    self.id_dim = int(np.shape(params["encoder"]["linear"]["kernel"])[0]) - autoencoder.LND_DIM
    self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
    self.num_devices = int(self.mesh.size)
    self.chunk = int(chunk)
    self.progress = progress
    self._repl = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.params = jax.device_put(params, self._repl)
    self._consts = {
        k: diffusion.ddim_constants(self.steps, k, pad=True) for k in ("invert", "decode")
    }
    self._compiled = {}

    def ddim(params, x, z_id, z_lnd, consts):
      z_face = model.apply({"params": params}, z_id, z_lnd, method="z_face")

      def eps_fn(x, t, z_face):
        return model.apply({"params": params}, x, t, z_face, method="denoise")

      return diffusion.ddim_scan(eps_fn, x, z_face, consts)

    batch = self._batch
    self._jit = jax.jit(
        ddim, in_shardings=(self._repl, batch, batch, batch, self._repl), out_shardings=batch
    )

  def chunk_size(self, num_frames: int) -> int:
    """Frames per call for a video of ``num_frames``: fixed per video shape."""
    n = min(self.chunk, max(int(num_frames), 1))
    return -(-n // self.num_devices) * self.num_devices

  def compiled(self, chunk: int):
    """The AOT-compiled DDIM scan for ``chunk`` frames (shared by invert and decode).

    Returns (fn, compile seconds spent now: 0 when it was compiled before).
    """
    if chunk in self._compiled:
      return self._compiled[chunk], 0.0
    t0 = time.perf_counter()
    s = self.size
    consts = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._repl),
        self._consts["decode"],
    )
    args = (
        self.params,
        jax.ShapeDtypeStruct((chunk, s, s, 3), jnp.float32, sharding=self._batch),
        jax.ShapeDtypeStruct((chunk, self.id_dim), jnp.float32, sharding=self._batch),
        jax.ShapeDtypeStruct((chunk, autoencoder.LND_DIM), jnp.float32, sharding=self._batch),
        consts,
    )
    self._compiled[chunk] = self._jit.lower(*args).compile()
    return self._compiled[chunk], time.perf_counter() - t0

  def invert(
      self, x0, z_id, z_lnd, timings: Optional[dict] = None, chunk: Optional[int] = None
  ) -> np.ndarray:
    """DDIM inversion x0 (M, S, S, 3) in [-1, 1] -> x_T, conditioned per frame on
    ``z_id`` (M, D) and ``z_lnd`` (M, 102). Adds ``invert`` (and ``compile``) seconds to
    ``timings``. ``chunk``: frames per call (default ``chunk_size(M)``); a video streamed in
    pieces passes its whole length's, so every piece runs the program the whole video would."""
    return self._run("invert", x0, z_id, z_lnd, {} if timings is None else timings, chunk)

  def decode(
      self, x_T, z_id, z_lnd, timings: Optional[dict] = None, chunk: Optional[int] = None
  ) -> np.ndarray:
    """DDIM decoding x_T (M, S, S, 3) -> x0 in [-1, 1] (float32), as ``invert``."""
    return self._run("decode", x_T, z_id, z_lnd, {} if timings is None else timings, chunk)

  def _run(self, kind: str, x, z_id, z_lnd, timings: dict, chunk: Optional[int]) -> np.ndarray:
    m = len(x)
    chunk = chunk or self.chunk_size(m)
    fn, compile_s = self.compiled(chunk)
    if compile_s:
      timings["compile"] = timings.get("compile", 0.0) + compile_s
    consts = jax.device_put(self._consts[kind], self._repl)
    t0 = time.perf_counter()
    outs = []
    n_chunks = -(-m // chunk)
    for c in _progress(range(n_chunks), kind, n_chunks, self.progress and n_chunks > 1):
      sl = slice(c * chunk, min((c + 1) * chunk, m))
      pad = chunk - (sl.stop - sl.start)

      def padded(a):
        a = np.asarray(a[sl], np.float32)
        return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

      args = [jax.device_put(padded(a), self._batch) for a in (x, z_id, z_lnd)]
      outs.append((fn(self.params, *args, consts), sl.stop - sl.start))
    result = np.concatenate([np.asarray(jax.device_get(o))[:k] for o, k in outs])
    timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------
class VideoEditor:
  """Encodes a video once, then edits it with batched DDIM (see the module docstring).

  Args:
    checkpoint_dir: a DVA workdir (``config.json`` + ``checkpoints/``; on the ``official``
      feature path also ``frozen_encoders/``, written by ``python -m s3jax.convert import``).
    steps: DDIM steps for inversion and decoding (must divide 1000, e.g. 20, 100).
      Default: ``options.steps`` (100; 1000 with ``reference``).
    mesh: a ``jax.sharding.Mesh``; frames are split over all of its axes. Default:
      one axis over every device.
    chunk: frames per jitted call (rounded up to a multiple of the device count;
      a shorter video uses a smaller chunk).
    cache: cache encodings (``encode(cache_dir=...)``, default ``<checkpoint>/edit_cache``).
    max_gap / detector: alignment options (``alignment.align_video``).
    model: optional ``(model, params, config)`` to skip loading the checkpoint (tests,
      benchmarks, sweeps).
    encoders: for the ``official`` path, ``OfficialEncoders`` variables or a
      ``face_encoding.OfficialFeatures`` (whose compiled programs are then shared) instead
      of ``<checkpoint>/frozen_encoders``.
    reference: start from ``REFERENCE_OPTIONS`` instead of ``DEFAULT_OPTIONS``.
    renormalize_identity / paste_space / align_border / blend / alignment: override that
      field of the options (``EditOptions``); None keeps it.
  """

  def __init__(
      self,
      checkpoint_dir,
      steps: Optional[int] = None,
      mesh=None,
      chunk: int = DEFAULT_CHUNK,
      cache: bool = True,
      max_gap: int = 5,
      detector: str = "cascade",
      progress: bool = False,
      model=None,
      step: Optional[int] = None,
      encoders=None,
      reference: bool = False,
      renormalize_identity: Optional[bool] = None,
      paste_space: Optional[str] = None,
      align_border: Optional[str] = None,
      blend: Optional[str] = None,
      alignment: Optional[str] = None,
  ):
    self.checkpoint_dir = pathlib.Path(checkpoint_dir)
    # Validated before loading anything.
    self.options = resolve_options(
        reference,
        steps=steps,
        renormalize_identity=renormalize_identity,
        paste_space=paste_space,
        align_border=align_border,
        blend=blend,
        alignment=alignment,
    )
    self.reference = bool(reference)
    self.steps = self.options.steps
    t0 = time.perf_counter()
    if model is None:
      self.model, params, self.config, self.ckpt_step = loading.load_dva(
          self.checkpoint_dir, step=step
      )
    else:
      self.model, params, self.config = model
      self.ckpt_step = None
    self.face_features = self.config.model.face_features
    if self.face_features not in ("dlib", "official"):
      raise ValueError(f"unknown face_features {self.face_features!r} (dlib or official)")
    if self.face_features == "official" and encoders is None:
      # Before anything is built or compiled: a missing import fails fast.
      encoders = dva_checkpoint.load_frozen_encoders(self.checkpoint_dir)
      if encoders is None:
        raise FileNotFoundError(
            f"{dva_checkpoint.frozen_encoders_dir(self.checkpoint_dir)} is missing: the "
            "official feature path needs the frozen IR-SE50/MobileNet/BiSeNet encoders. "
            "Import the published checkpoint, which carries them (encoder.*): `python -m "
            f"s3jax.convert import --src <published .ckpt> --workdir {self.checkpoint_dir} "
            "--config configs/voxceleb.py`"
        )
    self.size = int(self.config.model.unet.image_size)
    self.id_dim = autoencoder.id_dim(self.config.model)
    self.runner = DDIMRunner(
        self.model, params, self.steps, mesh=mesh, chunk=chunk, progress=progress
    )
    self.mesh = self.runner.mesh
    self.num_devices = self.runner.num_devices
    self.params = self.runner.params
    self.model_hash = params_hash(params, self.config.model)
    self.features = None  # the dlib path computes its features on the host
    if self.face_features == "official":
      if isinstance(encoders, face_encoding.OfficialFeatures):
        self.features = encoders  # shares its compiled programs (sweeps, tests)
      else:
        self.features = face_encoding.OfficialFeatures(encoders, batch_size=chunk, mesh=self.mesh)
      # z_id, z_lnd and the masks depend on the encoders: they key the cache too.
      self.model_hash = hashlib.sha256(
          (self.model_hash + self.features.fingerprint).encode()
      ).hexdigest()
    if self.reference and self.face_features != "official":
      logging.warning(
          "reference mode on a %r checkpoint: the reference's procedure with the dlib "
          "stand-ins for its encoders",
          self.face_features,
      )
    self.chunk = int(chunk)
    self.cache = bool(cache)
    self.max_gap = int(max_gap)
    self.detector = detector
    self.progress = progress
    self._reconstructions = {}  # fingerprint -> uint8 crops, the newest last
    self.load_seconds = time.perf_counter() - t0

  def chunk_size(self, num_frames: int) -> int:
    """Frames per DDIM call for a video of ``num_frames`` (``DDIMRunner.chunk_size``)."""
    return self.runner.chunk_size(num_frames)

  # -- encode / decode -------------------------------------------------------
  def cache_key(self, frames: np.ndarray, detect_frames: Optional[np.ndarray] = None) -> str:
    """The edit cache's key: frames, model, steps, size and the encode-time options.

    The reference alignment adds ``align=reference`` and the hash of ``detect_frames``
    when given (default-mode keys are unchanged).
    """
    detect = None if detect_frames is None else video_hash(detect_frames)
    return self.cache_key_of(video_hash(frames), detect)

  def cache_key_of(self, video_digest: str, detect_digest: Optional[str] = None) -> str:
    """``cache_key`` from the ``video_hash`` of the frames (and of ``detect_frames``)."""
    o = self.options
    opts = (
        f"steps={self.steps};size={self.size};gap={self.max_gap};det={self.detector};"
        f"renorm={o.renormalize_identity};border={o.align_border};"
        f"features={self.face_features}"
    )
    if o.alignment != "default":
      opts += f";align={o.alignment}"
      if detect_digest is not None:
        opts += f";detect={detect_digest}"
    return (
        f"{video_digest[:20]}-{self.model_hash[:20]}-s{self.steps}-{self.size}-"
        + hashlib.sha256(opts.encode()).hexdigest()[:8]
    )

  def default_cache_dir(self) -> pathlib.Path:
    return self.checkpoint_dir / "edit_cache"

  # -- alignment, one frame at a time ----------------------------------------
  def detect_settings(self) -> dict:
    """``alignment.detect_face``'s arguments for this editor's alignment: the default's
    detector, or the reference's (``alignment.REFERENCE_DETECT`` with HOG)."""
    if self.options.alignment == "default":
      return {"detector": self.detector}
    return dict(detector="hog", **alignment.REFERENCE_DETECT)

  def plan_alignment(self, found) -> alignment.AlignPlan:
    """Smoothed quads from the per-frame ``alignment.FaceDetection``s (``found``)."""
    return alignment.plan_alignment(found, self.detect_settings()["detector"], self.max_gap)

  def crop_frame(self, frame, quad, size: int) -> np.ndarray:
    """The aligned crop of ``frame`` (size px): ``alignment.crop_from_quad`` with
    ``align_border``, or the reference's ``alignment.reference_crop``."""
    if self.options.alignment == "reference":
      return alignment.reference_crop(frame, quad, size)
    return alignment.crop_from_quad(frame, quad, size, border=self.options.align_border)

  def align(self, frames, size: int, detect_frames=None) -> alignment.AlignResult:
    """``alignment.align_video``'s result for ``frames`` with crops of ``size`` px, as the
    options say.

    'default' alignment: ``align_video`` as it is (``align_border``). 'reference': the
    landmarks come from ``alignment.REFERENCE_DETECT`` on ``detect_frames`` (default: the
    frames; the reference's are ``dlib_decoded_frames``), the quads are smoothed as in the
    default, and the crops are ``alignment.reference_crop`` of ``frames`` (PIL's QUAD warp
    at 1024 px, JPEG at quality 75, PIL's resize to ``size``); the landmarks of frames
    without a detection are predicted on those crops. Built from ``detect_settings``,
    ``plan_alignment`` and ``crop_frame``, as the streaming editor aligns.
    """
    reference = self.options.alignment == "reference"
    src = frames if detect_frames is None or not reference else detect_frames
    t0 = time.perf_counter()
    found = alignment.detect_faces_batch(src, progress=self.progress, **self.detect_settings())
    t_detect = time.perf_counter() - t0
    plan = self.plan_alignment(found)
    t0 = time.perf_counter()
    crops = np.stack([self.crop_frame(f, q, size) for f, q in zip(frames, plan.quads)])
    t_crop = time.perf_counter() - t0
    report = dict(plan.report, seconds_detect=t_detect, seconds_crop=t_crop)
    if reference:
      report.update(
          alignment="reference", detect_frames="given" if detect_frames is not None else "frames"
      )
    return plan.result(crops, report)

  def frame_features(self, crops, landmarks, timings: Optional[dict] = None):
    """(z_id (M, D), z_lnd (M, 102)) of aligned crops (M, C, C, 3) uint8 with their
    landmarks (M, 68, 2) in crop pixels: dlib descriptor and landmark geometry, or the
    official encoders."""
    if self.features is None:
      z_frames = face_features.dlib_descriptor(crops, landmarks_crop=landmarks)
      return z_frames, face_features.z_lnd_from_landmarks(landmarks, np.shape(crops)[1])
    return self.features.id_feats(crops, timings), self.features.lnd_feats(crops, timings)

  def model_crops(self, crops, landmarks, timings: Optional[dict] = None):
    """(crops, masks) at the model size from aligned crops (M, C, C, 3) uint8 and their
    landmarks (M, 68, 2) in crop pixels: the crops resized, the video masks (M, S, S)
    uint8 from the landmark hull (dlib path) or BiSeNet on the crops (official path)."""
    s, c = self.size, np.shape(crops)[1]
    crops_s = face_features.resize_crops(crops, s)
    if self.features is not None:
      masks = self.features.video_masks(crops, s, timings)
    else:
      lnd = np.asarray(landmarks, np.float64)
      lnd_s = (lnd + 0.5) * (s / c) - 0.5 if c != s else lnd
      masks = np.stack([face_features.hull_mask(l, s, for_video=True) for l in lnd_s])
    return crops_s, np.asarray(masks).astype(np.uint8)

  def encode(self, video_frames, cache_dir=None, detect_frames=None) -> VideoCode:
    """Align, compute features and invert ``video_frames`` (N, H, W, 3) uint8 -> VideoCode.

    ``detect_frames``: the same frames decoded otherwise (N, H, W, 3), for the landmarks of
    the reference alignment (``dlib_decoded_frames``, as the reference detects); ignored by
    the default alignment. Raises ``alignment.NoFaceError`` when no frame has a face.
    """
    frames = np.asarray(video_frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if self.options.alignment == "default":
      detect_frames = None
    elif detect_frames is not None:
      detect_frames = np.asarray(detect_frames)
      if detect_frames.shape != frames.shape or detect_frames.dtype != np.uint8:
        raise ValueError(
            f"detect_frames must be uint8 of the frames' shape {frames.shape}, got "
            f"{detect_frames.shape} {detect_frames.dtype}"
        )
      if np.array_equal(detect_frames, frames):  # lossless frames decode alike: one cache entry
        detect_frames = None
    timings = {}
    t0 = time.perf_counter()
    key = self.cache_key(frames, detect_frames)
    timings["hash"] = time.perf_counter() - t0
    cache_path = None
    if self.cache:
      cache_path = pathlib.Path(cache_dir or self.default_cache_dir()) / f"{key}.npz"
      if cache_path.exists():
        try:
          code = VideoCode.load(cache_path)
          code.timings = dict(timings, cache_load=time.perf_counter() - t0 - timings["hash"])
          return code
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("ignoring unreadable edit cache %s: %s", cache_path, e)

    t0 = time.perf_counter()
    fsize = max(self.size, FEATURE_SIZE)
    res = self.align(frames, fsize, detect_frames)
    timings["align"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    usable = np.ones(len(frames), bool)
    usable[list(res.passthrough)] = False
    idx = np.flatnonzero(usable)
    lnd = np.asarray(res.landmarks_crop[idx], np.float64)
    z_frames, z_lnd = self.frame_features(res.crops[idx], lnd, timings)
    crops_s, masks = self.model_crops(res.crops[idx], lnd, timings)
    timings["features"] = time.perf_counter() - t0 - timings.get("compile", 0.0)
    code = self._encode_crops(
        crops_s,
        masks,
        lnd,
        z_frames,
        z_lnd,
        detected=np.asarray(res.has_face, bool)[idx],
        timings=timings,
        num_frames=len(frames),
        frame_shape=tuple(frames.shape[1:]),
        frame_indices=idx,
        quads=np.asarray(res.quads),
        has_face=np.asarray(res.has_face, bool),
        interpolated=np.asarray(res.interpolated, bool),
        passthrough=list(res.passthrough),
        align_report=jsonable(res.report),
        key=key,
        cache_path=str(cache_path) if cache_path else None,
    )
    if cache_path is not None:
      try:
        code.save(cache_path)
      except OSError as e:
        logging.warning("could not write the edit cache %s: %s", cache_path, e)
        code.cache_path = None
    return code

  def encode_aligned(
      self, crops_u8, landmarks, z_id_frames, z_lnd, name: str = "aligned"
  ) -> VideoCode:
    """A ``VideoCode`` for frames that are already aligned (e.g. dataset records).

    Args:
      crops_u8: (M, C, C, 3) uint8 aligned crops, any size C (resized to the model's).
      landmarks: (M, 68, 2) landmarks in pixels of those crops (the video masks of the
        dlib path; the official path's masks come from BiSeNet on the crops).
      z_id_frames: (M, D) per-frame z_id; their mean (``average_identity``) conditions the
        inversion.
      z_lnd: (M, 102) per-frame landmark codes.
      name: labels the code (``key`` is ``aligned:<name>``).

    Every frame is edited; there are no quads (``paste`` does not apply) and no cache.
    """
    crops = np.asarray(crops_u8)
    m = len(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
      raise ValueError(f"expected (M, C, C, 3) uint8 crops, got {crops.shape} {crops.dtype}")
    for what, a, shape in (
        ("landmarks", landmarks, (m, 68, 2)),
        ("z_id_frames", z_id_frames, (m, self.id_dim)),
        ("z_lnd", z_lnd, (m, autoencoder.LND_DIM)),
    ):
      if np.shape(a) != shape:
        raise ValueError(f"{what} must be {shape} for {m} crops, got {np.shape(a)}")
    timings = {}
    lnd = np.asarray(landmarks, np.float64)
    t0 = time.perf_counter()
    crops_s, masks = self.model_crops(crops, lnd, timings)
    timings["features"] = time.perf_counter() - t0
    return self._encode_crops(
        crops_s,
        masks,
        lnd,
        np.asarray(z_id_frames),
        np.asarray(z_lnd),
        detected=np.ones(m, bool),
        timings=timings,
        num_frames=m,
        frame_shape=(self.size, self.size, 3),
        frame_indices=np.arange(m),
        quads=np.zeros((m, 4, 2), np.float32),
        has_face=np.ones(m, bool),
        interpolated=np.zeros(m, bool),
        passthrough=[],
        align_report={},
        key=f"aligned:{name}",
        cache_path=None,
    )

  def _encode_crops(
      self, crops_s, masks, lnd, z_frames, z_lnd, detected, timings: dict, **video_fields
  ) -> VideoCode:
    """The shared tail of ``encode``/``encode_aligned``: the averaged z_id, DDIM inversion
    of the model-size crops -> VideoCode."""
    z_mean = average_identity(z_frames[detected], self.options.renormalize_identity)
    x_T = self.invert_crops(crops_s, z_mean, z_lnd, timings)
    return VideoCode(
        crops=crops_s,
        masks=masks,
        landmarks=np.asarray(lnd, np.float32),
        z_lnd=np.asarray(z_lnd, np.float32),
        z_id_frames=np.asarray(z_frames, np.float32),
        z_id=z_mean,
        x_T=x_T,
        cache_hit=False,
        timings=timings,
        **video_fields,
    )

  def invert_crops(self, crops_s, z_mean, z_lnd, timings: dict, chunk: Optional[int] = None):
    """x_T (M, S, S, 3) float32 of model-size crops, conditioned on the averaged z_id (D,)
    and each frame's z_lnd (``DDIMRunner.invert``)."""
    z_rep = np.repeat(np.asarray(z_mean, np.float32)[None], len(crops_s), 0)
    x_T = self.runner.invert(images.to_model(crops_s), z_rep, z_lnd, timings, chunk)
    return x_T.astype(np.float32)

  def decode_crops(self, x_T, z_id, z_lnd, timings: Optional[dict] = None, chunk=None):
    """Decodes x_T (M, S, S, 3) with ``z_id`` ((D,) or (M, D)) and z_lnd (M, 102) ->
    crops (M, S, S, 3) uint8."""
    z = np.asarray(z_id, np.float32)
    m = len(x_T)
    if z.ndim == 1:
      z = np.repeat(z[None], m, 0)
    if z.shape != (m, self.id_dim):
      raise ValueError(f"z_id must be ({self.id_dim},) or ({m}, {self.id_dim}), got {z.shape}")
    return images.to_uint8(self.runner.decode(x_T, z, z_lnd, timings, chunk))

  def decode(self, code: VideoCode, z_id, timings: Optional[dict] = None) -> np.ndarray:
    """Decode ``code.x_T`` with ``z_id`` ((D,) or (M, D)) -> aligned crops (M, S, S, 3) uint8."""
    return self.decode_crops(code.x_T, z_id, code.z_lnd, timings)

  def reconstruct(self, code: VideoCode, timings: Optional[dict] = None) -> np.ndarray:
    """The DDIM reconstruction (decode with the unedited averaged z_id) (M, S, S, 3) uint8.

    Cached: in memory (the editor's last ``RECON_CACHE_ENTRIES`` codes) and, for a code from
    the edit cache, in ``<key>.reconstruction.npz`` beside it, both keyed by a hash of x_T,
    z_id and z_lnd. Adds ``decode_reconstruction`` seconds to ``timings`` when it decodes,
    ``reconstruction_load`` when it reads the file.
    """
    return self.reconstruction(code, timings)[0]

  def reconstruction(self, code: VideoCode, timings: Optional[dict] = None):
    """``reconstruct`` -> (crops, where they came from: 'decoded', 'memory' or 'disk').

    The crops are the caller's own copy (the cache keeps its own).
    """
    timings = {} if timings is None else timings
    h = hashlib.sha256()
    for a in (code.x_T, code.z_id, code.z_lnd):
      a = np.ascontiguousarray(a, np.float32)
      h.update(repr(a.shape).encode())
      h.update(a.data)
    fp = h.hexdigest()
    if fp in self._reconstructions:
      return self._reconstructions[fp].copy(), "memory"
    path = None
    if code.cache_path:
      cp = pathlib.Path(code.cache_path)
      path = cp.with_name(f"{cp.stem}.reconstruction.npz")
    crops, source = None, "decoded"
    if path is not None and path.exists():
      t0 = time.perf_counter()
      try:
        with np.load(path, allow_pickle=False) as z:
          if str(z["fingerprint"]) == fp:
            crops, source = np.asarray(z["crops"]), "disk"
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("ignoring unreadable reconstruction cache %s: %s", path, e)
      timings["reconstruction_load"] = time.perf_counter() - t0
    if crops is None:
      t = {}
      crops = self.decode(code, code.z_id, t)
      timings["decode_reconstruction"] = t.get("decode", 0.0)
      if "compile" in t:
        timings["compile"] = timings.get("compile", 0.0) + t["compile"]
      if path is not None:
        try:
          tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
          np.savez(tmp, crops=crops, fingerprint=np.asarray(fp))
          tmp.replace(path)
        except OSError as e:
          logging.warning("could not write the reconstruction cache %s: %s", path, e)
    self._reconstructions[fp] = crops.copy()
    while len(self._reconstructions) > RECON_CACHE_ENTRIES:
      self._reconstructions.pop(next(iter(self._reconstructions)))
    return crops, source

  # -- the whole edit --------------------------------------------------------
  def blend_params(self, blend: str) -> dict:
    """``paste_back``'s dilate/blur for this model size.

    ``video.BLEND_DEFAULTS`` are in crop pixels of a 256 px crop; they are scaled to the
    model's crop size so the feather band covers the same part of the face at any size.
    """
    if blend not in BLENDS:
      raise ValueError(f"blend must be one of {sorted(BLENDS)}, got {blend!r}")
    d = video.BLEND_DEFAULTS[blend]
    return {"dilate": d["dilate"] * self.size / 256.0, "blur": d["blur"] * self.size / 256.0}

  def composite(self, code: VideoCode, crops) -> np.ndarray:
    """The reference's crop-space paste: ``where(mask, decoded, original crop)`` (M, S, S, 3)."""
    return crop_composite(code.masks, crops, code.crops)

  def paste(
      self,
      frames,
      code: VideoCode,
      crops,
      blend: Optional[str] = None,
      paste_space: Optional[str] = None,
      reconstruction=None,
  ) -> np.ndarray:
    """Pastes edited crops into copies of ``frames`` (frames not in the code pass through).

    ``paste_space`` 'frame': ``video.paste_back`` of the crop inside the warped video mask.
    'crop': the reference's; the crop-space ``composite`` replaces the whole quad.
    None: ``self.options``' (and likewise ``blend``).

    ``blend='residual'``: ``video.paste_back``'s residual of ``crops`` against ``reconstruction``
    ((M, S, S, 3) uint8; default ``self.reconstruct(code)``). With 'crop' the residual is
    masked in the crop (hard, as the reference composites) and added over the whole quad.

    The reference alignment with 'crop' and 'hard' pastes as the reference does:
    ``alignment.reference_paste`` (PIL PERSPECTIVE, bilinear, truncating, binary alpha) of
    the composite over the quad. One frame: ``paste_frame``.
    """
    blend, space = self.paste_choices(blend, paste_space)
    if blend == RESIDUAL and reconstruction is None:
      reconstruction = self.reconstruct(code)
    out = np.array(frames, copy=True)
    for j, i in enumerate(code.frame_indices):
      out[i] = self.paste_frame(
          frames[i],
          crops[j],
          code.quads[i],
          code.masks[j],
          code.crops[j],
          blend,
          space,
          None if reconstruction is None else reconstruction[j],
      )
    return out

  def paste_choices(self, blend: Optional[str] = None, paste_space: Optional[str] = None):
    """(blend, paste_space): the given ones or the options', validated."""
    blend = blend or self.options.blend
    space = paste_space or self.options.paste_space
    if space not in PASTE_SPACES:
      raise ValueError(f"paste_space must be one of {PASTE_SPACES}, got {space!r}")
    self.blend_params(blend)  # validates blend
    return blend, space

  def paste_frame(
      self, frame, crop, quad, mask, original_crop, blend: str, space: str, reconstruction=None
  ) -> np.ndarray:
    """One frame of ``paste``: the decoded ``crop`` (S, S, 3) uint8 pasted into a copy of
    ``frame`` over ``quad`` with the video ``mask`` (S, S); ``original_crop`` is the frame's
    aligned crop at the model size (the crop-space composite), ``reconstruction`` the
    residual blend's (S, S, 3) decode with the unedited z_id."""
    if space == "crop":
      crop = crop_composite(mask, crop, original_crop)
      if blend == RESIDUAL:  # the residual is then 0 outside the mask, as in the composite
        reconstruction = crop_composite(mask, reconstruction, original_crop)
      mask = np.ones_like(mask)
      if self.options.alignment == "reference" and blend == "hard":
        return alignment.reference_paste(frame, crop, quad)
    return video.paste_back(
        frame,
        crop,
        quad,
        mask,
        blend=blend,
        reconstruction_crop=reconstruction,
        **self.blend_params(blend),
    )

  def identity_embeddings(self, crops_u8) -> np.ndarray:
    """L2-normalised identity embeddings of aligned crops on the checkpoint's path: dlib
    descriptors (128-d) or ArcFace (IR-SE50, 512-d)."""
    if self.features is None:
      return face_features.identity_embeddings(crops_u8)
    return self.features.id_feats(crops_u8)

  def identity_metrics(self, original, edited, code: VideoCode) -> dict:
    """TL-ID/TG-ID (``identity_embeddings`` of the re-aligned frames), normalised by the
    original's."""
    idx = [int(i) for i in code.frame_indices if code.has_face[i]]
    if len(idx) < 2:
      return self.identity_scores(idx, idx)

    def embs(frames):
      crops = [self.crop_frame(frames[i], code.quads[i], FEATURE_SIZE) for i in idx]
      return self.identity_embeddings(np.stack(crops))

    return self.identity_scores(embs(original), embs(edited))

  def identity_scores(self, e_orig, e_edit) -> dict:
    """``identity_metrics`` from the identity embeddings (K, D) of the original and the
    edited frames with a detected face (crops of ``crop_frame`` at ``FEATURE_SIZE``)."""
    if len(e_orig) < 2:
      return {"tl_id": None, "tg_id": None, "note": "needs at least 2 frames with a face"}
    name = "dlib descriptor (128-d)" if self.features is None else "ArcFace IR-SE50 (512-d)"
    return {
        "tl_id": float(metrics.tl_id_normalised(e_edit, e_orig)),
        "tg_id": float(metrics.tg_id_normalised(e_edit, e_orig)),
        "tl_id_edited": float(metrics.tl_id(e_edit)),
        "tg_id_edited": float(metrics.tg_id(e_edit)),
        "tl_id_original": float(metrics.tl_id(e_orig)),
        "tg_id_original": float(metrics.tg_id(e_orig)),
        "identity_preservation": float(metrics.identity_preservation(e_edit, e_orig)),
        "embedding": f"{name}, frames re-cropped with the smoothed quads",
        "num_frames": len(e_orig),
    }

  def edit_choices(
      self,
      attribute: str,
      blend: Optional[str] = None,
      paste_space: Optional[str] = None,
      classifier: Optional[Classifier] = None,
      edit_fn: Optional[EditFn] = None,
  ):
    """(options with this edit's blend and paste space, edit_fn), checked before any work:
    the blend, the paste space, and the attribute when a ``classifier`` gives the edit."""
    options = dataclasses.replace(
        self.options,
        blend=blend or self.options.blend,
        paste_space=paste_space or self.options.paste_space,
    )
    if edit_fn is None:
      if classifier is None:
        raise ValueError("edit_video needs a classifier or an edit_fn")
      classifier.index(attribute)  # unknown attribute: fail before any work
      edit_fn = classifier.edit
    return options, edit_fn

  def edited_identity(self, edit_fn: EditFn, z_id, attribute: str, strength: float):
    """The edited video identity (D,) float32: ``edit_fn`` of the averaged ``z_id``."""
    z = np.asarray(z_id, np.float32)[None]
    return np.asarray(edit_fn(z, attribute, float(strength)), np.float32).reshape(-1)

  def residual_report(self, source: str, decode_seconds: float) -> dict:
    """The report's ``residual`` entry: where the reconstruction came from ('decoded',
    'memory' or 'disk') and what decoding it cost."""
    return {
        "extra_decode": source == "decoded",
        "reconstruction_source": source,
        "decode_reconstruction_s": round(float(decode_seconds), 4),
        "unet_calls_per_frame": self.steps if source == "decoded" else 0,
    }

  def edit_video(
      self,
      frames,
      attribute: str,
      strength: float,
      blend: Optional[str] = None,
      classifier: Optional[Classifier] = None,
      edit_fn: Optional[EditFn] = None,
      cache_dir=None,
      compute_metrics: bool = True,
      return_crops: bool = False,
      paste_space: Optional[str] = None,
      detect_frames=None,
  ):
    """Edits ``frames`` (N, H, W, 3) uint8 -> ``(frames_out, report)`` (+ crops if asked).

    Give a ``classifier`` (DVA classifier directions) or an ``edit_fn(z (N, D),
    attribute, strength) -> (N, D)`` (e.g. S3Editor's). Frames in long face
    gaps pass through unedited and are listed in the report. ``blend`` and
    ``paste_space`` default to ``self.options``'. Both renders share the inversion
    under the unedited z_id, as in the reference; ``crops`` are the decoded ones.
    ``blend='residual'`` also decodes the reconstruction (``reconstruct``, cached) and the
    report's ``residual`` says whether it took an extra decode and how long.
    ``detect_frames``: see ``encode`` (the reference alignment's landmark decode).
    The whole video is held in memory; ``edit_stream.edit_stream`` edits a video file in
    chunks, with the same result.
    """
    options, edit_fn = self.edit_choices(attribute, blend, paste_space, classifier, edit_fn)
    blend, paste_space = options.blend, options.paste_space
    frames = np.asarray(frames)
    t_all = time.perf_counter()
    code = self.encode(frames, cache_dir=cache_dir, detect_frames=detect_frames)
    timings = dict(code.timings)
    t0 = time.perf_counter()
    z_new = self.edited_identity(edit_fn, code.z_id, attribute, strength)
    timings["edit_z"] = time.perf_counter() - t0
    crops = self.decode(code, z_new, timings)
    recon, residual = None, None
    if blend == RESIDUAL:
      recon_t = {}
      recon, source = self.reconstruction(code, recon_t)
      residual = self.residual_report(source, recon_t.get("decode_reconstruction", 0.0))
      for k, v in recon_t.items():
        timings[k] = timings.get(k, 0.0) + v
    t0 = time.perf_counter()
    out = self.paste(frames, code, crops, blend, paste_space, reconstruction=recon)
    timings["paste"] = time.perf_counter() - t0
    ident = None
    if compute_metrics:
      t0 = time.perf_counter()
      ident = self.identity_metrics(frames, out, code)
      timings["metrics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    report = self.edit_report(code, options, attribute, strength, z_new, timings, ident, residual)
    if return_crops:
      return out, report, crops
    return out, report

  def edit_report(
      self,
      code: VideoCode,
      options: EditOptions,
      attribute: str,
      strength: float,
      z_new,
      timings: dict,
      identity: Optional[dict],
      residual: Optional[dict],
  ) -> dict:
    """The edit's report (docs/editing.md, "The report"), in memory or streamed."""
    return {
        "num_frames": int(code.num_frames),
        "frame_size": [int(code.frame_shape[1]), int(code.frame_shape[0])],
        "attribute": attribute,
        "strength": float(strength),
        "blend": options.blend,
        # 'residual' only: the reconstruction it subtracts (an extra decode unless cached).
        "residual": residual,
        "steps": self.steps,
        "face_features": self.face_features,
        "options": dataclasses.asdict(options),
        "reference": self.reference,
        # True when every EditOptions field is the reference's (docs/editing.md).
        "reference_options": options == REFERENCE_OPTIONS,
        "model_size": self.size,
        "checkpoint": str(self.checkpoint_dir),
        "checkpoint_step": self.ckpt_step,
        "model_hash": self.model_hash[:20],
        "frames_without_face": [int(i) for i in np.flatnonzero(~code.has_face)],
        "interpolated": [int(i) for i in np.flatnonzero(code.interpolated)],
        "passthrough": [int(i) for i in code.passthrough],
        "long_gaps": code.align_report.get("long_gaps", []),
        "edited_frames": int(len(code.frame_indices)),
        "cache": {"hit": bool(code.cache_hit), "path": code.cache_path, "key": code.key},
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
        "identity": identity,
        "z_id_cosine_to_original": float(
            np.dot(l2_normalize(np.float64(z_new)), l2_normalize(np.float64(code.z_id)))
        ),
        "devices": self.num_devices,
        "chunk": self.chunk_size(len(code.frame_indices)),
        "alignment": {
            k: code.align_report.get(k)
            for k in (
                "detected",
                "face_found_fraction",
                "jitter_raw",
                "jitter_smoothed",
                "detector",
                "detector_counts",
                "detector_per_frame",
                "detect_frames",
            )
        },
    }


def jsonable(obj):
  """Tuples -> lists, numpy scalars -> Python (for the cache metadata and reports)."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return obj
