"""State-dict I/O in every format, torch<->Flax key mapping errors, and the parity CLI."""

import json
import pathlib
import pickle

import numpy as np
import pytest

from s3jax.models.unet import UNetConfig
from s3jax.porting import state_dict as S
from s3jax.porting.unet_keys import (
    KeyMismatchError,
    key_table,
    unet_params_from_torch,
    unet_params_to_torch,
)

from train_helpers import run_convert

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = UNetConfig(
    image_size=8,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    embed_channels=64,
)


@pytest.fixture(scope="session")
def small_sd():
  r = np.random.default_rng(0)
  return {
      k: r.standard_normal(shape).astype(np.float32)
      for k, (_, _, shape) in key_table(SMALL).items()
  }


@pytest.fixture(scope="session")
def golden_sd(golden_dir):
  return S.load_state_dict(golden_dir / "unet_tiny_state_dict.npz")


def _same(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
    assert np.shape(a[k]) == np.shape(b[k]), k


# ------------------------------------------------------------------ formats
def test_golden_npz_decoding(golden_dir, golden_sd):
  raw = np.load(golden_dir / "unet_tiny_state_dict.npz")
  key = "input_blocks.0.0.weight"
  np.testing.assert_array_equal(
      golden_sd[key], raw[f"q::{key}"].astype(np.float32) * raw[f"s::{key}"]
  )
  assert golden_sd[key].dtype == np.float32
  assert not any("::" in k for k in golden_sd)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".npz", ".ckpt"])
@pytest.mark.parametrize("lightning", [False, True])
def test_round_trip_every_format(tmp_path, small_sd, suffix, lightning):
  sd = dict(small_sd, **{"bn.num_batches_tracked": np.array(7, np.int64)})
  path = S.save_state_dict(sd, tmp_path / f"w{suffix}", lightning=lightning)
  for which in ("ema", "model"):
    _same(S.load_state_dict(path, which=which), sd)


def test_lightning_layout_and_selection(tmp_path, small_sd):
  path = S.save_state_dict(small_sd, tmp_path / "w.pt", lightning=True)
  raw = torch.load(path, weights_only=True)
  assert set(raw) == {"state_dict"}
  assert {k.split(".", 1)[0] for k in raw["state_dict"]} == {"model", "ema_model"}
  # different EMA and raw weights: `which` picks the right one
  k0 = next(iter(small_sd))
  mixed = {f"model.{k0}": torch.zeros(2), f"ema_model.{k0}": torch.ones(2)}
  torch.save({"state_dict": mixed, "epoch": 3}, tmp_path / "m.ckpt")
  np.testing.assert_array_equal(S.load_state_dict(tmp_path / "m.ckpt", "ema")[k0], np.ones(2))
  np.testing.assert_array_equal(S.load_state_dict(tmp_path / "m.ckpt", "model")[k0], np.zeros(2))
  torch.save({"state_dict": {f"model.{k0}": torch.zeros(2)}}, tmp_path / "only_model.ckpt")
  with pytest.raises(S.StateDictError, match="ema_model"):
    S.load_state_dict(tmp_path / "only_model.ckpt", "ema")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    S.load_state_dict(tmp_path / "nope.pt")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(S.StateDictError, match="unknown state-dict format '.h5'"):
    S.load_state_dict(tmp_path / "w.h5")
  with pytest.raises(S.StateDictError, match="unknown state-dict format"):
    S.save_state_dict({"a": np.zeros(1)}, tmp_path / "w.h5")
  with pytest.raises(S.StateDictError, match="which"):
    S.save_state_dict({"a": np.zeros(1)}, tmp_path / "ok.npz")
    S.load_state_dict(tmp_path / "ok.npz", which="best")


class _Evil:

  def __reduce__(self):
    return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path):
  torch.save({"w": torch.zeros(1), "obj": _Evil()}, tmp_path / "evil.pt")
  with pytest.raises(S.StateDictError, match="weights_only=True"):
    S.load_state_dict(tmp_path / "evil.pt")
  with open(tmp_path / "plain.pth", "wb") as f:
    pickle.dump({"w": _Evil()}, f)
  with pytest.raises(S.StateDictError, match="weights_only=True"):
    S.load_state_dict(tmp_path / "plain.pth")


