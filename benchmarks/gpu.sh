#!/usr/bin/env bash
# One prepared GPU benchmark of s3jax: the paper-size DVA train step (bf16 and f32, largest
# batch that fits: images/s, MFU), 256 px edit frames/s at 100 DDIM steps, peak device memory
# with and without remat, and every program's XLA compile time, in under 8 minutes on one
# H100/H200. Writes benchmarks/results/gpu.json (--out FILE). Details: benchmarks/gpu_bench.py.
#
#   bash benchmarks/gpu.sh                      # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run --out /tmp/gpu.json   # the same script on the CPU, tiny
#   bash benchmarks/gpu.sh --help               # budget, batch, steps, precision options
#
# It installs and downloads nothing. It runs with ${PYTHON:-python} (python3 if there is no
# `python`), with the checkout on PYTHONPATH, so that Python needs:
#   - jax with CUDA (`pip install -e '.[cuda]'` in the repo's .venv, then PYTHON=.venv/bin/python);
#   - the project's own imports along the train step (s3jax.training.dva): flax, optax,
#     orbax-checkpoint, grain, array_record, ml_collections, absl-py, opencv-python-headless,
#     dlib-bin, pillow, scipy; and torch, for the versions bench_util records.
# On a machine with no network whose image lacks some of these, carry them as wheels built for
# its Python and put them on PYTHONPATH first. Without a GPU backend it stops with a clear
# error (exit 2) unless --dry-run, which forces the CPU (JAX_PLATFORMS=cpu).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
if ! command -v "$PY" >/dev/null 2>&1; then
  PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu_bench.py" "$@"
