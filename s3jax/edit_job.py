"""Editing a video file end to end: read, align and encode, edit z_id, decode, paste back,
write the video, the side-by-side, PNGs and the report, streamed in chunks so that memory
does not grow with the video's length (``edit_stream``). `python -m s3jax.edit` is its CLI."""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import time
from typing import Callable, Optional

import numpy as np

from s3jax import alignment, edit_stream, editing, images, loading, video


class EditError(Exception):
  """A user error: reported as one line, exit status 1."""


def load_edit_fn(editor: str, checkpoint, classifier_dir=None, s3editor_dir=None):
  """-> (edit_fn(z (N,D), attribute, strength) -> (N,D), attribute names or None, source dir)."""
  checkpoint = pathlib.Path(checkpoint)
  if editor == "classifier":
    d = pathlib.Path(classifier_dir) if classifier_dir else checkpoint / "classifier"
    try:
      clf = loading.load_classifier(d)
    except FileNotFoundError as e:
      raise EditError(str(e)) from None
    return clf.edit, list(clf.names), str(d)
  if editor == "s3editor":
    d = pathlib.Path(s3editor_dir) if s3editor_dir else checkpoint / "s3editor"
    if not d.exists():
      raise EditError(f"no S3Editor at {d}; train one (configs/s3editor.py) or pass --s3editor")
    try:
      fn = loading.load_editor(str(d))
    except FileNotFoundError as e:
      raise EditError(str(e)) from None
    names = getattr(fn, "names", None) or getattr(fn, "attributes", None)
    return fn, (list(names) if names is not None else None), str(d)
  raise EditError(f"--editor must be classifier or s3editor, got {editor!r}")


VIDEO_EDITOR_OPTIONS = (
    "steps",
    "chunk",
    "cache",
    "progress",
    "reference",
    "renormalize_identity",
    "paste_space",
    "align_border",
    "blend",
    "alignment_mode",
)


def load_video_editor(
    checkpoint,
    steps=None,
    chunk: int = 8,
    cache: bool = True,
    progress: bool = False,
    reference: bool = False,
    renormalize_identity=None,
    paste_space=None,
    align_border=None,
    blend=None,
    alignment_mode=None,
):
  """The ``editing.VideoEditor`` of ``run_edit``'s options; EditError if the DVA won't load."""
  try:
    return editing.VideoEditor(
        checkpoint,
        steps=steps,
        chunk=chunk,
        cache=cache,
        progress=progress,
        reference=reference,
        renormalize_identity=renormalize_identity,
        paste_space=paste_space,
        align_border=align_border,
        blend=blend,
        alignment=alignment_mode,
    )
  except (FileNotFoundError, ValueError, NotImplementedError) as e:
    raise EditError(f"cannot load the DVA from {checkpoint}: {e}") from None