# ------------------------------------------------------------------ key mapping
def test_torch_flax_round_trip_is_exact(golden_dir, golden_sd):
  cfg = UNetConfig.from_json(str(np.load(golden_dir / "unet_tiny_io.npz")["config"]))
  params = unet_params_from_torch(golden_sd, cfg)
  assert params["input_blocks_1_0"]["in_layers_2"]["kernel"].shape == (3, 3, 32, 32)
  assert params["middle_block_1"]["qkv"]["kernel"].shape == (64, 192)
  _same(unet_params_to_torch(params, cfg), golden_sd)


def test_missing_key_is_named(small_sd):
  sd = dict(small_sd)
  del sd["middle_block.1.qkv.weight"]
  with pytest.raises(KeyMismatchError, match=r"missing 1: middle_block\.1\.qkv\.weight"):
    unet_params_from_torch(sd, SMALL)


def test_unexpected_key_is_named(small_sd):
  sd = dict(small_sd, **{"encoder.linear.weight": np.zeros((512, 614), np.float32)})
  with pytest.raises(KeyMismatchError, match=r"unexpected 1: encoder\.linear\.weight"):
    unet_params_from_torch(sd, SMALL)


def test_shape_mismatch_is_named(small_sd):
  sd = dict(small_sd)
  sd["out.2.weight"] = np.zeros((3, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"out\.2\.weight.*\(3, 32, 1, 1\).*\(3, 32, 3, 3\)"):
    unet_params_from_torch(sd, SMALL)


def test_export_errors_name_the_parameter(small_sd):
  params = unet_params_from_torch(small_sd, SMALL)
  del params["output_blocks_0_0"]["skip_connection"]
  with pytest.raises(
      KeyMismatchError, match=r"output_blocks\.0\.0\.skip_connection\.(weight|bias)"
  ):
    unet_params_to_torch(params, SMALL)
  params = unet_params_from_torch(small_sd, SMALL)
  params["out_0"]["scale"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match=r"out\.0\.weight"):
    unet_params_to_torch(params, SMALL)


# ------------------------------------------------------------------ parity CLI
@pytest.fixture
def unet_only_golden(tmp_path, golden_dir):
  d = tmp_path / "golden"
  d.mkdir()
  for name in ("unet_tiny_io.npz", "unet_tiny_state_dict.npz"):
    (d / name).symlink_to(golden_dir / name)
  return d


def test_parity_cli(unet_only_golden):
  r = run_convert("parity", "--golden", unet_only_golden, "--backend", "jax")
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in r.stdout.splitlines()]
  eps = [row for row in rows if row["name"] == "jax/unet_tiny/eps"]
  assert eps and eps[0]["ok"] and eps[0]["rel_err"] < 1e-4 and eps[0]["tol"] == 1e-4
  # Only the checks whose files are there run (no encoders_io.npz: no encoder rows).
  assert all(row["name"].startswith("jax/unet_tiny/") and row["backend"] == "jax" for row in rows)


def test_parity_cli_fails_on_error(unet_only_golden, golden_dir):
  # A golden eps the UNet does not reproduce, and an encoders check whose file is broken.
  (unet_only_golden / "unet_tiny_io.npz").unlink()
  with np.load(golden_dir / "unet_tiny_io.npz") as z:
    io = {k: z[k] for k in z.files}
  io["eps"] = io["eps"] * np.float32(1.01)
  np.savez(unet_only_golden / "unet_tiny_io.npz", **io)
  (unet_only_golden / "encoders_io.npz").write_bytes(b"")
  r = run_convert("parity", "--golden", unet_only_golden, "--backend", "torch")
  assert r.returncode == 1, r.stderr
  rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
  eps = rows["torch/unet_tiny/eps"]
  assert not eps["ok"] and eps["rel_err"] > eps["tol"]
  # The broken check is reported, not fatal.
  enc = rows["torch/s3jax.parity.encoders"]
  assert enc["ok"] is False and enc["error"]


def test_cli_usage_errors(tmp_path):
  """Exit status 2 and a message naming the problem; --help lists the subcommands."""
  for args, message in (
      ((), "missing subcommand (one of: parity, export, import, import-classifier)"),
      (("convert",), "unknown subcommand 'convert'"),
      (("export", "--checkpoint", tmp_path), "export needs --out"),
      (("import", "--src", "a.pt", "--workdir", tmp_path), "import needs --config"),
      (("parity", "--golden", tmp_path, "--out", "x.pt"), "parity does not take --out"),
      (("parity", "--golden", tmp_path / "nope"), "golden directory not found"),
  ):
    r = run_convert(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert message in r.stderr, (args, r.stderr)
  r = run_convert("--help")
  for example in ("convert parity --golden", "convert export --checkpoint", "convert import --src"):
    assert example in r.stdout, r.stdout
