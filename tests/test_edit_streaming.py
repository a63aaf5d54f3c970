"""Long videos in bounded memory (s3jax.edit_stream): the streamed edit equals the in-memory
one, resumes from its per-chunk cache, and holds a few frames whatever the length.

Reuses tests/test_edit.py's tiny 32 px DVA and office-clip frames. The clip here is 11
frames with a short face gap (interpolated) and a long one (passed through), edited in
DDIM chunks of 2 frames, so chunks straddle the long gap and the last one is padded.
"""

import weakref

import numpy as np
import pytest

from s3jax import edit_stream, editing, images, loading, video

import test_edit
import test_edit_official

tiny_checkpoint = test_edit.tiny_checkpoint
office_frames = test_edit.office_frames
editor = test_edit.editor
STEPS = test_edit.STEPS
CHUNK = 2
# The official path's tiny DVA with random frozen encoders (ArcFace z_id, BiSeNet masks).
enc_variables = test_edit_official.enc_variables
official_workdir = test_edit_official.workdir
official_frames = test_edit_official.frames


@pytest.fixture(scope="module")
def gap_clip(office_frames, tmp_path_factory):
  """F F B F B B B B B B F (B: grey, no face): frame 2 interpolated, 4..9 passed through."""
  _, frames = office_frames
  blank = np.full_like(frames[0], 128)
  seq = np.stack([frames[0], frames[1], blank, frames[2]] + [blank] * 6 + [frames[3]])
  folder = tmp_path_factory.mktemp("gap_clip")
  for i, f in enumerate(seq):
    images.save_png(folder / f"{i:04d}.png", f)
  return folder, seq


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
  return loading.load_classifier(tiny_checkpoint / "classifier")


def chunked_editor(editor, tiny_checkpoint, **options):
  """The tiny DVA (weights shared with test_edit's editor) in chunks of 2 frames. HOG alone
  detects: the default cascade's CNN would search every blank frame (seconds each)."""
  model = (editor.model, editor.params, editor.config)
  return editing.VideoEditor(
      tiny_checkpoint, steps=STEPS, chunk=CHUNK, model=model, detector="hog", **options
  )


