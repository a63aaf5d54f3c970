"""The Flax stylegan2-ada generator: golden parity, fused vs non-fused, gradients over a frame
axis, the FFHQ 1024 config (shapes only), state-dict round trips and their errors."""

import dataclasses
import json
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.models import stylegan2 as sg
from s3jax.parity import stylegan2 as parity
from s3jax.parity.unet import rel_err
from s3jax.porting import stylegan2_keys as keys
from s3jax.porting.state_dict import StateDictError, load_state_dict
from s3jax.porting.unet_keys import KeyMismatchError
from train_helpers import random_generator_state_dict

SHARED = pathlib.Path(
    os.environ.get("S3JAX_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")
)
STIT = SHARED / "golden" / "stit"
# ffhq.pkl's G_ema init_kwargs (the generator STIT loads).
FFHQ_INIT_KWARGS = {
    "z_dim": 512,
    "c_dim": 0,
    "w_dim": 512,
    "img_resolution": 1024,
    "img_channels": 3,
    "mapping_kwargs": {"num_layers": 8},
    "synthesis_kwargs": {
        "channel_base": 32768,
        "channel_max": 512,
        "num_fp16_res": 4,
        "conv_clamp": 256,
    },
}


@pytest.fixture(scope="module")
def stit_dir():
  if not (STIT / parity.IO_FILE).is_file():
    pytest.skip(f"golden stit vectors not found at {STIT} (../shared is absent)")
  return STIT


@pytest.fixture(scope="module")
def golden_io(stit_dir):
  with np.load(stit_dir / parity.IO_FILE) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def config(golden_io):
  return sg.GeneratorConfig.from_init_kwargs(
      parity.io_init_kwargs(json.loads(str(golden_io["config"])))
  )


@pytest.fixture(scope="module")
def golden_sd(stit_dir):
  return load_state_dict(stit_dir / parity.STATE_DICT_FILE)


@pytest.fixture(scope="module")
def variables(golden_sd, config):
  return keys.variables_from_state_dict(golden_sd, config)


@pytest.fixture(scope="module")
def parity_rows(stit_dir):
  return parity.check(stit_dir)


def test_parity_rows_all_ok(parity_rows, golden_io):
  bad = [r for r in parity_rows if not r["ok"]]
  assert not bad, bad
  names = {r["name"] for r in parity_rows}
  inputs = {"config", "num_ws", "z", "c", "ws_mix", "conv_clamp_test"}
  assert set(golden_io) - inputs <= names  # every golden output has its row
  assert {"img_mix_nonfused", "pickle_G_ema_state_dict", "pickle_G_differs"} <= names
  for r in parity_rows:
    if r["name"].startswith(("ws_", "img_", "feat_")):
      assert r["tol"] == 1e-5 and r["rel_err"] < 1e-5


def test_fused_and_nonfused_agree(parity_rows, variables, config, golden_io):
  # the jitted functions (and batch shapes) are those the parity check compiled (lru-cached)
  ws = np.concatenate([golden_io[n] for n in list(parity.TRUNCATIONS) + ["ws_mix"]])
  fused, _ = parity.jitted_synthesis(config, features=True)(variables, ws)
  nonfused = parity.jitted_synthesis(config, "const", False)
  nonfused = np.concatenate([nonfused(variables, ws[i : i + 2]) for i in range(0, len(ws), 2)])
  assert rel_err(nonfused, fused) < 1e-6


@pytest.fixture(scope="module")
def micro():
  """A micro generator (8 px, 4 channels, noise_strength 0.1) and its variables."""
  config = sg.GeneratorConfig(
      z_dim=4,
      c_dim=0,
      w_dim=4,
      img_resolution=8,
      img_channels=3,
      mapping_num_layers=1,
      channel_base=32,
      channel_max=4,
      conv_clamp=256,
  )
  sd = random_generator_state_dict(config)
  rng = np.random.default_rng(0)
  variables = keys.variables_from_state_dict(sd, config)
  ws = rng.standard_normal((2, config.num_ws, config.w_dim)).astype(np.float32)
  return config, variables, ws


def test_grad_over_a_frame_axis_covers_params_only(micro):
  # Stitching tuning: per-frame parameter copies, non-fused (train) path, grad over params.
  config, variables, ws = micro
  frames = ws.shape[0]
  params = jax.tree.map(lambda p: jnp.stack([p] * frames), variables["params"])

  def loss(p, w):
    v = {"params": p, "buffers": variables["buffers"]}
    img = sg.synthesis(config, v, w[None], noise_mode="const", fused_modconv=False)
    return jnp.mean(jnp.square(img - 0.5)), img[0]

  grads, imgs = jax.jit(jax.vmap(jax.grad(loss, has_aux=True)))(params, ws)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    assert g.shape[0] == frames and np.all(np.isfinite(g)), path
    nonzero = float(np.max(np.abs(g))) > 0
    assert nonzero == (path[0] == "synthesis"), path  # the mapping is not on the path
  # buffers (noise_const, resample_filter, w_avg) are not trainable
  assert "noise_const" not in str(jax.tree.structure(grads))
  fused = jax.jit(lambda v, w: sg.synthesis(config, v, w))(variables, ws)
  assert rel_err(imgs, fused) < 1e-5


