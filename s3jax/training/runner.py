"""Builds the task named by `config.trainer` and runs the shared loop on it."""

from s3jax.training import loop, state
from s3jax.training.classifier import ClassifierTask
from s3jax.training.dva import DVATask
from s3jax.training.id_standin import IdStandinTask
from s3jax.training.s3editor import S3EditorTask
from s3jax.training.s3editor_gan import S3EditorGanTask
from s3jax.training.sd_finetune import SDFinetuneTask

TASKS = {
    "dva": DVATask,
    "classifier": ClassifierTask,
    "id_standin": IdStandinTask,
    "s3editor": S3EditorTask,
    "s3editor_gan": S3EditorGanTask,
    "sd_finetune": SDFinetuneTask,
}


def make_task(config, mesh, workdir):
  if config.trainer not in TASKS:
    raise ValueError(f"config.trainer={config.trainer!r}; expected one of {' | '.join(TASKS)}")
  return TASKS[config.trainer](config, mesh, workdir)


def run(config, workdir):
  """Trains (or resumes) to config.total_steps. Returns the loop's final metrics."""
  mesh = state.make_mesh(config.mesh)
  return loop.train(config, workdir, make_task(config, mesh, workdir))
