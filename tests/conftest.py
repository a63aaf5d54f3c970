"""Shared fixtures. Heavy compiled functions are session-scoped so tests reuse them."""

import os
import pathlib
import sys

import pytest
from absl import flags

# Grain starts worker processes only once absl flags are parsed.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests import `configs` from the checkout
  sys.path.insert(0, str(REPO))
SHARED = pathlib.Path(os.environ.get("S3JAX_SHARED", REPO.parent / "shared"))


def _shared_or_skip(relative, what):
  path = SHARED / relative
  if not path.is_dir():
    pytest.skip(f"{what} not found at {path} (../shared is absent)")
  return path


@pytest.fixture(scope="session")
def golden_dir():
  return _shared_or_skip("golden/dva", "golden vectors")


@pytest.fixture(scope="session")
def office_clip_dir():
  return _shared_or_skip("data/office_clip", "real clip")


# Compiled XLA programs are cached on disk for the whole session, so tests (and
# the subprocesses they start) that build the same jitted function compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.fixture(scope="session")
def sample_data_32(tmp_path_factory):
  """The embedded sample dataset at 32 px (real faces, dlib features), built once."""
  from data_prep.sample import ensure_sample_dataset

  root = tmp_path_factory.mktemp("sample32")
  ensure_sample_dataset(root, 32)
  return root
