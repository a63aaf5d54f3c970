"""The DVA trainer: determinism across devices and hosts, exact resume, preemption, failures."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from s3jax.training import runner
from s3jax.checkpointing import (CheckpointShapeError, Checkpointer, NoUsableCheckpointError)
from s3jax.training import loop
from s3jax.training import state as state_lib
from s3jax.training.dva import DVATask

from train_helpers import REPO, tiny_dva_config

MAIN = str(REPO / "tests" / "tiny_train_main.py")


def _losses(history):
  return np.array([m["loss"] for _, m in history])


def _run_subprocess(args, n_devices, extra_env=None, timeout=600):
  env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
      PYTHONPATH=str(REPO),
  )
  env.update(extra_env or {})
  return subprocess.Popen(
      [sys.executable, MAIN, *map(str, args)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _history_from(proc, timeout=900, with_log=False):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("HISTORY ")][-1]
  history = json.loads(line[len("HISTORY ") :])
  return (history, err) if with_log else history


def _params(workdir, step=None):
  from s3jax.loading import load_dva

  _, params, _, got = load_dva(workdir, step=step, ema=False)
  return params, got


@pytest.fixture(scope="session")
def straight_run(sample_data_32, tmp_path_factory):
  """Six steps straight through on one device: the reference for the other tests.

  Its users are all marked slow: building it (a cold compile and six steps) took 1-4 min
  on a shared 2-core machine, so `-m "not slow"` must not pull it in.
  """
  workdir = tmp_path_factory.mktemp("straight")
  result = runner.run(tiny_dva_config(sample_data_32, total_steps=6), workdir)
  return workdir, result


@pytest.mark.slow
def test_loss_is_finite_and_checkpoints_written(straight_run):
  workdir, result = straight_run
  assert result["step"] == 6
  assert np.all(np.isfinite(_losses(result["history"])))
  assert Checkpointer(workdir).all_steps() == [3, 6]
  assert list(pathlib.Path(workdir).glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(straight_run, sample_data_32, tmp_path):
  workdir, _ = straight_run
  first = runner.run(tiny_dva_config(sample_data_32, total_steps=3), tmp_path)
  second = runner.run(tiny_dva_config(sample_data_32, total_steps=6), tmp_path)
  assert first["step"] == 3 and second["step"] == 6
  resumed, _ = _params(tmp_path)
  straight, _ = _params(workdir)
  chex.assert_trees_all_equal(resumed, straight)
  # The resumed half consumed exactly the batches the straight run saw at steps 4..6.
  straight_losses = dict((s, m["loss"]) for s, m in straight_run[1]["history"])
  for s, m in second["history"]:
    assert m["loss"] == straight_losses[s]


@pytest.mark.slow
def test_four_devices_match_one_device(straight_run, tmp_path):
  workdir, result = straight_run
  proc = _run_subprocess([tmp_path / "four", _data_dir(workdir), 6], n_devices=4)
  four = _history_from(proc)
  np.testing.assert_allclose(_losses(four), _losses(result["history"]), rtol=2e-5)


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(straight_run, tmp_path):
  import portpicker

  workdir, _ = straight_run
  data_dir = _data_dir(workdir)
  single = _history_from(_run_subprocess([tmp_path / "single", data_dir, 4], n_devices=4))
  port = portpicker.pick_unused_port()
  procs = [
      _run_subprocess(
          [tmp_path / "multi", data_dir, 4],
          n_devices=2,
          extra_env={
              "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
              "JAX_NUM_PROCESSES": "2",
              "JAX_PROCESS_ID": str(i),
              # Not the session's persistent compile cache: an executable the 4-device
              # single-process run cached there was handed to one of the two processes,
              # which then skipped the cross-process collectives (gloo timeout).
              "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache_multi"),
          },
      )
      for i in range(2)
  ]
  multi = _history_from(procs[0])
  out, err = procs[1].communicate(timeout=900)
  assert procs[1].returncode == 0, err[-3000:]
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-5)


def _data_dir(workdir):
  return json.loads((pathlib.Path(workdir) / "config.json").read_text())["data"]["data_dir"]


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(straight_run, tmp_path):
  data_dir = _data_dir(straight_run[0])
  proc = _run_subprocess([tmp_path, data_dir, 100_000], n_devices=1)
  ckpt_dir = tmp_path / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and not (ckpt_dir / "3").exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted at step" in err
  steps = Checkpointer(tmp_path).all_steps()
  assert steps and steps[-1] >= 3
  stopped_at = steps[-1]
  resumed = _run_subprocess([tmp_path, data_dir, stopped_at + 2], n_devices=1)
  history, log = _history_from(resumed, with_log=True)
  warnings = [l for l in log.splitlines() if "could not be restored" in l]
  assert [s for s, _ in history] == [stopped_at + 1, stopped_at + 2], warnings


def _abstract_state(config, workdir):
  mesh = state_lib.make_mesh(config.mesh)
  return DVATask(config, mesh, workdir, data_iterator=iter([])).abstract_state


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_warning(straight_run, tmp_path, caplog):
  workdir = tmp_path / "copy"
  shutil.copytree(straight_run[0], workdir)
  for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  config = tiny_dva_config(_data_dir(straight_run[0]))
  abstract = _abstract_state(config, workdir)
  with caplog.at_level(logging.WARNING):
    state, step = Checkpointer(workdir).restore_latest(abstract)
  assert step == 3 and int(state.step) == 3
  assert "step 6 could not be restored" in caplog.text
  # A missing newest step directory falls back the same way.
  shutil.rmtree(workdir / "checkpoints" / "6" / "state")
  _, step = Checkpointer(workdir).restore_latest(abstract)
  assert step == 3
  # When nothing can be restored the run refuses to start over silently.
  for f in (workdir / "checkpoints" / "3" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(NoUsableCheckpointError, match="refusing to start from scratch"):
    Checkpointer(workdir).restore_latest(abstract)


@pytest.mark.slow
def test_wrong_shape_checkpoint_names_the_parameter(straight_run):
  workdir = straight_run[0]
  bigger = tiny_dva_config(_data_dir(workdir))
  bigger.model.unet.model_channels = 64
  with pytest.raises(CheckpointShapeError, match=r"unet/.*has shape"):
    Checkpointer(workdir).restore_latest(_abstract_state(bigger, workdir))


@pytest.mark.slow
def test_non_finite_loss_stops_without_writing_nan(straight_run, tmp_path):
  config = tiny_dva_config(_data_dir(straight_run[0]), total_steps=6)
  config.checkpoint_every = 1
  mesh = state_lib.make_mesh(config.mesh)
  task = DVATask(config, mesh, tmp_path)
  clean = task.data_iterator

  class PoisonAtStep3:

    def __init__(self):
      self.n = 0

    def __next__(self):
      batch = next(clean)
      self.n += 1
      if self.n == 3:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      return batch

    # Grain's checkpoint handler stores non-DatasetIterator states as bytes.
    def get_state(self):
      return json.dumps(clean.get_state()).encode()

    def set_state(self, s):
      clean.set_state(json.loads(s))

  task.data_iterator = PoisonAtStep3()
  with pytest.raises(loop.NonFiniteLossError, match="non-finite loss at step 3"):
    loop.train(config, tmp_path, task)
  steps = Checkpointer(tmp_path).all_steps()
  assert max(steps) == 2
  params, _ = _params(tmp_path)
  chex.assert_tree_all_finite(params)


def test_unknown_config_key_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "s3jax.train",
          "--config",
          "configs/voxceleb.py:demo",
          "--workdir",
          str(tmp_path),
          "--config.data.bogus_key=1",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode != 0
  assert "bogus_key" in proc.stderr


def test_unknown_config_variant_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "s3jax.train",
          "--config",
          "configs/voxceleb.py:nonsense",
          "--workdir",
          str(tmp_path),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode != 0
  assert "unknown config variant 'nonsense'" in proc.stderr
