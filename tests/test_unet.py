"""UNet: golden parity (Flax and PyTorch twin), paper-config key coverage, dtype/remat/dropout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.models.unet import UNet, UNetConfig, abstract_params
from s3jax.porting.state_dict import load_state_dict
from s3jax.porting.unet_keys import key_table, unet_params_from_torch, unet_params_to_torch

TOL = 1e-4


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny(golden_dir):
  io = np.load(golden_dir / "unet_tiny_io.npz")
  cfg = UNetConfig.from_json(str(io["config"]))
  sd = load_state_dict(golden_dir / "unet_tiny_state_dict.npz")
  params = unet_params_from_torch(sd, cfg)
  apply = jax.jit(UNet(cfg).apply, static_argnames=("train",))
  return dict(
      io=io,
      cfg=cfg,
      sd=sd,
      params=params,
      apply=apply,
      x=jnp.asarray(io["x"].transpose(0, 2, 3, 1)),
      t=jnp.asarray(io["t"], jnp.int32),
      cond=jnp.asarray(io["cond"]),
  )


@pytest.fixture(scope="session")
def tiny_eps(tiny):
  out = tiny["apply"]({"params": tiny["params"]}, tiny["x"], tiny["t"], tiny["cond"])
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="session")
def manifest_unet(golden_dir):
  keys = json.loads((golden_dir / "dva256_state_dict_manifest.json").read_text())["keys"]
  return {k: tuple(v) for k, v in keys.items() if not k.startswith("encoder.")}


def test_config_from_golden_json(tiny):
  cfg = tiny["cfg"]
  assert cfg.image_size == 32 and cfg.model_channels == 32
  assert cfg.channel_mult == (1, 2, 2) and cfg.attention_resolutions == (16,)
  assert cfg.dropout == 0.0 and cfg.dtype == "float32"


def test_golden_eps_jax(tiny, tiny_eps):
  assert tiny_eps.shape == tiny["io"]["eps"].shape
  assert rel(tiny_eps, tiny["io"]["eps"]) < TOL


def test_golden_eps_torch_twin(tiny):
  torch = pytest.importorskip("torch")
  from s3jax.torch_twin.unet import from_state_dict

  io = tiny["io"]
  model = from_state_dict(tiny["cfg"], tiny["sd"])
  with torch.no_grad():
    out = model(
        torch.from_numpy(io["x"]), torch.from_numpy(io["t"]), torch.from_numpy(io["cond"])
    ).numpy()
  assert rel(out, io["eps"]) < TOL


def test_twin_loads_exported_params(tiny, tiny_eps):
  """Flax -> torch names -> twin (strict) gives the same eps as Flax."""
  torch = pytest.importorskip("torch")
  from s3jax.torch_twin.unet import from_state_dict

  model = from_state_dict(tiny["cfg"], unet_params_to_torch(tiny["params"], tiny["cfg"]))
  io = tiny["io"]
  with torch.no_grad():
    out = model(
        torch.from_numpy(io["x"]), torch.from_numpy(io["t"]), torch.from_numpy(io["cond"])
    ).numpy()
  assert rel(out, tiny_eps) < 1e-5


def test_paper_keys_cover_manifest_both_ways(manifest_unet):
  """eval_shape of the paper UNet gives exactly the manifest's non-encoder keys and shapes."""
  table = key_table(UNetConfig.paper())
  ours = {k: v[2] for k, v in table.items()}
  assert sorted(set(manifest_unet) - set(ours)) == []
  assert sorted(set(ours) - set(manifest_unet)) == []
  bad = {k: (ours[k], manifest_unet[k]) for k in ours if ours[k] != manifest_unet[k]}
  assert bad == {}
  flat = jax.tree_util.tree_leaves(abstract_params(UNetConfig.paper()))
  assert sum(int(np.prod(x.shape)) for x in flat) == sum(
      int(np.prod(s)) for s in manifest_unet.values()
  )


def test_paper_keys_torch_twin(manifest_unet):
  torch = pytest.importorskip("torch")
  from s3jax.torch_twin.unet import TorchUNet

  with torch.device("meta"):
    model = TorchUNet(UNetConfig.paper())
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == manifest_unet


def test_no_resblock_updown_keys():
  cfg = UNetConfig(
      image_size=16,
      model_channels=32,
      channel_mult=(1, 2),
      num_res_blocks=1,
      attention_resolutions=(8,),
      resblock_updown=False,
  )
  names = set(key_table(cfg))
  assert "input_blocks.2.0.op.weight" in names
  assert any(k.endswith(".conv.weight") for k in names)
  torch = pytest.importorskip("torch")
  from s3jax.torch_twin.unet import TorchUNet

  assert set(TorchUNet(cfg).state_dict()) == names


def _random_model(cfg, seed=0, scale=0.1):
  """Random params from eval_shape + numpy (no Flax init compile; output convs not zero)."""
  r = np.random.default_rng(seed)
  p = jax.tree_util.tree_map(
      lambda l: jnp.asarray(scale * r.standard_normal(l.shape), jnp.float32), abstract_params(cfg)
  )
  s = cfg.image_size
  x = jnp.asarray(r.uniform(-1, 1, (2, s, s, cfg.in_channels)), jnp.float32)
  t = jnp.array([3, 700], jnp.int32)
  cond = jnp.asarray(r.normal(size=(2, cfg.embed_channels)), jnp.float32)
  return cfg, p, (x, t, cond)


@pytest.fixture(scope="session")
def small():
  """A small random model for dtype/dropout checks (two levels, up/down ResBlocks, attention)."""
  return _random_model(
      UNetConfig(
          image_size=8,
          model_channels=32,
          channel_mult=(1, 2),
          num_res_blocks=1,
          attention_resolutions=(4,),
          embed_channels=64,
      )
  )


@pytest.fixture(scope="session")
def one_level():
  """The smallest UNet with attention, for gradient (remat) checks."""
  return _random_model(
      UNetConfig(
          image_size=4,
          model_channels=32,
          channel_mult=(1,),
          num_res_blocks=1,
          attention_resolutions=(4,),
          embed_channels=32,
      )
  )


def _flat(tree):
  return np.concatenate(
      [np.ravel(np.asarray(l, np.float64)) for l in jax.tree_util.tree_leaves(tree)]
  )


def test_bf16_compute(small):
  import dataclasses

  cfg, p, args = small
  ref = jax.jit(UNet(cfg).apply)({"params": p}, *args)
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  out16 = jax.jit(UNet(cfg16).apply)({"params": p}, *args)
  assert out16.dtype == jnp.float32
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(p))
  assert 0 < rel(out16, np.asarray(ref)) < 0.1


@pytest.mark.slow  # ~22 s: two gradient compiles
def test_remat_same_gradients(one_level):
  import dataclasses

  cfg, p, args = one_level

  def grad(c):
    loss = lambda q: jnp.sum(UNet(c).apply({"params": q}, *args) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(p)

  g1 = _flat(grad(cfg))
  g2 = _flat(grad(dataclasses.replace(cfg, remat=True)))
  assert np.linalg.norm(g1) > 0
  assert np.linalg.norm(g1 - g2) / np.linalg.norm(g1) < 1e-5


def test_dropout_uses_rng(small):
  import dataclasses

  cfg, p, args = small
  f = jax.jit(UNet(dataclasses.replace(cfg, dropout=0.5)).apply, static_argnames=("train",))
  v = {"params": p}
  a = f(v, *args, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = f(v, *args, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  c = f(v, *args, train=False)
  assert not np.allclose(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_allclose(c, jax.jit(UNet(cfg).apply)(v, *args), rtol=1e-6, atol=1e-6)
