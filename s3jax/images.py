"""Image conversions: uint8 <-> the model's [-1, 1] floats, sample grids, PNG files.

Inside JAX, images are NHWC float32 in [-1, 1]; on disk and in videos they are
uint8. Every conversion between the two goes through this module.
"""

import pathlib

import numpy as np
from PIL import Image


def to_model(image_u8) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(image_u8, np.float32) * (2.0 / 255.0) - 1.0


def to_uint8(x) -> np.ndarray:
  """float [-1, 1] -> uint8, rounded to nearest and clipped."""
  return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(rows) -> np.ndarray:
  """(R, N, H, W, 3) in [-1, 1] -> one uint8 image, rows stacked vertically."""
  r, n, h, w, _ = rows.shape
  return to_uint8(rows).transpose(0, 2, 1, 3, 4).reshape(r * h, n * w, 3)


def save_png(path, image) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image)).save(path)