@pytest.fixture(scope="module")
def default_editor(editor, tiny_checkpoint):
  return chunked_editor(editor, tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_editor(editor, tiny_checkpoint):
  return chunked_editor(editor, tiny_checkpoint, reference=True)


def stream(ed, source, out_dir, classifier, strength=1.0, **kwargs):
  """Streams the edit into out_dir/edited.mp4 and PNGs -> (frames (N, H, W, 3), report)."""
  report = edit_stream.edit_stream(
      ed,
      source,
      out_dir / "edited.mp4",
      "Smiling",
      strength,
      classifier=classifier,
      cache_dir=out_dir / "cache",
      png_dir=out_dir / "png",
      **kwargs,
  )
  frames, _ = video.read_frames(out_dir / "png")
  return frames, report


@pytest.mark.parametrize(
    "which, blend, paste_space",
    [
        ("default_editor", "hard", "frame"),
        ("default_editor", "residual", "crop"),
        ("reference_editor", "hard", "crop"),  # PIL crops and PIL paste-back
    ],
    ids=["default", "residual-crop", "reference"],
)
def test_stream_equals_in_memory(
    which, blend, paste_space, request, gap_clip, classifier, tmp_path
):
  folder, seq = gap_clip
  ed = request.getfixturevalue(which)
  want, want_report = ed.edit_video(
      seq,
      "Smiling",
      1.0,
      blend,
      classifier=classifier,
      cache_dir=tmp_path / "memory",
      paste_space=paste_space,
  )
  got, report = stream(
      ed,
      edit_stream.FrameSource(folder),
      tmp_path,
      classifier,
      blend=blend,
      paste_space=paste_space,
  )
  np.testing.assert_array_equal(got, want)  # bit for bit, edited and passed-through frames
  assert not np.array_equal(got[10], seq[10])  # the last, padded chunk was edited
  assert report["passthrough"] == want_report["passthrough"] == list(range(4, 10))
  assert report["interpolated"] == want_report["interpolated"] == [2]
  assert report["stream"] == {
      "chunk": CHUNK,
      "chunks": 3,
      "chunks_inverted": [0, 1, 2],
      "chunks_from_cache": 0,
  }
  for k in ("z_id_cosine_to_original", "identity", "options", "frame_size", "edited_frames"):
    assert report[k] == want_report[k], k
  assert report["cache"]["key"] == want_report["cache"]["key"]  # one key for both caches
  assert video.read_frames(tmp_path / "edited.mp4")[0].shape == seq.shape
  assert not (tmp_path / "edited.partial.mp4").exists()


class Stopped(Exception):
  pass


class StopsAfter(edit_stream.FrameSource):
  """A frame folder whose reads stop (as a killed run) once ``limit`` frames were read."""

  def __init__(self, path, limit):
    super().__init__(path)
    self.limit, self.read = limit, 0

  def frames(self):
    for f in super().frames():
      if self.read == self.limit:
        raise Stopped(f"stopped after {self.limit} frames")
      self.read += 1
      yield f


def test_stream_resumes_from_chunk_cache(default_editor, gap_clip, classifier, tmp_path):
  folder, seq = gap_clip
  n = len(seq)
  # Hash, detect and features read 3n frames; the render pass then reads frames 0-1 (crops),
  # writes 0-1 (chunk 0 done) and stops on the crops of chunk 1.
  with pytest.raises(Stopped):
    stream(default_editor, StopsAfter(folder, 3 * n + 4), tmp_path, classifier)
  cache = next((tmp_path / "cache").glob("*.stream"))
  assert sorted(p.name for p in cache.iterdir()) == ["code.npz", "x_T-c2-00000.npy"]
  # The output appears only when complete; the partial one is removed.
  assert not (tmp_path / "edited.mp4").exists()
  assert not (tmp_path / "edited.partial.mp4").exists()

  resumed, report = stream(default_editor, edit_stream.FrameSource(folder), tmp_path, classifier)
  assert report["cache"]["hit"] and "align" not in report["timings_s"]
  assert report["stream"]["chunks_inverted"] == [1, 2]
  assert report["stream"]["chunks_from_cache"] == 1
  want, _ = default_editor.edit_video(
      seq, "Smiling", 1.0, classifier=classifier, cache_dir=tmp_path / "memory"
  )
  np.testing.assert_array_equal(resumed, want)

  # Another edit of the same video inverts nothing.
  _, again = stream(
      default_editor, edit_stream.FrameSource(folder), tmp_path, classifier, strength=-1.0
  )
  assert again["stream"]["chunks_inverted"] == [] and again["stream"]["chunks_from_cache"] == 3
  assert "invert" not in again["timings_s"]


class Tracked(np.ndarray):
  """A frame the test can hold a weak reference to."""


class CountsFramesInFlight(edit_stream.FrameSource):
  """A frame folder that records the most of its frames alive at once (held by anyone)."""

  def __init__(self, path):
    super().__init__(path)
    self.alive, self.most, self.read = {}, 0, 0

  def frames(self):
    for f in super().frames():
      t = f.view(Tracked)
      del f
      key = self.read
      self.alive[key] = weakref.ref(t, lambda _, k=key: self.alive.pop(k, None))
      self.read += 1
      self.most = max(self.most, len(self.alive))
      yield t


def test_stream_holds_a_few_frames(default_editor, gap_clip, classifier, tmp_path):
  folder, seq = gap_clip
  source = CountsFramesInFlight(folder)
  stream(default_editor, source, tmp_path, classifier, side_by_side=tmp_path / "sbs.mp4")
  assert source.read == 5 * len(seq)  # hash, detect, features, render crops, render writes
  # The render pass's two readers each hold their current frame; nothing keeps a chunk of
  # frames, let alone the video (11 frames).
  assert source.most <= 3, source.most


def test_frame_source_rereads_a_video_file(gap_clip, tmp_path):
  _, seq = gap_clip
  path = tmp_path / "clip.mp4"
  video.write_video(path, iter(seq[:4]), 12.5)
  source = edit_stream.FrameSource(path, max_frames=3)
  want, fps = video.read_frames(path, max_frames=3)
  assert source.fps == fps == pytest.approx(12.5) and source.detect_frames() is None
  for _ in range(2):  # every pass reads it afresh, one frame at a time
    np.testing.assert_array_equal(np.stack(list(source.frames())), want)


def test_frame_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    edit_stream.FrameSource(tmp_path / "missing.mp4")
  with pytest.raises(video.VideoReadError, match="no images"):
    edit_stream.FrameSource(tmp_path)


@pytest.fixture(scope="module")
def official_editor(official_workdir):
  """The official feature path in chunks of 2 (4 frames: 2 DDIM and encoder batches)."""
  return editing.VideoEditor(official_workdir, steps=STEPS, chunk=CHUNK, detector="hog")


@pytest.mark.slow
def test_official_stream_equals_in_memory(official_editor, official_frames, tmp_path):
  folder = tmp_path / "frames"
  for i, f in enumerate(official_frames):
    images.save_png(folder / f"{i:04d}.png", f)
  clf = loading.load_classifier(official_editor.checkpoint_dir / "classifier")
  want, want_report = official_editor.edit_video(
      official_frames, "Smiling", 1.0, classifier=clf, cache_dir=tmp_path / "memory"
  )
  got, report = stream(official_editor, edit_stream.FrameSource(folder), tmp_path, clf)
  np.testing.assert_array_equal(got, want)
  assert report["stream"]["chunks"] == 2
  assert report["identity"] == want_report["identity"]
  assert "ArcFace" in report["identity"]["embedding"]
