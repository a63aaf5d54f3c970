"""The reference DVA's frozen face encoders in Flax (inference only).

* :class:`IRSE50`: IR-SE50 ArcFace backbone (112 px input, 512-d L2-normalised output).
* :class:`MobileNetGDConv`: MobileNetV2 with a global depthwise conv head, 68x2 landmarks.
* :class:`BiSeNet`: BiSeNet face parsing (19 classes), the ResNet18 context-path variant.
* :class:`OfficialEncoders`: the reference's wrapper (crops, pooling, normalisation,
  parsing masks) around the three networks.

Conventions: images are NHWC float32 in [-1, 1]; parameters are float32; ``dtype``
changes the compute dtype of convolutions, dense layers and norms only. BatchNorm
always uses its running statistics (``batch_stats`` collection).

Resizing follows PyTorch exactly (the reference's ``AdaptiveAvgPool2d``,
``F.interpolate(mode='nearest')`` and ``F.interpolate(mode='bilinear',
align_corners=True)``); see the ``_*_matrix`` / ``_nearest_index`` helpers.
Parameter names are chosen so that :mod:`s3jax.porting.encoder_keys` can map them
one-to-one to the reference's ``state_dict`` keys.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# BiSeNet (CelebAMask-HQ) label ids the reference treats as background.
# Training mask: everything except background (0), hat (18) and cloth (16).
MASK_BACKGROUND_CLASSES = (0, 18, 16)
# Video paste-back mask additionally drops the ears (7, 8), the neck (14) and hair (17).
VIDEO_MASK_EXTRA_BACKGROUND_CLASSES = (7, 8, 14, 17)


# IR-SE50 unit layout: (in_channels, depth, stride) per bottleneck, 3+4+14+3 = 24 units.
def _irse50_units() -> list[tuple[int, int, int]]:
  units = []
  for cin, depth, n in ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)):
    units.append((cin, depth, 2))
    units.extend((depth, depth, 1) for _ in range(n - 1))
  return units


IRSE50_UNITS = tuple(_irse50_units())

# torchvision MobileNetV2 inverted-residual settings (expand t, channels c, repeats n, stride s).
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _mobilenet_v2_blocks() -> list[tuple[int, int, int, int]]:
  """(in_channels, out_channels, stride, expand_ratio) for features.1 .. features.17."""
  blocks, cin = [], 32
  for t, c, n, s in MOBILENET_V2_SETTINGS:
    for i in range(n):
      blocks.append((cin, c, s if i == 0 else 1, t))
      cin = c
  return blocks


MOBILENET_V2_BLOCKS = tuple(_mobilenet_v2_blocks())


# ----------------------------------------------------------------------------------------
# Resizing exactly as PyTorch does it.
# ----------------------------------------------------------------------------------------
def _adaptive_avg_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging matrix of torch's AdaptiveAvgPool along one axis.

  Bin i covers [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)).
  """
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  if h % size[0] == 0 and w % size[1] == 0:
    kh, kw = h // size[0], w // size[1]
    return nn.avg_pool(x, (kh, kw), strides=(kh, kw))
  mh = jnp.asarray(_adaptive_avg_matrix(h, size[0]))
  mw = jnp.asarray(_adaptive_avg_matrix(w, size[1]))
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=jax.lax.Precision.HIGHEST)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source indices of torch's F.interpolate(mode='nearest') (float32 scale, floor)."""
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """F.interpolate(x, size, mode='nearest') on NHWC (also works for integer/bool arrays)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  x = jnp.take(x, jnp.asarray(_nearest_index(h, size[0])), axis=1)
  return jnp.take(x, jnp.asarray(_nearest_index(w, size[1])), axis=2)


def _bilinear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of bilinear resize with align_corners=True."""
  m = np.zeros((n_out, n_in), np.float64)
  if n_out == 1 or n_in == 1:
    m[:, 0] = 1.0
    return m.astype(np.float32)
  src = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """F.interpolate(x, size, mode='bilinear', align_corners=True) on NHWC."""
  h, w = x.shape[1:3]
  mh = jnp.asarray(_bilinear_align_corners_matrix(h, size[0]), x.dtype)
  mw = jnp.asarray(_bilinear_align_corners_matrix(w, size[1]), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=jax.lax.Precision.HIGHEST)


def imagenet_normalize(x01: jax.Array) -> jax.Array:
  mean = jnp.asarray(IMAGENET_MEAN, x01.dtype)
  std = jnp.asarray(IMAGENET_STD, x01.dtype)
  return (x01 - mean) / std


