"""Flax <-> PyTorch-twin parity at random weights: needs no golden files (never skips on them).

Each Flax param tree is exported with the library's own key mapping (`unet_params_to_torch`,
`encoders_params_to_torch`) and loaded strictly into the twin, so a wrong name, layout or op
shows up here even where ../shared is absent. Weights are drawn so that no parameter is zero
(the zero-initialised output convs included) and activations stay O(1) through the nets.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax import diffusion
from s3jax.models import face_encoders as fe
from s3jax.models.unet import UNet, UNetConfig, abstract_params
from s3jax.porting import encoder_keys as ek
from s3jax.porting.unet_keys import unet_params_to_torch

torch = pytest.importorskip("torch")

from s3jax.torch_twin import encoders as twin_enc  # noqa: E402
from s3jax.torch_twin.unet import from_state_dict  # noqa: E402

# float32 on both sides. XLA and torch sum in different orders and pick different conv
# algorithms, so each layer differs by a few ulp (~1e-7 relative); over the ~20-60 layers
# here that stays well under 1e-5 of the output scale. 1e-4 of the scale leaves a 10x margin
# and still catches any real mismatch (a wrong layout, op or constant gives O(1) errors).
TOL = 1e-4
# DDIM divides by sqrt(1/abar - 1) (~0.01 at t=0), which scales per-step float32
# differences up; measured 1e-5 (invert) and 6e-5 (sample) of the scale, so 5e-4 keeps
# ~10x margin and still fails on any schedule, timestep-map or clipping error.
DDIM_TOL = 5e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  # torch's OpenMP workers spin-wait: on a busy 2-core machine a 16 px UNet forward took
  # 2-4 s with 2 threads and 0.06 s with 1.
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
  # No-op on CPU; on GPU/TPU the default f32 conv/matmul precision is TF32/bf16-like, which
  # the tolerances below are not meant to absorb.
  with jax.default_matmul_precision("float32"):
    yield


def assert_close(got, want, tol=TOL, what=""):
  """allclose with atol scaled to the reference's magnitude (random nets have no fixed scale)."""
  want = np.asarray(want, np.float64)
  scale = float(np.abs(want).max())
  assert scale > 0, f"{what}: reference is all zeros"
  np.testing.assert_allclose(
      np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale, err_msg=what
  )


