"""data_prep on Apache Beam (``--beam_pipeline_options``; needs the ``beam`` extra).

Two pipelines per run, both the same shape: tasks -> workers.

1. Per video: read, detect, align, features, unit + status file
   (``common.run_job``, the single-process path's own function). Videos that
   are already finished are left out before the pipeline starts (resume is at
   video granularity, ``common.pending_jobs``).
2. Per shard: each worker packs consecutive units into one ArrayRecord shard
   (``tfds_builder.ShardWriter``); the launcher then writes TFDS's metadata
   from the shards' counts. Nothing is repacked in one process.

Between them the launcher reads the status files, splits train/test and writes
``report.json``, as the single-process path does. The options follow TFDS's
``--beam_pipeline_options`` convention, ``"runner=DirectRunner,direct_num_workers=2"``.
Tasks travel to the workers as pickled chunk files under ``<out>/.beam/``
(not in the pipeline graph, which Dataflow caps at a few MB), so ``--out``
must be a folder the launcher and every worker see at the same path.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import uuid
from typing import Callable, Optional, Sequence

import apache_beam as beam
import cloudpickle
from apache_beam.options import pipeline_options

# Tasks per chunk file; the chunks are re-spread over the workers one task at a time.
CHUNK_SIZE = 256


def parse_options(text: str) -> pipeline_options.PipelineOptions:
  """``"k=v,k2=v2"`` (TFDS's ``--beam_pipeline_options``) -> ``PipelineOptions``.

  The DirectRunner with ``direct_num_workers`` other than 1 and no
  ``direct_running_mode`` gets ``multi_processing``: Beam's default
  (``in_memory``) runs one worker whatever the count, and the per-video work is
  CPU-bound Python.
  """
  argv = [f"--{opt.strip()}" for opt in text.split(",") if opt.strip()]
  options = pipeline_options.PipelineOptions(argv)
  runner = options.view_as(pipeline_options.StandardOptions).runner
  direct = options.view_as(pipeline_options.DirectOptions)
  mode_given = any(a.startswith("--direct_running_mode") for a in argv)
  if runner in (None, "DirectRunner") and direct.direct_num_workers != 1 and not mode_given:
    direct.direct_running_mode = "multi_processing"
  return options


def _read_chunk(path: str):
  # Each task stays cloudpickled through the shuffle: Beam's own coder falls back to plain
  # pickle, which cannot carry a job whose loader lives in a CLI's __main__.
  with open(path, "rb") as f:
    for index, item in cloudpickle.load(f):
      yield index, cloudpickle.dumps(item)


def _run_one(fn: Callable, numbered: tuple):
  index, item = numbered
  return index, fn(cloudpickle.loads(item))


def _write_results(results: list, path: str) -> None:
  pathlib.Path(path).write_text(json.dumps(sorted(results, key=lambda r: r[0])))


def run_map(
    fn: Callable,
    items: Sequence,
    options: str,
    workdir: str | os.PathLike,
    collect: bool = False,
) -> Optional[list]:
  """Runs ``fn(item)`` for every item as one Beam pipeline and waits for it.

  ``collect``: return the results in item order (they must be JSON values; they
  are gathered on one worker, so keep them small). ``fn`` and the items are
  pickled with cloudpickle.
  """
  items = list(items)
  if not items:
    return [] if collect else None
  scratch = pathlib.Path(workdir) / ".beam" / uuid.uuid4().hex
  scratch.mkdir(parents=True)
  try:
    chunks = []
    for start in range(0, len(items), CHUNK_SIZE):
      path = scratch / f"tasks-{start // CHUNK_SIZE:05d}.pkl"
      numbered = list(enumerate(items[start : start + CHUNK_SIZE], start))
      path.write_bytes(cloudpickle.dumps(numbered))
      chunks.append(str(path))
    results_path = str(scratch / "results.json")
    with beam.Pipeline(options=parse_options(options)) as p:
      done = (
          p
          | "Chunks" >> beam.Create(chunks)
          | "ReadTasks" >> beam.FlatMap(_read_chunk)
          | "Spread" >> beam.Reshuffle()
          | "Run" >> beam.Map(functools.partial(_run_one, fn))
      )
      if collect:
        _ = (
            done
            | "Gather" >> beam.combiners.ToList()
            | "WriteResults" >> beam.Map(_write_results, results_path)
        )
    if collect:
      return [r for _, r in json.loads(pathlib.Path(results_path).read_text())]
    return None
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
    try:
      scratch.parent.rmdir()  # only when no other run is using it
    except OSError:
      pass


def parallel_map(options: str, workdir: str | os.PathLike) -> Callable[[Callable, list], list]:
  """``tfds_builder.build_dataset``'s ``parallel_map``: one Beam pipeline per call."""
  return functools.partial(run_map, options=options, workdir=workdir, collect=True)
