"""The diffusers DDIM scheduler of Stable Diffusion 1.x (eta = 0), as IP-FaceDiff uses it.

`SDScheduler.from_diffusers(config)` reads a diffusers scheduler config (a DDIM or, as in
IP-FaceDiff, a PNDM one): absent keys take DDIMScheduler's defaults, so a PNDM config without
`clip_sample` clips the predicted x0 (golden SPEC §3). It holds:
- the float32 ᾱ table (`alphas_cumprod`): torch's float32 `linspace` (fused multiply-add), the
  squares and `1 - beta` in float32, the cumulative product accumulated in float64 as torch's
  CPU `cumprod` does, then rounded to float32;
- `timesteps(n)`: "leading" spacing plus `steps_offset`, descending;
- `step` (one DDIM step down, x0 clipped when `clip_sample`), `inversion_step` (one step up,
  never clipped), `add_noise` and `eps_from_noisy`.

These are diffusers' semantics, not DVA's (`s3jax.diffusion`): the clipped x0 does NOT re-derive
eps, the previous ᾱ at the last step is `final_alpha_cumprod` (ᾱ[0] unless `set_alpha_to_one`)
and the model is called at the schedule's own timesteps.

Float32 islands (SPEC §13): ᾱ and its square roots in `step`, `inversion_step` and
`eps_from_noisy` are float32 whatever the sample dtype; `add_noise` casts ᾱ to the sample
dtype before the square root. So an x64 run matches the reference's float64 run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# DDIMScheduler.__init__ defaults (diffusers 0.42.1); a key absent from a config takes these.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
BETA_SCHEDULES = ("linear", "scaled_linear")


def torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32) bit for bit (CPU kernel: float32 step, the
  first half counted from start, the second from end, each as a fused multiply-add)."""
  s, e = np.float32(start), np.float32(end)
  step = np.float32((e - s) / np.float32(max(n - 1, 1)))
  i = np.arange(n)
  # float32 operands, one float64 multiply-add, one rounding: an FMA.
  head = np.float64(s) + np.float64(step) * i
  tail = np.float64(e) - np.float64(step) * (n - 1 - i)
  return np.where(i < n // 2, head, tail).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SDScheduler:
  """A resolved diffusers DDIM config (eta = 0); defaults are Stable Diffusion 1.x's."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = False
  steps_offset: int = 1

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(
          f"beta_schedule {self.beta_schedule!r} is not supported (one of {BETA_SCHEDULES})"
      )

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "SDScheduler":
    """Resolve a diffusers scheduler config dict the way `DDIMScheduler.from_config` does.

    Unknown keys (e.g. PNDM's `skip_prk_steps`, `_class_name`) are ignored as diffusers does;
    settings this port does not implement raise ValueError.
    """
    c = dict(DDIM_DEFAULTS)
    c.update({k: v for k, v in config.items() if k in DDIM_DEFAULTS})
    if c["prediction_type"] != "epsilon":
      raise ValueError(f"prediction_type {c['prediction_type']!r} is not supported (epsilon)")
    if c["timestep_spacing"] != "leading":
      raise ValueError(f"timestep_spacing {c['timestep_spacing']!r} is not supported (leading)")
    if c["beta_schedule"] not in BETA_SCHEDULES:
      raise ValueError(
          f"beta_schedule {c['beta_schedule']!r} is not supported (one of {BETA_SCHEDULES})"
      )
    for key in ("trained_betas",):
      if c[key] is not None:
        raise ValueError(f"{key} is not supported")
    for key in ("thresholding", "rescale_betas_zero_snr"):
      if c[key]:
        raise ValueError(f"{key}=True is not supported")
    return cls(
        num_train_timesteps=int(c["num_train_timesteps"]),
        beta_start=float(c["beta_start"]),
        beta_end=float(c["beta_end"]),
        beta_schedule=str(c["beta_schedule"]),
        clip_sample=bool(c["clip_sample"]),
        clip_sample_range=float(c["clip_sample_range"]),
        set_alpha_to_one=bool(c["set_alpha_to_one"]),
        steps_offset=int(c["steps_offset"]),
    )

  # ------------------------------------------------------------------------------ tables
  @property
  def betas(self) -> np.ndarray:
    n = self.num_train_timesteps
    if self.beta_schedule == "scaled_linear":
      root = torch_linspace_float32(self.beta_start**0.5, self.beta_end**0.5, n)
      return root * root
    return torch_linspace_float32(self.beta_start, self.beta_end, n)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """ᾱ, float32 (the cumulative product accumulated in float64, as torch's CPU cumprod)."""
    alphas = np.float32(1.0) - self.betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

  @property
  def final_alpha_cumprod(self) -> np.float32:
    return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

  def step_ratio(self, n_steps: int) -> int:
    if not 0 < n_steps <= self.num_train_timesteps:
      raise ValueError(f"n_steps must be in [1, {self.num_train_timesteps}], got {n_steps}")
    return self.num_train_timesteps // n_steps

  def timesteps(self, n_steps: int) -> np.ndarray:
    """`set_timesteps(n)`: descending int64, leading spacing + steps_offset (50 -> 981..1)."""
    r = self.step_ratio(n_steps)
    return (np.arange(n_steps, dtype=np.int64) * r)[::-1].copy() + self.steps_offset

  # -------------------------------------------------------------------------- the formulas
  def alpha_pair(self, t, n_steps: int) -> tuple[jax.Array, jax.Array]:
    """(ᾱ[t], ᾱ[t - r]) as float32 scalars; ᾱ[t - r] is `final_alpha_cumprod` when t - r < 0.

    `t` may be traced. The pair serves both directions: `step` goes from the first to the
    second, `inversion_step` (whose previous timestep is always t - r) from the second to the
    first.
    """
    table = jnp.asarray(self.alphas_cumprod)
    t = jnp.asarray(t, jnp.int32)
    t_prev = t - self.step_ratio(n_steps)
    a_prev = jnp.where(
        t_prev >= 0, table[jnp.maximum(t_prev, 0)], jnp.float32(self.final_alpha_cumprod)
    )
    return table[t], a_prev

  def step(self, eps: jax.Array, t, x: jax.Array, n_steps: int, clip: bool | None = None):
    """DDIMScheduler.step (eta 0): x_t -> x_{t-r}. The predicted x0 is clipped when `clip`
    (default: the config's `clip_sample`); eps is NOT re-derived from the clipped x0."""
    a_t, a_prev = self.alpha_pair(t, n_steps)
    clip = self.clip_sample if clip is None else clip
    return ddim_move(x, eps, a_t, a_prev, self.clip_sample_range if clip else None)

  def inversion_step(self, eps: jax.Array, t, x: jax.Array, n_steps: int) -> jax.Array:
    """TokenFlow's DDIM inversion step (SPEC §4): x at t - r -> x at t, with eps evaluated at
    the new t; from `final_alpha_cumprod` at the first step; never clipped."""
    a_t, a_prev = self.alpha_pair(t, n_steps)
    return ddim_move(x, eps, a_prev, a_t, None)

  def add_noise(self, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
    """sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps, with ᾱ cast to the sample dtype before the roots."""
    a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t, jnp.int32)].astype(x0.dtype)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps

  def eps_from_noisy(self, noisy: jax.Array, x0: jax.Array, t) -> jax.Array:
    """TokenFlow's `get_ddim_eps`: (z_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t), roots in float32."""
    a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    dt = noisy.dtype
    return (noisy - jnp.sqrt(a).astype(dt) * x0) / jnp.sqrt(1 - a).astype(dt)


def ddim_move(x, eps, a_from, a_to, clip_range: float | None):
  """The one DDIM formula: x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from), optionally clipped to
  ±clip_range, then sqrt(a_to) x0 + sqrt(1 - a_to) eps. The square roots are taken in the ᾱ
  dtype (float32) and then cast to the sample dtype (SPEC §13)."""
  dt = x.dtype
  x0 = (x - jnp.sqrt(1 - a_from).astype(dt) * eps) / jnp.sqrt(a_from).astype(dt)
  if clip_range is not None:
    x0 = jnp.clip(x0, -clip_range, clip_range)
  return jnp.sqrt(a_to).astype(dt) * x0 + jnp.sqrt(1 - a_to).astype(dt) * eps
