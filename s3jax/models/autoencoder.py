"""The diffusion video autoencoder: face-feature fusion (z_face) plus the noise predictor.

The frozen face encoders are not part of the trained model: their features
(`z_id`, `z_lnd`) are computed once in `data_prep` and stored in the shards,
so the train step only sees the fusion layer and the UNet. The parameter tree
mirrors the reference's names: `encoder/linear` is `encoder.linear.*` and
`unet/...` are the UNet keys.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from s3jax.models.unet import UNet, UNetConfig

LND_DIM = 102  # 68 landmarks x 2, minus the 17 jaw points


class FaceFusion(nn.Module):
  """z_face = Linear(cat(z_id, z_lnd)); the reference's `encoder.linear`."""

  features: int = 512

  @nn.compact
  def __call__(self, z_id, z_lnd):
    z = jnp.concatenate([z_id, z_lnd], axis=-1).astype(jnp.float32)
    return nn.Dense(self.features, name="linear")(z)


class DVA(nn.Module):
  """Noise predictor eps(x_t, t, z_face(z_id, z_lnd))."""

  unet_config: UNetConfig

  def setup(self):
    self.encoder = FaceFusion(self.unet_config.embed_channels)
    self.unet = UNet(self.unet_config)

  def z_face(self, z_id, z_lnd):
    return self.encoder(z_id, z_lnd)

  def denoise(self, x_t, t, z_face, train: bool = False):
    """Predicts eps from an already fused z_face (used by DDIM)."""
    return self.unet(x_t, t, z_face, train=train)

  def __call__(self, x_t, t, z_id, z_lnd, train: bool = False):
    return self.unet(x_t, t, self.encoder(z_id, z_lnd), train=train)


def make_dva(model_config: Any) -> DVA:
  """Builds the DVA from the `model` block of a config."""
  unet_fields = dict(model_config.unet)
  unet_fields["dtype"] = model_config.get("dtype", "float32")
  unet_fields["remat"] = model_config.get("remat", False)
  return DVA(UNetConfig(**unet_fields))


def id_dim(model_config: Any) -> int:
  """Width of z_id for the configured face-feature path."""
  return {"dlib": 128, "official": 512}[model_config.face_features]


def init_params(model: DVA, model_config: Any, rng):
  """Fresh DVA params for the configured image size and face-feature path."""
  size = model_config.unet.image_size
  dummy = (
      jnp.zeros((1, size, size, 3)),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, id_dim(model_config))),
      jnp.zeros((1, LND_DIM)),
  )
  return model.init({"params": rng}, *dummy)["params"]