def run_edit(
    checkpoint,
    input,
    attribute,
    strength,
    out,
    steps: Optional[int] = None,  # pylint: disable=redefined-builtin
    blend: Optional[str] = None,
    side_by_side: bool = False,
    max_frames: Optional[int] = None,
    classifier: Optional[str] = None,
    editor: str = "classifier",
    s3editor: Optional[str] = None,
    png_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    cache: bool = True,
    chunk: int = 8,
    metrics: bool = True,
    progress: bool = False,
    video_editor=None,
    command: Optional[str] = None,
    on_stage: Optional[Callable[[str], None]] = None,
    reference: bool = False,
    renormalize_identity: Optional[bool] = None,
    paste_space: Optional[str] = None,
    align_border: Optional[str] = None,
    alignment_mode: Optional[str] = None,
    clip_prompt: Optional[str] = None,
    clip_source_prompt: Optional[str] = None,
    clip_dir: Optional[str] = None,
    clip_iterations: Optional[int] = None,
) -> dict:
  """The whole edit of a video file; returns the report. Raises EditError on user errors.

  With ``clip_prompt`` the edit is the DVA reference's CLIP edit (``clip_edit``): z_id is
  optimised towards ``clip_prompt`` from ``clip_source_prompt`` with the CLIP model in
  ``clip_dir`` (transformers layout) on the first edited frame; ``strength`` is its --scale.

  ``video_editor``: an existing ``editing.VideoEditor`` to reuse (tests, sweeps); its
  options then hold, except ``blend`` and ``paste_space`` when given.
  ``on_stage(message)`` is called at each stage (the CLI prints them).
  ``reference``: the reference's options (``editing.REFERENCE_OPTIONS``); ``steps``,
  ``blend``, ``renormalize_identity``, ``paste_space``, ``align_border`` and
  ``alignment_mode`` (option ``alignment``) override
  single options when not None (``editing.EditOptions``); ``blend`` is one of
  ``editing.BLENDS`` ('residual' adds one decode, reported under ``residual``).
  """
  t_start = time.perf_counter()
  timings = {}
  if checkpoint is None or not pathlib.Path(checkpoint).is_dir():
    raise EditError(f"--checkpoint {checkpoint!r} is not a directory")
  if not input:
    raise EditError("--input is required")
  if not pathlib.Path(input).exists():
    raise EditError(f"--input {input}: no such video file or frame folder")
  if not out:
    raise EditError("--out is required")
  if not attribute and not clip_prompt:
    raise EditError("--attribute (see --list-attributes) or --clip-prompt is required")
  try:  # bad option values are user errors, before anything loads
    editing.resolve_options(
        reference,
        steps=steps,
        blend=blend,
        renormalize_identity=renormalize_identity,
        paste_space=paste_space,
        align_border=align_border,
        alignment=alignment_mode,
    )
  except ValueError as e:
    raise EditError(str(e)) from None
  if clip_prompt:
    if not clip_dir or not pathlib.Path(clip_dir).is_dir():
      raise EditError(f"--clip {clip_dir!r}: no such directory (a transformers-layout CLIP)")
    edit_fn, names, source, attribute = None, None, str(clip_dir), "clip"
  else:
    edit_fn, names, source = load_edit_fn(editor, checkpoint, classifier, s3editor)
  if names is not None and attribute not in names:
    raise EditError(f"unknown attribute {attribute!r}; valid attributes: {', '.join(names)}")
  stage = stage_printer(on_stage)
  try:
    frames = edit_stream.FrameSource(input, max_frames=max_frames)
  except (video.VideoReadError, ValueError) as e:
    raise EditError(str(e)) from None

  t0 = time.perf_counter()
  if video_editor is None:
    stage(f"loading the DVA from {checkpoint}")
    video_editor = load_video_editor(
        checkpoint,
        steps=steps,
        chunk=chunk,
        cache=cache,
        progress=progress,
        reference=reference,
        renormalize_identity=renormalize_identity,
        paste_space=paste_space,
        align_border=align_border,
        blend=blend,
        alignment_mode=alignment_mode,
    )
  timings["load_model"] = time.perf_counter() - t0

  stage(
      f"editing {input}: {attribute} x {strength} at {video_editor.steps} DDIM steps "
      f"({'reference' if video_editor.reference else 'default'} options, "
      f"{video_editor.face_features} features), streamed in chunks"
  )
  out = pathlib.Path(out)
  extra = {}
  sbs = None
  if side_by_side:
    sbs = out.with_name(out.stem + ".side_by_side.mp4")
    extra["side_by_side"] = str(sbs)
  if png_dir:
    extra["png_dir"] = str(pathlib.Path(png_dir))
  if clip_prompt:
    edit_fn = clip_edit_fn(
        video_editor,
        frames,
        clip_dir,
        clip_prompt,
        clip_source_prompt,
        clip_iterations,
        cache_dir,
        stage,
    )
    extra["clip"] = edit_fn.report
  try:
    report = edit_stream.edit_stream(
        video_editor,
        frames,
        out,
        attribute,
        strength,
        blend=blend,
        edit_fn=edit_fn,
        cache_dir=cache_dir,
        compute_metrics=metrics,
        paste_space=paste_space,
        side_by_side=sbs,
        png_dir=png_dir,
        on_stage=stage,
    )
  except alignment.NoFaceError as e:
    raise EditError(f"{input}: {e}") from None
  except (video.VideoReadError, loading.UnknownAttributeError) as e:
    raise EditError(str(e)) from None
  except KeyError as e:  # e.g. S3Editor's edit_fn on an attribute outside its pool
    if "attribute" not in str(e):
      raise
    raise EditError(str(e.args[0]) if e.args else str(e)) from None
  timings["total"] = time.perf_counter() - t_start

  report = dict(report)
  report["timings_s"] = dict(report["timings_s"], edit_total=report["timings_s"].get("total"))
  report["timings_s"].update({k: round(v, 4) for k, v in timings.items()})
  report.update(
      {
          "command": command,
          "input": str(input),
          "output": str(out),
          "fps": float(frames.fps),
          "editor": editor,
          "editor_source": source,
          **extra,
      }
  )
  return write_report(report, out, stage)


