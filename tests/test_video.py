"""Video I/O and paste-back."""

import time

import cv2
import numpy as np
import pytest

from s3jax import alignment as A
from s3jax import face_features as F
from s3jax import video as V


def _frames(n=8, h=64, w=96, seed=0):
  rng = np.random.RandomState(seed)
  base = cv2.resize(
      (rng.rand(4, 6, 3) * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC
  )
  return np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)])


# ------------------------------------------------------------------ I/O


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001])
def test_write_read_round_trip(tmp_path, fps):
  frames = _frames()
  path = tmp_path / "clip.mp4"
  V.write_video(path, frames, fps)
  back, fps_back = V.read_frames(path)
  assert back.shape == frames.shape and back.dtype == np.uint8
  assert fps_back == pytest.approx(fps, rel=1e-4)
  assert np.abs(back.astype(int) - frames).mean() < 6.0  # lossy H.264 at crf 18
  first, _ = V.read_frames(path, max_frames=3)
  assert len(first) == 3


def test_write_odd_size_pads(tmp_path):
  frames = _frames(n=3, h=63, w=95)
  V.write_video(tmp_path / "odd.mp4", frames, 10)
  back, _ = V.read_frames(tmp_path / "odd.mp4")
  assert back.shape == (3, 64, 96, 3)
  assert np.abs(back[:, :63, :95].astype(int) - frames).mean() < 6.0


def test_side_by_side(tmp_path):
  left, right = _frames(n=4), _frames(n=4, h=32, w=48, seed=1)
  V.write_side_by_side(tmp_path / "sbs.mp4", left, right, 12)
  back, fps = V.read_frames(tmp_path / "sbs.mp4")
  assert back.shape == (4, 64, 96 + 96, 3) and fps == pytest.approx(12)


