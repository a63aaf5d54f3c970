"""Builds the task named by `config.trainer` and runs the shared loop on it."""

from s3jax.training import loop, state


def make_task(config, mesh, workdir):
  if config.trainer == "dva":
    from s3jax.training.dva import DVATask

    return DVATask(config, mesh, workdir)
  if config.trainer == "classifier":
    from s3jax.training.classifier import ClassifierTask

    return ClassifierTask(config, mesh, workdir)
  if config.trainer == "s3editor":
    from s3jax.training.s3editor import S3EditorTask

    return S3EditorTask(config, mesh, workdir)
  raise ValueError(f"config.trainer={config.trainer!r}; expected dva | classifier | s3editor")


def run(config, workdir):
  """Trains (or resumes) to config.total_steps. Returns the loop's final metrics."""
  mesh = state.make_mesh(config.mesh)
  return loop.train(config, workdir, make_task(config, mesh, workdir))
