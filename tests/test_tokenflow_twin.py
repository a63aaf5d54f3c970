"""The PyTorch twin of IP-FaceDiff's TokenFlow-PnP edit against `golden/ipfacediff` (float32).

The golden models are tiny (32 px frames, 16x16 latents): the whole golden run (inversion,
edit, units) takes well under a minute on one thread.
"""

import os
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from s3jax.parity import ipfacediff_torch  # noqa: E402
from s3jax.parity.unet import rel_row  # noqa: E402
from s3jax.torch_twin import tokenflow  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("S3JAX_SHARED", REPO.parent / "shared")) / "golden/ipfacediff"


@pytest.fixture(scope="module")
def golden():
  if not (GOLDEN / ipfacediff_torch.IO_FILE).exists():
    pytest.skip(f"IP-FaceDiff golden vectors not found at {GOLDEN}")
  return GOLDEN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)  # spin-waiting OpenMP workers crawl on a busy 2-core machine
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(golden):
  return {r["name"]: r for r in ipfacediff_torch.check(golden)}


def test_twin_matches_golden_run(rows):
  bad = [r for r in rows.values() if not r["ok"]]
  assert not bad, bad
  expected = {"inversion_latents", "edit_frames", "edit_nn_idx", "edit_pivot_idx", "prop_out"}
  expected |= {f"edit_latents[{k}]" for k in range(11)}
  assert expected <= set(rows)
  assert rows["edit_nn_idx"]["mismatches"] == 0


def test_blend_weights():
  assert torch.equal(tokenflow.blend_weights(0, 8), torch.ones(8))
  w = tokenflow.blend_weights(3, 8)
  assert float(w.min()) == pytest.approx(0.6225, abs=1e-4)  # sigmoid(1/2) at s = 0
  assert float(w.max()) == pytest.approx(0.7311, abs=1e-4)  # sigmoid(1) at the batch centre
  assert int(w.argmax()) == 4


def test_edit_video_defaults_path(golden):
  """edit_video end to end with random keyframes (the reference's draw), then the plain UNet."""
  models = tokenflow.load_models(golden)
  with np.load(golden / ipfacediff_torch.IO_FILE) as z:
    frames = z["frames"]
    unet_in = {k: z[k] for k in ("unet_in_latents", "unet_in_timesteps", "unet_out")}
    unet_in["context"] = z["unet_in_encoder_hidden_states"]
  result = tokenflow.edit_video(
      frames,
      "a man with blonde hair",
      "a man talking",
      models=models,
      n_inversion_steps=4,
      n_timesteps=2,
      batch_size=2,
  )
  assert result.frames.shape == frames.shape
  assert 0.0 <= result.frames.min() and result.frames.max() <= 1.0
  assert result.timesteps == [501, 1]
  torch.manual_seed(tokenflow.SEED)  # the reference: seed_everything, then randint per step
  offsets = np.stack([torch.randint(2, (2,)).numpy() for _ in range(2)])
  np.testing.assert_array_equal(result.pivots, offsets + np.array([0, 2]))
  # TokenFlow stays installed but inactive outside the edit: the plain diffusers UNet again.
  with torch.no_grad():
    eps = models.unet(
        torch.as_tensor(unet_in["unet_in_latents"]),
        torch.as_tensor(unet_in["unet_in_timesteps"]),
        encoder_hidden_states=torch.as_tensor(unet_in["context"]),
    ).sample.numpy()
  assert rel_row("unet_out", eps, unet_in["unet_out"], 1e-5)["ok"]