def random_tree(abstract, seed):
  """Non-zero random leaves by role: kernels LeCun-normal, norm scales ~ 1, shifts small.

  LeCun (not He) keeps activations O(1) through the 24 residual units of IR-SE50: with He
  they grow ~2x per unit and float32 rounding alone then reaches ~3e-4 of the output.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = tuple(leaf.shape)
    n = lambda: rng.standard_normal(shape, np.float32)  # noqa: E731
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      x = n() / np.sqrt(fan_in)
    elif name in ("scale", "alpha"):
      x = 1.0 + 0.1 * n() if name == "scale" else 0.25 + 0.05 * n()
    elif name == "var":
      x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:  # bias, running mean, the unused ImageNet head
      x = 0.1 * n()
    return np.asarray(x, np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------- UNet
def tiny_unet(resblock_updown):
  # Three levels so both down- and up-sampling paths appear twice; attention at 8 px with
  # two heads exercises the legacy head split. 32 channels: every skip concat (64, 96, 128)
  # stays divisible by GroupNorm's 32 groups, as the reference requires.
  return UNetConfig(
      image_size=16,
      model_channels=32,
      channel_mult=(1, 2, 2),
      num_res_blocks=1,
      attention_resolutions=(8,),
      embed_channels=32,
      num_heads=2,
      resblock_updown=resblock_updown,
  )


def unet_pair(cfg, seed=0):
  """(Flax params, torch twin loaded strictly from their export)."""
  params = random_tree(abstract_params(cfg), seed)
  twin = from_state_dict(cfg, unet_params_to_torch(params, cfg))
  return params, twin


def unet_inputs(cfg, seed=1):
  rng = np.random.default_rng(seed)
  s = cfg.image_size
  x = rng.uniform(-1, 1, (2, cfg.in_channels, s, s)).astype(np.float32)
  t = np.array([3, 700], np.int64)
  cond = rng.standard_normal((2, cfg.embed_channels)).astype(np.float32)
  return x, t, cond


def _top_level_call(module, method_name):
  return method_name == "__call__" and len(module.scope.path) == 1


def flax_blocks(cfg, params, x, t, cond):
  """{block name: NCHW output} of every input/middle/output block, plus the final eps."""
  model = UNet(cfg)
  eps, state = jax.jit(
      functools.partial(model.apply, capture_intermediates=_top_level_call, mutable="intermediates")
  )({"params": params}, nhwc(x), jnp.asarray(t, jnp.int32), jnp.asarray(cond))
  inter = flax.core.unfreeze(state["intermediates"])

  def last_layer(prefix):
    # A block's output is its last layer's output (layers are `<block>_<j>`).
    js = [
        int(k[len(prefix) :]) for k in inter if k.startswith(prefix) and k[len(prefix) :].isdigit()
    ]
    return nchw(inter[f"{prefix}{max(js)}"]["__call__"][0])

  n_in = sum(1 for k in inter if k.startswith("input_blocks_") and k.endswith("_0"))
  n_out = sum(1 for k in inter if k.startswith("output_blocks_") and k.endswith("_0"))
  out = {f"input_blocks.{i}": last_layer(f"input_blocks_{i}_") for i in range(n_in)}
  out["middle_block"] = last_layer("middle_block_")
  out.update({f"output_blocks.{i}": last_layer(f"output_blocks_{i}_") for i in range(n_out)})
  out["out"] = nchw(eps)
  return out


def torch_blocks(twin, x, t, cond):
  """The same block outputs from forward hooks on the twin."""
  out, handles = {}, []

  def keep(name):
    return lambda module, args, result: out.__setitem__(name, result.detach().numpy())

  named = [(f"input_blocks.{i}", b) for i, b in enumerate(twin.input_blocks)]
  named.append(("middle_block", twin.middle_block))
  named += [(f"output_blocks.{i}", b) for i, b in enumerate(twin.output_blocks)]
  for name, module in named:
    handles.append(module.register_forward_hook(keep(name)))
  try:
    with torch.no_grad():
      out["out"] = twin(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
  finally:
    for h in handles:
      h.remove()
  return out


@pytest.mark.parametrize("resblock_updown", [True, False], ids=["resblock_updown", "conv_updown"])
def test_unet_block_by_block(resblock_updown):
  cfg = tiny_unet(resblock_updown)
  params, twin = unet_pair(cfg)
  x, t, cond = unet_inputs(cfg)
  ours = flax_blocks(cfg, params, x, t, cond)
  theirs = torch_blocks(twin, x, t, cond)
  # Same block list on both sides: conv_in, 3 res + 2 downsamples in; 3 levels x 2 out.
  assert list(ours) == list(theirs)
  assert len([k for k in ours if k.startswith("input_blocks.")]) == 6
  assert len([k for k in ours if k.startswith("output_blocks.")]) == 6
  # In order, so the first failure names the first diverging block.
  for name in ours:
    assert ours[name].shape == theirs[name].shape, name
    assert_close(ours[name], theirs[name], what=name)
  assert np.abs(theirs["out"]).mean() > 1e-2  # the output conv is not zero


# ---------------------------------------------------------------------------------- DDIM
def _reference_schedule(num_steps, num_timesteps=1000):
  """The reference's linear betas + `space_timesteps('ddimN')` respacing, rebuilt from scratch
  (independently of `s3jax.diffusion`, so the schedule is checked too)."""
  scale = 1000 / num_timesteps
  betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  base_ac = np.cumprod(1.0 - betas, axis=0)
  for stride in range(1, num_timesteps):
    if len(range(0, num_timesteps, stride)) == num_steps:
      use = set(range(0, num_timesteps, stride))
      break
  timestep_map, new_betas, last = [], [], 1.0
  for i, a in enumerate(base_ac):
    if i in use:
      new_betas.append(1 - a / last)
      last = a
      timestep_map.append(i)
  ac = np.cumprod(1.0 - np.array(new_betas, np.float64), axis=0)
  return dict(
      timestep_map=np.array(timestep_map),
      sqrt_recip=np.sqrt(1.0 / ac),
      sqrt_recipm1=np.sqrt(1.0 / ac - 1),
      prev=np.append(1.0, ac[:-1]),
      next=np.append(ac[1:], 0.0),
  )


def _extract(arr, t, x):
  """The reference's `_extract_into_tensor`: float64 table, indexed, then float32."""
  return torch.from_numpy(arr)[t].float().reshape(-1, *([1] * (x.ndim - 1)))


