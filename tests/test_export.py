"""PyTorch export/import of whole DVA checkpoints (`python -m s3jax.convert export|import`)."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import configs  # noqa: E402
from s3jax import checkpointing, loading, optim  # noqa: E402
from s3jax.models.autoencoder import make_dva  # noqa: E402
from s3jax.models.unet import UNetConfig  # noqa: E402
from s3jax.porting import dva_checkpoint as dc  # noqa: E402
from s3jax.porting import state_dict as sdlib  # noqa: E402
from s3jax.porting.unet_keys import KeyMismatchError, key_table  # noqa: E402

from train_helpers import TINY_UNET, run_convert  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(face_features="dlib"):
  c = configs.get("voxceleb:demo")
  c.model.unet = ml_collections.ConfigDict(TINY_UNET)
  c.model.face_features = face_features
  return c


def tiny_config_file(tmp_path, face_features="dlib") -> pathlib.Path:
  """`tiny_config()` as a config file for `--config` (the CLI runs from the repo root)."""
  path = tmp_path / "tiny_dva_config.py"
  path.write_text(
      "import ml_collections\n"
      "import configs\n\n\n"
      "def get_config():\n"
      '  c = configs.get("voxceleb:demo")\n'
      f"  c.model.unet = ml_collections.ConfigDict({TINY_UNET!r})\n"
      f"  c.model.face_features = {face_features!r}\n"
      "  return c\n"
  )
  return path


def _randomise(tree, seed):
  """Non-trivial weights everywhere (the zero-initialised output convs too)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  # Its users are all marked slow: this fixture alone took ~55 s (cold) on 2 cores.
  workdir = tmp_path_factory.mktemp("dva_ckpt")
  config = tiny_config()
  model = make_dva(config.model)
  tx = optim.make_optimizer(config.optim)
  state = loading.init_dva_state(model, tx, config, jax.random.key(0))
  params = _randomise(state.params, 1)
  ema = _randomise(state.params, 2)
  state = checkpointing.TrainState(
      step=jnp.asarray(42, jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params)
  )
  ck = checkpointing.Checkpointer(workdir, async_save=False)
  ck.save(42, state, config=config, force=True)  # the config travels with the step
  ck.close()
  return workdir, config, jax.device_get(params), jax.device_get(ema)


def _restore_both(workdir):
  """(params, ema_params, config, step) of a workdir in one orbax restore."""
  _, state, config, step = loading.restore_dva_state(workdir)
  return state.params, state.ema_params, config, step


def _config_in_step(workdir, step):
  """The config saved inside checkpoint `step` itself (None if it was saved without one)."""
  ck = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    return ck.restore_config(step)
  finally:
    ck.close()


