"""The identity stand-in trainer: a small CNN distilled from the dlib descriptor.

S3Editor's identity loss needs a differentiable identity network; offline
there are no ArcFace weights, so this task fits `models.id_standin.IdentityNet`
to the z_id the shards already hold, with the loss `1 - cos(net(frame), z_id)`.
It runs in the shared loop like every task (resume, orbax checkpoints, config
in each checkpoint). At each sample point it writes its agreement with dlib to
`<workdir>/id_standin_report.json` (see `id_standin.agreement`).
"""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp

from s3jax import input_pipeline, optim
from s3jax.checkpointing import TrainState, new_train_state
from s3jax.models import id_standin
from s3jax.training import state as state_lib

BATCH_KEYS = ("image", "z_id")


class IdStandinTask:
  """Trainer task for `s3jax.training.loop.train` (see the module docstring)."""

  def __init__(self, config, mesh, workdir, data_iterator=None):
    self.config = config
    self.mesh = mesh
    self.workdir = pathlib.Path(workdir)
    self.model = id_standin.make_identity_net(config.model)
    self.tx = optim.make_optimizer(config.optim)
    self.rng = jax.random.key(config.seed)
    self.abstract_state, self.state_sharding, self.init_state = state_lib.sharded_init(
        self._init, self.rng, mesh
    )
    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, state_lib.batch_sharding(mesh)),
        out_shardings=(self.state_sharding, state_lib.replicated(mesh)),
        donate_argnums=0,
    )
    self.data_iterator = (
        data_iterator
        if data_iterator is not None
        else input_pipeline.make_train_iterator(config.data, seed=config.seed)
    )

  def _init(self, rng) -> TrainState:
    return new_train_state(id_standin.init_params(self.model, rng), self.tx)

  def global_batch(self, batch):
    frames, targets = id_standin.frames_and_targets(batch)
    if targets.shape[-1] != self.model.features:
      raise ValueError(
          f"the records hold {targets.shape[-1]}-d z_id but model.features="
          f"{self.model.features}; set --config.model.features={targets.shape[-1]}"
      )
    return input_pipeline.to_global_arrays({"image": frames, "z_id": targets}, self.mesh)

  def _train_step(self, state: TrainState, batch):
    def loss_fn(params):
      e = self.model.apply({"params": params}, batch["image"])
      return jnp.mean(1.0 - jnp.sum(e * batch["z_id"], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, tail = state_lib.apply_gradients(
        state, grads, loss, self.tx, float(self.config.ema_decay)
    )
    return new_state, {
        "loss": loss,
        **tail,
        "lr": optim.learning_rate_at(self.config.optim, state.step),
    }

  def agreement_report(self, params) -> dict:
    """Agreement with dlib on held-out and on training frames."""
    cfg = self.config
    ev = input_pipeline.make_eval_iterator(cfg.data, seed=0, batch_size=4)
    tr = input_pipeline.make_train_iterator(cfg.data, seed=cfg.seed + 99)
    params = jax.device_get(params)
    return {
        "test": id_standin.agreement(
            self.model, params, [next(ev) for _ in range(cfg.eval_batches)]
        ),
        "train": id_standin.agreement(self.model, params, [next(tr) for _ in range(4)]),
    }

  def write_samples(self, state, step, writer):
    report = dict(self.agreement_report(state.params), step=int(step))
    if jax.process_index() == 0:
      (self.workdir / id_standin.REPORT_FILE).write_text(json.dumps(report, indent=2))
      writer.write_scalars(
          step,
          {f"agreement/{split}_cos_mean": report[split]["cos_mean"] for split in ("test", "train")},
      )
      logging.info("id stand-in step %d: agreement with dlib %s", step, json.dumps(report))
