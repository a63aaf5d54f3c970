"""Alignment and dlib face features: synthetic checks plus the real office clip."""

import time

import cv2
import numpy as np
import pytest
import skimage.data

from s3jax import alignment as A
from s3jax import face_features as F
from s3jax import video as V

N_CLIP_FRAMES = 24
CLIP_WIDTH = 480


@pytest.fixture(scope="module")
def clip(office_clip_dir):
  frames, fps = V.read_frames(office_clip_dir, max_frames=N_CLIP_FRAMES, resize_width=CLIP_WIDTH)
  t = time.perf_counter()
  res = A.align_video(frames, size=256)
  per_frame = (time.perf_counter() - t) / len(frames)
  print(
      f"\nalign_video: {per_frame * 1000:.1f} ms/frame at {frames.shape[2]}x{frames.shape[1]}; "
      f"report={res.report}"
  )
  return frames, res


@pytest.fixture(scope="module")
def astronaut():
  return skimage.data.astronaut()


# ---------------------------------------------------------------- real clip


def test_clip_face_found_in_most_frames(clip):
  frames, res = clip
  frac = res.has_face.mean()
  print(f"face found in {100 * frac:.1f}% of {len(frames)} frames")
  assert frac >= 0.95
  assert res.crops.shape == (len(frames), 256, 256, 3) and res.crops.dtype == np.uint8
  assert res.quads.shape == res.raw_quads.shape == (len(frames), 4, 2)
  assert res.landmarks_crop.shape == (len(frames), 68, 2)
  assert res.passthrough == []


def test_clip_smoothing_reduces_jitter(clip):
  _, res = clip
  raw, smooth = A.quad_jitter(res.raw_quads), A.quad_jitter(res.quads)
  print(f"quad jitter raw={raw:.3f}px smoothed={smooth:.3f}px (frame 480 px wide)")
  assert smooth < 0.5 * raw
  # Smoothing must not drift the face away: centres stay within a few px.
  c_raw, _, _ = A.quad_to_cxy(res.raw_quads)
  c_s, _, _ = A.quad_to_cxy(res.quads)
  assert np.abs(c_raw - c_s).max() < 5.0


def test_clip_landmarks_land_on_canonical_face(clip):
  _, res = clip
  lm = res.landmarks_crop
  # FFHQ alignment puts the eyes on a fixed horizontal line near y ~ 0.47 * size.
  eyes_y = np.concatenate([lm[:, 36:48, 1]]).mean(axis=1) / 256
  assert np.all((eyes_y > 0.38) & (eyes_y < 0.55)), eyes_y
  # The shape predictor on the crop (canonical box) agrees with mapped landmarks.
  err = [np.abs(A.predict_landmarks_in_crop(c) - l).mean() for c, l in zip(res.crops[:6], lm[:6])]
  print("predicted-vs-mapped landmark error (px):", np.round(err, 2))
  assert max(err) < 2.0
  z = F.z_lnd_from_landmarks(lm, 256)
  assert z.shape == (len(lm), 102) and z.dtype == np.float32
  assert 0.0 <= z.min() and z.max() <= 1.0 and z.min() > 0.05 and z.max() < 0.95


def test_clip_identity_consistent(clip, astronaut):
  _, res = clip
  t = time.perf_counter()
  raw = F.dlib_descriptor(res.crops, normalize=False)
  per = (time.perf_counter() - t) / len(raw)
  dist = np.linalg.norm(raw - raw.mean(0), axis=1)
  print(
      f"dlib descriptor: {per * 1000:.0f} ms/crop; raw distance to the clip mean "
      f"max={dist.max():.3f} mean={dist.mean():.3f}"
  )
  # dlib's same-person threshold is 0.6 on the raw (unnormalised) descriptor.
  assert dist.max() < 0.6
  # A different person (the astronaut) is far from this one.
  lm = A.detect_landmarks(astronaut)
  other = F.dlib_descriptor(A.crop_from_quad(astronaut, A.ffhq_quad(lm), 256), normalize=False)[0]
  print(f"astronaut to clip mean: {np.linalg.norm(other - raw.mean(0)):.3f}")
  assert np.linalg.norm(other - raw.mean(0)) > 0.6
  z_id = F.identity_embeddings(res.crops[:3], res.landmarks_crop[:3])
  assert z_id.shape == (3, 128) and z_id.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(z_id, axis=1), 1.0, atol=1e-5)


