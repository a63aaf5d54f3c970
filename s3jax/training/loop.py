"""The one training loop every trainer shares.

Data flows in from `task.data_iterator` (grain), the step is `task.train_step`
(a pure jitted function with donated state), and checkpoints are written by
`Checkpointer.save` below. A task supplies: `abstract_state`, `state_sharding`,
`init_state()`, `train_step(state, batch)`, `data_iterator`, `global_batch(batch)`
and optionally `write_samples(state, step, writer)` and `summary(state)`.
"""

import logging
import signal
import time

import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from s3jax.checkpointing import Checkpointer, write_config


class NonFiniteLossError(FloatingPointError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint, then exiting")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def _to_host(metrics):
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def train(config, workdir, task) -> dict:
  """Runs (or resumes) training to `config.total_steps`.

  Returns {"step", "history": [(step, metrics) at each log point], **last metrics}.
  """
  is_main = jax.process_index() == 0
  if is_main:
    write_config(workdir, config)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)

  state, start_step = checkpointer.restore_latest(task.abstract_state, task.data_iterator)
  if state is None:
    compile_start = time.time()
    state = task.init_state()
    start_step = 0
    logging.info("initialised a fresh train state in %.1fs", time.time() - compile_start)
  else:
    logging.info("resumed from step %d", start_step)
  if is_main and start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    writer.write_hparams({"num_params": n_params, **_flat_hparams(config)})

  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  last_metrics = {}
  logged = []  # (step, metrics) at every log point, returned to the caller
  pending = None  # (step, metrics) of the step before: checked one step late to keep dispatch async
  history = []
  step = start_step

  def check_finite(step_and_metrics):
    done_step, m = step_and_metrics
    host = _to_host(m)
    if not np.isfinite(host["loss"]) or host.get("finite", 1.0) < 1.0:
      raise NonFiniteLossError(
          f"non-finite loss at step {done_step} ({host}); the update was not applied and "
          "no checkpoint was written after it. Lower optim.lr or check the data."
      )
    return host

  with _Preemption() as preemption:
    try:
      while step < config.total_steps:
        batch = task.global_batch(next(task.data_iterator))
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = task.train_step(state, batch)
        if pending is not None:
          history.append(check_finite(pending))
        step += 1
        pending = (step, metrics)
        report(step)

        last = step == config.total_steps
        if step % config.log_every == 0 or last or preemption.requested:
          history.append(check_finite(pending))
          pending = None
          last_metrics = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
          last_metrics.pop("finite", None)
          writer.write_scalars(step, last_metrics)
          logged.append((step, last_metrics))
          history = []
        if getattr(task, "write_samples", None) and (step % config.sample_every == 0 or last):
          task.write_samples(state, step, writer)
        if step % config.checkpoint_every == 0 or last or preemption.requested:
          if pending is not None:
            history.append(check_finite(pending))
            pending = None
          checkpointer.save(step, state, task.data_iterator, config=config, force=True)
        if preemption.requested:
          logging.warning("preempted at step %d; checkpoint saved", step)
          break
    finally:
      checkpointer.close()
      writer.flush()
  return {"step": step, "history": logged, **last_metrics}


def _flat_hparams(config):
  flat = {}

  def visit(prefix, node):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if hasattr(v, "items"):
        visit(name + ".", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[name] = v
      else:
        flat[name] = str(v)

  visit("", config)
  return flat