def clip_edit_fn(
    video_editor, frames, clip_dir, prompt, source_prompt, iterations, cache_dir, stage
):
  """The ``clip_edit.CLIPEditFn`` of a streamed video: encode (cached, so the edit reuses
  it), then optimise z_id on the first edited frame."""
  from s3jax import clip_edit  # CLIP loads only for --clip-prompt

  try:
    stage(f"optimising z_id towards {prompt!r} with CLIP from {clip_dir}")
    clip_editor = clip_edit.CLIPEditor(
        clip_dir,
        prompt,
        source_prompt or "face",
        settings=clip_edit.clip_settings(iterations=iterations, lr=None),
    )
    code = edit_stream.encode_stream(video_editor, frames, cache_dir)
    first = int(code.frame_indices[0])
    first_frame = next(itertools.islice(frames.frames(), first, None))
    return clip_editor.edit_fn_for_video(video_editor, code, first_frame=first_frame)
  except alignment.NoFaceError as e:
    raise EditError(f"{frames.path}: {e}") from None
  except (FileNotFoundError, ValueError) as e:
    raise EditError(f"CLIP edit: {e}") from None


def run_comparison(checkpoint, input, attribute, strength, out, **kwargs) -> dict:  # pylint: disable=redefined-builtin
  """The S3Editor's edit (``out``), the plain classifier edit of the same encoding
  (``OUT.plain.mp4``), and ``OUT.comparison.mp4``: input | plain | S3Editor per frame.

  ``kwargs`` as ``run_edit``'s (``editor`` is forced to each side in turn); the second edit
  reuses the first's VideoEditor and inversion cache, so it only decodes. Returns the
  S3Editor edit's report with ``plain_report`` and ``comparison`` added."""
  out = pathlib.Path(out)
  kwargs.pop("editor", None)
  if kwargs.get("video_editor") is None:
    kwargs["video_editor"] = load_video_editor(
        checkpoint, **{k: kwargs[k] for k in VIDEO_EDITOR_OPTIONS if k in kwargs}
    )
  report = run_edit(checkpoint, input, attribute, strength, out, editor="s3editor", **kwargs)
  plain_out = out.with_name(out.stem + ".plain.mp4")
  plain = run_edit(checkpoint, input, attribute, strength, plain_out, editor="classifier", **kwargs)
  comparison = out.with_name(out.stem + ".comparison.mp4")
  source = edit_stream.FrameSource(input, max_frames=kwargs.get("max_frames"))
  with video.VideoWriter(comparison, source.fps) as writer:
    for frame, a, b in zip(source.frames(), video.iter_frames(plain_out), video.iter_frames(out)):
      writer.write(video.side_by_side(video.side_by_side(frame, a), b))
  report = dict(report, plain_report=plain["report_path"], comparison=str(comparison))
  report_path(out).write_text(
      json.dumps({k: v for k, v in report.items() if k != "report_path"}, indent=2)
  )
  return report


def report_path(out) -> pathlib.Path:
  """Where run_edit writes the report for ``out`` (OUT.mp4 -> OUT.report.json)."""
  out = pathlib.Path(out)
  return (
      out.with_suffix(".report.json")
      if out.suffix == ".mp4"
      else out.with_name(out.name + ".report.json")
  )


