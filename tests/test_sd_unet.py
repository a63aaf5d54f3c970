"""The Flax SD-1.x UNet (`s3jax.sd.unet`) and its diffusers importer (`s3jax.porting.sd_keys`).

Golden (golden/ipfacediff): the plain forward `unet_out`, TokenFlow propagation (unit f) and
extended attention with PnP Q/K injection (unit g). Oracle: a diffusers UNet2DConditionModel at
another tiny config, output and module by module. Importer errors and round trip. Keyframe /
batch consistency of the TokenFlow modes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.parity.unet import rel_err
from s3jax.porting.sd_keys import unet_params_from_state_dict, unet_state_dict_from_params
from s3jax.porting.state_dict import StateDictError, load_state_dict
from s3jax.sd.unet import (
    QK_INJECTION_BLOCKS,
    Attention,
    SDUNet,
    SDUNetConfig,
    TokenFlowCall,
    blend_weights_for_batch,
    propagate_keyframe_attention,
)

GOLDEN_TOL = 1e-5  # README: unet_out
UNIT_TOL = 1e-6  # README: prop_out, ea_out_*
EA_HEADS = 8  # the golden UNet's attention_head_dim (a head count in SD-1.x)


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def ipfd_dir(golden_dir):
  path = golden_dir.parent / "ipfacediff"
  if not path.is_dir():
    pytest.skip(f"IP-FaceDiff golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def golden_io(ipfd_dir):
  with np.load(ipfd_dir / "io.npz") as z:
    return dict(z)


@pytest.fixture(scope="module")
def golden_sd(ipfd_dir):
  return load_state_dict(ipfd_dir / "unet.safetensors")


@pytest.fixture(scope="module")
def golden_config(ipfd_dir):
  return SDUNetConfig.from_diffusers(json.loads((ipfd_dir / "unet_config.json").read_text()))


@pytest.fixture(scope="module")
def golden_params(golden_sd, golden_config):
  return unet_params_from_state_dict(golden_sd, golden_config)


@pytest.fixture(scope="module")
def golden_model(golden_config):
  return SDUNet(golden_config)


@pytest.fixture(scope="module")
def plain_fn(golden_model):
  return jax.jit(lambda p, x, t, c: golden_model.apply({"params": p}, x, t, c))


@pytest.fixture(scope="module")
def keyframe_fn(golden_model):
  def run(p, x, t, c, inject_conv, inject_qk):
    tf = TokenFlowCall("keyframe", inject_conv, inject_qk)
    return golden_model.apply({"params": p}, x, t, c, tf)

  return jax.jit(run)


@pytest.fixture(scope="module")
def batch_fn(golden_model):
  def run(p, x, t, c, inject_conv, store, b, w):
    tf = TokenFlowCall("batch", inject_conv, jnp.bool_(False), store, b, w, return_nn=True)
    return golden_model.apply({"params": p}, x, t, c, tf)

  return jax.jit(run)


# ----------------------------------------------------------------------------- golden
def test_golden_unet_out(golden_io, golden_params, plain_fn):
  out = plain_fn(
      golden_params,
      nhwc(golden_io["unet_in_latents"]),
      jnp.asarray(golden_io["unet_in_timesteps"], jnp.int32),
      jnp.asarray(golden_io["unet_in_encoder_hidden_states"]),
  )
  err = rel_err(np.transpose(np.asarray(out), (0, 3, 1, 2)), golden_io["unet_out"])
  assert err <= GOLDEN_TOL, err


def test_golden_propagation(golden_io):
  """Unit (f): batches b = 0, 1, 2 of n = 2 frames against 3 keyframes."""
  frame_feats = golden_io["prop_frame_feats"][0]  # only the source branch is matched
  keyframe_feats = golden_io["prop_keyframe_feats"][0]
  n_kf = keyframe_feats.shape[0]
  attn_out = golden_io["prop_keyframe_attn_out"].reshape(3, n_kf, *keyframe_feats.shape[1:])
  n = frame_feats.shape[0]
  propagate = jax.jit(
      lambda b: propagate_keyframe_attention(
          frame_feats, keyframe_feats, attn_out, b, blend_weights_for_batch(b, n)
      )
  )
  for b in golden_io["prop_batch_idx"]:
    out = propagate(jnp.int32(b))
    err = rel_err(out, golden_io["prop_out"][b])
    assert err <= UNIT_TOL, (b, err)


def test_blend_weights():
  assert np.array_equal(blend_weights_for_batch(0, 4), np.ones(4, np.float32))
  w = np.asarray(blend_weights_for_batch(2, 4))
  d1 = np.abs(np.arange(8, 12) - 10)
  d2 = np.abs(np.arange(8, 12) - 6)
  np.testing.assert_allclose(w, 1 / (1 + np.exp(-d2 / (d1 + d2))), rtol=1e-6)
  assert (w >= 0.62).all() and (w <= 0.74).all()


def attn1_params(params, block: str):
  """'up_blocks.2.attentions.1.transformer_blocks.0.attn1' -> that attention's params."""
  parts = block.split(".")
  path = [f"{parts[i]}_{parts[i + 1]}" for i in range(0, len(parts) - 1, 2)] + [parts[-1]]
  for key in path:
    params = params[key]
  return params


