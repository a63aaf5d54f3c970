"""A non-editable install works for every CLI, run from outside the checkout.

`pip install --no-deps --target DIR .` copies the package as a wheel would; the
CLIs then run with DIR first on the path, from a directory that is not the
repository, so nothing can silently come from the source tree. The config file
is the repository's (configs/ is not packaged); it imports its shared blocks
from the installed `s3jax.config_blocks`.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  target = tmp_path_factory.mktemp("site")
  subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "install",
          "--quiet",
          "--no-deps",
          "--no-build-isolation",
          "--target",
          str(target),
          str(REPO),
      ],
      check=True,
      capture_output=True,
      timeout=600,
  )
  env = dict(os.environ, PYTHONPATH=str(target))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cwd = tmp_path_factory.mktemp("elsewhere")
  return target, env, cwd


def _run(args, installed, timeout=600):
  _, env, cwd = installed
  return subprocess.run(
      [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
  )


@pytest.mark.slow
def test_the_installed_package_is_the_one_imported(installed):
  target, _, _ = installed
  res = _run(
      ["-c", "import s3jax, data_prep; print(s3jax.__file__); print(data_prep.__file__)"], installed
  )
  assert res.returncode == 0, res.stderr[-2000:]
  for line in res.stdout.split():
    assert line.startswith(str(target)), res.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, expected",
    [
        ("s3jax.train", "--workdir"),
        ("s3jax.edit", "--attribute"),
        ("s3jax.evaluate", "--workdir"),
        ("s3jax.convert", "--golden"),
        ("data_prep.sample", "--out"),
        ("data_prep.voxceleb", "--out"),
        ("data_prep.celebahq", "--out"),
    ],
)
def test_every_cli_answers_help(installed, module, expected):
  res = _run(
      ["-m", module, "--helpfull" if module.startswith("data_prep") else "--help"], installed
  )
  assert expected in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
  assert "Traceback" not in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_the_installed_trainer_runs_a_repository_config(installed, sample_data_32, tmp_path):
  """The identity stand-in demo config, two steps, from outside the checkout."""
  res = _run(
      [
          "-m",
          "s3jax.train",
          f"--config={REPO / 'configs' / 'id_standin.py'}:demo",
          f"--workdir={tmp_path / 'run'}",
          f"--config.data.data_dir={sample_data_32}",
          "--config.data.image_size=32",
          "--config.model.input_size=32",
          "--config.model.width=8",
          "--config.model.depth=2",
          "--config.total_steps=2",
          "--config.checkpoint_every=2",
          "--config.sample_every=2",
          "--config.eval_batches=1",
      ],
      installed,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  assert (tmp_path / "run" / "id_standin_report.json").exists()