def torch_ddim(twin, x, cond, num_steps, invert):
  """The reference's `ddim_sample_loop` / `ddim_reverse_sample_loop` at eta=0, clip on."""
  s = _reference_schedule(num_steps)
  steps = list(range(num_steps))[:-1] if invert else list(range(num_steps))[::-1]
  x = torch.from_numpy(x)
  cond = torch.from_numpy(cond)
  with torch.no_grad():
    for i in steps:
      t = torch.full((x.shape[0],), i, dtype=torch.long)
      eps = twin(x, torch.from_numpy(s["timestep_map"])[t], cond)
      x0 = (_extract(s["sqrt_recip"], t, x) * x - _extract(s["sqrt_recipm1"], t, x) * eps).clamp(
          -1, 1
      )
      eps = (_extract(s["sqrt_recip"], t, x) * x - x0) / _extract(s["sqrt_recipm1"], t, x)
      a = _extract(s["next"] if invert else s["prev"], t, x)
      x = x0 * torch.sqrt(a) + torch.sqrt(1 - a) * eps
  return x.numpy()


def test_ddim_invert_and_sample_match_torch_twin():
  # Two levels at 8 px: the block test covers the architecture, this one the sampler loop.
  cfg = dataclasses.replace(
      tiny_unet(True), image_size=8, channel_mult=(1, 2), attention_resolutions=(4,)
  )
  params, twin = unet_pair(cfg, seed=2)
  x0, _, cond = unet_inputs(cfg, seed=3)
  model = UNet(cfg)
  n = 10

  def jitted(sampler):
    # Params are an argument, not a closure: closed-over arrays become HLO constants,
    # which XLA then folds (slow compiles, no persistent-cache hits across seeds).
    def run(p, x, c):
      return sampler(lambda x, t, c: model.apply({"params": p}, x, t, c), x, c, num_steps=n)

    return jax.jit(run)

  invert, sample = jitted(diffusion.ddim_invert), jitted(diffusion.ddim_sample)
  x_t = nchw(invert(params, nhwc(x0), jnp.asarray(cond)))
  ref_x_t = torch_ddim(twin, x0, cond, n, invert=True)
  assert_close(x_t, ref_x_t, tol=DDIM_TOL, what="ddim_invert")
  # Decode the same (torch) x_T on both sides, so sampling is checked on its own.
  rec = nchw(sample(params, nhwc(ref_x_t), jnp.asarray(cond)))
  ref_rec = torch_ddim(twin, ref_x_t, cond, n, invert=False)
  assert_close(rec, ref_rec, tol=DDIM_TOL, what="ddim_sample")
  assert np.abs(ref_rec - x0).mean() > 1e-3  # a random UNet does not reconstruct trivially


# ------------------------------------------------------------------------------ encoders
@pytest.fixture(scope="module")
def encoders():
  """Random OfficialEncoders variables and the twin loaded strictly from their export."""
  variables = random_tree(fe.init_variables(), seed=4)
  sd = ek.encoders_params_to_torch(variables)
  return variables, twin_enc.load_official_encoders(sd, with_linear=False)


def _net_vars(variables, net):
  return {coll: tree[net] for coll, tree in variables.items()}


def test_ir_se50_id_feats(encoders):
  """The ArcFace path at 256 px (batch 1): crop, adaptive pool to 112, IR-SE50, L2 norm."""
  variables, twin = encoders
  x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
  model = fe.OfficialEncoders()
  ours = jax.jit(functools.partial(model.apply, method=fe.OfficialEncoders.id_feats))(
      variables, nhwc(x)
  )
  with torch.no_grad():
    theirs = twin.id_feats(torch.from_numpy(x)).numpy()
  assert_close(ours, theirs, what="id_feats")


def test_mobilenet_gdconv_landmarks(encoders):
  """The raw (unclamped) landmark head on the 224 px input `lnd_feats` feeds it."""
  variables, twin = encoders
  x = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
  ours = jax.jit(fe.MobileNetGDConv().apply)(_net_vars(variables, "lndnet"), nhwc(x))
  with torch.no_grad():
    theirs = twin.lndnet.backbone(torch.from_numpy(x)).numpy()
  assert ours.shape == theirs.shape == (1, 136)
  assert_close(ours, theirs, what="lndnet")


def test_bisenet_logits(encoders):
  """All three BiSeNet logit maps at 256 px (batch 1; ~27 GFLOP per side)."""
  variables, twin = encoders
  x = np.random.default_rng(7).standard_normal((1, 3, 256, 256)).astype(np.float32)
  ours = jax.jit(fe.BiSeNet().apply)(_net_vars(variables, "bgnet"), nhwc(x))
  with torch.no_grad():
    theirs = twin.bgnet.backbone(torch.from_numpy(x))
  for name, a, b in zip(("out", "out16", "out32"), ours, theirs):
    assert_close(nchw(a), b.numpy(), what=name)
