"""The config files. Entry points take them by path (`--config configs/voxceleb.py:demo`);
tests and benchmarks, which run from a checkout, use `configs.get("voxceleb:demo")`."""

import importlib


def get(spec: str):
  """`'name[:variant]'` -> `configs/<name>.py`'s `get_config(variant)`."""
  name, _, variant = spec.partition(":")
  return importlib.import_module(f"configs.{name}").get_config(variant)
