"""Shared fixtures. Heavy compiled functions are session-scoped so tests reuse them."""
import os
import pathlib

import pytest
from absl import flags

# Grain starts worker processes only once absl flags are parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("S3JAX_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def golden_dir():
    path = SHARED / "golden" / "dva"
    if not path.is_dir():
        pytest.skip(f"golden vectors not found at {path} (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def office_clip_dir():
    path = SHARED / "data" / "office_clip"
    if not path.is_dir():
        pytest.skip(f"real clip not found at {path} (../shared is absent)")
    return path
