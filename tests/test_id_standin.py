"""The identity stand-in task: trains in the shared loop, resumes exactly, loads for S3Editor."""

import chex
import numpy as np
import pytest

import configs
from s3jax import checkpointing, loading
from s3jax.models import id_standin
from s3jax.training import runner


def _config(data_dir, total_steps):
  c = configs.get("id_standin:demo")
  c.data.data_dir = str(data_dir)
  c.data.image_size = 32
  c.model.update(dict(width=8, depth=2, input_size=32))
  c.optim.decay_steps = 12
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = 3
  c.sample_every = 12
  c.eval_batches = 1
  return c


@pytest.fixture(scope="module")
def straight_run(sample_data_32, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("id_straight")
  out = runner.run(_config(sample_data_32, 12), str(workdir))
  return workdir, out


def test_trains_and_the_loss_goes_down(straight_run):
  workdir, out = straight_run
  losses = [m["loss"] for _, m in out["history"]]
  assert out["step"] == 12 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  report = (workdir / id_standin.REPORT_FILE).read_text()
  assert '"cos_mean"' in report


def test_resume_is_exact_and_the_loader_reads_the_last_step(straight_run, sample_data_32, tmp_path):
  workdir, _ = straight_run
  runner.run(_config(sample_data_32, 6), str(tmp_path))
  runner.run(_config(sample_data_32, 12), str(tmp_path))
  chex.assert_trees_all_equal(
      checkpointing.restore_saved_state(workdir), checkpointing.restore_saved_state(tmp_path)
  )
  model, params, report = loading.load_id_standin(tmp_path)
  assert model.features == 128 and report["step"] == 12
  x = np.zeros((2, 32, 32, 3), np.float32)
  e = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  # The config travels with the checkpoint: the loader needs nothing else.
  assert checkpointing.read_config(tmp_path, 12).model.width == 8
