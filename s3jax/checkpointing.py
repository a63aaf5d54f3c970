"""Orbax checkpoints of the train state, the grain iterator and the config.

A checkpoint step holds three items: `state` (params, EMA params, optimizer
state, step), `data` (the grain iterator position, one JSON file per process)
and `config` (the resolved run config as JSON, so a loader reads the config
of the very step it restores). Saves are async and atomic (orbax writes to a
tmp dir and renames).
Restore picks the newest step that loads; a broken newest step falls back to
the previous one with a warning, never silently to a fresh start.
"""

import json
import logging
import pathlib
from typing import Any, Optional

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


@flax.struct.dataclass
class TrainState:
  """What every trainer checkpoints: step, params, their EMA and the optimizer state."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def new_train_state(params, tx) -> TrainState:
  """A fresh state at step 0; the EMA starts equal to the params."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )


class CheckpointShapeError(ValueError):
  """A checkpoint does not fit the model that tries to load it."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_tree_matches(expected: Any, found: Any, what: str = "checkpoint") -> None:
  """Raises CheckpointShapeError naming the first parameter whose shape differs."""
  exp = {
      _path_str(p): tuple(np.shape(x) if not hasattr(x, "shape") else x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  got = {
      _path_str(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(found)[0]
      if hasattr(x, "shape")
  }
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  if missing:
    raise CheckpointShapeError(
        f"{what} lacks parameter {missing[0]!r} " f"({len(missing)} missing in all)"
    )
  if unexpected:
    raise CheckpointShapeError(
        f"{what} has unexpected parameter {unexpected[0]!r} "
        f"({len(unexpected)} unexpected in all)"
    )
  for name in sorted(exp):
    if exp[name] != got[name]:
      raise CheckpointShapeError(
          f"{what}: parameter {name!r} has shape {got[name]} but the model expects " f"{exp[name]}"
      )


def hash_named_arrays(h, named_arrays) -> None:
  """Feeds ``(name, array)`` pairs, in the order given, into the hashlib object ``h``:
  the name, the shape and dtype, then the bytes. Weights fingerprints are built on it."""
  for name, v in named_arrays:
    v = np.ascontiguousarray(np.asarray(jax.device_get(v)))
    h.update(name.encode())
    h.update(repr((v.shape, str(v.dtype))).encode())
    h.update(v.data)


class Checkpointer:
  """Saves and restores (train state, data iterator) under `workdir/checkpoints`."""

  def __init__(self, workdir, max_to_keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(
      self, step: int, state: Any, data_iterator: Any = None, config=None, force: bool = False
  ) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(config_to_dict(config))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_config(self, step: int):
    """The config saved with `step` (a ConfigDict), or None for a step saved without one."""
    if not (self.directory / str(step) / "config").exists():
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_step(self, step: int, abstract_state: Any, data_iterator: Any):
    metadata = self.manager.item_metadata(step)
    state_meta = metadata["state"] if metadata is not None else None
    if state_meta is None:
      raise FileNotFoundError(f"checkpoint step {step} has no readable state metadata")
    check_tree_matches(abstract_state, state_meta, what=f"checkpoint step {step}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None):
    """Returns (state, step) of the newest loadable checkpoint, or (None, None) if none exist.

    A checkpoint with the wrong shapes raises CheckpointShapeError at once:
    falling back to an older step of the same run would not help.
    """
    steps = self.all_steps()
    if not steps:
      return None, None
    errors = []
    for step in reversed(steps):
      try:
        return self.restore_step(step, abstract_state, data_iterator), step
      except CheckpointShapeError:
        raise
      except Exception as e:  # A truncated or missing file: try the step before.
        logging.warning(
            "checkpoint step %d could not be restored (%s: %s); trying an " "earlier one",
            step,
            type(e).__name__,
            e,
        )
        errors.append(f"step {step}: {type(e).__name__}: {e}")
    raise NoUsableCheckpointError(
        f"none of the checkpoints in {self.directory} could be restored; refusing to "
        "start from scratch over them. Move them away to start fresh.\n" + "\n".join(errors)
    )


def all_steps(workdir) -> list:
  """The checkpoint steps of `workdir`, oldest first; FileNotFoundError when it has none."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  if not steps:
    raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
  return steps


def latest_step(workdir) -> int:
  """The newest checkpoint step of `workdir`; FileNotFoundError when it has none."""
  return all_steps(workdir)[-1]


def read_config(workdir, step: Optional[int] = None):
  """The config saved with checkpoint `step` (default: the newest) of `workdir`.

  Workdirs written before configs travelled with checkpoints fall back to
  `workdir/config.json`.
  """
  config = None
  if (pathlib.Path(workdir) / "checkpoints").is_dir():
    ckpt = Checkpointer(workdir, async_save=False)
    try:
      steps = ckpt.all_steps()
      if step is None and steps:
        step = steps[-1]
      config = ckpt.restore_config(step) if step in steps else None
    finally:
      ckpt.close()
  if config is not None:
    return config
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found and no checkpoint with a config: is {workdir} an " "s3jax workdir?"
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_state_only(workdir, abstract_state: Any, step: Optional[int] = None):
  """Restores just the train state (for editing/eval), newest loadable step by default."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
    if step is None:
      state, step = ckpt.restore_latest(abstract_state)
    else:
      state = ckpt.restore_step(step, abstract_state, None)
    return state, step
  finally:
    ckpt.close()


def restore_saved_state(workdir, step: Optional[int] = None) -> Any:
  """The state tree of checkpoint `step` (default: newest) exactly as saved, as numpy arrays.

  For loaders of models whose template is not a full train state (the EMA
  editor, the identity stand-in); they check the shapes they use.
  """
  step = latest_step(workdir) if step is None else int(step)
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"]
  finally:
    ckpt.close()


def config_to_dict(config) -> dict:
  """The resolved config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir, config) -> None:
  """`workdir/config.json`, for people; loaders read the copy inside each checkpoint."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2))
