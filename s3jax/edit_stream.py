"""Editing a long video in bounded memory: the frames stream through in chunks.

``edit_stream`` is ``VideoEditor.edit_video`` for a video file or a frame folder that
need not fit in memory (``python -m s3jax.edit`` runs it). It reads the video several
times, one frame at a time:

1. hash: the cache key (``editing.VideoDigest``, the same key ``VideoEditor.encode`` uses);
2. detect: landmarks per frame, then the quads are filled and smoothed over the whole
   video (``VideoEditor.plan_alignment``), as ``edit_video`` does;
3. features: each frame cropped with its smoothed quad, z_id and z_lnd per chunk; the
   video's z_id is their average. Steps 2-3 keep only small per-frame arrays (quads,
   landmarks, z_id, z_lnd: a few KB a frame) in a ``VideoCode`` without crops, masks or
   x_T, cached as ``<cache>/<key>.stream/code.npz``;
4. render, a chunk of edited frames at a time: crop, mask, invert (or load the chunk's
   x_T from ``<key>.stream/x_T-c<chunk>-<index>.npy``), decode with the edited z_id; a
   second reader then pastes and writes the frames up to the chunk's last one (frames in
   long face gaps go straight from it to the writer).

Memory: one chunk of crops, masks, x_T and decodes plus a few frames, whatever the length.
The output equals ``edit_video``'s bit for bit: every step is the same function
(``VideoEditor.crop_frame``, ``frame_features``, ``model_crops``, ``paste_frame``) and the
DDIM and encoder calls get the same frames in the same batches (``edit_video``'s chunks,
the last one padded alike). A run that stops resumes: the code and every chunk's x_T
written so far are reused, and so is a second edit of the same video.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from typing import Callable, Iterator, Optional

import dlib
import numpy as np
from tqdm import tqdm

from s3jax import alignment, editing, images, video

CODE_FILE = "code.npz"


class FrameSource:
  """A video file or frame folder that the stream reads one frame at a time, as often as it
  needs. Opening checks that it exists and has a frame rate (``video.frame_rate``).

  ``detect_frames()``: dlib's own decode of a folder's files, on which the reference
  detects (``editing.dlib_decoded_frames``); None for a video file.
  """

  def __init__(self, path, max_frames: Optional[int] = None):
    self.path = pathlib.Path(path)
    self.max_frames = max_frames
    self.fps = video.frame_rate(self.path)
    if max_frames is not None and max_frames <= 0:
      raise ValueError(f"max_frames must be positive, got {max_frames}")
    if self.path.is_dir():
      video.frame_files(self.path)  # a folder without images fails here

  def frames(self) -> Iterator[np.ndarray]:
    return video.iter_frames(self.path, self.max_frames)

  def detect_frames(self) -> Optional[Iterator[np.ndarray]]:
    if not self.path.is_dir():
      return None
    files = video.frame_files(self.path, self.max_frames)
    return (dlib.load_rgb_image(str(f)) for f in files)


class _Reader:
  """Iterates frames, adding the seconds spent decoding to ``timings['read']``."""

  def __init__(self, frames, timings: dict):
    self._it = iter(frames)
    self._timings = timings

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    try:
      return next(self._it)
    finally:
      self._timings["read"] = self._timings.get("read", 0.0) + time.perf_counter() - t0


@dataclasses.dataclass
class StreamCache:
  """A streamed video's cache folder, ``<cache_dir>/<key>.stream/``: the ``VideoCode``
  without crops, masks and x_T (``code.npz``), and per chunk its x_T and, for the residual
  blend, the reconstruction (.npy, named by chunk size and index)."""

  root: pathlib.Path

  @property
  def code_path(self) -> pathlib.Path:
    return self.root / CODE_FILE

  def chunk_path(self, kind: str, chunk: int, index: int) -> pathlib.Path:
    return self.root / f"{kind}-c{chunk}-{index:05d}.npy"

  def load_code(self) -> Optional[editing.VideoCode]:
    if not self.code_path.exists():
      return None
    try:
      return editing.VideoCode.load(self.code_path)
    except (OSError, ValueError, KeyError) as e:
      logging.warning("ignoring unreadable stream cache %s: %s", self.code_path, e)
      return None

  def load_chunk(self, kind: str, chunk: int, index: int, length: int) -> Optional[np.ndarray]:
    path = self.chunk_path(kind, chunk, index)
    if not path.exists():
      return None
    try:
      a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      logging.warning("ignoring unreadable chunk %s: %s", path, e)
      return None
    return a if len(a) == length else None

  def save(self, path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Writes ``path`` through a temporary file (a stopped run leaves no half file)."""
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
      write(tmp)
      tmp.replace(path)
    except OSError as e:
      logging.warning("could not write the stream cache %s: %s", path, e)


