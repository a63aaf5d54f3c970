"""STIT's video edit on a StyleGAN2 backbone: align, e4e, PTI, latent edit, stitching tuning,
paste back (`python -m s3jax.edit --backbone stylegan2` is its CLI, via ``edit_job``).

Per video (Tzaban et al. 2022, `train.py` + `edit_video_stitching_tuning.py`):
1. align every frame with the same temporally smoothed FFHQ quads as the DVA editor
   (``alignment.align_video``), cropped at the generator's resolution;
2. e4e inverts each crop (resized to 256 px) to a W+ pivot (``models.e4e``);
3. PTI tunes one generator on all frames from those pivots (``gan.pti``);
4. the InterFaceGAN edit ``w + strength/2 * direction`` (``gan_edit``; STIT's factor);
5. stitching tuning: every frame's copy of the PTI generator is tuned at once so that its
   edit blends into the frame's border (``gan.stitching``);
6. the tuned crop is pasted back inside STIT's full mask (``video.paste_back``).

The segmentation STIT masks with (BiSeNet: every class but background, cloth and hat) is
stood in for by the landmark hull of ``face_features.hull_mask(for_video=False)`` (face, hair,
ears and some neck), which needs no weights; that is our choice and it is reported.

Frames are held in memory (crops at the generator's resolution): a 300-frame 1024 px video
holds ~0.9 GB of crops; PTI needs every frame at once anyway.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Optional

import cv2
import numpy as np

from s3jax import alignment, face_features, gan_edit, images, video
from s3jax.gan import pti, stitching
from s3jax.models import e4e, stylegan2
from s3jax.porting import e4e_keys, stylegan2_keys

MASK_SOURCE = "landmark hull (face_features.hull_mask, for_video=False) standing in for BiSeNet"


class GANEditError(ValueError):
  """The generator, encoder or direction cannot be used together (a user error)."""


@dataclasses.dataclass
class GANEditSettings:
  """STIT's defaults (``gan.pti`` and ``gan.stitching`` cite their sources)."""

  pti_epochs: int = pti.PTI_EPOCHS  # 0: no PTI, edit with the loaded generator
  stitch_steps: int = stitching.NUM_STEPS  # 0: paste the naive edit
  frames_per_chunk: int = stitching.FRAMES_PER_CHUNK
  outer_mask_dilation: Optional[int] = None  # None: 50 at 1024 px, scaled
  blend: str = "hard"  # STIT's radius-0 paste; 'feather' softens the full mask's edge
  progress: bool = False