def test_golden_extended_attention(golden_io, golden_params):
  """Unit (g): attn1 with TokenFlow's extended attention, with and without Q/K injection."""
  io = golden_io
  block = str(io["ea_block"])
  assert block.rsplit(".transformer_blocks", 1)[0] in QK_INJECTION_BLOCKS
  injected_t = int(io["ea_t_injected"])
  not_injected_t = int(io["ea_t_not_injected"])
  schedule = set(io["edit_qk_injection_timesteps"].tolist())
  assert injected_t in schedule and not_injected_t not in schedule

  @jax.jit
  def extended(params, x, inject):
    return Attention(x.shape[-1], EA_HEADS).apply(
        {"params": params}, x, inject, method=Attention.extended
    )

  def run(block, x, inject):
    return extended(attn1_params(golden_params, block), jnp.asarray(x), jnp.bool_(inject))

  outs = {}
  for name, inject in (("injected", True), ("not_injected", False)):
    outs[name] = run(block, io["ea_x"], inject)
    err = rel_err(outs[name], io[f"ea_out_{name}"])
    assert err <= UNIT_TOL, (name, err)
  assert rel_err(outs["injected"], outs["not_injected"]) > 1e-2  # the switch does something
  down_block = str(io["ea_down_block"])
  err = rel_err(run(down_block, io["ea_down_x"], False), io["ea_down_out"])  # no schedule
  assert err <= UNIT_TOL, err


# ----------------------------------------------------------------------------- oracle
ORACLE_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=3,
    block_out_channels=(16, 24),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=20,
    attention_head_dim=4,
    norm_num_groups=4,
    flip_sin_to_cos=False,
    freq_shift=1,
)


def randomise(torch_module, seed=12345):
  """Norms get weight 1 + 0.1 N, bias 0.1 N; every other bias + 0.05 N (as the golden set)."""
  import torch  # Lazy: test-only oracle.

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      elif "norm" in name:
        p.copy_(0.1 * noise)
      elif name.endswith("bias"):
        p.add_(0.05 * noise)


def test_diffusers_oracle_module_by_module():
  import torch  # Lazy: test-only oracle.
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  ref = UNet2DConditionModel(**ORACLE_CONFIG).eval()
  randomise(ref)
  config = SDUNetConfig.from_diffusers(dict(ref.config))
  assert config.block_out_channels == (16, 24) and config.heads == 4
  params = unet_params_from_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, config)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)  # non-square latent
  t = np.array([999, 3])
  ctx = rng.standard_normal((2, 5, 20)).astype(np.float32)
  seen = {}
  hooks = [
      getattr(ref, name).register_forward_hook(
          lambda m, i, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o)
      )
      for name in ("time_embedding", "mid_block")
  ]
  hooks.append(
      ref.down_blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("down0", o[0]))
  )
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
  for h in hooks:
    h.remove()

  forward = jax.jit(
      lambda p, x, t, c: SDUNet(config).apply(
          {"params": p}, x, t, c, capture_intermediates=True, mutable=["intermediates"]
      )
  )
  eps, state = forward(params, nhwc(x), jnp.asarray(t, jnp.int32), jnp.asarray(ctx))
  inter = state["intermediates"]
  nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))  # noqa: E731
  errs = {
      "eps": rel_err(nchw(eps), want),
      "time_embedding": rel_err(inter["time_embedding"]["__call__"][0], seen["time_embedding"]),
      "down_blocks.0": rel_err(nchw(inter["down_blocks_0"]["__call__"][0][0]), seen["down0"]),
      "mid_block": rel_err(nchw(inter["mid_block"]["__call__"][0][0]), seen["mid_block"]),
  }
  assert all(e <= 1e-5 for e in errs.values()), errs


# ----------------------------------------------------------------------------- importer
def test_importer_errors_name_the_key(golden_sd, golden_config):
  key = "up_blocks.1.resnets.1.conv2.weight"
  missing = {k: v for k, v in golden_sd.items() if k != key}
  with pytest.raises(StateDictError, match="missing 1: " + key.replace(".", r"\.")):
    unet_params_from_state_dict(missing, golden_config)
  stray = {**golden_sd, "add_embedding.linear_1.weight": np.zeros((4, 4), np.float32)}
  with pytest.raises(StateDictError, match=r"unexpected 1: add_embedding\.linear_1\.weight"):
    unet_params_from_state_dict(stray, golden_config)
  wrong = {**golden_sd, key: np.zeros((3, 3, 3, 3), np.float32)}
  with pytest.raises(StateDictError, match=key.replace(".", r"\.") + r" has shape \(3, 3, 3, 3\)"):
    unet_params_from_state_dict(wrong, golden_config)


