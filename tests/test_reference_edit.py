"""The edit benchmarks' baseline: the reference's classifier-edit loop on the PyTorch twin.

`s3jax.torch_twin.reference_edit` must compute the same edit as our JAX DDIM (so the
benchmarks compare like with like) and make exactly the UNet calls of the reference's
`editing_classifier.py`: batches of 4 in frame order, and per batch T - 1 inversion calls,
T for the log render and T for the edit render, at the original timesteps of `ddim{T}`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax import diffusion
from s3jax.models.unet import UNet, UNetConfig, abstract_params
from s3jax.porting.unet_keys import unet_params_to_torch

torch = pytest.importorskip("torch")

from s3jax.torch_twin.reference_edit import REFERENCE_BATCH_SIZE, reference_edit  # noqa: E402
from s3jax.torch_twin.unet import from_state_dict  # noqa: E402

STEPS = 10
FRAMES = 6  # batches of 4 and 2, as the reference's DataLoader (drop_last=False) gives
CFG = UNetConfig(
    image_size=8,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    embed_channels=32,
)


class CountingUNet:
  """Records the batch size and timestep of every call, then runs the twin."""

  def __init__(self, unet):
    self.unet, self.calls = unet, []

  def __call__(self, x, t, cond):
    self.calls.append((int(x.shape[0]), int(t[0])))
    return self.unet(x, t, cond)


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  # Every leaf random (the zero-initialised output convs too), so eps depends on the inputs.
  params = jax.tree.map(
      lambda a: (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]) or 1)).astype(
          np.float32
      ),
      abstract_params(CFG),
  )
  twin = from_state_dict(CFG, unet_params_to_torch(params, CFG))
  s = CFG.image_size
  x0 = rng.uniform(-1, 1, (FRAMES, s, s, 3)).astype(np.float32)
  z_face, z_face_edit = rng.standard_normal((2, FRAMES, CFG.embed_channels)).astype(np.float32)
  consts = {k: diffusion.ddim_constants(STEPS, k) for k in ("invert", "decode")}
  return params, twin, x0, z_face, z_face_edit, consts


def test_reference_edit_is_our_edit(case):
  """Same x_T, same edited frames as `diffusion.ddim_invert` + `ddim_sample` in JAX."""
  params, twin, x0, z_face, z_face_edit, consts = case
  torch.set_num_threads(1)  # spin-waiting OpenMP workers crawl on a busy 2-core machine
  model = UNet(CFG)

  def eps_fn(p):
    return lambda x, t, c: model.apply({"params": p}, x, t, c)

  invert = jax.jit(lambda p, x, c: diffusion.ddim_invert(eps_fn(p), x, c, STEPS))
  sample = jax.jit(lambda p, x, c: diffusion.ddim_sample(eps_fn(p), x, c, STEPS))
  ours = np.asarray(sample(params, invert(params, jnp.asarray(x0), z_face), z_face_edit))
  theirs = reference_edit(twin, x0, z_face, z_face_edit, consts["invert"], consts["decode"])
  assert theirs.shape == ours.shape == x0.shape
  # float32 on both sides; the 19-step chain amplifies per-call rounding (~1e-6): measured
  # 2.4e-4 max abs (frames in [-1, 1]); a wrong z_face or step rule moves it by ~1.
  np.testing.assert_allclose(theirs, ours, atol=2e-3)
  # The edit changes the frames (0.78 mean abs here), so the check above is not vacuous.
  reconstruction = np.asarray(sample(params, invert(params, jnp.asarray(x0), z_face), z_face))
  assert np.abs(ours - reconstruction).mean() > 0.1
  # Batching does not change the math (the reference's quirk 16): measured 7e-5.
  one_by_one = reference_edit(
      twin, x0, z_face, z_face_edit, consts["invert"], consts["decode"], 1, False
  )
  np.testing.assert_allclose(one_by_one, theirs, atol=1e-3)


@pytest.mark.parametrize("log_render", [True, False])
def test_reference_edit_calls(case, log_render):
  """Batches of 4 then 2; per batch: invert (T-1 calls, t ascending), [log render], edit."""
  _, twin, x0, z_face, z_face_edit, consts = case
  torch.set_num_threads(1)
  counting = CountingUNet(twin)
  timings = {}
  reference_edit(
      counting,
      x0,
      z_face,
      z_face_edit,
      consts["invert"],
      consts["decode"],
      log_render=log_render,
      timings=timings,
  )
  ts = list(diffusion.respaced_timesteps(STEPS))  # 0, 100, ..., 900
  per_batch = ts[:-1] + ts[::-1] * (2 if log_render else 1)
  assert len(per_batch) == (3 if log_render else 2) * STEPS - 1
  want = [(REFERENCE_BATCH_SIZE, t) for t in per_batch] + [(2, t) for t in per_batch]
  assert counting.calls == want
  assert set(timings) == {"invert", "log_render", "edit_render"}
  assert timings["invert"] > 0 and timings["edit_render"] > 0