def _chunk_crops(editor, frames, chunks, quads, size: int):
  """Yields (index, members, crops (k, size, size, 3)) per chunk of edited frames, reading
  ``frames`` only up to each chunk's last member and keeping only its crops."""
  it = enumerate(frames)
  for c, members in enumerate(chunks):
    wanted, crops = set(int(i) for i in members), []
    for i, frame in it:
      if i in wanted:
        crops.append(editor.crop_frame(frame, quads[i], size))
      if i == members[-1]:
        break
    if len(crops) != len(members):
      raise video.VideoReadError("the video ended early: it changed while it was edited")
    yield c, members, np.stack(crops)


class _Outputs:
  """The edited video, optionally the side-by-side and PNGs, written frame by frame; the
  videos go to ``*.partial.mp4`` first and take their names once complete."""

  def __init__(self, out, fps: float, side_by_side=None, png_dir=None):
    self.final = [pathlib.Path(out)] + ([pathlib.Path(side_by_side)] if side_by_side else [])
    self.writers = [video.VideoWriter(_partial(p), fps) for p in self.final]
    self.png_dir = pathlib.Path(png_dir) if png_dir else None
    self.count = 0

  def write(self, frame, edited) -> None:
    self.writers[0].write(edited)
    if len(self.writers) > 1:
      self.writers[1].write(video.side_by_side(frame, edited))
    if self.png_dir is not None:
      images.save_png(self.png_dir / f"{self.count:05d}.png", edited)
    self.count += 1

  def close(self) -> None:
    for w, p in zip(self.writers, self.final):
      w.close()
      _partial(p).replace(p)

  def abort(self) -> None:
    """After an error: the partial videos are closed and removed."""
    for w, p in zip(self.writers, self.final):
      w.abort()
      _partial(p).unlink(missing_ok=True)


def _partial(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f"{path.stem}.partial{path.suffix}")


def _progress(it, enabled: bool, **kwargs):
  return tqdm(it, leave=False, **kwargs) if enabled else it


class _DetectPairs:
  """(frame, the frame to detect on) pairs: ``source.detect_frames()`` for the reference
  alignment when the source has them, else the frame itself. ``same`` ends False when a
  detection frame differed from its frame (``VideoEditor.encode`` then keys and reports
  ``detect_frames``; equal ones, as lossless frames decode, are as if not given)."""

  def __init__(self, editor, source, timings: dict):
    self.frames = _Reader(source.frames(), timings)
    detect = source.detect_frames() if editor.options.alignment == "reference" else None
    self.detect = None if detect is None else _Reader(detect, timings)
    self.same = True

  def __iter__(self):
    if self.detect is None:
      for f in self.frames:
        yield f, f
      return
    for f, d in zip(self.frames, self.detect):
      if np.shape(d) != np.shape(f):
        raise ValueError(f"the detection decode is {np.shape(d)}, the frame {np.shape(f)}")
      self.same = self.same and np.array_equal(f, d)
      yield f, d