def test_round_trip_is_exact(golden_sd, golden_config, golden_params):
  back = unet_state_dict_from_params(golden_params, golden_config)
  assert set(back) == set(golden_sd)
  for k, v in golden_sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_config_rejects_unsupported_options(ipfd_dir):
  cfg = json.loads((ipfd_dir / "unet_config.json").read_text())
  with pytest.raises(ValueError, match="use_linear_projection"):
    SDUNetConfig.from_diffusers({**cfg, "use_linear_projection": True})
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    SDUNetConfig.from_diffusers(
        {**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D"] + cfg["down_block_types"][1:]}
    )
  assert SDUNetConfig.from_diffusers({**cfg, "attention_head_dim": [8, 8, 8, 8]}).heads == 8


# ----------------------------------------------------------------------------- TokenFlow modes
@pytest.fixture(scope="module")
def keyframe_run(golden_io, golden_params, keyframe_fn):
  """A keyframe pass of 3 keyframes at t = 901 with both injections on."""
  rng = np.random.default_rng(1)
  n_kf = 3
  x = rng.standard_normal((3 * n_kf, 16, 16, 4)).astype(np.float32)
  text = golden_io["edit_step0_unet_text"]  # (18, 77, C): [src x2 | uncond x2 | cond x2] x 3
  ctx = np.concatenate([np.repeat(text[i : i + 1], n_kf, 0) for i in (0, 2, 4)])
  t = jnp.int32(901)
  eps, store = keyframe_fn(golden_params, x, t, ctx, jnp.bool_(True), jnp.bool_(True))
  return dict(x=x, ctx=ctx, t=t, eps=np.asarray(eps), store=store, n_kf=n_kf)


def test_keyframe_store_layout(keyframe_run, golden_config):
  store = keyframe_run["store"]
  assert len(store) == 16
  assert "up_blocks.1.attentions.2" in store and "mid_block.attentions.0" in store
  feats = store["down_blocks.0.attentions.0"]["feats"]
  attn = store["down_blocks.0.attentions.0"]["attn_out"]
  assert feats.shape == (3, 256, golden_config.block_out_channels[0])
  assert attn.shape == (3, 3, 256, golden_config.block_out_channels[0])


def test_source_branch_ignores_edit_branches(keyframe_run, golden_params, keyframe_fn):
  """Injection copies source -> edit only: the source branch never sees the edit branches."""
  run = keyframe_run
  n = run["n_kf"]
  x = run["x"].copy()
  x[n:] = np.random.default_rng(2).standard_normal(x[n:].shape)
  eps, store = keyframe_fn(golden_params, x, run["t"], run["ctx"], jnp.bool_(True), jnp.bool_(True))
  np.testing.assert_allclose(np.asarray(eps)[:n], run["eps"][:n], rtol=0, atol=1e-5)
  assert rel_err(np.asarray(eps)[n:], run["eps"][n:]) > 1e-3


def test_batch_pass_of_keyframe_copies_finds_itself(keyframe_run, golden_params, batch_fn):
  """A batch whose source frames are copies of keyframe b matches every token to itself in
  keyframe b; for b == 0 (w = 1) the source branch then reproduces the keyframe pass exactly."""
  run = keyframe_run
  n_kf, n = run["n_kf"], 2
  x_kf, ctx_kf = run["x"], run["ctx"]
  rng = np.random.default_rng(3)
  for b in range(n_kf):
    src = np.repeat(x_kf[b : b + 1], n, 0)
    edit = rng.standard_normal((2 * n, 16, 16, 4)).astype(np.float32)
    x = np.concatenate([src, edit])
    ctx = np.concatenate([np.repeat(ctx_kf[i * n_kf : i * n_kf + 1], n, 0) for i in range(3)])
    w = blend_weights_for_batch(b, n)
    eps, nn_idx = batch_fn(
        golden_params, x, run["t"], ctx, jnp.bool_(True), run["store"], jnp.int32(b), w
    )
    assert len(nn_idx) == 16
    blocks = list(nn_idx) if b == 0 else ["down_blocks.0.attentions.0"]
    for block in blocks:
      s = run["store"][block]["feats"].shape[1]
      want = np.tile(np.arange(s), n)
      assert np.array_equal(np.asarray(nn_idx[block][0]), want), (b, block)
    if b == 0:
      np.testing.assert_allclose(
          np.asarray(eps)[:n], np.repeat(run["eps"][:1], n, 0), rtol=0, atol=1e-5
      )