def test_read_folder_natural_order(tmp_path):
  frames = _frames(n=12)
  for i, f in enumerate(frames):
    cv2.imwrite(str(tmp_path / f"f{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  (tmp_path / "notes.txt").write_text("not an image")
  back, fps = V.read_frames(tmp_path)
  assert fps == V.DEFAULT_FOLDER_FPS
  np.testing.assert_array_equal(back, frames)  # f2 before f10; PNG is lossless
  small, _ = V.read_frames(tmp_path, max_frames=5, resize_width=48)
  assert small.shape == (5, 32, 48, 3)


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    V.read_frames(tmp_path / "missing.mp4")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(V.VideoReadError, match="no images"):
    V.read_frames(empty)
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(np.random.RandomState(0).bytes(4096))
  with pytest.raises(V.VideoReadError):
    V.read_frames(bad)
  # A real file truncated to its header is also refused cleanly.
  V.write_video(tmp_path / "ok.mp4", _frames(n=4), 10)
  trunc = tmp_path / "trunc.mp4"
  trunc.write_bytes((tmp_path / "ok.mp4").read_bytes()[:200])
  with pytest.raises(V.VideoReadError):
    V.read_frames(trunc)
  (empty / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(V.VideoReadError, match="cannot read image"):
    V.read_frames(empty)


# ------------------------------------------------------------------ paste-back


def _paste_case(seed=0, angle=17.0, side=150.0):
  rng = np.random.RandomState(seed)
  frame = (rng.rand(240, 320, 3) * 255).astype(np.uint8)
  crop = (rng.rand(128, 128, 3) * 255).astype(np.uint8)
  th = np.deg2rad(angle)
  x = side / 2 * np.array([np.cos(th), np.sin(th)])
  y = np.array([-x[1], x[0]])
  quad = A.cxy_to_quad([150.0, 120.0], x, y)
  mask = np.zeros((128, 128), np.uint8)
  cv2.circle(mask, (64, 70), 40, 1, -1)
  return frame, crop, quad, mask


@pytest.mark.parametrize("blend", ["hard", "feather", "poisson"])
def test_paste_back_outside_support_bit_identical(blend):
  frame, crop, quad, mask = _paste_case()
  out, alpha, support = V.paste_back(frame, crop, quad, mask, blend=blend, return_mask=True)
  assert out.shape == frame.shape and out.dtype == np.uint8
  assert alpha.shape == support.shape == frame.shape[:2]
  np.testing.assert_array_equal(out[~support], frame[~support])
  assert np.all(alpha[~support] == 0) and 0 <= alpha.min() and alpha.max() <= 1
  assert (out[support] != frame[support]).mean() > 0.5  # the crop did land inside
  # The support is the warped mask dilated: its area is about the disc's area scaled.
  s2 = (150.0 / 128) ** 2
  d = V.BLEND_DEFAULTS[blend]["dilate"] * 150.0 / 128
  expect = np.pi * (40 * 150.0 / 128 + d) ** 2
  assert abs(support.sum() - expect) < 0.08 * expect, (support.sum(), expect, s2)


def test_paste_back_hard_and_feather_alpha():
  frame, crop, quad, mask = _paste_case(seed=1)
  _, a_hard, s_hard = V.paste_back(frame, crop, quad, mask, blend="hard", return_mask=True)
  _, a_f, s_f = V.paste_back(frame, crop, quad, mask, blend="feather", return_mask=True)
  assert set(np.unique(a_hard)) <= {0.0, 1.0}
  assert np.all(s_f >= s_hard)  # feather support = dilated hard mask
  inner = s_hard.astype(bool)
  assert a_f[inner].min() > 0.9 and a_f[inner].mean() > 0.99  # the face itself is replaced
  ring = s_f & ~s_hard
  assert 0.05 < a_f[ring].mean() < 0.7  # and the border is a soft ramp
  # With explicit dilate/blur the guarantee still holds.
  out, _, sup = V.paste_back(
      frame, crop, quad, mask * 255, blend="feather", dilate=4, blur=2, return_mask=True
  )
  np.testing.assert_array_equal(out[~sup], frame[~sup])


def test_paste_back_quad_partly_outside_frame():
  frame, crop, _, mask = _paste_case()
  quad = A.cxy_to_quad([10.0, 230.0], [80.0, 0.0], [0.0, 80.0])
  for blend in ("hard", "feather", "poisson"):
    out, _, sup = V.paste_back(frame, crop, quad, mask, blend=blend, return_mask=True)
    np.testing.assert_array_equal(out[~sup], frame[~sup])
  far = A.cxy_to_quad([-500.0, -500.0], [50.0, 0.0], [0.0, 50.0])
  np.testing.assert_array_equal(V.paste_back(frame, crop, far, mask), frame)


def test_paste_back_real_clip_identity(office_clip_dir):
  """Unedited crops pasted back reproduce the frame; an edit lands on the face."""
  frames, _ = V.read_frames(office_clip_dir, max_frames=12, resize_width=480)
  res = A.align_video(frames, size=256)
  i = 6
  mask = F.hull_mask(res.landmarks_crop[i], 256, for_video=True)
  for blend in ("hard", "feather", "poisson"):
    t = time.perf_counter()
    out, alpha, sup = V.paste_back(
        frames[i], res.crops[i], res.quads[i], mask, blend=blend, return_mask=True
    )
    dt = time.perf_counter() - t
    err = np.abs(out.astype(int) - frames[i])[sup].mean()
    print(f"{blend}: {dt * 1000:.1f} ms, mean |diff| inside support {err:.2f}")
    assert err < 3.0
    np.testing.assert_array_equal(out[~sup], frames[i][~sup])
  # The support covers the nose tip, not the frame corners.
  nose = A.transform_points(res.landmarks_crop[i][30:31], A.paste_matrix(res.quads[i], 256))[0]
  assert sup[int(round(nose[1])), int(round(nose[0]))]
  assert not sup[0, 0] and not sup[-1, -1]