def test_clip_gap_filling(clip):
  """Knock out detections: short gaps get interpolated, long ones pass through."""
  frames, res = clip
  quads = [q for q in res.raw_quads]
  for i in (5, 6):
    quads[i] = None
  for i in range(12, 20):
    quads[i] = None
  g = A.fill_face_gaps(quads, max_gap=3)
  assert g.interpolated[[5, 6]].all() and g.interpolated.sum() == 2
  assert g.passthrough == list(range(12, 20)) and g.long_gaps == [(12, 20)]
  c, _, _ = A.quad_to_cxy(g.quads)
  c0, _, _ = A.quad_to_cxy(res.raw_quads)
  assert np.abs(c[5:7] - c0[5:7]).max() < 10.0


# ---------------------------------------------------------------- synthetic


def test_astronaut_face_found_and_false_positive_rejected(astronaut):
  lm, score = A.detect_landmarks(astronaut, upsample=1, return_score=True)
  assert lm is not None and lm.shape == (68, 2) and score > 1.0
  # The face is at roughly (175..270, 76..170) in the 512 px image.
  assert 170 < lm[30, 0] < 280 and 80 < lm[30, 1] < 180
  rects, scores, _ = A.get_detector("hog").run(astronaut, 1, 0.0)
  assert len(rects) >= 1  # the 0.12-score false positive is dropped by min_score
  assert sum(s >= A.DEFAULT_HOG_MIN_SCORE for s in scores) == 1


def test_cnn_detector_option(astronaut):
  lm_cnn = A.detect_landmarks(astronaut, detector="cnn", upsample=0)
  lm_hog = A.detect_landmarks(astronaut)
  assert lm_cnn is not None
  assert np.abs(lm_cnn - lm_hog).mean() < 5.0


class _CountingHog:
  """dlib's HOG detector, counting ``run`` calls."""

  def __init__(self, det):
    self.det, self.calls = det, 0

  def run(self, img, upsample, threshold):
    self.calls += 1
    return self.det.run(img, upsample, threshold)


class _CountingCnn:
  """dlib's mmod detector, counting calls."""

  def __init__(self, det):
    self.det, self.calls = det, 0

  def __call__(self, img, upsample):
    self.calls += 1
    return self.det(img, upsample)


def _counting_cascade():
  hog, cnn = _CountingHog(A.get_detector("hog")), _CountingCnn(A.get_detector("cnn"))
  return [("hog", hog), ("cnn", cnn)], hog, cnn


