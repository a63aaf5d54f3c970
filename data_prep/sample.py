r"""A small face-video dataset built in seconds from faces shipped in packages.

  python -m data_prep.sample --out DIR [--size 64] [--frames 10]
      [--encoders DIR | --checkpoint FILE]                # official face features
  python -m data_prep.sample --clip CLIP.mp4 [--frames 24]   # one held-out video to edit

Sources (nothing is downloaded):
  * ``astronaut``: ``skimage.data.astronaut()`` (Eileen Collins, 512 px);
  * ``grace_hopper``: matplotlib's ``sample_data/grace_hopper.jpg``.

Each "video" is a still photo given smooth synthetic head motion -- a
similarity warp about the face centre whose rotation (up to ~7 deg), scale
(+-8%) and translation (up to ~6% of the frame) follow random sinusoids --
and a lighting change (global gain, colour cast and a moving left/right
gradient), rendered as 320x320 frames. The frames then go through the real
path: ``align_video`` (dlib), the dlib descriptor, z_lnd, hull masks (or, with
``--encoders`` / ``--checkpoint``, the official encoders as in
``data_prep.voxceleb``), and the TFDS ``voxceleb_faces`` writer (record layout:
``data_prep/tfds_builder.py``).

Splits: ``train`` holds 3 astronaut and 2 grace_hopper videos; ``test`` holds
one more video of each with unseen motion. With only two real identities the
sample's split is *by video*, not by identity as in ``data_prep.voxceleb``.
"""

from __future__ import annotations

import os
import pathlib
import sys

import cv2
import numpy as np

from data_prep import common, tfds_builder

FRAME_SIZE = 320
# (identity, number of train videos); each identity also gets one test video.
SAMPLE_IDENTITIES = (("astronaut", 3), ("grace_hopper", 2))


def source_image(identity: str) -> np.ndarray:
  """RGB uint8 photo of ``identity`` from an installed package."""
  if identity == "astronaut":
    import skimage.data  # pylint: disable=g-import-not-at-top

    return np.ascontiguousarray(skimage.data.astronaut()[..., :3])
  if identity == "grace_hopper":
    import matplotlib.cbook  # pylint: disable=g-import-not-at-top

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return common.read_image(path)
  raise ValueError(f"unknown sample identity {identity!r}")


def _face_box(img: np.ndarray):
  from s3jax import alignment  # pylint: disable=g-import-not-at-top

  lm = alignment.detect_landmarks(img)
  if lm is None:
    raise common.PrepError("sample source image: no face detected")
  centre = lm.mean(0)
  extent = float(np.max(lm.max(0) - lm.min(0)))
  return centre, extent