# ----------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------
def conv2d(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    *,
    dtype: Dtype,
    name: str,
    use_bias: bool = False,
) -> nn.Conv:
  """PyTorch-style Conv2d: explicit symmetric padding (never 'SAME')."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def batch_norm(*, dtype: Dtype, name: str) -> nn.BatchNorm:
  """torch BatchNorm2d in eval mode: running statistics (``batch_stats``), eps 1e-5."""
  return nn.BatchNorm(
      use_running_average=True,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


class PReLU(nn.Module):
  """Per-channel PReLU (torch.nn.PReLU(num_parameters=C)); param ``alpha`` (C,)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(0.25), (self.features,), jnp.float32)
    alpha = alpha.astype(x.dtype)
    return jnp.where(x >= 0, x, alpha * x)


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm + optional activation ('relu' | 'relu6' | None)."""

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  act: str | None = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv2d(
        self.features,
        self.kernel,
        self.stride,
        self.padding,
        self.groups,
        dtype=self.dtype,
        name="conv",
    )(x)
    x = batch_norm(dtype=self.dtype, name="bn")(x)
    if self.act == "relu":
      x = nn.relu(x)
    elif self.act == "relu6":
      x = jnp.clip(x, 0, 6)
    return x


# ----------------------------------------------------------------------------------------
# IR-SE50 (ArcFace).
# ----------------------------------------------------------------------------------------
class BottleneckIRSE(nn.Module):
  in_channels: int
  depth: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, dt = self.depth, self.dtype
    if self.in_channels == self.depth:
      shortcut = x[:, :: self.stride, :: self.stride, :]  # MaxPool2d(1, stride)
    else:
      shortcut = conv2d(d, 1, self.stride, dtype=dt, name="shortcut_conv")(x)
      shortcut = batch_norm(dtype=dt, name="shortcut_bn")(shortcut)
    r = batch_norm(dtype=dt, name="bn0")(x)
    r = conv2d(d, 3, 1, 1, dtype=dt, name="conv1")(r)
    r = PReLU(d, dtype=dt, name="prelu")(r)
    r = conv2d(d, 3, self.stride, 1, dtype=dt, name="conv2")(r)
    r = batch_norm(dtype=dt, name="bn2")(r)
    # Squeeze-and-excitation (reduction 16, bias-free 1x1 convs).
    s = jnp.mean(r, axis=(1, 2), keepdims=True)
    s = nn.relu(conv2d(d // 16, 1, dtype=dt, name="se_fc1")(s))
    s = nn.sigmoid(conv2d(d, 1, dtype=dt, name="se_fc2")(s))
    return r * s + shortcut


class IRSE50(nn.Module):
  """IR-SE50 backbone on 112x112 NHWC input (already cropped/pooled); returns L2-normalised (N, 512)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    x = x.astype(dt)
    x = conv2d(64, 3, 1, 1, dtype=dt, name="input_conv")(x)
    x = batch_norm(dtype=dt, name="input_bn")(x)
    x = PReLU(64, dtype=dt, name="input_prelu")(x)
    for i, (cin, depth, stride) in enumerate(IRSE50_UNITS):
      x = BottleneckIRSE(cin, depth, stride, dtype=dt, name=f"body_{i}")(x)
    x = batch_norm(dtype=dt, name="output_bn")(x)
    # Dropout is a no-op in eval; torch's Flatten is channel-major (NCHW).
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(512, dtype=dt, param_dtype=jnp.float32, name="output_linear")(x)
    x = batch_norm(dtype=dt, name="output_bn1d")(x)
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------
# MobileNetV2 with GDConv head (landmarks).
# ----------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    hidden = self.in_channels * self.expand_ratio
    h = x
    if self.expand_ratio != 1:
      h = ConvBN(hidden, 1, act="relu6", dtype=dt, name="expand")(h)
    h = ConvBN(hidden, 3, self.stride, 1, groups=hidden, act="relu6", dtype=dt, name="dw")(h)
    h = ConvBN(self.out_channels, 1, act=None, dtype=dt, name="project")(h)
    if self.stride == 1 and self.in_channels == self.out_channels:
      h = h + x
    return h