def test_noise_modes(micro):
  config, variables, ws = micro
  run = jax.jit(lambda v, w, k: sg.synthesis(config, v, w, noise_mode="random", noise_rng=k))
  a, b = run(variables, ws, jax.random.PRNGKey(0)), run(variables, ws, jax.random.PRNGKey(1))
  assert a.shape == (2, 8, 8, 3) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(variables, ws, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="noise_rng"):
    sg.synthesis(config, variables, ws, noise_mode="random")
  with pytest.raises(ValueError, match="noise_mode"):
    sg.synthesis(config, variables, ws, noise_mode="bogus")


def test_ffhq_1024_config_shapes():
  config = sg.GeneratorConfig.from_init_kwargs(FFHQ_INIT_KWARGS)
  assert config.to_init_kwargs() == FFHQ_INIT_KWARGS
  assert config.num_ws == 18
  assert config.block_channels == {
      4: 512,
      8: 512,
      16: 512,
      32: 512,
      64: 512,
      128: 256,
      256: 128,
      512: 64,
      1024: 32,
  }
  shapes = sg.abstract_variables(config)
  flat = flax.traverse_util.flatten_dict(shapes)
  assert flat[("params", "synthesis", "b4", "const")].shape == (4, 4, 512)
  assert flat[("params", "synthesis", "b1024", "conv0", "kernel")].shape == (3, 3, 64, 32)
  assert flat[("params", "synthesis", "b1024", "torgb", "kernel")].shape == (1, 1, 32, 3)
  assert flat[("buffers", "synthesis", "b1024", "conv1", "noise_const")].shape == (1024, 1024)
  assert flat[("params", "mapping", "fc7", "kernel")].shape == (512, 512)
  table = keys.key_table(config)
  assert len(table) == len(flat)
  assert table["synthesis.b1024.conv0.weight"][3] == (32, 64, 3, 3)
  assert list(table)[0] == "synthesis.b4.const" and list(table)[-1] == "mapping.fc7.bias"
  ws = jax.ShapeDtypeStruct((2, 18, 512), jnp.float32)
  img, feats = jax.eval_shape(
      lambda v, w: sg.synthesis(config, v, w, return_features=True), shapes, ws
  )
  assert img.shape == (2, 1024, 1024, 3)
  assert feats[1024].shape == (2, 1024, 1024, 32) and feats[4].shape == (2, 4, 4, 512)
  z = jax.ShapeDtypeStruct((2, 512), jnp.float32)
  out = jax.eval_shape(lambda v, z: sg.mapping(config, v, z, truncation_psi=0.7), shapes, z)
  assert out.shape == (2, 18, 512)


def test_config_round_trip_and_errors(config, golden_io):
  init_kwargs = parity.io_init_kwargs(json.loads(str(golden_io["config"])))
  assert config.to_init_kwargs() == init_kwargs
  assert config.num_ws == int(golden_io["num_ws"])
  with pytest.raises(sg.GeneratorConfigError, match="bogus"):
    sg.GeneratorConfig.from_init_kwargs(dict(init_kwargs, mapping_kwargs={"bogus": 1}))
  with pytest.raises(sg.GeneratorConfigError, match="architecture"):
    sg.GeneratorConfig.from_init_kwargs(
        dict(init_kwargs, synthesis_kwargs={"architecture": "resnet"})
    )


def test_state_dict_round_trip(variables, golden_sd, config, tmp_path, stit_dir):
  sd = keys.state_dict_from_variables(variables, config)
  assert list(sd) == list(golden_sd)  # G.state_dict() order
  for k, v in golden_sd.items():
    assert sd[k].shape == v.shape and sd[k].dtype == v.dtype, k
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  # files: a bare state dict with its sidecar config, and the network pickle
  path = keys.save_generator(config, variables, tmp_path / "g.safetensors")
  assert keys.sidecar_path(path).is_file()
  cfg2, v2 = keys.load_generator(path)
  assert cfg2 == config
  jax.tree.map(np.testing.assert_array_equal, v2, variables)
  cfg3, v3 = keys.load_generator(stit_dir / parity.PICKLE_FILE)
  assert cfg3 == config
  jax.tree.map(np.testing.assert_array_equal, v3, variables)
  cfg4, _ = keys.load_generator(stit_dir / parity.STATE_DICT_FILE, config=config.to_init_kwargs())
  assert cfg4 == config
  with pytest.raises(StateDictError, match="pass config="):
    keys.load_generator(stit_dir / parity.STATE_DICT_FILE)
  other = dataclasses.replace(config, conv_clamp=None)
  with pytest.raises(StateDictError, match="differs"):
    keys.load_generator(stit_dir / parity.PICKLE_FILE, config=other)


def test_state_dict_errors(golden_sd, config):
  bad = dict(golden_sd)
  bad["synthesis.b8.conv0.weight"] = np.zeros((64, 64, 3, 4), np.float32)
  with pytest.raises(
      keys.GeneratorShapeError, match=r"synthesis\.b8\.conv0\.weight.*\(64, 64, 3, 3\)"
  ):
    keys.variables_from_state_dict(bad, config)
  missing = {k: v for k, v in golden_sd.items() if k != "mapping.w_avg"}
  with pytest.raises(KeyMismatchError, match=r"missing 1: mapping\.w_avg"):
    keys.variables_from_state_dict(missing, config)
  extra = dict(golden_sd, **{"synthesis.b128.const": np.zeros(3)})
  with pytest.raises(KeyMismatchError, match=r"unexpected 1: synthesis\.b128\.const"):
    keys.variables_from_state_dict(extra, config)
  # the same weights do not fit a config with other channel counts
  wider = dataclasses.replace(config, channel_base=2048)
  with pytest.raises(keys.GeneratorShapeError, match="shape mismatch"):
    keys.variables_from_state_dict(golden_sd, wider)