@pytest.fixture(scope="module")
def hog_miss(astronaut):
  """The astronaut rotated by 50 degrees: HOG (frontal, upright) misses, the CNN finds it."""
  h, w = astronaut.shape[:2]
  m = cv2.getRotationMatrix2D((w / 2, h / 2), 50, 1.0)
  return cv2.warpAffine(astronaut, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def test_cascade_easy_frame_uses_hog_only(astronaut):
  stages, hog, cnn = _counting_cascade()
  found = A.detect_face(astronaut, detector=stages)
  assert found.source == "hog" and found.landmarks is not None
  assert hog.calls == 1 and cnn.calls == 0  # found at upsample 0; the CNN never runs
  np.testing.assert_allclose(found.landmarks, A.detect_landmarks(astronaut, detector="hog"))
  assert A.detect_face(astronaut, detector="cascade").source == "hog"


def test_cascade_finds_what_hog_misses(astronaut, hog_miss):
  assert A.detect_face(hog_miss, detector="hog") == (None, None, None)
  stages, hog, cnn = _counting_cascade()
  found = A.detect_face(hog_miss, detector=stages)
  assert hog.calls == 2 and cnn.calls == 1  # HOG at upsample 0 and 1, then the CNN at 0
  assert found.source == "cnn" and found.score >= A.DEFAULT_CNN_MIN_SCORE
  by_cnn = A.detect_face(hog_miss, detector="cnn")
  assert by_cnn.source == "cnn"
  np.testing.assert_allclose(found.landmarks, by_cnn.landmarks)
  # The face lands where the rotation takes the upright one (the 68-point predictor,
  # trained on upright faces, is only roughly right on a 50-degree roll).
  h, w = astronaut.shape[:2]
  m = cv2.getRotationMatrix2D((w / 2, h / 2), 50, 1.0)
  centre = m @ np.append(A.detect_landmarks(astronaut).mean(0), 1.0)
  assert np.linalg.norm(found.landmarks.mean(0) - centre) < 30.0


def test_align_video_reports_detector_per_frame(astronaut, hog_miss):
  stages, _, cnn = _counting_cascade()
  res = A.align_video([astronaut, hog_miss, astronaut], size=64, detector=stages, max_gap=0)
  assert res.detector_per_frame == ["hog", "cnn", "hog"]
  assert res.has_face.all() and cnn.calls == 1
  assert res.report["detector"] == "hog+cnn"
  assert res.report["detector_per_frame"] == ["hog", "cnn", "hog"]
  assert res.report["detector_counts"] == {"hog": 2, "cnn": 1}
  hog_only = A.align_video([astronaut, hog_miss, astronaut], size=64, detector="hog", max_gap=1)
  assert hog_only.detector_per_frame == ["hog", None, "hog"]
  assert hog_only.report["detector_counts"] == {"hog": 2}


def test_detector_names():
  assert A.detector_name("cascade") == "cascade"
  assert [k for k, _ in A.detector_stages("cascade")] == ["hog", "cnn"]
  with pytest.raises(ValueError):
    A.detector_stages("mtcnn")
  with pytest.raises(ValueError):
    A.detect_landmarks(np.zeros((8, 8, 3), np.uint8), detector=[("sift", None)])


def test_no_face():
  coins = skimage.data.coins()
  noise = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype(np.uint8)
  assert A.detect_landmarks(coins) is None
  assert A.detect_landmarks(noise) is None
  with pytest.raises(A.NoFaceError):
    A.align_video([noise, noise])
  with pytest.raises(A.NoFaceError):
    A.fill_face_gaps([None, None])
  with pytest.raises(ValueError):
    A.detect_landmarks(np.zeros((4, 4, 3), np.float32))


def test_model_paths_from_package():
  for name in (
      "shape_predictor_68_face_landmarks.dat",
      "mmod_human_face_detector.dat",
      "dlib_face_recognition_resnet_model_v1.dat",
  ):
    assert A.model_path(name).endswith(name)
  assert A.get_shape_predictor() is A.get_shape_predictor()  # cached


def _toy_landmarks():
  lm = np.zeros((68, 2))
  lm[36:42] = [100.0, 100.0]
  lm[42:48] = [140.0, 100.0]
  lm[48] = [105.0, 150.0]
  lm[54] = [135.0, 150.0]
  return lm


def test_ffhq_quad_geometry():
  q = A.ffhq_quad(_toy_landmarks())
  c, x, y = A.quad_to_cxy(q)
  # eye_avg (120, 100), eye_to_mouth (0, 50): c = (120, 105), x along +x of
  # length max(40 * 2, 50 * 1.8) = 90, y = rot90(x).
  np.testing.assert_allclose(c, [120, 105])
  np.testing.assert_allclose(x, [90, 0], atol=1e-9)
  np.testing.assert_allclose(y, [0, 90], atol=1e-9)
  np.testing.assert_allclose(q, [[30, 15], [30, 195], [210, 195], [210, 15]])
  np.testing.assert_allclose(A.cxy_to_quad(c, x, y), q)
  # Rotating the landmarks rotates the quad.
  th = np.deg2rad(20)
  r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
  np.testing.assert_allclose(A.ffhq_quad(_toy_landmarks() @ r.T), q @ r.T, atol=1e-9)


def test_matrices_and_crop():
  # FFHQ/STIT convention (PIL QUAD with quad + 0.5): the quad corners are the
  # crop's outer edges, so a quad from (29.5, 14.5) of side 180 is exactly
  # pixels [30:210] x [15:195].
  q = np.array([[29.5, 14.5], [29.5, 194.5], [209.5, 194.5], [209.5, 14.5]])
  m, inv = A.paste_matrix(q, 180), A.crop_matrix(q, 180)
  np.testing.assert_allclose(A.transform_points([[0, 0], [179, 179]], m), [[30, 15], [209, 194]])
  pts = np.random.RandomState(0).rand(10, 2) * 180
  np.testing.assert_allclose(A.transform_points(A.transform_points(pts, m), inv), pts, atol=1e-9)
  img = (np.random.RandomState(1).rand(240, 260, 3) * 255).astype(np.uint8)
  np.testing.assert_array_equal(A.crop_from_quad(img, q, 180), img[15:195, 30:210])
  # Downscaled 2x: equal to a 2x2 box filter of that crop (up to rounding).
  half = img[15:195, 30:210].astype(np.float64).reshape(90, 2, 90, 2, 3).mean((1, 3))
  assert np.abs(A.crop_from_quad(img, q, 90).astype(np.float64) - half).max() <= 1.0
  # Landmarks follow the crop: frame pixel 120 is crop coordinate (120 - 29.5) / 2 - 0.5.
  np.testing.assert_allclose(A.landmarks_in_crop([[120, 105]], q, 90), [[44.75, 44.75]])
  # A rotated quad: paste(crop(frame)) reproduces the frame inside the quad.
  c, x, y = np.array([130.0, 120.0]), np.array([60.0, 25.0]), np.array([-25.0, 60.0])
  rq = A.cxy_to_quad(c, x, y)
  smooth = np.ascontiguousarray(
      np.linspace(0, 255, 260)[None, :, None].repeat(240, 0).repeat(3, 2).astype(np.uint8)
  )
  crop = A.crop_from_quad(smooth, rq, 128)
  # The quad centre is the crop centre; crop pixels sample the frame where paste_matrix says.
  np.testing.assert_allclose(
      A.transform_points([c], A.crop_matrix(rq, 128)), [[63.5, 63.5]], atol=1e-9
  )
  for u, v in [(10, 20), (100, 64), (64, 120)]:
    fx = A.transform_points([[u, v]], A.paste_matrix(rq, 128))[0, 0]
    assert abs(float(crop[v, u, 0]) - fx * 255 / 259) <= 1.5


def test_smooth_and_jitter_synthetic():
  rng = np.random.RandomState(0)
  t = np.arange(40, dtype=np.float64)
  c = np.stack([100 + 2 * t, 80 + t], 1)
  x = np.tile([[50.0, 0.0]], (40, 1))
  y = np.tile([[0.0, 50.0]], (40, 1))
  clean = A.cxy_to_quad(c, x, y)
  assert A.quad_jitter(clean) < 1e-9
  noisy = A.cxy_to_quad(c + rng.randn(40, 2) * 2, x + rng.randn(40, 2), y + rng.randn(40, 2))
  sm = A.smooth_quads(noisy)
  print(f"synthetic jitter raw={A.quad_jitter(noisy):.2f} smoothed={A.quad_jitter(sm):.2f}")
  assert A.quad_jitter(sm) < 0.4 * A.quad_jitter(noisy)
  np.testing.assert_allclose(A.smooth_quads(np.repeat(clean[:1], 5, 0)), np.repeat(clean[:1], 5, 0))


def test_fill_face_gaps_interpolates_linearly():
  qs = [A.cxy_to_quad([10.0 * i, 0.0], [5.0, 0.0], [0.0, 5.0]) for i in range(8)]
  holes = [None, qs[1], None, None, qs[4], qs[5], None, None]
  g = A.fill_face_gaps(holes, max_gap=2)
  np.testing.assert_allclose(g.quads[1:6], np.stack(qs[1:6]))  # interior: linear
  np.testing.assert_allclose(g.quads[0], qs[1])  # edge: hold
  np.testing.assert_allclose(g.quads[6], qs[5])
  assert g.interpolated.tolist() == [True, False, True, True, False, False, True, True]
  assert g.passthrough == []
  g = A.fill_face_gaps(holes, max_gap=1)
  assert g.passthrough == [2, 3, 6, 7] and g.long_gaps == [(2, 4), (6, 8)]


def test_flip_landmarks(astronaut):
  perm = F.FLIP_PERMUTATION
  np.testing.assert_array_equal(perm[perm], np.arange(68))
  lm = A.detect_landmarks(astronaut)
  q = A.ffhq_quad(lm)
  crop = A.crop_from_quad(astronaut, q, 256)
  lmc = A.landmarks_in_crop(lm, q, 256)
  flipped = F.flip_landmarks(lmc, 256)
  np.testing.assert_allclose(F.flip_landmarks(flipped, 256), lmc)
  # Semantics survive: index 36..41 is still the image-left eye, and dlib on the
  # mirrored crop finds (nearly) the flipped points.
  assert flipped[36:42, 0].mean() < flipped[42:48, 0].mean()
  pred = A.predict_landmarks_in_crop(np.ascontiguousarray(crop[:, ::-1]))
  err = np.abs(pred - flipped).mean()
  print(f"flip: dlib on mirrored crop vs flipped landmarks {err:.2f}px")
  assert err < 3.0


def test_z_lnd_convention():
  lm = np.full((68, 2), 128.0)
  lm[17] = [16.0, 240.0]
  lm[18] = [240.0, 16.0]
  lm[19] = [0.0, 255.0]  # clamped
  z = F.z_lnd_from_landmarks(lm, 256)
  assert z.shape == (102,)
  np.testing.assert_allclose(z[:6], [0, 1, 1, 0, 0, 1])
  np.testing.assert_allclose(z[6:], (128 - 16) / 224, rtol=1e-6)
  # A 512 px crop with the same content gives the same z_lnd.
  z512 = F.z_lnd_from_landmarks((lm + 0.5) * 2 - 0.5, 512)
  np.testing.assert_allclose(z512, z, atol=1e-6)


def test_hull_masks(astronaut):
  lm = A.detect_landmarks(astronaut)
  q = A.ffhq_quad(lm)
  lmc = A.landmarks_in_crop(lm, q, 256)
  face = F.hull_mask(lmc, 256, for_video=True)
  train = F.hull_mask(lmc, 256)
  for m in (face, train):
    assert m.shape == (256, 256) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
  assert np.all(train >= face)  # training mask contains the face hull
  assert 0.15 < face.mean() < 0.45 and train.mean() > 1.4 * face.mean()
  brow_y = int(lmc[17:27, 1].min())
  lift = 0.12 * np.linalg.norm(lmc[17:27].mean(0) - lmc[8])  # brow lift of the face hull
  assert face[: int(brow_y - lift - 2)].sum() == 0  # face-only mask stops just above the brows
  assert train[: int(brow_y - lift - 2)].sum() > 1000  # the training mask covers the forehead/hair
  # Every landmark is inside the face mask.
  ij = np.clip(np.round(lmc).astype(int), 0, 255)
  assert face[ij[:, 1], ij[:, 0]].all()
