"""Compute variants of the DVA train step against the plain f32 step on one device.

- bf16 compute (`model.dtype=bfloat16`, params f32): a 20-step run stays finite, its loss
  tracks the f32 run's within BF16_LOSS_RTOL at every step, and its first gradient is within
  BF16_GRAD_RTOL of f32's.
- remat (`model.remat=True`): the same first loss and gradients, and under 0.6x the XLA temp
  memory (measured 0.46x here; the paper-size step's figure is in benchmarks/remat.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from s3jax.training import state as state_lib

from test_fsdp import tiny_step_config, train_synthetic

STEPS = 20
# The bands, measured on this config: bf16 losses within 0.07% of f32's over the 20 steps
# (two f32 programs, plain and remat, drift apart as much: 0.08%), and a first-step gradient
# 0.3% from f32's (two f32 programs: < 1e-5).
BF16_LOSS_RTOL = 0.01
BF16_GRAD_RTOL = 0.03


def _run(tmp_path_factory, **model):
  config = tiny_step_config(tmp_path_factory.mktemp("precision"), **model)
  config.total_steps = STEPS
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), state_lib.BATCH_AXES)
  _, state, history, step, first = train_synthetic(config, mesh, STEPS)
  return dict(
      state=state, history=history, first=first, temp=step.memory_analysis().temp_size_in_bytes
  )


def _adam_first_moment(opt_state):
  """Adam's mu: after the first step it is (1 - b1) times the clipped gradient."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(adam.mu)]).astype(np.float64)


@pytest.fixture(scope="module")
def f32_run(tmp_path_factory):
  return _run(tmp_path_factory)


@pytest.mark.slow
def test_bf16_run_is_finite_and_tracks_f32(f32_run, tmp_path_factory):
  run = _run(tmp_path_factory, dtype="bfloat16")
  state, history = run["state"], run["history"]
  losses = np.array([m["loss"] for m in history])
  f32_losses = np.array([m["loss"] for m in f32_run["history"]])
  print(f"bf16 losses {losses.tolist()}\nf32 losses {f32_losses.tolist()}")
  print(f"largest relative difference {np.max(np.abs(losses / f32_losses - 1)):.4f}")
  assert np.all(np.isfinite(losses)) and all(m["finite"] == 1.0 for m in history)
  assert all(np.isfinite(m["grad_norm"]) for m in history)
  # Compute only: the params and the optimizer state stay f32.
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(losses, f32_losses, rtol=BF16_LOSS_RTOL)
  grads = _adam_first_moment(run["first"].opt_state)
  f32_grads = _adam_first_moment(f32_run["first"].opt_state)
  grad_error = np.linalg.norm(grads - f32_grads) / np.linalg.norm(f32_grads)
  print(f"first-step gradient, relative error vs f32: {grad_error:.4f}")
  # Not the f32 program by another name (that would be < 1e-5), and within the band.
  assert 1e-4 < grad_error < BF16_GRAD_RTOL


@pytest.mark.slow
def test_remat_step_matches_plain_with_less_temp_memory(f32_run, tmp_path_factory):
  run = _run(tmp_path_factory, remat=True)
  print(f"XLA temp bytes: plain {f32_run['temp']}, remat {run['temp']}")
  history, plain = run["history"], f32_run["history"]
  # The first step: same loss, same gradients (dropout included: its random bits are
  # recomputed from the same key).
  np.testing.assert_allclose(history[0]["loss"], plain[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(history[0]["grad_norm"], plain[0]["grad_norm"], rtol=1e-5)
  grads = _adam_first_moment(run["first"].opt_state)
  plain_grads = _adam_first_moment(f32_run["first"].opt_state)
  assert np.linalg.norm(plain_grads) > 0
  assert np.linalg.norm(grads - plain_grads) / np.linalg.norm(plain_grads) < 1e-5
  # Later steps are not compared: rounding differences in near-zero gradients become
  # whole Adam steps (the update is about lr * sign(g)), so any two programs drift apart.
  assert all(m["finite"] == 1.0 for m in history)
  assert run["temp"] < 0.6 * f32_run["temp"]
