"""Runs the tiny DVA trainer in a subprocess (fake devices, multi-host, SIGTERM tests).

  python tests/tiny_train_main.py WORKDIR DATA_DIR TOTAL_STEPS
Prints `HISTORY <json>` with the logged (step, metrics) on process 0.
"""

import json
import pathlib
import sys

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).parent))
flags.FLAGS.mark_as_parsed()

from train_helpers import tiny_dva_config  # noqa: E402

from s3jax import train  # noqa: E402
from s3jax.training import runner  # noqa: E402


def main():
  workdir, data_dir, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
  train.maybe_initialize_distributed()
  import jax

  result = runner.run(tiny_dva_config(data_dir, total_steps=total), workdir)
  if jax.process_index() == 0:
    print("HISTORY " + json.dumps(result["history"]), flush=True)


if __name__ == "__main__":
  main()