class MobileNetGDConv(nn.Module):
  """MobileNetV2 features + GDConv head on 224x224 NHWC (ImageNet-normalised); (N, 136).

  ``keep_imagenet_head`` declares the unused ImageNet classifier of the wrapped
  torchvision model (``pretrain_net.classifier.1``) so checkpoints round-trip losslessly;
  it never takes part in the forward pass.
  """

  num_outputs: int = 136
  keep_imagenet_head: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    if self.keep_imagenet_head:
      self.param("classifier_kernel", nn.initializers.zeros, (1280, 1000), jnp.float32)
      self.param("classifier_bias", nn.initializers.zeros, (1000,), jnp.float32)
    x = x.astype(dt)
    x = ConvBN(32, 3, 2, 1, act="relu6", dtype=dt, name="features_0")(x)
    for i, (cin, cout, stride, t) in enumerate(MOBILENET_V2_BLOCKS, start=1):
      x = InvertedResidual(cin, cout, stride, t, dtype=dt, name=f"features_{i}")(x)
    x = ConvBN(1280, 1, act="relu6", dtype=dt, name=f"features_{len(MOBILENET_V2_BLOCKS) + 1}")(x)
    x = ConvBN(1280, 7, groups=1280, act=None, dtype=dt, name="linear7")(x)
    x = ConvBN(self.num_outputs, 1, act=None, dtype=dt, name="linear1")(x)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# BiSeNet (face parsing).
# ----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
  in_channels: int
  out_channels: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    r = conv2d(self.out_channels, 3, self.stride, 1, dtype=dt, name="conv1")(x)
    r = nn.relu(batch_norm(dtype=dt, name="bn1")(r))
    r = conv2d(self.out_channels, 3, 1, 1, dtype=dt, name="conv2")(r)
    r = batch_norm(dtype=dt, name="bn2")(r)
    if self.in_channels != self.out_channels or self.stride != 1:
      x = conv2d(self.out_channels, 1, self.stride, dtype=dt, name="downsample_conv")(x)
      x = batch_norm(dtype=dt, name="downsample_bn")(x)
    return nn.relu(x + r)


