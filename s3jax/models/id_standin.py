"""A small differentiable identity network distilled from the dlib descriptor.

S3Editor's identity loss needs a differentiable face-identity network. The
paper uses ArcFace (IR-SE50); its weights cannot be downloaded here, and the
dlib descriptor that stands in for z_id offline is not differentiable (it is
a C++ ResNet). DESIGN.md allows "a small Flax CNN distilled from the dlib
descriptor on the training frames" as the stand-in; this module is that CNN.

``IdentityNet(image (N, H, W, 3) in [-1, 1]) -> (N, D)`` L2-normalised, any
H = W (resized to ``input_size`` first). :func:`distill` trains it with the
cosine loss ``1 - cos(net(frame), z_id(frame))`` against the descriptors the
shards already hold (``z_id`` / ``z_id_flip``), so nothing new is computed
with dlib. :func:`agreement` reports how closely it agrees with dlib.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

__all__ = ["IdentityNet", "distill", "agreement", "save", "load"]


class IdentityNet(nn.Module):
  """conv stack (stride 2) -> global mean pool -> Dense(D) -> L2 norm."""

  features: int = 128
  width: int = 32
  depth: int = 4
  input_size: int = 64

  @nn.compact
  def __call__(self, image):
    x = jnp.asarray(image, jnp.float32)
    if x.shape[1] != self.input_size or x.shape[2] != self.input_size:
      x = jax.image.resize(
          x, (x.shape[0], self.input_size, self.input_size, x.shape[3]), "linear", antialias=True
      )
    for i in range(self.depth):
      c = self.width * min(2**i, 4)
      x = nn.Conv(c, (3, 3), strides=(2, 2), name=f"conv{i}")(x)
      x = nn.GroupNorm(num_groups=min(8, c), name=f"norm{i}")(x)
      x = nn.silu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.features, name="head")(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _frames(batch):
  img = np.asarray(batch["image"], np.float32)
  z = np.asarray(batch["z_id"], np.float32)
  return img.reshape((-1,) + img.shape[-3:]), z.reshape(-1, z.shape[-1])


def distill(
    train_iterator,
    *,
    features: int = 128,
    steps: int = 300,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    depth: int = 4,
    input_size: int = 64,
    log_every: int = 50,
):
  """Fits an :class:`IdentityNet` to the z_id (dlib) of the frames of ``train_iterator``.

  ``train_iterator`` yields pipeline batches (``image`` (B, k, H, W, 3),
  ``z_id`` (B, k, D)). Returns ``(model, params, losses)``.
  """
  model = IdentityNet(features, width, depth, input_size)
  first = next(train_iterator)
  img, _ = _frames(first)
  params = model.init(jax.random.key(seed), jnp.asarray(img[:1]))["params"]
  tx = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  )
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, img, z):
    def loss_fn(p):
      e = model.apply({"params": p}, img)
      return jnp.mean(1.0 - jnp.sum(e * z, axis=-1))

    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  batch = first
  for i in range(steps):
    img, z = _frames(batch)
    zn = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    params, opt, loss = step(params, opt, jnp.asarray(img), jnp.asarray(zn))
    losses.append(float(loss))
    if log_every and (i + 1) % log_every == 0:
      print(
          f"id stand-in distillation step {i + 1}/{steps}: 1-cos {np.mean(losses[-log_every:]):.4f}",
          flush=True,
      )
    batch = next(train_iterator)
  return model, params, losses


def agreement(model, params, batches) -> dict:
  """Cosine agreement of the stand-in with the dlib descriptor on ``batches``.

  Returns mean/min cosine(net(frame), dlib z_id), the same for the
  trivial predictor "mean descriptor of these frames" (a baseline: with few
  identities it is already high), and how well the stand-in preserves
  pairwise similarities (Pearson r between the pairwise-cosine matrices of
  the stand-in and of dlib, off the diagonal).
  """
  fn = jax.jit(lambda x: model.apply({"params": params}, x))
  es, zs = [], []
  for b in batches:
    img, z = _frames(b)
    es.append(np.asarray(fn(jnp.asarray(img))))
    zs.append(z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12))
  e, z = np.concatenate(es), np.concatenate(zs)
  cos = np.sum(e * z, axis=-1)
  mean_z = z.mean(0)
  mean_z /= np.linalg.norm(mean_z)
  base = z @ mean_z
  iu = np.triu_indices(len(e), 1)
  pe, pz = (e @ e.T)[iu], (z @ z.T)[iu]
  r = (
      float(np.corrcoef(pe, pz)[0, 1])
      if len(pe) > 1 and pe.std() > 0 and pz.std() > 0
      else float("nan")
  )
  return {
      "num_frames": int(len(e)),
      "cos_mean": float(cos.mean()),
      "cos_min": float(cos.min()),
      "baseline_mean_descriptor_cos": float(base.mean()),
      "pairwise_similarity_pearson_r": r,
  }


def save(directory, model: IdentityNet, params, report: Optional[dict] = None) -> None:
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / "id_standin.msgpack").write_bytes(serialization.to_bytes(params))
  meta = {
      "features": model.features,
      "width": model.width,
      "depth": model.depth,
      "input_size": model.input_size,
      "report": report or {},
  }
  (d / "id_standin.json").write_text(json.dumps(meta, indent=2))


def load(directory):
  """Returns ``(model, params, meta)`` saved by :func:`save`."""
  d = pathlib.Path(directory)
  meta = json.loads((d / "id_standin.json").read_text())
  model = IdentityNet(meta["features"], meta["width"], meta["depth"], meta["input_size"])
  template = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, meta["input_size"], meta["input_size"], 3))
      )["params"]
  )
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  params = serialization.from_bytes(template, (d / "id_standin.msgpack").read_bytes())
  return model, params, meta


def exists(directory) -> bool:
  d = pathlib.Path(directory)
  return (d / "id_standin.msgpack").exists() and (d / "id_standin.json").exists()