def encode_stream(
    editor, source, cache_dir=None, timings: Optional[dict] = None, on_stage=None
) -> editing.VideoCode:
  """Steps 1-3 of the module docstring: a ``VideoCode`` without crops, masks and x_T
  (None), landmarks (M, 68, 2) float64 in pixels of the ``max(size, FEATURE_SIZE)`` crops.

  Cached (``StreamCache``) when the editor caches; ``cache_path`` is then the code file.
  Raises ``alignment.NoFaceError`` when no frame has a face.
  """
  timings = {} if timings is None else timings
  stage = on_stage or (lambda msg: None)
  show = editor.progress
  cache, n = None, None
  key = ""
  if editor.cache:
    stage("hashing the frames")
    t0 = time.perf_counter()
    digest, detect_digest = editing.VideoDigest(), editing.VideoDigest()
    pairs = _DetectPairs(editor, source, timings)
    for f, d in _progress(pairs, show, desc="hash", unit="frame"):
      digest.update(f)
      if pairs.detect is not None:
        detect_digest.update(d)
    n = digest.count
    given = None if pairs.same else detect_digest.hexdigest()
    key = editor.cache_key_of(digest.hexdigest(), given)
    cache = StreamCache(pathlib.Path(cache_dir or editor.default_cache_dir()) / f"{key}.stream")
    timings["hash"] = time.perf_counter() - t0
    code = cache.load_code()
    if code is not None:
      code.cache_path = str(cache.code_path)
      return code

  stage("detecting faces")
  t0, read0 = time.perf_counter(), timings.get("read", 0.0)
  pairs = _DetectPairs(editor, source, timings)
  shapes = []

  def detection_frames():
    for f, d in pairs:
      if not shapes:
        shapes.append(tuple(int(v) for v in np.shape(f)))
      yield d

  found = alignment.detect_faces_batch(
      _progress(detection_frames(), show, desc="detect", unit="frame", total=n),
      **editor.detect_settings(),
  )
  plan = editor.plan_alignment(found)
  timings["align"] = time.perf_counter() - t0 - (timings.get("read", 0.0) - read0)
  n = len(found)

  stage("computing the face features")
  t0, read0 = time.perf_counter(), timings.get("read", 0.0)
  usable = np.ones(n, bool)
  usable[list(plan.passthrough)] = False
  idx = np.flatnonzero(usable)
  chunks = _chunks(editor, idx)
  fsize = max(editor.size, editing.FEATURE_SIZE)
  lnd, z_frames, z_lnd = [], [], []
  crops_it = _chunk_crops(editor, _Reader(source.frames(), timings), chunks, plan.quads, fsize)
  for _, members, crops in _progress(crops_it, show, desc="features", total=len(chunks)):
    lmc = np.stack([plan.crop_landmarks(int(i), c) for i, c in zip(members, crops)])
    zf, zl = editor.frame_features(crops, lmc, timings)
    lnd.append(lmc)
    z_frames.append(np.asarray(zf))
    z_lnd.append(np.asarray(zl))
  z_frames = np.concatenate(z_frames)
  timings["features"] = (
      time.perf_counter() - t0 - (timings.get("read", 0.0) - read0) - timings.get("compile", 0.0)
  )
  report = dict(plan.report, seconds_detect=timings["align"])
  if editor.options.alignment == "reference":
    report.update(alignment="reference", detect_frames="frames" if pairs.same else "given")
  detected = np.asarray(plan.has_face, bool)
  code = editing.VideoCode(
      num_frames=n,
      frame_shape=shapes[0],
      frame_indices=idx,
      quads=np.asarray(plan.quads),
      crops=None,
      masks=None,
      landmarks=np.concatenate(lnd),
      z_lnd=np.concatenate(z_lnd).astype(np.float32),
      z_id_frames=z_frames.astype(np.float32),
      z_id=editing.average_identity(z_frames[detected[idx]], editor.options.renormalize_identity),
      x_T=None,
      has_face=detected,
      interpolated=np.asarray(plan.interpolated, bool),
      passthrough=list(plan.passthrough),
      align_report=editing.jsonable(report),
      key=key,
      cache_hit=False,
      cache_path=str(cache.code_path) if cache else None,
  )
  if cache is not None:
    try:
      code.save(cache.code_path)
    except OSError as e:
      logging.warning("could not write the stream cache %s: %s", cache.code_path, e)
  return code


