"""STIT's stitching tuning (`edit_video_stitching_tuning.py`) on the PyTorch generator twin.

The reference procedure, kept as the reference runs it: for every frame, one after the other,
render the naive edit with the eval-mode generator (fused modconv), build the masks from the
frame's face mask, then `optimize_border`: deep-copy the generator, switch it to train mode
(non-fused modconv), Adam (lr 3e-4, betas (0.9, 0.999), eps 1e-8) over *all* its parameters
for `num_steps` steps on `masked_l2(G(w), crop, border) + lambda * masked_l2(G(w), edited,
content)`, and one final forward. The segmentation network is not part of it: callers pass the
face mask at half the generator resolution, as BiSeNet gives it to the reference.

Images and masks are NCHW here (the reference's layout). STIT's defaults are read from
`s3jax.gan.stitching` (one place for them).
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from s3jax.gan.stitching import (
    BORDER_LOSS_THRESHOLD,
    CONTENT_LOSS_LAMBDA,
    INNER_MASK_DILATION,
    NUM_STEPS,
    STITCHING_LR,
    WHOLE_IMAGE_BORDER,
    scaled_outer_dilation,
)
from s3jax.torch_twin.stylegan2 import Generator


def dilation(mask: torch.Tensor, radius: int) -> torch.Tensor:
  """Flat max over a (2r+1)^2 square, outside pixels ignored (`morphology.dilation`, geodesic)."""
  if radius == 0:
    return mask
  return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def create_masks(
    border_pixels: int,
    mask: torch.Tensor,
    inner_dilation: int = 0,
    outer_dilation: int = 0,
    whole_image_border: bool = False,
):
  """The reference's `create_masks` on an (N, 1, S, S) {0,1} mask: (content, border, full)."""
  size = mask.shape[2]
  idx = torch.arange(size)
  rows, cols = idx[:, None], idx[None, :]
  edge = (rows < border_pixels) | (cols < border_pixels)
  edge = edge | (rows >= size - border_pixels) | (cols >= size - border_pixels)
  edge = edge.to(mask.dtype)[None, None].expand_as(mask)
  temp = dilation(mask, inner_dilation) if inner_dilation != 0 else mask
  border = torch.minimum(edge, temp)
  full = dilation(temp, outer_dilation)
  border = torch.maximum(border, 1 - temp if whole_image_border else full - temp)
  border = border.clip(0, 1)
  content = (mask - border).clip(0, 1)
  return content, border, full


def calc_masks(
    face_mask_half: torch.Tensor,
    border_pixels: int,
    inner_mask_dilation: int,
    outer_mask_dilation: int,
    whole_image_border: bool,
    image_size: int,
):
  """`calc_masks` after its segmentation: halved arguments, then x2 bilinear (align_corners)."""
  masks = create_masks(
      border_pixels // 2,
      face_mask_half,
      inner_mask_dilation // 2,
      outer_mask_dilation // 2,
      whole_image_border,
  )
  return tuple(
      F.interpolate(m, (image_size, image_size), mode="bilinear", align_corners=True) for m in masks
  )


def masked_l2(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """sum((x*m - t*m)^2) / sum(m): summed over C, H, W, divided by the one-channel mask's sum."""
  err = F.mse_loss(x * mask, target * mask, reduction="none")
  return err.sum() / mask.sum()


def optimize_border(
    G: Generator,
    border_image: torch.Tensor,
    content_image: torch.Tensor,
    w: torch.Tensor,
    border_mask: torch.Tensor,
    content_mask: torch.Tensor,
    num_steps: int = NUM_STEPS,
    content_loss_lambda: float = CONTENT_LOSS_LAMBDA,
    border_loss_threshold: float = BORDER_LOSS_THRESHOLD,
    lr: float = STITCHING_LR,
    losses: Optional[dict] = None,
    return_generator: bool = False,
):
  """The reference's `optimize_border(..., optimize_generator=True)`: the tuned image.

  `losses`, if given, gets lists 'border', 'content' and 'loss' (one entry per step, before its
  update). With `return_generator`, returns (image, tuned generator copy).
  """
  G = copy.deepcopy(G).train(True).requires_grad_(True).float()
  optimizer = torch.optim.Adam(list(G.parameters()), lr)
  for _ in range(num_steps):
    img = G.synthesis(w, noise_mode="const")
    border_loss = masked_l2(img, border_image, border_mask)
    content_loss = masked_l2(img, content_image, content_mask)
    loss = border_loss + content_loss_lambda * content_loss
    if losses is not None:
      for k, v in (("border", border_loss), ("content", content_loss), ("loss", loss)):
        losses.setdefault(k, []).append(float(v.detach()))
    if border_loss < border_loss_threshold:
      break
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  with torch.no_grad():
    img = G.synthesis(w, noise_mode="const").detach()
  return (img, G) if return_generator else img


def reference_stitching(
    gen: Generator,
    crops: np.ndarray,
    w_edits: np.ndarray,
    face_masks_half: np.ndarray,
    num_steps: int = NUM_STEPS,
    border_pixels: Optional[int] = None,
    inner_mask_dilation: int = INNER_MASK_DILATION,
    outer_mask_dilation: Optional[int] = None,
    whole_image_border: bool = WHOLE_IMAGE_BORDER,
    content_loss_lambda: float = CONTENT_LOSS_LAMBDA,
) -> np.ndarray:
  """The reference's per-frame loop, frame after frame: edited render, masks, optimize_border.

  crops (N, 3, S, S) in [-1, 1], w_edits (N, num_ws, w_dim), face_masks_half (N, 1, S/2, S/2)
  -> tuned images (N, 3, S, S). `outer_mask_dilation` defaults to STIT's 50 px at 1024 scaled
  to S (rounded up to even); `border_pixels` defaults to it, as in the reference.
  """
  size = crops.shape[-1]
  outer = scaled_outer_dilation(size) if outer_mask_dilation is None else outer_mask_dilation
  border_pixels = outer if border_pixels is None else border_pixels
  gen = gen.eval()
  out = []
  for i in range(len(crops)):
    w = torch.as_tensor(w_edits[i])[None]
    with torch.no_grad():
      edited = gen.synthesis(w, noise_mode="const")
    crop = torch.as_tensor(np.asarray(crops[i], np.float32))[None]
    content, border, _ = calc_masks(
        torch.as_tensor(np.asarray(face_masks_half[i], np.float32))[None],
        border_pixels,
        inner_mask_dilation,
        outer,
        whole_image_border,
        size,
    )
    out.append(
        optimize_border(
            gen,
            crop,
            edited,
            w,
            border,
            content,
            num_steps=num_steps,
            content_loss_lambda=content_loss_lambda,
        )[0].numpy()
    )
  return np.stack(out)
