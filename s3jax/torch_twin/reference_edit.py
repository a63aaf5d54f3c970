"""The reference's classifier-edit loop on the PyTorch twin: the baseline of the edit benchmarks.

`editing_classifier.py` of gmkim-ai/Diffusion-Video-Autoencoders edits one attribute at one
scale per run. It loads the frames with a DataLoader of `--batch_size` (default 4,
`drop_last=False`) and, for every batch:

1. inverts the crops under the averaged z_face (`encode_stochastic`, T - 1 DDIM steps);
2. renders that x_T under the same z_face (`avg_img_recon`, T steps; only saved for its logs);
3. renders the edit from the same x_T under the edited z_face (T steps).

T is `--T` (default 1000) and the respacing `ddim{T}` (`diffusion.respaced_timesteps`: at
T=1000 every timestep). So every edit inverts every frame again. Per frame and edit that is
3T - 1 UNet calls as the script runs, 2T - 1 without the log render (2: the leaner choice,
and the one the benchmarks quote first).

Step constants come in as numpy dicts (`s3jax.diffusion.ddim_constants(T, 'invert' |
'decode')`), so this module needs only torch and numpy. The per-step math is
`s3jax.diffusion.ddim_step`'s.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

REFERENCE_BATCH_SIZE = 4  # editing_classifier.py --batch_size default
REFERENCE_STEPS = 1000  # editing_classifier.py --T default; 'ddim1000' keeps every timestep


@torch.no_grad()
def ddim_scan(unet, x: torch.Tensor, z_face: torch.Tensor, consts: dict) -> torch.Tensor:
  """Deterministic DDIM of the NCHW batch `x` over `consts` (one UNet call per entry)."""
  for i in range(len(consts["t"])):
    t = torch.full((x.shape[0],), int(consts["t"][i]), dtype=torch.int64)
    rec, recm1 = float(consts["sqrt_recip"][i]), float(consts["sqrt_recipm1"][i])
    eps = unet(x, t, z_face)
    x0 = (rec * x - recm1 * eps).clamp(-1.0, 1.0)
    eps = (rec * x - x0) / recm1
    a = float(consts["a_target"][i])
    x = x0 * a**0.5 + (1.0 - a) ** 0.5 * eps
  return x


def reference_edit(
    unet,
    x0_nhwc: np.ndarray,
    z_face: np.ndarray,
    z_face_edit: np.ndarray,
    invert_consts: dict,
    decode_consts: dict,
    batch_size: int = REFERENCE_BATCH_SIZE,
    log_render: bool = True,
    timings: Optional[dict] = None,
) -> np.ndarray:
  """One edit of the frames `x0_nhwc` (N, S, S, 3) in [-1, 1] as `editing_classifier.py` runs it.

  `z_face` (N, E) is the fused code of the averaged z_id with each frame's landmarks, and
  `z_face_edit` that of the edited z_id. Batches of `batch_size` frames in order (the last
  may be smaller); each is inverted under `z_face`, rendered under it when `log_render`, and
  rendered under `z_face_edit`. Returns the edited renders (N, S, S, 3) in [-1, 1];
  `timings` gets seconds per phase added under 'invert', 'log_render' and 'edit_render'.
  """
  timings = {} if timings is None else timings
  x0 = torch.as_tensor(np.ascontiguousarray(np.asarray(x0_nhwc, np.float32).transpose(0, 3, 1, 2)))
  zf, zf_edit = (torch.as_tensor(np.asarray(z, np.float32)) for z in (z_face, z_face_edit))
  out = []
  for b in range(0, len(x0), batch_size):
    sl = slice(b, b + batch_size)
    t0 = time.perf_counter()
    x_T = ddim_scan(unet, x0[sl], zf[sl], invert_consts)
    t1 = time.perf_counter()
    if log_render:
      ddim_scan(unet, x_T, zf[sl], decode_consts)
    t2 = time.perf_counter()
    out.append(ddim_scan(unet, x_T, zf_edit[sl], decode_consts))
    t3 = time.perf_counter()
    for phase, seconds in (("invert", t1 - t0), ("log_render", t2 - t1), ("edit_render", t3 - t2)):
      timings[phase] = timings.get(phase, 0.0) + seconds
  return torch.cat(out).numpy().transpose(0, 2, 3, 1)
