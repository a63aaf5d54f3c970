"""Gaussian diffusion for DVA: linear schedule, q_sample, x0/eps conversions, DDIM (eta=0).

Follows the reference (`diffusion/base.py`, `diffusion/diffusion.py`):
- T=1000 linear betas 1e-4..0.02 in float64; coefficients are cast to float32 per step.
- Respacing `ddimN`: the smallest integer stride s with len(range(0, 1000, s)) == N; no such
  stride is an error. The respaced cumulative alphas are the original ones at those timesteps.
  The model is always called with the *original* timestep.
- `ddim_invert` runs N-1 steps (`range(N)[:-1]`) with alphas_cumprod_next; `ddim_sample` runs N
  steps down to t=0. Both clip the predicted x0 to [-1, 1] and re-derive eps from it.
Every DDIM here is `ddim_scan` (one `jax.lax.scan` of `ddim_step`) over step constants
from `ddim_constants` (the respaced samplers) or `step_constants` (any timesteps and
target alphas); `eps_fn(x, t, cond)` is any traceable callable.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@functools.lru_cache(maxsize=None)
def _betas(num_timesteps: int) -> np.ndarray:
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """Linear betas (float64), as the reference's 'linear' schedule."""
  return _betas(num_timesteps).copy()


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """prod_{s<=t} (1 - beta_s), float64."""
  return np.cumprod(1.0 - _betas(num_timesteps))