def write_edited_video(out, frames, edited, fps, side_by_side=False, png_dir=None) -> dict:
  """OUT.mp4, optionally OUT.side_by_side.mp4 (input | edit) and PNGs; -> the report's paths."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  video.write_video(out, edited, fps)
  extra = {}
  if side_by_side:
    sbs = out.with_name(out.stem + ".side_by_side.mp4")
    video.write_side_by_side(sbs, frames, edited, fps)
    extra["side_by_side"] = str(sbs)
  if png_dir:
    pathlib.Path(png_dir).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(edited):
      images.save_png(pathlib.Path(png_dir) / f"{i:05d}.png", f)
    extra["png_dir"] = str(png_dir)
  return extra


def write_report(report: dict, out, stage) -> dict:
  """OUT.report.json; returns ``report`` with its ``report_path``."""
  rpath = report_path(out)
  rpath.write_text(json.dumps(editing.jsonable(report), indent=2))
  report["report_path"] = str(rpath)
  stage(f"wrote {out} and {rpath}")
  return report


def stage_printer(on_stage):
  """A stage logger that also calls ``on_stage`` (the CLI's progress lines) when given."""

  def stage(msg):
    logging.info("%s", msg)
    if on_stage is not None:
      on_stage(msg)

  return stage


def in_memory_report(
    video_editor, res, frames, source, input, out, command, side_by_side, png_dir, metrics, timings
):  # pylint: disable=redefined-builtin
  """Write the video (and side-by-side, PNGs) of an in-memory edit's ``res`` and measure its
  identity (the editor's ``identity_report``, timed into ``timings["metrics"]``);
  -> (the report's shared fields, the written extras)."""
  edited = res["frames"]
  extra = write_edited_video(out, frames, edited, source.fps, side_by_side, png_dir)
  identity = None
  if metrics:
    t0 = time.perf_counter()
    identity = video_editor.identity_report(frames, edited, res["aligned"], res["frame_indices"])
    timings["metrics"] = time.perf_counter() - t0
  report = {
      "command": command,
      "input": str(input),
      "output": str(out),
      "num_frames": len(frames),
      "frame_size": [int(frames[0].shape[1]), int(frames[0].shape[0])],
      "fps": float(source.fps),
      "identity": identity,
  }
  return report, extra


def run_gan_edit(
    input,  # pylint: disable=redefined-builtin
    direction,
    strength: float,
    out,
    generator,
    encoder,
    settings=None,
    side_by_side: bool = False,
    max_frames: Optional[int] = None,
    png_dir: Optional[str] = None,
    metrics: bool = True,
    command: Optional[str] = None,
    on_stage: Optional[Callable[[str], None]] = None,
    video_editor=None,
) -> dict:
  """STIT's edit of a video file on a StyleGAN2 generator (``gan.video_edit``): the video,
  OUT.report.json, optionally OUT.side_by_side.mp4 (input | edit) and PNGs. Raises EditError
  on user errors. ``video_editor``: a loaded ``GANVideoEditor`` to reuse (its settings hold).
  """
  from s3jax.gan import video_edit  # the GAN stack loads only for --backbone stylegan2

  t_start = time.perf_counter()
  for flag, value in (("--generator", generator), ("--encoder", encoder)):
    if video_editor is None and (not value or not pathlib.Path(value).exists()):
      raise EditError(f"{flag} {value!r}: no such file")
  if not input or not pathlib.Path(input).exists():
    raise EditError(f"--input {input}: no such video file or frame folder")
  if not out:
    raise EditError("--out is required")
  if not direction:
    raise EditError("--direction is required with --backbone stylegan2 (an InterFaceGAN .npy)")

  stage = stage_printer(on_stage)
  timings = {}
  try:
    d = video_edit.read_direction(direction)
    source = edit_stream.FrameSource(input, max_frames=max_frames)
    frames = list(source.frames())
    if video_editor is None:
      stage(f"loading the generator {generator} and the encoder {encoder}")
      t0 = time.perf_counter()
      video_editor = video_edit.GANVideoEditor(generator, encoder, settings)
      timings["load_model"] = time.perf_counter() - t0
    s = video_editor.settings
    stage(
        f"editing {input} ({len(frames)} frames): {pathlib.Path(direction).name} x {strength} "
        f"on StyleGAN2 {video_editor.size} px, PTI {s.pti_epochs} epochs, stitching tuning "
        f"{s.stitch_steps} steps"
    )
    res = video_editor.edit(frames, d, strength, timings)
  except alignment.NoFaceError as e:
    raise EditError(f"{input}: {e}") from None
  except (video.VideoReadError, video_edit.GANEditError, ValueError, FileNotFoundError) as e:
    raise EditError(str(e)) from None
  report, extra = in_memory_report(
      video_editor,
      res,
      frames,
      source,
      input,
      out,
      command,
      side_by_side,
      png_dir,
      metrics,
      timings,
  )
  aligned = res["aligned"]
  losses = res["stitch_losses"]
  report.update(
      {
          "direction": str(direction),
          "strength": float(strength),
          "edit": "w + strength/2 * direction (STIT's InterFaceGAN factor)",
          **video_editor.info(),
          "passthrough": [int(i) for i in aligned.passthrough],
          "alignment": aligned.report,
          "pti_loss_first_last": None
          if res["pti_losses"] is None
          else [
              float(np.mean(res["pti_losses"]["loss"][0])),
              float(np.mean(res["pti_losses"]["loss"][-1])),
          ],
          "stitching_border_loss_first_last": None
          if losses is None
          else [float(np.mean(losses["border"][:, 0])), float(np.mean(losses["border"][:, -1]))],
          **extra,
      }
  )
  timings["total"] = time.perf_counter() - t_start
  report["timings_s"] = {k: round(float(v), 4) for k, v in timings.items()}
  return write_report(report, out, stage)


def run_text_edit(
    input,  # pylint: disable=redefined-builtin
    prompt: str,
    source_prompt: str,
    out,
    sd_dir,
    settings=None,
    side_by_side: bool = False,
    max_frames: Optional[int] = None,
    png_dir: Optional[str] = None,
    metrics: bool = True,
    command: Optional[str] = None,
    on_stage: Optional[Callable[[str], None]] = None,
    video_editor=None,
) -> dict:
  """IP-FaceDiff's text edit of a video file on Stable Diffusion (``sd.video_edit``): the
  video, OUT.report.json, optionally OUT.side_by_side.mp4 (input | edit) and PNGs. Raises
  EditError on user errors. ``video_editor``: a loaded ``TextVideoEditor`` to reuse.
  """
  from s3jax.sd import video_edit  # the SD stack loads only for --method ipfacediff

  t_start = time.perf_counter()
  if video_editor is None and (not sd_dir or not pathlib.Path(sd_dir).is_dir()):
    raise EditError(f"--sd {sd_dir!r}: no such directory (a diffusers-layout SD model)")
  if not input or not pathlib.Path(input).exists():
    raise EditError(f"--input {input}: no such video file or frame folder")
  if not out:
    raise EditError("--out is required")
  if not prompt:
    raise EditError("--prompt is required with --method ipfacediff")
  source_prompt = source_prompt or ""
  stage = stage_printer(on_stage)
  timings = {}
  try:
    source = edit_stream.FrameSource(input, max_frames=max_frames)
    frames = list(source.frames())
    if video_editor is None:
      stage(f"loading Stable Diffusion from {sd_dir}")
      t0 = time.perf_counter()
      video_editor = video_edit.TextVideoEditor(sd_dir, settings)
      timings["load_model"] = time.perf_counter() - t0
    s = video_editor.settings
    stage(
        f"editing {input} ({len(frames)} frames): {source_prompt!r} -> {prompt!r} at "
        f"{video_editor.size} px, {s.n_inversion_steps} inversion / {s.n_timesteps} edit steps, "
        f"TokenFlow batch {s.batch_size}"
    )
    res = video_editor.edit(frames, prompt, source_prompt, timings)
  except alignment.NoFaceError as e:
    raise EditError(f"{input}: {e}") from None
  except (video.VideoReadError, video_edit.TextEditError, ValueError, FileNotFoundError) as e:
    raise EditError(str(e)) from None
  report, extra = in_memory_report(
      video_editor,
      res,
      frames,
      source,
      input,
      out,
      command,
      side_by_side,
      png_dir,
      metrics,
      timings,
  )
  aligned = res["aligned"]
  report.update(
      {
          "prompt": prompt,
          "source_prompt": source_prompt,
          **video_editor.info(),
          "passthrough": [] if aligned is None else [int(i) for i in aligned.passthrough],
          "alignment": None if aligned is None else aligned.report,
          **extra,
      }
  )
  timings["total"] = time.perf_counter() - t_start
  report["timings_s"] = {k: round(float(v), 4) for k, v in timings.items()}
  return write_report(report, out, stage)
