"""The DVA training loss: two noises on one (x0, t), plus the masked x0 consistency term."""

import jax.numpy as jnp

from s3jax import diffusion


def dva_loss(eps_fn, x0, t, mask, noise1, noise2, reg_coef: float = 1.0):
  """L1(eps1) + L1(eps2) + reg_coef * mean|m*x0_hat(eps1) - m*x0_hat(eps2)|.

  `eps_fn(x_t, t)` gets both noisy copies as ONE batched call of 2B so the
  backbone runs once. x0_hat is the unclamped prediction, as in the reference.
  Returns (loss, metrics dict).
  """
  b = x0.shape[0]
  x_t = jnp.concatenate(
      [diffusion.q_sample(x0, t, noise1), diffusion.q_sample(x0, t, noise2)], axis=0
  )
  t2 = jnp.concatenate([t, t], axis=0)
  eps_hat = eps_fn(x_t, t2).astype(jnp.float32)
  noise = jnp.concatenate([noise1, noise2], axis=0)
  l1 = jnp.mean(jnp.abs(eps_hat - noise), axis=(1, 2, 3))
  l1_1, l1_2 = jnp.mean(l1[:b]), jnp.mean(l1[b:])
  x0_hat = diffusion.pred_x0_from_eps(x_t, t2, eps_hat)
  reg = jnp.mean(jnp.abs(mask * x0_hat[:b] - mask * x0_hat[b:]))
  loss = l1_1 + l1_2 + reg_coef * reg
  return loss, {"loss": loss, "l1_eps1": l1_1, "l1_eps2": l1_2, "l_reg": reg}


def masked_mean(diff, mask):
  """Per-frame mean of diff (n,H,W) over mask (n,H,W); 0 where the mask is empty."""
  num = jnp.sum(diff * mask, axis=(1, 2))
  den = jnp.sum(mask, axis=(1, 2))
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0), den > 0