def _chunks(editor, idx) -> list:
  """The edited frames in ``edit_video``'s DDIM chunks (``VideoEditor.chunk_size``)."""
  size = editor.chunk_size(len(idx))
  return [idx[k : k + size] for k in range(0, len(idx), size)]


def edit_stream(
    editor,
    source,
    out,
    attribute: str,
    strength: float,
    blend: Optional[str] = None,
    classifier=None,
    edit_fn=None,
    cache_dir=None,
    compute_metrics: bool = True,
    paste_space: Optional[str] = None,
    side_by_side=None,
    png_dir=None,
    on_stage: Optional[Callable[[str], None]] = None,
) -> dict:
  """Edits the video ``source`` (a ``FrameSource``) into ``out`` (mp4) chunk by chunk and
  returns the report: ``VideoEditor.edit_video``'s, plus ``stream`` (the chunk size, the
  number of chunks, those inverted now and how many came from the cache).

  Arguments as ``edit_video``'s; ``side_by_side``: also write input | edit to this mp4;
  ``png_dir``: also write each output frame as PNG there. ``on_stage(message)`` is called
  at each pass. The reference alignment detects on ``source.detect_frames()`` (dlib's
  decode of a folder), as ``edit_job`` passed ``detect_frames`` to ``edit_video``.
  """
  options, edit_fn = editor.edit_choices(attribute, blend, paste_space, classifier, edit_fn)
  t_all = time.perf_counter()
  timings = {}
  code = encode_stream(editor, source, cache_dir, timings, on_stage)
  t0 = time.perf_counter()
  z_new = editor.edited_identity(edit_fn, code.z_id, attribute, strength)
  timings["edit_z"] = time.perf_counter() - t0
  render = _Render(editor, code, options, z_new, compute_metrics, timings)
  if on_stage is not None:
    on_stage(
        f"editing {len(code.frame_indices)} frames in {len(render.chunks)} chunks of "
        f"{render.size}"
    )
  outputs = _Outputs(out, source.fps, side_by_side, png_dir)
  try:
    render.run(source, outputs)
    outputs.close()
  except BaseException:
    outputs.abort()
    raise
  ident = render.identity() if compute_metrics else None
  residual = None
  if options.blend == editing.RESIDUAL:
    source_name = "decoded" if "decoded" in render.recon_sources else "disk"
    residual = editor.residual_report(source_name, timings.get("decode_reconstruction", 0.0))
  timings["total"] = time.perf_counter() - t_all
  report = editor.edit_report(code, options, attribute, strength, z_new, timings, ident, residual)
  report["stream"] = {
      "chunk": render.size,
      "chunks": len(render.chunks),
      "chunks_inverted": render.inverted,
      "chunks_from_cache": len(render.chunks) - len(render.inverted),
  }
  return report


