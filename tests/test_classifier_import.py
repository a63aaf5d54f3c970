"""Import of the reference's CelebA-HQ attribute classifier (`convert import-classifier`).

The oracle is the golden classifier edit in ../shared/golden/edit (the reference's
`editing_classifier.py`, run step for step): its `classifier.ckpt`, the `avg_cond`
it edits and the `avg_cond2` it gets for Smiling at s = +0.3.
"""

import json
import os
import pickle
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from s3jax import loading
from s3jax.porting import classifier as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def golden_edit(golden_dir):
  d = golden_dir.parent / "edit"
  if not (d / "classifier.ckpt").is_file():
    pytest.skip(f"golden classifier edit not found in {d}")
  return d


@pytest.fixture(scope="module")
def edit_io(golden_edit):
  with np.load(golden_edit / "edit_io.npz") as z:
    return {k: z[k] for k in ("config", "avg_cond", "avg_cond_norm", "direction", "avg_cond2")}


@pytest.fixture(scope="module")
def golden_tensors(golden_edit):
  return torch.load(golden_edit / "classifier.ckpt", weights_only=True)["state_dict"]


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run_convert(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "s3jax.convert", *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_golden_ckpt_edit_matches_reference(golden_edit, edit_io, tmp_path):
  res = C.import_classifier(golden_edit / "classifier.ckpt", tmp_path)
  assert res.path == tmp_path / "classifier.npz"
  assert (res.num_attributes, res.dim, res.edit_weights, res.has_ema) == (
      40,
      512,
      "classifier",
      True,
  )
  clf = loading.load_classifier(tmp_path)
  config = json.loads(str(edit_io["config"]))
  assert clf.names == config["id_to_cls"] == list(C.ID_TO_CLS)
  assert clf.index("Smiling") == config["attribute_id"] == 31
  assert np.isnan(clf.auc).all() and clf.edit_weights == "classifier"
  # The README's steps: ẑ = (z̄ − μ)/σ, d = normalize(w_31), l2norm(σ(ẑ + s√512·d) + μ).
  assert _rel((edit_io["avg_cond"] - clf.mean) / clf.std, edit_io["avg_cond_norm"]) < 1e-6
  w = clf.direction("Smiling")
  assert _rel(w / np.linalg.norm(w), edit_io["direction"][0]) < 1e-6
  got = clf.edit(edit_io["avg_cond"], "Smiling", config["scale"])
  assert got.shape == (1, 512)
  assert _rel(got, edit_io["avg_cond2"]) <= 1e-6
  # The golden .npz of the same state gives the same classifier.
  res2 = C.import_classifier(golden_edit / "classifier_state_dict.npz", tmp_path / "npz")
  clf2 = loading.load_classifier(res2.path)
  np.testing.assert_array_equal(clf2.weight, clf.weight)
  np.testing.assert_array_equal(clf2.ema_weight, clf.ema_weight)


def test_ema_weights_are_stored_and_selectable(golden_edit, edit_io, golden_tensors, tmp_path):
  C.import_classifier(golden_edit / "classifier.ckpt", tmp_path / "default")
  C.import_classifier(golden_edit / "classifier.ckpt", tmp_path / "ema", edit_weights="ema")
  clf, ema = (loading.load_classifier(tmp_path / d) for d in ("default", "ema"))
  t = {k: v.numpy().astype(np.float64) for k, v in golden_tensors.items()}
  for c in (clf, ema):  # both files hold both probes, transposed to (D, A)
    np.testing.assert_array_equal(c.weight, t["classifier.weight"].T)
    np.testing.assert_array_equal(c.bias, t["classifier.bias"])
    np.testing.assert_array_equal(c.ema_weight, t["ema_classifier.weight"].T)
    np.testing.assert_array_equal(c.ema_bias, t["ema_classifier.bias"])
  assert ema.edit_weights == "ema"
  np.testing.assert_array_equal(ema.direction("Smiling"), t["ema_classifier.weight"][31])
  z = edit_io["avg_cond"]
  # The README (quirk 8): the EMA row moves avg_cond2 by 39%.
  assert _rel(ema.edit(z, "Smiling", 0.3), edit_io["avg_cond2"]) > 0.3
  np.testing.assert_allclose(
      ema.logits(z), ((z - ema.mean) / ema.std) @ ema.ema_weight + ema.ema_bias, rtol=1e-12
  )


def test_extra_keys_are_ignored(golden_tensors, tmp_path):
  """A published checkpoint may also carry the autoencoder copies and trainer state."""
  sd = dict(golden_tensors)
  sd.update({"model.out.2.weight": torch.zeros(3, 8), "ema_model.out.2.weight": torch.ones(3, 8)})
  torch.save(
      {"epoch": 7, "global_step": 1234, "state_dict": sd, "optimizer_states": [{"lr": 1e-3}]},
      tmp_path / "last.ckpt",
  )
  res = C.import_classifier(tmp_path / "last.ckpt", tmp_path / "out")
  assert (res.ignored_keys, res.epoch, res.global_step) == (2, 7, 1234)
  clf = loading.load_classifier(tmp_path / "out")
  np.testing.assert_array_equal(clf.weight, golden_tensors["classifier.weight"].numpy().T)


def test_missing_or_misshapen_keys_are_named(golden_tensors, tmp_path):
  sd = {k: v for k, v in golden_tensors.items() if k != "conds_std"}
  torch.save({"state_dict": sd}, tmp_path / "a.ckpt")
  with pytest.raises(C.ClassifierImportError, match=r"a\.ckpt: missing conds_std"):
    C.import_classifier(tmp_path / "a.ckpt", tmp_path / "a")
  sd = dict(golden_tensors, **{"classifier.weight": torch.zeros(39, 512)})
  torch.save({"state_dict": sd}, tmp_path / "b.ckpt")
  with pytest.raises(
      C.ClassifierImportError, match=r"classifier\.weight.*\(39, 512\).*\(40, 512\)"
  ):
    C.import_classifier(tmp_path / "b.ckpt", tmp_path / "b")
  sd = dict(golden_tensors, **{"conds_std": torch.zeros(1, 512)})
  torch.save({"state_dict": sd}, tmp_path / "c.ckpt")
  with pytest.raises(C.ClassifierImportError, match="conds_std has entries <= 0"):
    C.import_classifier(tmp_path / "c.ckpt", tmp_path / "c")
  sd = {k: v for k, v in golden_tensors.items() if not k.startswith("ema_")}
  torch.save({"state_dict": sd}, tmp_path / "no_ema.ckpt")
  assert not C.import_classifier(tmp_path / "no_ema.ckpt", tmp_path / "d").has_ema
  with pytest.raises(C.ClassifierImportError, match="no ema_classifier"):
    C.import_classifier(tmp_path / "no_ema.ckpt", tmp_path / "e", edit_weights="ema")
  assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()
  with pytest.raises(FileExistsError, match="--overwrite"):
    C.import_classifier(tmp_path / "no_ema.ckpt", tmp_path / "d")


class _Hostile:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_hostile_pickle_is_refused(golden_tensors, tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"state_dict": dict(golden_tensors, evil=_Hostile(marker))}, tmp_path / "evil.ckpt")
  with open(tmp_path / "plain.ckpt", "wb") as f:
    pickle.dump({"state_dict": {"conds_mean": _Hostile(marker)}}, f)
  for name in ("evil.ckpt", "plain.ckpt"):
    with pytest.raises(C.StateDictError, match="weights_only=True"):
      C.import_classifier(tmp_path / name, tmp_path / "out")
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


