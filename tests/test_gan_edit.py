"""STIT's InterFaceGAN latent editor (golden/stit/latent_edit_io.npz)."""

import numpy as np
import pytest

from s3jax import gan_edit
from s3jax.parity import latent_edit


@pytest.fixture(scope="module")
def stit_dir(golden_dir):
  path = golden_dir.parent / "stit"
  if not path.is_dir():
    pytest.skip(f"STIT golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def golden_io(stit_dir):
  with np.load(stit_dir / latent_edit.IO_FILE) as z:
    return {k: z[k] for k in z.files}


def test_golden_parity_rows(stit_dir):
  rows = latent_edit.check(stit_dir)
  assert [r["name"] for r in rows] == ["direction", "factors", "w_edits"]
  for r in rows:
    assert r["ok"], r


def test_direction_file_row0_float64(golden_io, tmp_path):
  path = tmp_path / "smile.npy"
  np.save(path, golden_io["direction_file"])
  direction = gan_edit.load_interfacegan_direction(path)
  assert direction.shape == (1, 64) and direction.dtype == np.float64
  np.testing.assert_array_equal(direction, golden_io["direction"])


def test_edit_is_half_factor_in_float64():
  w = np.zeros((2, 3, 4), np.float32)
  direction = np.ones((1, 4), np.float64)
  edits = gan_edit.interfacegan_edits(w, direction, gan_edit.edit_factors((2, 6, 3)))
  assert edits.shape == (3, 2, 3, 4) and edits.dtype == np.float64
  np.testing.assert_array_equal(edits[:, 0, 0, 0], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(gan_edit.edit_factors(), np.linspace(2, 20, 10))


def test_wrong_shape_or_missing_direction_file(tmp_path):
  for name, arr in (("flat", np.ones(512)), ("cube", np.ones((2, 18, 512)))):
    path = tmp_path / f"{name}.npy"
    np.save(path, arr)
    with pytest.raises(ValueError, match=r"\(num_ws, w_dim\)"):
      gan_edit.load_interfacegan_direction(path)
  with pytest.raises(FileNotFoundError, match="direction file not found"):
    gan_edit.load_interfacegan_direction(tmp_path / "absent.npy")
  with pytest.raises(ValueError, match=r"direction must be \(1, 512\)"):
    gan_edit.interfacegan_edits(np.zeros((1, 18, 512)), np.ones((1, 64)), [2.0])