class _Render:
  """Step 4 of the module docstring: invert, decode, paste and write chunk by chunk."""

  def __init__(self, editor, code, options, z_new, compute_metrics: bool, timings: dict):
    self.editor, self.code, self.z_new = editor, code, z_new
    self.blend, self.space = options.blend, options.paste_space
    self.compute_metrics = compute_metrics
    self.timings = timings
    self.chunks = _chunks(editor, code.frame_indices)
    self.size = editor.chunk_size(len(code.frame_indices))
    self.cache = StreamCache(pathlib.Path(code.cache_path).parent) if code.cache_path else None
    self.inverted, self.recon_sources = [], []
    self.embeddings = ([], [])  # identity embeddings of the original and edited frames

  def add_time(self, key: str, since: float) -> None:
    self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - since

  def run(self, source, outputs: _Outputs) -> None:
    ed, code = self.editor, self.code
    fsize = max(ed.size, editing.FEATURE_SIZE)
    frames = enumerate(_Reader(source.frames(), self.timings))
    crops_it = _chunk_crops(
        ed, _Reader(source.frames(), self.timings), self.chunks, code.quads, fsize
    )
    for c, members, crops in _progress(crops_it, ed.progress, desc="edit", total=len(self.chunks)):
      in_chunk, paste = self.chunk_pastes(c, members, crops)
      faces = ([], [])
      for i, frame in frames:
        t0 = time.perf_counter()
        edited = paste(i, frame)
        self.add_time("paste", t0)
        if self.compute_metrics and i in in_chunk and code.has_face[i]:
          t0 = time.perf_counter()
          for kept, f in zip(faces, (frame, edited)):
            kept.append(ed.crop_frame(f, code.quads[i], editing.FEATURE_SIZE))
          self.add_time("metrics", t0)
        t0 = time.perf_counter()
        outputs.write(frame, edited)
        self.add_time("write", t0)
        if i == members[-1]:
          break
      if faces[0]:
        t0 = time.perf_counter()
        for kept, f in zip(self.embeddings, faces):
          kept.append(ed.identity_embeddings(np.stack(f)))
        self.add_time("metrics", t0)
    for _, frame in frames:  # frames after the last edited one (a long gap at the end)
      t0 = time.perf_counter()
      outputs.write(frame, frame)
      self.add_time("write", t0)
    if outputs.count != code.num_frames:
      raise video.VideoReadError(
          f"read {outputs.count} frames, {code.num_frames} before: the video changed while "
          "it was edited"
      )

  def chunk_pastes(self, c: int, members, crops):
    """Chunk ``c``'s decodes -> (its frame indices, ``paste(i, frame)``: frame ``i`` edited,
    or as it is when it is not in the chunk)."""
    ed, code = self.editor, self.code
    sl = slice(c * self.size, c * self.size + len(members))
    z_lnd = code.z_lnd[sl]
    t0 = time.perf_counter()
    crops_s, masks = ed.model_crops(crops, code.landmarks[sl], self.timings)
    self.add_time("features", t0)
    x_T = self.cache.load_chunk("x_T", self.size, c, len(members)) if self.cache else None
    if x_T is None:
      x_T = ed.invert_crops(crops_s, code.z_id, z_lnd, self.timings, self.size)
      self.inverted.append(c)
      self.save("x_T", c, x_T)
    decoded = ed.decode_crops(x_T, self.z_new, z_lnd, self.timings, self.size)
    recon = None
    if self.blend == editing.RESIDUAL:
      recon = self.cache.load_chunk("recon", self.size, c, len(members)) if self.cache else None
      self.recon_sources.append("disk" if recon is not None else "decoded")
      if recon is None:
        t = {}
        recon = ed.decode_crops(x_T, code.z_id, z_lnd, t, self.size)
        self.timings["decode_reconstruction"] = (
            self.timings.get("decode_reconstruction", 0.0) + t["decode"]
        )
        self.timings["compile"] = self.timings.get("compile", 0.0) + t.get("compile", 0.0)
        self.save("recon", c, recon)
    position = {int(i): j for j, i in enumerate(members)}

    def paste(i: int, frame):
      j = position.get(i)
      if j is None:
        return frame
      r = None if recon is None else recon[j]
      return ed.paste_frame(
          frame, decoded[j], code.quads[i], masks[j], crops_s[j], self.blend, self.space, r
      )

    return position, paste

  def save(self, kind: str, c: int, array) -> None:
    if self.cache is not None:
      self.cache.save(self.cache.chunk_path(kind, self.size, c), lambda p: np.save(p, array))

  def identity(self) -> dict:
    t0 = time.perf_counter()
    e_orig, e_edit = [
        np.concatenate(e) if e else np.zeros((0, self.editor.id_dim)) for e in self.embeddings
    ]
    scores = self.editor.identity_scores(e_orig, e_edit)
    self.add_time("metrics", t0)
    return scores