def _assert_bitwise(a, b):
  """Same tree of float32 leaves with identical bits (-0.0 vs 0.0 or NaN payloads count)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  chex.assert_type(jax.tree.leaves(a), np.float32)
  bits = lambda t: jax.tree.map(lambda x: np.asarray(x).view(np.uint32), t)  # noqa: E731
  chex.assert_trees_all_equal(bits(a), bits(b), strict=True)


@pytest.mark.slow
def test_lightning_round_trip_is_bitwise(tiny_ckpt, tmp_path):
  workdir, config, params, ema = tiny_ckpt
  out = tmp_path / "dva.ckpt"
  r = run_convert("export", "--checkpoint", workdir, "--out", out, "--lightning")
  assert r.returncode == 0, r.stderr
  row = json.loads(r.stdout)  # exactly one JSON line
  assert row["wrote"] == str(out) and row["step"] == 42 and row["weights"] == "model+ema"
  assert row["lightning"] and row["face_features"] == "dlib"
  # Lightning layout, readable with weights_only=True.
  obj = torch.load(str(out), map_location="cpu", weights_only=True)
  assert obj["global_step"] == 42
  sd = obj["state_dict"]
  assert {k.split(".", 1)[0] for k in sd} == {"model", "ema_model"}
  plain = dc.params_to_torch(params, config.model)
  assert set(sd) == {"model." + k for k in plain} | {"ema_model." + k for k in plain}
  assert np.array_equal(
      sd["model.encoder.linear.weight"].numpy(), np.asarray(params["encoder"]["linear"]["kernel"]).T
  )
  assert np.array_equal(
      sd["ema_model.encoder.linear.weight"].numpy(),
      np.asarray(ema["encoder"]["linear"]["kernel"]).T,
  )

  new = tmp_path / "imported"
  r = run_convert("import", "--src", out, "--workdir", new, "--config", tiny_config_file(tmp_path))
  assert r.returncode == 0, r.stderr
  row = json.loads(r.stdout)
  assert row["step"] == 0 and row["params_and_ema_from_separate_sets"]
  _, p2, _, step = loading.load_dva(new, ema=False)  # the editor's loader
  _, e2, cfg2, _ = loading.load_dva(new, ema=True)
  assert step == 0 and cfg2.model.face_features == "dlib"
  assert _config_in_step(new, 0).model.face_features == "dlib"
  _assert_bitwise(params, p2)
  _assert_bitwise(ema, e2)

  # --which picks one set for both.
  new2 = tmp_path / "imported_ema"
  dc.import_checkpoint(out, new2, tiny_config(), which="ema", step=5)
  p3, _, _, step3 = _restore_both(new2)
  assert step3 == 5
  _assert_bitwise(ema, p3)


@pytest.mark.slow
def test_safetensors_and_pt_round_trip(tiny_ckpt, tmp_path):
  workdir, config, params, ema = tiny_ckpt
  for name, use_ema, want in (("ema.safetensors", True, ema), ("model.pt", False, params)):
    out = tmp_path / name
    res = dc.export_checkpoint(workdir, out, ema=use_ema)
    assert res.step == 42 and not res.lightning
    sd = sdlib.load_state_dict(out)
    assert "encoder.linear.weight" in sd and "time_embed.time_embed.0.weight" in sd
    assert not any(k.startswith(("model.", "ema_model.")) for k in sd)
    new = tmp_path / f"imp_{name}"
    dc.import_checkpoint(out, new, tiny_config())
    p2, e2, _, _ = _restore_both(new)
    _assert_bitwise(want, p2)
    _assert_bitwise(want, e2)
  # Lightning in safetensors: flat model.*/ema_model.* keys.
  out = tmp_path / "both.safetensors"
  dc.export_checkpoint(workdir, out, lightning=True)
  new = tmp_path / "imp_both_st"
  dc.import_checkpoint(out, new, tiny_config())
  p2, e2, _, _ = _restore_both(new)
  _assert_bitwise(params, p2)
  _assert_bitwise(ema, e2)


@pytest.mark.slow
def test_torch_twin_matches_jax(tiny_ckpt, tmp_path):
  workdir, config, _, ema = tiny_ckpt
  out = tmp_path / "ema.pt"
  dc.export_checkpoint(workdir, out, ema=True)
  twin = dc.torch_dva_from_state_dict(sdlib.load_state_dict(out), config.model)
  model = make_dva(config.model)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  t = np.array([0, 500, 999], np.int32)
  z_id = rng.normal(size=(3, 128)).astype(np.float32)
  z_id /= np.linalg.norm(z_id, axis=1, keepdims=True)
  z_lnd = rng.uniform(0, 1, (3, 102)).astype(np.float32)
  ref = np.asarray(model.apply({"params": ema}, x, t, z_id, z_lnd))
  with torch.no_grad():
    got = (
        twin(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t).long(),
            torch.from_numpy(z_id),
            torch.from_numpy(z_lnd),
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    zf_twin = twin.z_face(torch.from_numpy(z_id), torch.from_numpy(z_lnd)).numpy()
  zf = np.asarray(model.apply({"params": ema}, z_id, z_lnd, method="z_face"))
  assert np.abs(ref).mean() > 1e-3  # non-trivial output
  np.testing.assert_allclose(zf_twin, zf, rtol=1e-5, atol=1e-5)
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 1e-5, rel
  np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.slow
def test_errors_name_the_parameter(tiny_ckpt, tmp_path):
  workdir, config, params, _ = tiny_ckpt
  sd = dc.params_to_torch(params, config.model)
  bad = dict(sd)
  bad["input_blocks.1.0.in_layers.2.weight"] = np.zeros((32, 32, 3, 1), np.float32)
  with pytest.raises(ValueError, match=r"input_blocks\.1\.0\.in_layers\.2\.weight"):
    dc.params_from_torch(bad, config.model)
  bad = dict(sd)
  del bad["out.2.bias"]
  with pytest.raises(KeyMismatchError, match=r"out\.2\.bias"):
    dc.params_from_torch(bad, config.model)
  bad = dict(sd)
  bad["encoder.linear.weight"] = np.zeros((512, 300), np.float32)
  with pytest.raises(dc.DVACheckpointError, match=r"encoder\.linear\.weight"):
    dc.params_from_torch(bad, config.model)
  bad = dict(sd)
  del bad["encoder.linear.bias"]
  with pytest.raises(dc.DVACheckpointError, match=r"encoder\.linear\.bias"):
    dc.params_from_torch(bad, config.model)
  # Through the CLI: exit code 2 and the name on stderr (a wrong-shape file for this config).
  path = tmp_path / "bad.safetensors"
  bad = dict(sd)
  bad["middle_block.0.emb_layers.1.weight"] = np.zeros((7, 512), np.float32)
  sdlib.save_state_dict(bad, path)
  r = run_convert(
      "import", "--src", path, "--workdir", tmp_path / "w", "--config", tiny_config_file(tmp_path)
  )
  assert r.returncode == 2, r.stderr
  assert "middle_block.0.emb_layers.1.weight" in r.stderr


def test_reference_key_names_for_the_paper_model(golden_dir):
  """Export names are the reference's: the manifest's non-frozen keys, shapes included."""
  manifest = json.loads((golden_dir / "dva256_state_dict_manifest.json").read_text())["keys"]
  want = {
      k: tuple(v)
      for k, v in manifest.items()
      if not k.startswith(("encoder.idnet.", "encoder.lndnet.", "encoder.bgnet."))
  }
  got = {k: tuple(v[2]) for k, v in key_table(UNetConfig.paper()).items()}
  got["encoder.linear.weight"] = (512, 614)
  got["encoder.linear.bias"] = (512,)
  assert got == want


@pytest.mark.slow
def test_official_import_keeps_frozen_encoders(tiny_ckpt, tmp_path, golden_dir):
  """A reference file with encoder.idnet/lndnet/bgnet keys: those become frozen-encoder
  variables, face_features becomes 'official', and export writes them back unchanged."""
  workdir, config, params, _ = tiny_ckpt
  enc = sdlib.load_state_dict(golden_dir / "encoders_state_dict.npz")
  sd = {
      k: v
      for k, v in dc.params_to_torch(params, config.model).items()
      if not k.startswith("encoder.")
  }
  sd.update({"encoder." + k: v for k, v in enc.items()})
  src = tmp_path / "official.safetensors"
  sdlib.save_state_dict(sd, src)
  new = tmp_path / "official"
  res = dc.import_checkpoint(src, new, tiny_config("dlib"))
  assert res.face_features == "official" and res.frozen_encoders is not None
  p2, _, cfg2, _ = _restore_both(new)
  assert cfg2.model.face_features == "official"
  assert p2["encoder"]["linear"]["kernel"].shape == (614, 512)
  assert dc.load_frozen_encoders(new) is not None
  out = tmp_path / "back.pt"
  dc.export_checkpoint(new, out, ema=True)
  back = sdlib.load_state_dict(out)
  assert set(back) == set(sd) | {k for k in back if k.endswith("num_batches_tracked")}
  for k, v in sd.items():
    # The reference registers torchvision's MobileNetV2 twice; base_net.0.* is the copy
    # load_state_dict keeps, so export writes it under both names.
    src_key = k.replace(".pretrain_net.features.", ".base_net.0.")
    assert np.array_equal(np.asarray(back[k]), np.asarray(sd[src_key])), k