def synth_video(
    identity: str, n_frames: int, seed: int, frame_size: int = FRAME_SIZE
) -> list[np.ndarray]:
  """Frames of one synthetic video (smooth motion + lighting), RGB uint8."""
  img = source_image(identity).astype(np.float32)
  centre, extent = _face_box(img.astype(np.uint8))
  rng = np.random.default_rng(seed)
  # Base zoom: the face spans ~38% of the frame.
  base = 0.38 * frame_size / max(extent, 1.0)
  t = np.arange(n_frames) / max(n_frames - 1, 1)

  def wave(amp):
    f, ph = rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi)
    return amp * np.sin(2 * np.pi * f * t + ph)

  rot, scl = wave(7.0), 1.0 + wave(0.08)
  tx, ty = wave(0.06 * frame_size), wave(0.05 * frame_size)
  gain = 1.0 + wave(0.2)
  cast = np.stack([1.0 + wave(0.08) for _ in range(3)], -1)
  grad = wave(0.25)
  xs = np.linspace(-1.0, 1.0, frame_size, dtype=np.float32)[None, :, None]
  frames = []
  for i in range(n_frames):
    m = cv2.getRotationMatrix2D(
        (float(centre[0]), float(centre[1])), float(rot[i]), float(base * scl[i])
    )
    # Move the face centre to the frame centre, then add the translation.
    m[:, 2] += np.array([frame_size / 2 + tx[i], frame_size / 2 + ty[i]]) - centre
    warped = cv2.warpAffine(
        img, m, (frame_size, frame_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    light = gain[i] * cast[i][None, None, :] * (1.0 + grad[i] * xs)
    frames.append(np.clip(warped * light, 0, 255).astype(np.uint8))
  return frames


def _load_synth(identity, n_frames, seed):
  return synth_video(identity, n_frames, seed), {}


def sample_jobs(frames_per_video: int = 10, seed: int = 0) -> list[common.Job]:
  jobs = []
  for k, (ident, n_train) in enumerate(SAMPLE_IDENTITIES):
    for v in range(n_train + 1):
      split = "test" if v == n_train else "train"
      vid = f"{ident}/{split}_{v:02d}"
      s = seed * 1000 + k * 100 + v
      jobs.append(
          common.Job(
              key=common.safe_key(vid),
              path=f"synthetic:{ident}",
              video_id=vid,
              identity=ident,
              load=_load_synth,
              load_args=(ident, frames_per_video, s),
          )
      )
  return jobs


def build_sample_dataset(
    out_dir: str | os.PathLike,
    size: int = 64,
    frames_per_video: int = 10,
    seed: int = 0,
    progress: bool = False,
    features=None,
) -> pathlib.Path:
  """Builds (or resumes) the sample into ``out_dir``; returns the version dir.

  ``out_dir`` gets the same layout as ``data_prep.voxceleb``: units/,
  report.json and ``voxceleb_faces/1.0.0``. ``features``: None (dlib) or an
  ``OfficialFeatures`` (``common.load_official_features``).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  jobs = sample_jobs(frames_per_video, seed)
  statuses = common.run_jobs(
      jobs,
      out_dir,
      size=size,
      detector="hog",
      max_gap=5,
      workers=1,
      progress=progress,
      features=features,
  )
  failed = [s for s in statuses if s["status"] != "ok"]
  version_dir = common.build_from_statuses(
      out_dir,
      jobs,
      statuses,
      lambda j: "/test_" in j.video_id,
      tfds_builder.VoxcelebFaces,
      features=features,
  )
  common.write_report(
      out_dir,
      statuses,
      {
          "command": " ".join(sys.argv),
          "size": size,
          "detector": "hog",
          "dataset_dir": str(version_dir) if version_dir else None,
          "kind": "sample",
          **common.features_info(features),
      },
  )
  if failed or version_dir is None:
    raise RuntimeError(
        f"sample dataset: {len(failed)} videos failed: "
        f"{[(s['video_id'], s['reason']) for s in failed]}"
    )
  return version_dir


def ensure_sample_dataset(data_dir: str | os.PathLike, size: int = 64, **kwargs) -> pathlib.Path:
  """Returns the dataset in ``data_dir``; builds the sample there if none exists.

  An existing dataset of another crop size or other face features (``features``
  kwarg, see ``build_sample_dataset``) is an error (not overwritten).
  """
  from s3jax.input_pipeline import find_version_dir  # pylint: disable=g-import-not-at-top

  try:
    version_dir = find_version_dir(data_dir)
  except FileNotFoundError:
    return build_sample_dataset(data_dir, size=size, **kwargs)
  from s3jax.input_pipeline import FrameSource  # pylint: disable=g-import-not-at-top
  from data_prep.tfds_builder import decode_png  # pylint: disable=g-import-not-at-top

  have = decode_png(FrameSource(version_dir, "train")[0]["image"]).shape[0]
  if have != size:
    raise ValueError(
        f"{version_dir} holds {have} px frames, config wants {size} px; "
        f"point data_dir elsewhere or delete it"
    )
  from s3jax.input_pipeline import check_face_features  # pylint: disable=g-import-not-at-top

  check_face_features(version_dir, common.features_info(kwargs.get("features"))["face_features"])
  return version_dir


def write_sample_clip(
    path, identity: str = "grace_hopper", n_frames: int = 24, seed: int = 1234, fps: float = 25.0
) -> pathlib.Path:
  """An MP4 of a sample identity with motion unseen in the dataset (the demo edits it)."""
  from s3jax import video  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  video.write_video(path, synth_video(identity, n_frames, seed), fps)
  return path


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  f = flags.FLAGS
  if f.clip:
    print(f"sample clip: {write_sample_clip(f.clip, n_frames=f.frames)}")
    return
  if not f.out:
    raise SystemExit("--out (or --clip) is required")
  import time  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  features = common.load_official_features(f.encoders, f.checkpoint, f.encoder_batch)
  # Idempotent, so `make demo` can run it every time.
  version_dir = ensure_sample_dataset(
      f.out, size=f.size, frames_per_video=f.frames, seed=f.seed, progress=True, features=features
  )
  print(f"sample dataset: {version_dir} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string("clip", None, "Instead of a dataset, write one held-out sample video here.")
  flags.DEFINE_integer("size", 64, "Crop size (px).")
  flags.DEFINE_integer("frames", 10, "Frames per video.")
  flags.DEFINE_integer("seed", 0, "Motion/lighting seed.")
  common.define_feature_flags()
  app.run(main)