def test_old_classifier_files_still_load(tmp_path):
  rng = np.random.default_rng(0)
  loading.save_classifier(
      tmp_path / "classifier.npz",
      ["A", "B"],
      rng.normal(size=(8, 2)),
      np.zeros(2),
      np.zeros(8),
      np.ones(8),
      np.full(2, np.nan),
  )
  with np.load(tmp_path / "classifier.npz") as z:
    assert set(z.files) == set(loading.CLASSIFIER_KEYS)  # the old format, unchanged
  clf = loading.load_classifier(tmp_path)
  assert clf.ema_weight is None and clf.edit_weights == "classifier"
  np.testing.assert_array_equal(clf.edit_weight, clf.weight)
  with pytest.raises(ValueError, match="ema_weight"):
    loading.save_classifier(
        tmp_path / "x.npz", ["A"], np.ones((8, 1)), [0], 0, 1, [0], edit_weights="ema"
    )


@pytest.mark.slow  # two CLI processes, each importing jax and torch (~10 s)
def test_cli(golden_edit, tmp_path):
  r = run_convert(
      "import-classifier", "--src", golden_edit / "classifier.ckpt", "--out", tmp_path / "c"
  )
  assert r.returncode == 0, r.stderr
  row = json.loads(r.stdout.strip().splitlines()[-1])
  assert row["wrote"] == str(tmp_path / "c" / "classifier.npz")
  assert (row["attributes"], row["dim"], row["edit_weights"], row["ema_stored"]) == (
      40,
      512,
      "classifier",
      True,
  )
  # Unconvertible file: exit 2 and one line naming the problem.
  r = run_convert(
      "import-classifier", "--src", golden_edit / "dva_ema_unet.ckpt", "--out", tmp_path / "d"
  )
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().count("\n") == 0 and "missing conds_mean" in r.stderr
