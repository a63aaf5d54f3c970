r"""Edit a face in a video with a trained DVA.

  python -m s3jax.edit --checkpoint runs/demo --input VIDEO.mp4|FRAMES_DIR \
      --attribute Mouth_Wide --strength 0.5 --out out/edited.mp4 \
      [--steps 100] [--blend hard|feather|poisson] [--side-by-side] [--max-frames N] \
      [--classifier DIR] [--editor classifier|s3editor] [--s3editor DIR] [--png-dir DIR]
  python -m s3jax.edit --checkpoint runs/demo --list-attributes

Steps: align (dlib, STIT-smoothed FFHQ quads) -> per-frame z_lnd and the averaged
z_id -> batched DDIM inversion (cached per video and model in
<checkpoint>/edit_cache) -> edit z_id -> batched DDIM decoding -> paste back
-> OUT (the input's fps and size), OUT.report.json, optionally
OUT.side_by_side.mp4 (input | edit) and one PNG per frame.

Exit status 0 on success, 1 on a user error (unknown attribute, no face in the
video, missing file, ...), with a one-line message and no traceback.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
import time
from typing import Optional

from absl import app, flags

FLAGS = flags.FLAGS
_HYPHENATED = ("side-by-side", "max-frames", "list-attributes", "png-dir", "cache-dir")


class EditError(Exception):
  """A user error: reported as one line, exit status 1."""


def define_flags():
  """Defines the CLI flags (only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string(
      "checkpoint", None, "DVA workdir (config.json + checkpoints/), e.g. runs/demo."
  )
  flags.DEFINE_string("input", None, "Input video file or folder of frames.")
  flags.DEFINE_string("attribute", None, "Attribute to edit (see --list-attributes).")
  flags.DEFINE_float("strength", 0.5, "Edit strength s (negative removes the attribute).")
  flags.DEFINE_string("out", None, "Output MP4 path; the report goes to OUT.report.json.")
  flags.DEFINE_integer("steps", 100, "DDIM steps for inversion and decoding (divides 1000).")
  flags.DEFINE_enum(
      "blend",
      "hard",
      ["hard", "feather", "poisson"],
      "Paste-back: hard (DVA), feather (dilate + blur, STIT), poisson.",
  )
  flags.DEFINE_bool("side-by-side", False, "Also write OUT.side_by_side.mp4 (input | edit).")
  flags.DEFINE_integer("max-frames", None, "Only the first N frames.")
  flags.DEFINE_string("classifier", None, "Classifier dir (default <checkpoint>/classifier).")
  flags.DEFINE_bool(
      "list-attributes", False, "Print the editable attributes, one a line, and exit."
  )
  flags.DEFINE_enum(
      "editor",
      "classifier",
      ["classifier", "s3editor"],
      "Where the edit comes from: DVA classifier directions or a trained S3Editor.",
  )
  flags.DEFINE_string("s3editor", None, "S3Editor dir (default <checkpoint>/s3editor).")
  flags.DEFINE_string("png-dir", None, "Also write each output frame as PNG here.")
  flags.DEFINE_string("cache-dir", None, "Inversion cache (default <checkpoint>/edit_cache).")
  flags.DEFINE_bool("cache", True, "Use the inversion cache.")
  flags.DEFINE_integer("chunk", 8, "Frames per jitted DDIM call (rounded to the device count).")
  flags.DEFINE_bool("metrics", True, "Compute TL-ID/TG-ID of the result (dlib).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def load_edit_fn(editor: str, checkpoint, classifier_dir=None, s3editor_dir=None):
  """-> (edit_fn(z (N,D), attribute, strength) -> (N,D), attribute names or None, source dir)."""
  from s3jax import editing

  checkpoint = pathlib.Path(checkpoint)
  if editor == "classifier":
    d = pathlib.Path(classifier_dir) if classifier_dir else checkpoint / "classifier"
    try:
      clf = editing.load_classifier(d)
    except FileNotFoundError as e:
      raise EditError(str(e)) from None
    return editing.classifier_edit_fn(clf), list(clf.names), str(d)
  if editor == "s3editor":
    d = pathlib.Path(s3editor_dir) if s3editor_dir else checkpoint / "s3editor"
    try:
      from s3jax.training import s3editor  # pylint: disable=g-import-not-at-top

      load_editor = s3editor.load_editor
    except (ImportError, AttributeError) as e:
      raise EditError(
          f"--editor s3editor needs s3jax.training.s3editor.load_editor, which is "
          f"not available ({type(e).__name__}: {e})"
      ) from None
    if not d.exists():
      raise EditError(f"no S3Editor at {d}; train one (configs/s3editor.py) or pass --s3editor")
    fn = load_editor(str(d))
    names = getattr(fn, "names", None) or getattr(fn, "attributes", None)
    return fn, (list(names) if names is not None else None), str(d)
  raise EditError(f"--editor must be classifier or s3editor, got {editor!r}")


def run_edit(
    checkpoint,
    input,
    attribute,
    strength,
    out,
    steps: int = 100,  # pylint: disable=redefined-builtin
    blend: str = "hard",
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
) -> dict:
  """The whole CLI as a function; returns the report. Raises EditError on user errors.

  ``video_editor``: an existing ``editing.VideoEditor`` to reuse (tests, sweeps).
  """
  from s3jax import alignment, editing, video

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
  if not attribute:
    raise EditError("--attribute is required (see --list-attributes)")
  edit_fn, names, source = load_edit_fn(editor, checkpoint, classifier, s3editor)
  if names is not None and attribute not in names:
    raise EditError(f"unknown attribute {attribute!r}; valid attributes: {', '.join(names)}")

  def stage(msg):
    if progress:
      print(f"[s3jax.edit] {msg}", file=sys.stderr, flush=True)

  stage(f"reading {input}")
  t0 = time.perf_counter()
  try:
    frames, fps = video.read_frames(input, max_frames=max_frames)
  except (video.VideoReadError, ValueError) as e:
    raise EditError(str(e)) from None
  timings["read"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  if video_editor is None:
    stage(f"loading the DVA from {checkpoint}")
    try:
      video_editor = editing.VideoEditor(
          checkpoint, steps=steps, chunk=chunk, cache=cache, progress=progress
      )
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
      raise EditError(f"cannot load the DVA from {checkpoint}: {e}") from None
  timings["load_model"] = time.perf_counter() - t0

  stage(f"editing {len(frames)} frames: {attribute} x {strength} at {steps} DDIM steps")
  try:
    frames_out, report = video_editor.edit_video(
        frames,
        attribute,
        strength,
        blend=blend,
        edit_fn=edit_fn,
        cache_dir=cache_dir,
        compute_metrics=metrics,
    )
  except alignment.NoFaceError as e:
    raise EditError(f"{input}: {e}") from None
  except editing.UnknownAttributeError as e:
    raise EditError(str(e)) from None
  except KeyError as e:  # e.g. S3Editor's edit_fn on an attribute outside its pool
    if "attribute" not in str(e):
      raise
    raise EditError(str(e.args[0]) if e.args else str(e)) from None

  stage(f"writing {out}")
  t0 = time.perf_counter()
  out = pathlib.Path(out)
  video.write_video(out, frames_out, fps)
  extra = {}
  if side_by_side:
    sbs = out.with_name(out.stem + ".side_by_side.mp4")
    video.write_side_by_side(sbs, frames, frames_out, fps)
    extra["side_by_side"] = str(sbs)
  if png_dir:
    import cv2

    p = pathlib.Path(png_dir)
    p.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames_out):
      cv2.imwrite(str(p / f"{i:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    extra["png_dir"] = str(p)
  timings["write"] = time.perf_counter() - t0
  timings["total"] = time.perf_counter() - t_start

  report = dict(report)
  report["timings_s"] = dict(report["timings_s"], edit_total=report["timings_s"].get("total"))
  report["timings_s"].update({k: round(v, 4) for k, v in timings.items()})
  report.update(
      {
          "command": command,
          "input": str(input),
          "output": str(out),
          "fps": float(fps),
          "editor": editor,
          "editor_source": source,
          **extra,
      }
  )
  rpath = (
      out.with_name(out.name + ".report.json")
      if out.suffix != ".mp4"
      else out.with_suffix(".report.json")
  )
  rpath.write_text(json.dumps(report, indent=2))
  report["report_path"] = str(rpath)
  stage(f"wrote {out} and {rpath}")
  return report


def report_path(out) -> pathlib.Path:
  """Where run_edit writes the report for ``out`` (OUT.mp4 -> OUT.report.json)."""
  out = pathlib.Path(out)
  return (
      out.with_suffix(".report.json")
      if out.suffix == ".mp4"
      else out.with_name(out.name + ".report.json")
  )


def _normalise_argv(argv):
  """Accepts --max_frames as well as --max-frames (and --noside_by_side etc.)."""
  out = []
  for a in argv:
    for name in _HYPHENATED:
      under = name.replace("-", "_")
      for prefix in ("--", "--no"):
        if a == prefix + under or a.startswith(prefix + under + "="):
          a = prefix + name + a[len(prefix + under) :]
    out.append(a)
  return out


def _parse(argv):
  return FLAGS(_normalise_argv(argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging as std_logging
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  try:
    if FLAGS.checkpoint is None:
      raise EditError("--checkpoint is required")
    if FLAGS.cache and pathlib.Path(FLAGS.checkpoint).is_dir():
      # Persist compiled DDIM programs too, so a sweep of CLI runs compiles once.
      import jax

      root = pathlib.Path(FLAGS["cache-dir"].value or pathlib.Path(FLAGS.checkpoint) / "edit_cache")
      jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if FLAGS["list-attributes"].value:
      _, names, source = load_edit_fn(
          FLAGS.editor, FLAGS.checkpoint, FLAGS.classifier, FLAGS.s3editor
      )
      if names is None:
        raise EditError(f"the editor at {source} does not list its attributes")
      print("\n".join(names))
      return 0
    report = run_edit(
        FLAGS.checkpoint,
        FLAGS.input,
        FLAGS.attribute,
        FLAGS.strength,
        FLAGS.out,
        steps=FLAGS.steps,
        blend=FLAGS.blend,
        side_by_side=FLAGS["side-by-side"].value,
        max_frames=FLAGS["max-frames"].value,
        classifier=FLAGS.classifier,
        editor=FLAGS.editor,
        s3editor=FLAGS.s3editor,
        png_dir=FLAGS["png-dir"].value,
        cache_dir=FLAGS["cache-dir"].value,
        cache=FLAGS.cache,
        chunk=FLAGS.chunk,
        metrics=FLAGS.metrics,
        progress=FLAGS.progress,
        command=" ".join(shlex.quote(a) for a in sys.argv),
    )
  except EditError as e:
    print(f"s3jax.edit: error: {e}", file=sys.stderr)
    sys.exit(1)
  t = report["timings_s"]
  ident = report.get("identity") or {}
  print(
      f"wrote {report['output']} ({report['num_frames']} frames, "
      f"{report['frame_size'][0]}x{report['frame_size'][1]} @ {report['fps']:.2f} fps) in "
      f"{t['total']:.1f}s; cache {'hit' if report['cache']['hit'] else 'miss'}; "
      f"TL-ID {ident.get('tl_id')}, TG-ID {ident.get('tg_id')}; report {report['report_path']}"
  )
  if report["passthrough"]:
    print(f"frames left unedited (no face, long gap): {report['passthrough']}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse)
