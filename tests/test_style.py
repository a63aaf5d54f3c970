"""One formatter for the tree: pyink, configured in pyproject.toml."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_tree_is_pyink_formatted():
  exe = shutil.which("pyink", path=str(pathlib.Path(sys.executable).parent)) or shutil.which(
      "pyink"
  )
  if exe is None:
    pytest.fail("pyink is not installed: it is part of the test extra (pip install -e '.[test]')")
  res = subprocess.run(
      [exe, "--check", "--quiet", "."], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, "files need formatting (run `pyink .`):\n" + res.stdout + res.stderr
