"""Trains s3jax models. One entry point, five trainers (`config.trainer`: dva | classifier | id_standin | s3editor | s3editor_gan).

  python -m s3jax.train --config configs/voxceleb.py --workdir runs/dva
  python -m s3jax.train --config configs/voxceleb.py:demo --workdir runs/demo
  python -m s3jax.train --config configs/celebahq_classifier.py:demo --workdir runs/demo/classifier
  python -m s3jax.train --config configs/id_standin.py:demo --workdir runs/demo/id_standin
  python -m s3jax.train --config configs/s3editor.py:demo --workdir runs/demo/s3editor

Override config fields with --config.<field>=<value> (unknown fields are an
error). Re-running with the same --workdir resumes from its newest checkpoint.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
(or run where jax.distributed auto-detects the cluster, e.g. TPU pods, SLURM).
"""

import logging
import os

from absl import app, flags
import jax
from ml_collections import config_flags

from s3jax.training import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/voxceleb.py:demo", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> None:
  """Initialises jax.distributed when the environment describes a multi-process job."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    # Only affects the CPU backend (multi-process CPU runs need gloo collectives);
    # the backend must not be touched before initialize(), so set it unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    logging.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  maybe_initialize_distributed()
  runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