class GANVideoEditor:
  """A StyleGAN2 generator and an e4e encoder, loaded once, editing videos."""

  def __init__(self, generator_path, encoder_path, settings: Optional[GANEditSettings] = None):
    self.settings = settings or GANEditSettings()
    self.generator_path, self.encoder_path = str(generator_path), str(encoder_path)
    self.config, self.variables = stylegan2_keys.load_generator(generator_path)
    self.e4e_config, self.e4e_variables, self.latent_avg = e4e_keys.load_e4e(encoder_path)
    if self.e4e_config.n_styles != self.config.num_ws or e4e.STYLE_DIM != self.config.w_dim:
      raise GANEditError(
          f"the encoder gives W+ of ({self.e4e_config.n_styles}, {e4e.STYLE_DIM}) but the "
          f"generator reads ({self.config.num_ws}, {self.config.w_dim}): they are not a pair "
          f"(e4e stylegan_size {self.e4e_config.stylegan_size}, generator "
          f"{self.config.img_resolution} px)"
      )
    self.size = int(self.config.img_resolution)
    self._encode = e4e.jitted_encoder(self.e4e_config)

  # -- steps --------------------------------------------------------------------------------
  def align(self, frames) -> alignment.AlignResult:
    return alignment.align_video(frames, size=self.size, progress=self.settings.progress)

  def invert(self, crops_u8, batch: int = 8) -> np.ndarray:
    """e4e W+ pivots (N, num_ws, 512) float32 of the aligned crops."""
    out = []
    for i in range(0, len(crops_u8), batch):
      x = np.stack([resize(c, e4e.INPUT_SIZE) for c in crops_u8[i : i + batch]])
      codes = np.asarray(self._encode(self.e4e_variables, images.to_model(x)))
      out.append(e4e.w_plus(codes, self.latent_avg))
    return np.concatenate(out).astype(np.float32)

  def face_masks_half(self, landmarks_crop) -> np.ndarray:
    """(N, S/2, S/2, 1) float32 {0, 1}: the foreground STIT segments at half resolution."""
    half = self.size // 2
    lm = (np.asarray(landmarks_crop, np.float64) + 0.5) * (half / self.size) - 0.5
    return np.stack([face_features.hull_mask(l, half)[..., None] for l in lm]).astype(np.float32)

  def full_masks(self, masks_half) -> np.ndarray:
    """(N, S, S) float32 in [0, 1]: STIT's paste mask (the face mask dilated by the border)."""
    args = stitching_mask_args(self.size, self.settings.outer_mask_dilation)
    _, _, full = stitching.calc_masks(np.asarray(masks_half), image_size=self.size, **args)
    return np.asarray(full)[..., 0]

  def edit(
      self, frames, direction, strength: float, timings: Optional[dict] = None, pivots=None
  ) -> dict:
    """The whole edit of ``frames`` (uint8 RGB) -> dict of the pasted frames and the parts.

    ``direction`` (1, w_dim) from ``gan_edit.load_interfacegan_direction``; the edit is
    ``w + strength/2 * direction`` (STIT's factor). ``pivots``: W+ to use instead of e4e's.
    """
    timings = {} if timings is None else timings
    s = self.settings
    t0 = time.perf_counter()
    aligned = self.align(frames)
    timings["align"] = time.perf_counter() - t0
    idx = [i for i in range(len(frames)) if i not in set(aligned.passthrough)]
    crops_u8 = aligned.crops[idx]
    t0 = time.perf_counter()
    w_pivots = self.invert(crops_u8) if pivots is None else np.asarray(pivots, np.float32)[idx]
    timings["e4e"] = time.perf_counter() - t0
    targets = images.to_model(crops_u8)
    variables, pti_losses = self.variables, None
    if s.pti_epochs > 0:
      tuned = pti.pivotal_tuning(
          self.config, self.variables, w_pivots, targets, epochs=s.pti_epochs, progress=s.progress
      )
      variables, pti_losses = tuned["variables"], tuned["losses"]
      timings["pti"] = time.perf_counter() - t0 - timings["e4e"]
    direction = np.asarray(direction)
    if direction.shape[-1] != self.config.w_dim:
      raise GANEditError(
          f"the direction has width {direction.shape[-1]}, the generator's W has "
          f"{self.config.w_dim}"
      )
    w_edits = gan_edit.interfacegan_edits(w_pivots, direction, [float(strength)])[0]
    masks_half = self.face_masks_half(aligned.landmarks_crop[idx])
    t0 = time.perf_counter()
    tuner = stitching.StitchingTuner(
        self.config,
        variables,
        num_steps=max(s.stitch_steps, 0),
        frames_per_chunk=s.frames_per_chunk,
        **stitching_mask_args(self.size, s.outer_mask_dilation),
    )
    if s.stitch_steps > 0:
      res = tuner.tune(w_edits, targets, masks_half, timings)
      out_crops, naive = res["images"], res["edited"]
      stitch_losses = {k: np.asarray(v) for k, v in res["losses"].items()}
    else:
      naive = np.asarray(
          stylegan2.synthesis(self.config, variables, w_edits.astype(np.float32)), np.float32
      )
      out_crops, stitch_losses = naive, None
    timings["stitching"] = time.perf_counter() - t0
    full = self.full_masks(masks_half)
    t0 = time.perf_counter()
    out_u8 = images.to_uint8(out_crops)
    pasted = [np.array(f, copy=True) for f in frames]
    for j, i in enumerate(idx):
      pasted[i] = video.paste_back(frames[i], out_u8[j], aligned.quads[i], full[j], blend=s.blend)
    timings["paste"] = time.perf_counter() - t0
    return dict(
        frames=pasted,
        aligned=aligned,
        frame_indices=idx,
        crops=out_u8,
        naive_crops=images.to_uint8(naive),
        w_pivots=w_pivots,
        w_edits=w_edits,
        full_masks=full,
        pti_losses=pti_losses,
        stitch_losses=stitch_losses,
    )

  def identity_report(self, original_frames, edited_frames, aligned, frame_indices) -> dict:
    """TL-ID / TG-ID of the edited video normalised by the input's (STIT 4.2), dlib."""
    return face_features.video_identity_report(
        original_frames, edited_frames, aligned, frame_indices
    )

  def info(self) -> dict:
    s = self.settings
    return {
        "backbone": "stylegan2",
        "generator": self.generator_path,
        "encoder": self.encoder_path,
        "resolution": self.size,
        "num_ws": self.config.num_ws,
        "pti_epochs": s.pti_epochs,
        "stitch_steps": s.stitch_steps,
        "outer_mask_dilation": stitching_mask_args(self.size, s.outer_mask_dilation)[
            "outer_mask_dilation"
        ],
        "blend": s.blend,
        "mask_source": MASK_SOURCE,
    }


def stitching_mask_args(size: int, outer_mask_dilation: Optional[int] = None) -> dict:
  """STIT's mask arguments at ``size`` px (the border equals the outer dilation, as there)."""
  outer = (
      stitching.scaled_outer_dilation(size) if outer_mask_dilation is None else outer_mask_dilation
  )
  return dict(
      border_pixels=outer,
      inner_mask_dilation=stitching.INNER_MASK_DILATION,
      outer_mask_dilation=outer,
      whole_image_border=stitching.WHOLE_IMAGE_BORDER,
  )


def resize(crop_u8, size: int) -> np.ndarray:
  """A crop resized to ``size`` px (bilinear; INTER_AREA when shrinking by more than 2x)."""
  if crop_u8.shape[0] == size:
    return np.asarray(crop_u8)
  shrink = crop_u8.shape[0] > 2 * size
  interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(np.asarray(crop_u8), (size, size), interpolation=interp)


def read_direction(path) -> np.ndarray:
  """``gan_edit.load_interfacegan_direction`` with a missing file as a GANEditError."""
  if not pathlib.Path(path).exists():
    raise GANEditError(f"--direction {path}: no such file")
  return gan_edit.load_interfacegan_direction(path)