class ResNet18(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    x = conv2d(64, 7, 2, 3, dtype=dt, name="conv1")(x)
    x = nn.relu(batch_norm(dtype=dt, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats, cin = [], 64
    for li, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      x = BasicBlock(cin, cout, stride, dtype=dt, name=f"layer{li}_0")(x)
      x = BasicBlock(cout, cout, 1, dtype=dt, name=f"layer{li}_1")(x)
      cin = cout
      feats.append(x)
    return feats[1], feats[2], feats[3]  # 1/8, 1/16, 1/32


class AttentionRefinement(nn.Module):
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    feat = ConvBN(self.out_channels, 3, 1, 1, dtype=dt, name="conv")(x)
    a = jnp.mean(feat, axis=(1, 2), keepdims=True)
    a = conv2d(self.out_channels, 1, dtype=dt, name="conv_atten")(a)
    a = nn.sigmoid(batch_norm(dtype=dt, name="bn_atten")(a))
    return feat * a


class ContextPath(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    feat8, feat16, feat32 = ResNet18(dtype=dt, name="resnet")(x)
    avg = jnp.mean(feat32, axis=(1, 2), keepdims=True)
    avg = ConvBN(128, 1, dtype=dt, name="conv_avg")(avg)
    avg_up = resize_nearest(avg, feat32.shape[1:3])
    feat32_sum = AttentionRefinement(128, dtype=dt, name="arm32")(feat32) + avg_up
    feat32_up = resize_nearest(feat32_sum, feat16.shape[1:3])
    feat32_up = ConvBN(128, 3, 1, 1, dtype=dt, name="conv_head32")(feat32_up)
    feat16_sum = AttentionRefinement(128, dtype=dt, name="arm16")(feat16) + feat32_up
    feat16_up = resize_nearest(feat16_sum, feat8.shape[1:3])
    feat16_up = ConvBN(128, 3, 1, 1, dtype=dt, name="conv_head16")(feat16_up)
    return feat8, feat16_up, feat32_up


class FeatureFusion(nn.Module):
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, fsp, fcp):
    dt = self.dtype
    feat = ConvBN(self.out_channels, 1, dtype=dt, name="convblk")(
        jnp.concatenate([fsp, fcp], axis=-1)
    )
    a = jnp.mean(feat, axis=(1, 2), keepdims=True)
    a = nn.relu(conv2d(self.out_channels // 4, 1, dtype=dt, name="conv1")(a))
    a = nn.sigmoid(conv2d(self.out_channels, 1, dtype=dt, name="conv2")(a))
    return feat * a + feat


class BiSeNetOutput(nn.Module):
  mid_channels: int
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvBN(self.mid_channels, 3, 1, 1, dtype=self.dtype, name="conv")(x)
    return conv2d(self.num_classes, 1, dtype=self.dtype, name="conv_out")(x)


class BiSeNet(nn.Module):
  """BiSeNet on NHWC ImageNet-normalised input; returns the three logit maps at input size.

  With ``aux_outputs=False`` only the main head's logits are returned (the only one the
  reference uses); the auxiliary heads' parameters still exist.
  """

  num_classes: int = 19
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, aux_outputs: bool = True):
    dt = self.dtype
    h, w = x.shape[1:3]
    x = x.astype(dt)
    feat_res8, feat_cp8, feat_cp16 = ContextPath(dtype=dt, name="cp")(x)
    fuse = FeatureFusion(256, dtype=dt, name="ffm")(feat_res8, feat_cp8)
    out = BiSeNetOutput(256, self.num_classes, dtype=dt, name="conv_out")(fuse)
    out16 = BiSeNetOutput(64, self.num_classes, dtype=dt, name="conv_out16")(feat_cp8)
    out32 = BiSeNetOutput(64, self.num_classes, dtype=dt, name="conv_out32")(feat_cp16)
    up = lambda t: resize_bilinear_align_corners(t.astype(jnp.float32), (h, w))
    if not aux_outputs:
      return up(out)
    return up(out), up(out16), up(out32)


# ----------------------------------------------------------------------------------------
# The reference wrapper.
# ----------------------------------------------------------------------------------------
def face_mask_from_parsing(labels: jax.Array, for_video: bool = False) -> jax.Array:
  """Foreground mask (float32 0/1, same shape as ``labels``) from BiSeNet class ids.

  Training mask: every class except background 0, cloth 16 and hat 18. ``for_video``
  also drops ears 7/8, neck 14 and hair 17 (the reference's paste-back mask).
  """
  classes = MASK_BACKGROUND_CLASSES + (VIDEO_MASK_EXTRA_BACKGROUND_CLASSES if for_video else ())
  fg = jnp.ones(labels.shape, bool)
  for c in classes:
    fg = fg & (labels != c)
  return fg.astype(jnp.float32)


class OfficialEncoders(nn.Module):
  """The reference's frozen encoders (``DiffusionVideoAutoencoder`` minus ``linear``).

  Input ``x``: NHWC in [-1, 1], 256x256 (the size the reference's crops assume).
  Variables: ``{'params'|'batch_stats': {'idnet': ..., 'lndnet': ..., 'bgnet': ...}}``.
  """

  dtype: Dtype = jnp.float32
  parsing_size: int = 512

  def setup(self):
    self.idnet = IRSE50(dtype=self.dtype)
    self.lndnet = MobileNetGDConv(dtype=self.dtype)
    self.bgnet = BiSeNet(dtype=self.dtype)

  def id_feats(self, x):
    """(N, 512) L2-normalised ArcFace embedding of crop [35:223, 32:220], pooled to 112."""
    if x.shape[1] != 256:  # reference: AdaptiveAvgPool2d((256, 256)) first
      x = adaptive_avg_pool(x, (256, 256))
    x = x[:, 35:223, 32:220, :]
    x = adaptive_avg_pool(x, (112, 112))
    return self.idnet(x)

  def lnd_feats(self, x):
    """(N, 102): landmarks on crop [16:240] clamped to [0, 1], jaw points 0..16 dropped.

    Like the reference there is no resize: a non-224 input is cropped to [16:240]
    (exactly 224 px for a 256 px frame), a 224 px input is used as is.
    """
    if x.shape[1] != 224:
      x = x[:, 16:240, 16:240, :]
    out = self.lndnet(imagenet_normalize((x + 1.0) / 2.0))
    out = jnp.clip(out, 0.0, 1.0).reshape(x.shape[0], 68, 2)[:, 17:, :]
    return out.reshape(x.shape[0], -1)

  def parsing(self, x):
    """(N, P, P) int32 BiSeNet labels at the parsing size (nearest resize to P first)."""
    p = self.parsing_size
    x = resize_nearest(x, (p, p))
    x = imagenet_normalize((jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0)
    logits = self.bgnet(x, aux_outputs=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def _mask(self, labels, for_video, size):
    m = face_mask_from_parsing(labels, for_video)[..., None]
    return resize_nearest(m, size)

  def face_mask(self, x, for_video: bool = False):
    """(N, H, W, 1) float32 0/1 face mask (nearest resize of the parsing back to H x W)."""
    return self._mask(self.parsing(x), for_video, x.shape[1:3])

  def __call__(self, x):
    labels = self.parsing(x)
    return {
        "id_feats": self.id_feats(x),
        "lnd_feats": self.lnd_feats(x),
        "face_mask": self._mask(labels, False, x.shape[1:3]),
        "face_mask_video": self._mask(labels, True, x.shape[1:3]),
    }


def init_variables(model: OfficialEncoders | None = None, size: int = 256):
  """Abstract (``jax.eval_shape``) variables of ``model`` for a ``size`` px input."""
  model = model or OfficialEncoders()
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