def _extract(arr64: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  """arr[t] as float32, broadcast to rank `ndim` (like the reference's _extract_into_tensor)."""
  v = jnp.asarray(arr64.astype(np.float32))[t]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int (B,) original timesteps."""
  ac = alphas_cumprod()
  return _extract(np.sqrt(ac), t, x0.ndim) * x0 + _extract(np.sqrt(1.0 - ac), t, x0.ndim) * noise


def pred_x0_from_eps(x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (no clipping)."""
  ac = alphas_cumprod()
  return (
      _extract(np.sqrt(1.0 / ac), t, x_t.ndim) * x_t
      - _extract(np.sqrt(1.0 / ac - 1.0), t, x_t.ndim) * eps
  )


def eps_from_x0(x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
  ac = alphas_cumprod()
  return (_extract(np.sqrt(1.0 / ac), t, x_t.ndim) * x_t - x0) / _extract(
      np.sqrt(1.0 / ac - 1.0), t, x_t.ndim
  )


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """Original timesteps kept by the reference's `ddim{num_steps}` respacing (int32, ascending).

  Raises ValueError when no integer stride leaves exactly `num_steps` steps.
  """
  num_steps = int(num_steps)
  for stride in range(1, num_timesteps):
    if len(range(0, num_timesteps, stride)) == num_steps:
      return np.arange(0, num_timesteps, stride, dtype=np.int32)
  raise ValueError(
      f"cannot respace {num_timesteps} diffusion steps to exactly {num_steps} DDIM steps with "
      f"an integer stride (the reference's 'ddim{num_steps}' rule); valid counts include 10, "
      f"20, 25, 50, 100, 200, 250, 500, 1000"
  )


def respaced_schedule(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> dict:
  """Respaced float64 arrays: timesteps, alphas_cumprod, alphas_cumprod_prev/next.

  Built like the reference: new betas 1 - abar_i / abar_last over the kept steps, cumprod again.
  """
  ts = respaced_timesteps(num_steps, num_timesteps)
  ac_full = alphas_cumprod(num_timesteps)
  last, new_betas = 1.0, []
  for i in ts:
    new_betas.append(1.0 - ac_full[i] / last)
    last = ac_full[i]
  ac = np.cumprod(1.0 - np.asarray(new_betas, np.float64))
  return {
      "timesteps": ts,
      "alphas_cumprod": ac,
      "alphas_cumprod_prev": np.append(1.0, ac[:-1]),
      "alphas_cumprod_next": np.append(ac[1:], 0.0),
  }


def step_constants(timesteps, target_alphas, alphas=None, valid=None) -> dict:
  """Step constants for ``ddim_scan``: one entry per step, in scan order (numpy, host).

  Args:
    timesteps: original timesteps the model is called with, one per step.
    target_alphas: the cumulative alpha each step moves x to (1.0 lands on the x0 estimate).
    alphas: the cumulative alpha at each step's timestep; default ``alphas_cumprod()[t]``.
    valid: optional 0/1 per step; a step with 0 leaves x unchanged (padding, see
      ``ddim_constants``). Without it every step runs and the scan has no ``lax.cond``.

  Returns a dict of arrays: t (int32), sqrt_recip, sqrt_recipm1, a_target (float32,
  computed in float64 and cast, as the reference's coefficients), and valid (int32)
  when given.
  """
  ts = np.asarray(timesteps, np.int64).reshape(-1)
  ac = alphas_cumprod()[ts] if alphas is None else np.asarray(alphas, np.float64).reshape(-1)
  target = np.asarray(target_alphas, np.float64).reshape(-1)
  if not len(ts) == len(ac) == len(target):
    raise ValueError(
        f"{len(ts)} timesteps, {len(ac)} alphas and {len(target)} target alphas: one per step"
    )
  f32 = lambda a: np.asarray(a, np.float64).astype(np.float32)  # noqa: E731
  consts = {
      "t": ts.astype(np.int32),
      "sqrt_recip": f32(np.sqrt(1.0 / ac)),
      "sqrt_recipm1": f32(np.sqrt(1.0 / ac - 1.0)),
      "a_target": f32(target),
  }
  if valid is not None:
    consts["valid"] = np.asarray(valid, np.int32).reshape(len(ts))
  return consts


def ddim_constants(num_steps: int, kind: str, pad: bool = False) -> dict:
  """Step constants of ``ddim_invert`` (kind='invert') or ``ddim_sample`` ('decode').

  Decoding runs the respaced steps N-1 ... 0 towards alphas_cumprod_prev; inversion runs
  0 ... N-2 towards alphas_cumprod_next (N-1 steps). With ``pad``, both kinds carry
  ``valid`` and have N entries (inversion ends with a skipped step), so one compiled
  ``ddim_scan`` serves both with the constants as arguments.
  """
  sched = respaced_schedule(num_steps)
  n = len(sched["timesteps"])
  if kind == "invert":
    idx = np.arange(n if pad else n - 1)
    target = sched["alphas_cumprod_next"]
    valid = (idx < n - 1).astype(np.int32) if pad else None
  elif kind == "decode":
    idx = np.arange(n)[::-1]
    target = sched["alphas_cumprod_prev"]
    valid = np.ones(n, np.int32) if pad else None
  else:
    raise ValueError(f"kind must be 'invert' or 'decode', got {kind!r}")
  return step_constants(
      sched["timesteps"][idx], target[idx], alphas=sched["alphas_cumprod"][idx], valid=valid
  )


def ddim_step(eps_fn: EpsFn, x: jax.Array, cond, c: dict, clip: bool = True) -> jax.Array:
  """One deterministic DDIM move of x from timestep c["t"] to the alpha c["a_target"].

  Predicts eps, then x0 (clamped to [-1, 1] when `clip`), re-derives eps from that x0
  (as the reference does), and steps. `c` holds scalars: t, sqrt_recip, sqrt_recipm1,
  a_target (one entry of ``step_constants``). With a_target 1.0 the result is the x0
  estimate.
  """
  t = jnp.full((x.shape[0],), c["t"], jnp.int32)
  eps = eps_fn(x, t, cond).astype(x.dtype)
  x0 = c["sqrt_recip"] * x - c["sqrt_recipm1"] * eps
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  eps = (c["sqrt_recip"] * x - x0) / c["sqrt_recipm1"]
  a = c["a_target"]
  return x0 * jnp.sqrt(a) + jnp.sqrt(1.0 - a) * eps


def ddim_scan(eps_fn: EpsFn, x: jax.Array, cond, consts: dict, clip: bool = True) -> jax.Array:
  """Deterministic DDIM over ``consts`` (``step_constants`` / ``ddim_constants``), one scan.

  Each step is ``ddim_step``. When ``consts`` has ``valid``, steps with 0 are skipped
  (``lax.cond``: no model call). ``consts`` may be traced (jit arguments): only their
  length is static.
  """

  def step(x, c):
    if "valid" not in c:
      return ddim_step(eps_fn, x, cond, c, clip), None
    move = lambda x: ddim_step(eps_fn, x, cond, c, clip)  # noqa: E731
    return jax.lax.cond(c["valid"] > 0, move, lambda x: x, x), None

  x, _ = jax.lax.scan(step, x, consts)
  return x


def ddim_sample(
    eps_fn: EpsFn, x_T: jax.Array, cond, num_steps: int, clip: bool = True
) -> jax.Array:
  """Deterministic DDIM decoding x_T -> x_0 over `num_steps` respaced steps (one lax.scan).

  `num_steps` must be a Python int (static under jit).
  """
  return ddim_scan(eps_fn, x_T, cond, ddim_constants(num_steps, "decode"), clip)


def ddim_invert(eps_fn: EpsFn, x0: jax.Array, cond, num_steps: int, clip: bool = True) -> jax.Array:
  """Deterministic DDIM inversion x_0 -> x_T, the reference's `encode_stochastic`.

  Runs `num_steps - 1` steps (i = 0 .. N-2) with the respaced alphas_cumprod_next, in one scan.
  """
  return ddim_scan(eps_fn, x0, cond, ddim_constants(num_steps, "invert"), clip)


def decode_from_noised(eps_fn: EpsFn, x0: jax.Array, t_start: int, noise, cond, steps: int = 1):
  """Noise ``x0`` to ``t_start``, then ``steps`` deterministic DDIM steps down to t=0.

  The cheap decode of S3Editor's train step. The timesteps are
  ``round(linspace(t_start, 0, steps + 1))[:-1]`` (original indices); no
  clipping, so the gradient reaches every pixel; ``steps=1`` is the one-step
  x0 prediction. The last step's target alpha is 1, so the result is the
  final x0 estimate. ``t_start`` and ``steps`` are Python ints.
  """
  ts = np.round(np.linspace(int(t_start), 0, int(steps) + 1)).astype(np.int32)
  ac = alphas_cumprod()
  consts = step_constants(ts[:-1], [ac[t] if t > 0 else 1.0 for t in ts[1:]])
  x = q_sample(x0, jnp.full((x0.shape[0],), ts[0], jnp.int32), noise)
  return ddim_scan(eps_fn, x, cond, consts, clip=False)
