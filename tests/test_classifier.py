"""The attribute-classifier trainer and the classifier edit direction."""

import json
import math
import pathlib

import numpy as np
import pytest

import configs
from s3jax import loading

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config(arg=""):
  return configs.get(f"celebahq_classifier:{arg}")


def _synthetic(dim, n, seed):
  """Attribute 0 linearly separable along a random direction; attribute 1 pure noise."""
  from s3jax.training.classifier import FeatureSet

  r = np.random.default_rng(seed)
  direction = np.random.default_rng(99).standard_normal(dim)
  direction /= np.linalg.norm(direction)
  z = r.standard_normal((n, dim)).astype(np.float32)
  s = z @ direction
  y0 = s > 0
  z[y0] += 1.0 * direction.astype(np.float32)  # margin
  z[~y0] -= 1.0 * direction.astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)  # unit sphere, like z_id
  y = np.stack([y0, r.random(n) < 0.5], 1).astype(np.float32)
  return FeatureSet(z, y, None), direction


@pytest.fixture(scope="module", params=[128, 512], ids=["dlib128", "arcface512"])
def trained(request, tmp_path_factory):
  import jax
  from s3jax.training import loop, state
  from s3jax.training.classifier import ClassifierTask

  dim = request.param
  train, direction = _synthetic(dim, 512, 0)
  test, _ = _synthetic(dim, 256, 1)
  cfg = _load_config("")
  cfg.unlock()
  cfg.data.batch_size = 64
  cfg.total_steps = 150
  cfg.log_every = 50
  cfg.sample_every = 150
  cfg.checkpoint_every = 150
  cfg.optim.lr = 1e-2
  workdir = tmp_path_factory.mktemp(f"clf{dim}")
  mesh = state.make_mesh(cfg.mesh)
  task = ClassifierTask(cfg, mesh, workdir, features=(train, test, ["Separable", "Noise"]))
  metrics = loop.train(cfg, workdir, task)
  return workdir, task, metrics, direction, dim


def test_learns_separable_attribute(trained):
  workdir, _, metrics, direction, dim = trained
  summary = json.loads((workdir / "classifier.json").read_text())
  assert summary["attributes"]["Separable"]["auc"] > 0.99
  assert 0.3 < summary["attributes"]["Noise"]["auc"] < 0.7
  assert summary["dim"] == dim
  assert np.isfinite(metrics["loss"])


def test_npz_format(trained):
  workdir, task, _, direction, dim = trained
  with np.load(workdir / "classifier.npz", allow_pickle=False) as z:
    assert sorted(z.files) == sorted(["names", "weight", "bias", "mean", "std", "auc"])
    assert z["names"].shape == (2,) and z["names"].dtype.kind == "U"
    assert list(z["names"]) == ["Separable", "Noise"]
    assert z["weight"].shape == (dim, 2) and z["weight"].dtype == np.float32
    assert z["bias"].shape == (2,) and z["bias"].dtype == np.float32
    assert z["mean"].shape == (dim,) and z["mean"].dtype == np.float32
    assert z["std"].shape == (dim,) and z["std"].dtype == np.float32
    assert z["auc"].shape == (2,) and z["auc"].dtype == np.float32
    np.testing.assert_allclose(z["mean"], task.train_set.z.mean(0), atol=1e-6)
    # The learned direction (mapped back to z space) points along the true one.
    w_z = z["weight"][:, 0] / z["std"]
    cos = float(w_z @ direction / np.linalg.norm(w_z))
    assert cos > 0.8


def test_edit_direction_formula(trained):
  workdir, _, _, _, dim = trained
  clf = loading.load_classifier(workdir)
  r = np.random.default_rng(3)
  z = r.standard_normal(dim)
  z /= np.linalg.norm(z)
  s = 0.7
  w = clf.weight[:, 0]
  expect = (z - clf.mean) / clf.std + s * math.sqrt(dim) * w / np.linalg.norm(w)
  expect = expect * clf.std + clf.mean
  expect /= np.linalg.norm(expect)
  got = clf.edit(z, "Separable", s)
  np.testing.assert_allclose(got, expect, atol=1e-6)
  assert abs(np.linalg.norm(got) - 1) < 1e-5
  # Strength 0 leaves a unit z_id unchanged; positive strength raises the logit.
  np.testing.assert_allclose(clf.edit(z, "Separable", 0.0), z, atol=1e-6)
  assert clf.logits(got)[0] > clf.logits(z)[0]
  # Batched input.
  zz = np.stack([z, -z])
  assert clf.edit(zz, "Separable", s).shape == (2, dim)


def test_unknown_attribute_lists_valid(trained):
  workdir, *_, dim = trained
  clf = loading.load_classifier(workdir)
  with pytest.raises(loading.UnknownAttributeError, match="Separable, Noise"):
    clf.edit(np.ones(dim) / math.sqrt(dim), "Eyeglasses", 1.0)
  with pytest.raises(ValueError, match="width"):
    clf.edit(np.ones(dim + 1), "Separable", 1.0)


def test_auc_and_otsu():
  from s3jax.training.classifier import auc_score, otsu_threshold

  assert auc_score([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
  assert auc_score([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
  assert auc_score([0.5, 0.5], [0, 1]) == 0.5
  assert math.isnan(auc_score([0.1, 0.2], [1, 1]))
  t = otsu_threshold([1.0, 1.1, 0.9, 5.0, 5.2, 4.9])
  assert 1.1 < t < 4.9


def test_measure_properties():
  from s3jax.training.classifier import measure_properties

  img = np.zeros((64, 64, 3), np.uint8)
  img[:, :32] = (200, 100, 50)  # bright warm left half
  img[:, 32:] = (50, 50, 100)
  mask = np.ones((64, 64), np.uint8)
  lm = np.zeros((68, 2))
  lm[27:31, 0] = 32
  lm[36:42] = [[10, 20], [12, 18], [14, 18], [16, 20], [14, 22], [12, 22]]
  lm[42:48] = lm[36:42] + [30, 0]
  lm[48], lm[54] = [20, 45], [44, 45]
  bright, warm, lit_left, mouth, ear = measure_properties(img, mask, lm)
  assert lit_left > 50 and warm > 0
  assert mouth == pytest.approx(24 / 30)
  assert ear == pytest.approx((4 + 4) / (2 * 6))
