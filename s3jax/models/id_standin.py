"""A small differentiable identity network distilled from the dlib descriptor.

S3Editor's identity loss needs a differentiable face-identity network. The
paper uses ArcFace (IR-SE50); its weights cannot be downloaded here, and the
dlib descriptor that stands in for z_id offline is not differentiable (it is
a C++ ResNet). docs/design.md allows "a small Flax CNN distilled from the dlib
descriptor on the training frames" as the stand-in; this module is that CNN.

``IdentityNet(image (N, H, W, 3) in [-1, 1]) -> (N, D)`` L2-normalised, any
H = W (resized to ``input_size`` first). The ``id_standin`` trainer
(``s3jax.training.id_standin``) fits it with the cosine loss
``1 - cos(net(frame), z_id(frame))`` against the descriptors the shards
already hold, so nothing new is computed with dlib; ``loading.load_id_standin``
loads it. :func:`agreement` reports how closely it agrees with dlib.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IdentityNet",
    "make_identity_net",
    "init_params",
    "frames_and_targets",
    "agreement",
    "REPORT_FILE",
]

REPORT_FILE = "id_standin_report.json"


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


def make_identity_net(model_config) -> IdentityNet:
  """The stand-in described by the ``model`` block of ``configs/id_standin.py``."""
  return IdentityNet(
      features=int(model_config.features),
      width=int(model_config.width),
      depth=int(model_config.depth),
      input_size=int(model_config.input_size),
  )


def init_params(model: IdentityNet, rng):
  return model.init(rng, jnp.zeros((1, model.input_size, model.input_size, 3)))["params"]


def frames_and_targets(batch):
  """Pipeline batch (B, k, ...) -> frames (B*k, H, W, 3) and unit z_id targets (B*k, D)."""
  img = np.asarray(batch["image"], np.float32)
  z = np.asarray(batch["z_id"], np.float32)
  img, z = img.reshape((-1,) + img.shape[-3:]), z.reshape(-1, z.shape[-1])
  return img, z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


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
    img, z = frames_and_targets(b)
    es.append(np.asarray(fn(jnp.asarray(img))))
    zs.append(z)
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
