"""IP-FaceDiff's text-driven edit of a face video (`python -m s3jax.edit --method ipfacediff`,
via ``edit_job.run_text_edit``).

Per video:
1. align every frame with the temporally smoothed FFHQ quads the other editors use
   (``alignment.align_video``), cropped at the SD model's native resolution; or, with
   ``whole_frame``, resize each whole frame to that resolution (the reference's own input:
   TokenFlow resizes square frames to 512 x 512);
2. DDIM-invert the crops under the source prompt and run TokenFlow-PnP under the edit prompt
   (``sd.pipeline.StableDiffusion.edit_video``: both jitted scans, SPEC.md of
   golden/ipfacediff);
3. paste each edited crop back inside the face's landmark hull (``video.paste_back``, feather
   by default), or resize the whole frame back.

The reference drops the last ``n_frames % batch_size`` frames; here the clip is padded with
copies of its last frame up to a multiple of the batch and the padding is dropped after the
edit, so every frame is edited. Output frames are ``floor(255 x)`` as the reference's PNGs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import cv2
import numpy as np

from s3jax import alignment, face_features, video
from s3jax.sd import pipeline

# TokenFlow's config_pnp.yaml default (SPEC.md §8).
NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
PASTE_BLENDS = ("hard", "feather", "poisson")  # residual needs a reconstruction: none here
MASK_SOURCE = "landmark hull (face_features.hull_mask, for_video=True)"


class TextEditError(ValueError):
  """The SD directory or the options cannot be used (a user error)."""


@dataclasses.dataclass
class TextEditSettings:
  """TokenFlow-PnP's defaults (SPEC.md §8); IP-FaceDiff ships no config of its own."""

  n_inversion_steps: int = 500
  n_timesteps: int = 50
  guidance_scale: float = 7.5
  pnp_f_t: float = 0.8
  pnp_attn_t: float = 0.5
  batch_size: int = 8
  negative_prompt: str = NEGATIVE_PROMPT
  seed: int = 1
  whole_frame: bool = False
  blend: str = "feather"
  progress: bool = False


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """``x`` (N, ...) with its last entry repeated up to a multiple of ``multiple`` entries."""
  extra = (-len(x)) % multiple
  return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


def to_uint8_floor(frames01) -> np.ndarray:
  """[0, 1] -> uint8 as the reference writes its PNGs (ToPILImage truncates)."""
  return np.floor(np.clip(np.asarray(frames01, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_frames(frames_u8, width: int, height: int) -> np.ndarray:
  """Every frame resized (Lanczos, as TokenFlow's frame extraction) to ``width x height``."""
  return np.stack(
      [
          cv2.resize(np.asarray(f), (width, height), interpolation=cv2.INTER_LANCZOS4)
          for f in frames_u8
      ]
  )


class TextVideoEditor:
  """A Stable Diffusion model, loaded once, editing videos from text prompts."""

  def __init__(self, sd_dir, settings: Optional[TextEditSettings] = None):
    self.settings = settings or TextEditSettings()
    if self.settings.batch_size < 1:
      raise TextEditError(f"batch_size must be >= 1, got {self.settings.batch_size}")
    if self.settings.blend not in PASTE_BLENDS:
      raise TextEditError(f"--blend must be one of {', '.join(PASTE_BLENDS)} with ipfacediff")
    self.sd_dir = str(sd_dir)
    try:
      self.sd = pipeline.StableDiffusion.load(sd_dir)
    except (FileNotFoundError, ValueError) as e:
      raise TextEditError(f"cannot load Stable Diffusion from {sd_dir}: {e}") from None
    self.size = int(self.sd.resolution)

  def edit_crops(self, crops_u8, prompt: str, source_prompt: str) -> np.ndarray:
    """Edited crops (N, S, S, 3) uint8 of aligned crops (N, S, S, 3) uint8."""
    s = self.settings
    n = len(crops_u8)
    frames01 = pad_to_multiple(np.asarray(crops_u8, np.float32) / 255.0, s.batch_size)
    out01 = self.sd.edit_video(
        frames01,
        prompt=prompt,
        source_prompt=source_prompt,
        negative_prompt=s.negative_prompt,
        n_inversion_steps=s.n_inversion_steps,
        n_timesteps=s.n_timesteps,
        guidance_scale=s.guidance_scale,
        pnp_f_t=s.pnp_f_t,
        pnp_attn_t=s.pnp_attn_t,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    return to_uint8_floor(np.asarray(out01)[:n])

  def edit(self, frames, prompt: str, source_prompt: str, timings: Optional[dict] = None) -> dict:
    """The whole edit of ``frames`` (uint8 RGB) -> dict of the output frames and the parts."""
    timings = {} if timings is None else timings
    s = self.settings
    if not prompt:
      raise TextEditError("--prompt is required with --method ipfacediff")
    if s.whole_frame:
      h, w = frames[0].shape[:2]
      t0 = time.perf_counter()
      crops = resize_frames(frames, self.size, self.size)
      edited = self.edit_crops(crops, prompt, source_prompt)
      timings["edit"] = time.perf_counter() - t0
      out = list(resize_frames(edited, w, h))
      return dict(frames=out, aligned=None, frame_indices=list(range(len(frames))), crops=edited)
    t0 = time.perf_counter()
    aligned = alignment.align_video(frames, size=self.size, progress=s.progress)
    timings["align"] = time.perf_counter() - t0
    idx = [i for i in range(len(frames)) if i not in set(aligned.passthrough)]
    t0 = time.perf_counter()
    edited = self.edit_crops(aligned.crops[idx], prompt, source_prompt)
    timings["edit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pasted = [np.array(f, copy=True) for f in frames]
    band = video.blend_band(s.blend, self.size)
    for j, i in enumerate(idx):
      mask = face_features.hull_mask(aligned.landmarks_crop[i], self.size, for_video=True)
      pasted[i] = video.paste_back(
          frames[i], edited[j], aligned.quads[i], mask, blend=s.blend, **band
      )
    timings["paste"] = time.perf_counter() - t0
    return dict(frames=pasted, aligned=aligned, frame_indices=idx, crops=edited)

  def identity_report(self, original_frames, edited_frames, aligned, frame_indices) -> dict:
    if aligned is None:
      return {"tl_id": None, "tg_id": None, "note": "whole-frame mode: no face alignment"}
    return face_features.video_identity_report(
        original_frames, edited_frames, aligned, frame_indices
    )

  def info(self) -> dict:
    s = self.settings
    return {
        "method": "ipfacediff",
        "sd": self.sd_dir,
        "resolution": self.size,
        "mode": "whole frame" if s.whole_frame else "aligned face crop",
        "mask_source": None if s.whole_frame else MASK_SOURCE,
        **{k: v for k, v in dataclasses.asdict(s).items() if k != "progress"},
    }
