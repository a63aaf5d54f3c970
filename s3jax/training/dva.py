"""The DVA trainer task: init, the pure train step, and the sample grids."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from s3jax import diffusion, images, input_pipeline, loading, losses, optim
from s3jax.checkpointing import TrainState
from s3jax.models.autoencoder import make_dva
from s3jax.training import state as state_lib

BATCH_KEYS = ("image", "mask", "z_id", "z_lnd")


def flatten_frames(batch):
  """(B, k, ...) items of k frames -> (B*k, ...) frames."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


class DVATask:

  def __init__(self, config, mesh, workdir, data_iterator=None):
    if data_iterator is None:  # fail before compiling when the records are the other path's
      input_pipeline.check_face_features(config.data.data_dir, config.model.face_features)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.mesh = mesh
    self.model = make_dva(config.model)
    self.tx = optim.make_optimizer(config.optim)
    self.rng = jax.random.key(config.seed)

    self.abstract_state, self.state_sharding, self.init_state = state_lib.sharded_init(
        self._init, self.rng, mesh
    )
    self._batch_sharding = state_lib.batch_sharding(mesh)
    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, self._batch_sharding),
        out_shardings=(self.state_sharding, state_lib.replicated(mesh)),
        donate_argnums=0,
    )
    self.data_iterator = (
        data_iterator
        if data_iterator is not None
        else (input_pipeline.make_train_iterator(config.data, seed=config.seed))
    )
    self._sample_fn = None

  # -- state ---------------------------------------------------------------
  def _init(self, rng):
    return loading.init_dva_state(self.model, self.tx, self.config, rng)

  def global_batch(self, batch):
    local = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    return input_pipeline.to_global_arrays(local, self.mesh)

  # -- the pure train step -------------------------------------------------
  def _train_step(self, state: TrainState, batch):
    cfg = self.config
    frames = flatten_frames(batch)
    x0 = frames["image"]
    n = x0.shape[0]
    rng = jax.random.fold_in(self.rng, state.step)
    rng_t, rng_n1, rng_n2, rng_drop = jax.random.split(rng, 4)
    t = jax.random.randint(rng_t, (n,), 0, cfg.diffusion.num_timesteps)
    noise1 = jax.random.normal(rng_n1, x0.shape)
    noise2 = jax.random.normal(rng_n2, x0.shape)
    z_id2 = jnp.concatenate([frames["z_id"]] * 2)
    z_lnd2 = jnp.concatenate([frames["z_lnd"]] * 2)

    def loss_fn(params):
      def eps_fn(x_t, t2):
        return self.model.apply(
            {"params": params}, x_t, t2, z_id2, z_lnd2, train=True, rngs={"dropout": rng_drop}
        )

      return losses.dva_loss(eps_fn, x0, t, frames["mask"], noise1, noise2, cfg.loss.reg_coef)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, tail = state_lib.apply_gradients(
        state, grads, metrics["loss"], self.tx, cfg.ema_decay
    )
    metrics = dict(metrics, **tail, lr=optim.learning_rate_at(cfg.optim, state.step))
    return new_state, metrics

  # -- sample grids ----------------------------------------------------------
  def _build_sample_fn(self):
    steps = self.config.diffusion.eval_steps

    def sample(params, image, z_id, z_lnd):
      def eps_fn(x, t, z_face):
        return self.model.apply({"params": params}, x, t, z_face, method="denoise")

      def z_face(zi, zl):
        return self.model.apply({"params": params}, zi, zl, method="z_face")

      x_t = diffusion.ddim_invert(eps_fn, image, z_face(z_id, z_lnd), steps)
      # One decode of 3N rows: reconstruction; identity swap (another row's z_id
      # with this frame's motion and noise map); motion swap (another row's landmarks).
      conds = jnp.concatenate(
          [
              z_face(z_id, z_lnd),
              z_face(jnp.roll(z_id, 1, axis=0), z_lnd),
              z_face(z_id, jnp.roll(z_lnd, 1, axis=0)),
          ]
      )
      decoded = diffusion.ddim_sample(eps_fn, jnp.concatenate([x_t] * 3), conds, steps)
      return jnp.concatenate([image[None], decoded.reshape((3,) + image.shape)])

    return jax.jit(sample)

  def write_samples(self, state, step, writer):
    if self._sample_fn is None:
      self._sample_fn = self._build_sample_fn()
    batch = flatten_frames(self._sample_batch(state))
    rows = self._sample_fn(state.ema_params, batch["image"], batch["z_id"], batch["z_lnd"])
    grid = images.make_grid(np.asarray(jax.device_get(rows)))
    if jax.process_index() == 0:
      writer.write_images(step, {"samples/real_recon_idswap_motionswap": grid[None]})
      path = self.workdir / "samples" / f"step_{step:07d}.png"
      images.save_png(path, grid)
      logging.info("wrote sample grid %s", path)

  def _sample_batch(self, state):
    if not hasattr(self, "_fixed_sample_batch"):
      it = input_pipeline.make_eval_iterator(
          self.config.data, seed=self.config.seed, batch_size=self.config.num_sample_rows
      )
      b = next(it)
      self._fixed_sample_batch = {k: jnp.asarray(b[k][:, :1]) for k in BATCH_KEYS}
    return self._fixed_sample_batch
