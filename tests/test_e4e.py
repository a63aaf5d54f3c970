"""e4e encoder (golden/stit): parity of the Flax port, the pSp checkpoint importer."""

import pickle

import chex
import numpy as np
import pytest

from s3jax.models.e4e import E4EConfig
from s3jax.parity import e4e as parity
from s3jax.porting.e4e_keys import e4e_from_state_dict, load_e4e
from s3jax.porting.encoder_keys import EncoderKeyError
from s3jax.porting.state_dict import StateDictError, load_state_dict

# The forward (IR-SE50 + 10 style blocks at 256 px) is compiled once, inside parity.check;
# the importer tests below never run it.


@pytest.fixture(scope="module")
def stit_dir(golden_dir):
  path = golden_dir.parent / "stit"
  if not path.is_dir():
    pytest.skip(f"STIT golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def golden_sd(stit_dir):
  return load_state_dict(stit_dir / parity.STATE_DICT_FILE)


@pytest.fixture(scope="module")
def golden_import(golden_sd):
  return e4e_from_state_dict(golden_sd)


def test_golden_parity_rows(stit_dir):
  rows = parity.check(stit_dir)
  names = ["codes", "w_plus", *parity.FEATURE_MEANS, "c3_sample0", "latent_avg"]
  assert [r["name"] for r in rows] == names
  for r in rows:
    assert r["ok"], r
  with pytest.raises(ValueError, match="no PyTorch twin"):
    parity.check(stit_dir, backend="torch")


def test_config_inferred_from_style_blocks(golden_import):
  config, variables, latent_avg = golden_import
  assert config == E4EConfig(stylegan_size=64) and config.n_styles == 10
  assert latent_avg.shape == (10, 512) and latent_avg.dtype == np.float32
  assert sorted(variables) == ["batch_stats", "params"]


def test_pt_psp_layout_round_trip(golden_sd, golden_import, tmp_path):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in golden_sd.items() if k != "latent_avg"}
  state["decoder.style.1.weight"] = torch.zeros(8, 8)  # pSp's generator: ignored
  opts = {
      "encoder_type": "Encoder4Editing",
      "stylegan_size": 64,
      "start_from_latent_avg": True,
      "checkpoint_path": None,
      "progressive_steps": [0, 20000],
  }
  ckpt = {
      "state_dict": state,
      "opts": opts,
      "latent_avg": torch.from_numpy(golden_sd["latent_avg"]),
  }
  path = tmp_path / "e4e_tiny.pt"
  torch.save(ckpt, path)
  config, variables, latent_avg = load_e4e(path)
  want_config, want_variables, want_latent_avg = golden_import
  assert config == want_config
  np.testing.assert_array_equal(latent_avg, want_latent_avg)
  chex.assert_trees_all_equal(variables, want_variables)

  # opts disagreeing with the state dict, or naming another encoder, are refused (the
  # config is checked first, so a few style keys make the checkpoint).
  small = {k: v for k, v in state.items() if k.endswith(".linear.bias")}
  torch.save({"state_dict": small, "opts": {**opts, "stylegan_size": 1024}}, path)
  with pytest.raises(EncoderKeyError, match="needs 18 style blocks"):
    load_e4e(path)
  torch.save({"state_dict": small, "opts": {**opts, "encoder_type": "GradualStyleEncoder"}}, path)
  with pytest.raises(StateDictError, match="GradualStyleEncoder"):
    load_e4e(path)


def test_wrong_shape_missing_and_stray_keys(golden_sd):
  key = "encoder.styles.3.linear.weight"
  bad = {**golden_sd, key: np.zeros((512, 256), np.float32)}
  with pytest.raises(EncoderKeyError, match=r"shape mismatch .*styles\.3\.linear\.weight"):
    e4e_from_state_dict(bad)
  missing = {k: v for k, v in golden_sd.items() if k != "encoder.latlayer2.bias"}
  with pytest.raises(EncoderKeyError, match="missing e4e parameter 'encoder.latlayer2.bias'"):
    e4e_from_state_dict(missing)
  with pytest.raises(EncoderKeyError, match="unexpected e4e parameter"):
    e4e_from_state_dict({**golden_sd, "encoder.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(EncoderKeyError, match="unexpected key"):
    e4e_from_state_dict({**golden_sd, "discriminator.weight": np.zeros(3, np.float32)})
  with pytest.raises(EncoderKeyError, match="latent_avg"):
    e4e_from_state_dict({**golden_sd, "latent_avg": np.zeros((9, 512), np.float32)})


class _Hostile:
  """Unpickling this creates a file: what a weights-only reader must never do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (str(self.marker), "w"))


def test_hostile_pickle_refused(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"
  path = tmp_path / "hostile.pt"
  torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "opts": _Hostile(marker)}, path)
  assert not marker.exists()
  with pytest.raises(StateDictError, match="weights_only=True"):
    load_e4e(path)
  assert not marker.exists()
  with open(path.with_suffix(".npz"), "wb") as f:  # a pickled npz entry is refused too
    pickle.dump({"x": 1}, f)
  with pytest.raises(ValueError, match="pickle"):
    load_e4e(path.with_suffix(".npz"))
  assert not marker.exists()
