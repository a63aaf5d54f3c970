"""Evaluation sweeps: checkpoints x attributes x strengths x DDIM steps.

  python -m s3jax.evaluate --config configs/eval.py:demo --workdir runs/demo/eval
  python -m s3jax.evaluate --config configs/eval.py --workdir runs/eval \\
      --config.checkpoints='("runs/dva@all",)' --config.data.videos='("clip.mp4",)'

Inputs (``config.data``): given videos (files or frame folders) or, when
``videos`` is empty, the held-out split of a ``data_prep`` dataset (build the
demo's with ``python -m data_prep.sample --out runs/data/sample --size 64``).
The sweep, its metrics and outputs are ``s3jax.evaluation`` (see its docstring);
re-running with the same ``--workdir`` resumes, skipping finished cells.
"""

import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from s3jax.evaluation import sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Sweep config, e.g. configs/eval.py:demo. Override fields with "
    "--config.<field>=<value>, e.g. --config.ddim_steps='(10,20)' "
    "--config.data.videos='(\"clip.mp4\",)'.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (re-running resumes: finished cells in <workdir>/cells are skipped).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar over the cells.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required (see --help)")
  t0 = time.perf_counter()
  try:
    rows = sweep.run_sweep(config, workdir, progress=_PROGRESS.value)
  except FileNotFoundError as e:  # a missing dataset, checkpoint or classifier
    sys.exit(f"s3jax.evaluate: error: {e}")
  ok = sum(r.get("status") == "ok" for r in rows)
  summary = pathlib.Path(workdir) / "summary.md"
  print(f"{ok}/{len(rows)} cells ok in {time.perf_counter() - t0:.1f}s; table: {summary}")
  print(summary.read_text())


if __name__ == "__main__":
  app.run(main)
