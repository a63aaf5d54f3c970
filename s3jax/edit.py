r"""Edit a face in a video with a trained DVA.

  python -m s3jax.edit --checkpoint runs/demo --input VIDEO.mp4|FRAMES_DIR \
      --attribute Mouth_Wide --strength 0.5 --out out/edited.mp4 \
      [--steps 100] [--blend hard|feather|poisson|residual] [--side-by-side] [--max-frames N] \
      [--classifier DIR] [--editor classifier|s3editor] [--s3editor DIR] [--compare-plain] \
      [--png-dir DIR] \
      [--reference] [--[no]renormalize-identity] [--paste-space frame|crop] \
      [--align-border reflect|constant] [--alignment default|reference]
  python -m s3jax.edit --checkpoint runs/demo --list-attributes
  python -m s3jax.edit --checkpoint runs/demo --clip DIR --clip-prompt "face with a beard" \
      [--clip-source-prompt face] [--clip-iterations 2000] --strength 1 --input VIDEO --out OUT.mp4
  python -m s3jax.edit --backbone stylegan2 --generator G.pkl --encoder e4e.pt \
      --direction smile.npy --strength 2 --input VIDEO --out OUT.mp4 \
      [--pti-epochs N] [--stitch-steps N] [--outer-mask-dilation PX] [--blend hard|feather]
  python -m s3jax.edit --method ipfacediff --sd SD_DIR --prompt "a man with a beard" \
      --source-prompt "a man" --input VIDEO --out OUT.mp4 [--steps 50] [--inversion-steps 500] \
      [--guidance-scale 7.5] [--pnp-f-t 0.8] [--pnp-attn-t 0.5] [--tokenflow-batch 8] \
      [--negative-prompt TEXT] [--seed 1] [--whole-frame]

Steps: align (dlib, STIT-smoothed FFHQ quads) -> per-frame z_lnd and the averaged
z_id (dlib or the official encoders, as the checkpoint was trained) -> batched DDIM
inversion (cached per video, model and chunk in <checkpoint>/edit_cache) -> edit z_id ->
batched DDIM decoding -> paste back -> OUT (the input's fps and size), OUT.report.json,
optionally OUT.side_by_side.mp4 (input | edit) and one PNG per frame. With --editor s3editor
--compare-plain: also OUT.plain.mp4 (the plain classifier edit of the same encoding, decoding
only) and OUT.comparison.mp4 (input | plain | S3Editor).

The video streams through in chunks of --chunk edited frames (s3jax.edit_stream): memory
does not grow with its length. Only small per-frame arrays (quads, landmarks, z_id, z_lnd)
are kept for the whole video, from a first pass that detects every face and averages z_id;
a stopped run resumes from the chunks already inverted. --reference streams too.

--reference reproduces the reference's editing_classifier.py: 1000 DDIM steps, the
identity average not renormalised, a hard paste composited in the crop, no alignment
padding, and its alignment (dlib detection at full resolution, PIL crop with a JPEG round
trip, PIL paste-back). Each of those is also a flag of its own, which wins over --reference
(docs/editing.md lists the deviations of the default and why). The landmarks are detected
on the frames as they are read (OpenCV's decode, which equals PIL's on JPEG), not on
dlib's own JPEG decode as the reference does; on JPEG frames that can move them by a few
pixels (VideoEditor.encode(detect_frames=editing.dlib_decoded_frames(...)) removes it).

--backbone stylegan2 is STIT's edit (s3jax.gan.video_edit): the same alignment, e4e pivots,
PTI of one generator over all frames, the InterFaceGAN edit w + strength/2 * direction,
stitching tuning of every frame at once, paste-back inside STIT's mask, and the same report
with TL-ID/TG-ID. The generator is an NVIDIA network pickle (read without running its code),
or a .pt/.safetensors state dict with a .json of its init kwargs beside it.

--method ipfacediff is IP-FaceDiff's text edit (s3jax.sd.video_edit): the same alignment (or
--whole-frame), DDIM inversion of the crops under --source-prompt, TokenFlow-PnP under
--prompt (keyframes with extended attention, nearest-neighbour propagation, PnP injection,
classifier-free guidance: jitted scans), paste-back inside the face hull, and the same report
with TL-ID/TG-ID. --sd is a diffusers-layout Stable Diffusion 1.x folder (unet/, vae/,
text_encoder/, tokenizer/, scheduler/), e.g. IP-FaceDiff's identity_model or
CompVis/stable-diffusion-v1-4 downloaded beforehand.

Exit status 0 on success, 1 on a user error (unknown attribute, no face in the
video, missing file, ...), with a one-line message and no traceback.
"""

from __future__ import annotations

import logging
import pathlib
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax

from s3jax import edit_job, editing

_METHOD = flags.DEFINE_enum(
    "method",
    "dva",
    ["dva", "stit", "ipfacediff"],
    "dva: a DVA latent edit (--backbone picks DVA or StyleGAN2); stit: STIT's StyleGAN2 edit "
    "(= --backbone stylegan2); ipfacediff: IP-FaceDiff's text edit on Stable Diffusion (--sd, "
    "--prompt, --source-prompt).",
)
_SD = flags.DEFINE_string(
    "sd", None, "ipfacediff: a diffusers-layout Stable Diffusion 1.x folder (unet/, vae/, ...)."
)
_PROMPT = flags.DEFINE_string("prompt", None, "ipfacediff: the edit prompt.")
_SOURCE_PROMPT = flags.DEFINE_string(
    "source-prompt", "", "ipfacediff: the prompt describing the input (the inversion prompt)."
)
_NEGATIVE_PROMPT = flags.DEFINE_string(
    "negative-prompt", None, "ipfacediff: the unconditional prompt (default TokenFlow's)."
)
_INVERSION_STEPS = flags.DEFINE_integer(
    "inversion-steps", None, "ipfacediff: DDIM inversion steps (default 500, TokenFlow's)."
)
_GUIDANCE_SCALE = flags.DEFINE_float(
    "guidance-scale", None, "ipfacediff: classifier-free guidance scale (default 7.5)."
)
_PNP_F_T = flags.DEFINE_float(
    "pnp-f-t", None, "ipfacediff: share of the steps with conv-feature injection (default 0.8)."
)
_PNP_ATTN_T = flags.DEFINE_float(
    "pnp-attn-t", None, "ipfacediff: share of the steps with Q/K injection (default 0.5)."
)
_TOKENFLOW_BATCH = flags.DEFINE_integer(
    "tokenflow-batch", None, "ipfacediff: frames per TokenFlow batch, one keyframe each (8)."
)
_CLIP_PROMPT = flags.DEFINE_string(
    "clip-prompt",
    None,
    "dva: edit by text instead of an attribute: z_id is optimised with the DVA reference's "
    "directional CLIP loss (editing_CLIP.py) towards this prompt; --strength is its scale.",
)
_CLIP_SOURCE_PROMPT = flags.DEFINE_string(
    "clip-source-prompt", "face", "dva CLIP edit: the prompt describing the input."
)
_CLIP_DIR = flags.DEFINE_string(
    "clip", None, "dva CLIP edit: a transformers-layout CLIP folder (config.json + weights)."
)
_CLIP_ITERATIONS = flags.DEFINE_integer(
    "clip-iterations",
    None,
    "dva CLIP edit: Adam iterations on z_id (default 2000, the reference's).",
)
_SEED = flags.DEFINE_integer("seed", None, "ipfacediff: the keyframe draws' seed (default 1).")
_WHOLE_FRAME = flags.DEFINE_bool(
    "whole-frame",
    False,
    "ipfacediff: edit the whole frame resized to the model's resolution (the reference's "
    "input) instead of the aligned face crop pasted back.",
)
_BACKBONE = flags.DEFINE_enum(
    "backbone",
    "dva",
    ["dva", "stylegan2"],
    "dva: a Diffusion Video Autoencoder (--checkpoint); stylegan2: STIT's edit (--generator, "
    "--encoder, --direction).",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "DVA workdir (config.json + checkpoints/), e.g. runs/demo."
)
_GENERATOR = flags.DEFINE_string(
    "generator",
    None,
    "stylegan2: the generator: NVIDIA network pickle (G_ema, e.g. ffhq.pkl) or a state dict "
    "(.pt/.safetensors/.npz) with its init kwargs in a .json beside it.",
)
_ENCODER = flags.DEFINE_string(
    "encoder", None, "stylegan2: the e4e checkpoint (pSp layout, e.g. e4e_ffhq_encode.pt)."
)
_DIRECTION = flags.DEFINE_string(
    "direction", None, "stylegan2: an InterFaceGAN W direction .npy (STIT's layout: row 0 is used)."
)
_PTI_EPOCHS = flags.DEFINE_integer(
    "pti-epochs", None, "stylegan2: PTI epochs over the frames (default STIT's; 0: no PTI)."
)
_STITCH_STEPS = flags.DEFINE_integer(
    "stitch-steps", None, "stylegan2: stitching-tuning Adam steps (default STIT's 100; 0: none)."
)
_OUTER_MASK_DILATION = flags.DEFINE_integer(
    "outer-mask-dilation",
    None,
    "stylegan2: the stitching border in generator pixels (default 50 at 1024 px, scaled).",
)
_INPUT = flags.DEFINE_string("input", None, "Input video file or folder of frames.")
_ATTRIBUTE = flags.DEFINE_string("attribute", None, "Attribute to edit (see --list-attributes).")
_STRENGTH = flags.DEFINE_float("strength", 0.5, "Edit strength s (negative removes the attribute).")
_OUT = flags.DEFINE_string("out", None, "Output MP4 path; the report goes to OUT.report.json.")
_STEPS = flags.DEFINE_integer(
    "steps",
    None,
    "DDIM steps for inversion and decoding (divides 1000). Default 100; 1000 with --reference.",
)
_BLEND = flags.DEFINE_enum(
    "blend",
    None,
    list(editing.BLENDS),
    "Paste-back: hard (DVA, the default), feather (dilate + blur, STIT), poisson, or residual "
    "(frame + feathered (edit - reconstruction): keeps the frame's detail; one extra decode).",
)
_REFERENCE = flags.DEFINE_bool(
    "reference",
    False,
    "Reproduce the reference's editing_classifier.py: --steps 1000 --norenormalize-identity "
    "--paste-space crop --align-border constant --blend hard (explicit flags win).",
)
_RENORMALIZE_IDENTITY = flags.DEFINE_bool(
    "renormalize-identity",
    None,
    "L2-normalise the averaged z_id (default yes; the reference: no).",
)
_PASTE_SPACE = flags.DEFINE_enum(
    "paste-space",
    None,
    ["frame", "crop"],
    "frame: composite inside the warped mask in the frame (default); crop: composite in the "
    "crop and replace the whole quad (the reference).",
)
_ALIGN_BORDER = flags.DEFINE_enum(
    "align-border",
    None,
    ["reflect", "constant"],
    "Alignment fill outside the frame: reflect (default) or constant black (the reference).",
)
_ALIGNMENT = flags.DEFINE_enum(
    "alignment",
    None,
    list(editing.ALIGNMENTS),
    "default: detect on a 640 px copy, OpenCV crop and paste-back; reference: the "
    "reference's detection (full resolution, upsample 0, first face), PIL crop via a 1024 px "
    "JPEG, PIL paste-back (the default with --reference).",
)
_SIDE_BY_SIDE = flags.DEFINE_bool(
    "side-by-side", False, "Also write OUT.side_by_side.mp4 (input | edit)."
)
_MAX_FRAMES = flags.DEFINE_integer("max-frames", None, "Only the first N frames.")
_CLASSIFIER = flags.DEFINE_string(
    "classifier", None, "Classifier dir (default <checkpoint>/classifier)."
)
_LIST_ATTRIBUTES = flags.DEFINE_bool(
    "list-attributes", False, "Print the editable attributes, one a line, and exit."
)
_EDITOR = flags.DEFINE_enum(
    "editor",
    "classifier",
    ["classifier", "s3editor"],
    "Where the edit comes from: DVA classifier directions or a trained S3Editor.",
)
_S3EDITOR = flags.DEFINE_string("s3editor", None, "S3Editor dir (default <checkpoint>/s3editor).")
_COMPARE_PLAIN = flags.DEFINE_bool(
    "compare-plain",
    False,
    "With --editor s3editor: also the plain classifier edit of the same encoding "
    "(OUT.plain.mp4) and OUT.comparison.mp4 (input | plain | S3Editor).",
)
_PNG_DIR = flags.DEFINE_string("png-dir", None, "Also write each output frame as PNG here.")
_CACHE_DIR = flags.DEFINE_string(
    "cache-dir", None, "Inversion cache (default <checkpoint>/edit_cache)."
)
_CACHE = flags.DEFINE_bool("cache", True, "Use the inversion cache.")
_CHUNK = flags.DEFINE_integer(
    "chunk",
    8,
    "Frames per jitted DDIM (and encoder) call (rounded to the device count), and per "
    "streamed chunk: memory grows with it, not with the video's length.",
)
_METRICS = flags.DEFINE_bool(
    "metrics", True, "Compute TL-ID/TG-ID of the result (dlib or ArcFace, as the checkpoint)."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
# absl takes the hyphenated names as they are; the underscore spellings work too.
for _name in (
    "side-by-side",
    "compare-plain",
    "max-frames",
    "list-attributes",
    "png-dir",
    "cache-dir",
    "renormalize-identity",
    "paste-space",
    "align-border",
    "pti-epochs",
    "stitch-steps",
    "outer-mask-dilation",
    "source-prompt",
    "negative-prompt",
    "inversion-steps",
    "guidance-scale",
    "pnp-f-t",
    "pnp-attn-t",
    "tokenflow-batch",
    "whole-frame",
    "clip-prompt",
    "clip-source-prompt",
    "clip-iterations",
):
  flags.DEFINE_alias(_name.replace("-", "_"), _name)


def _print_stage(message: str) -> None:
  print(f"[s3jax.edit] {message}", file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  if _METHOD.value == "ipfacediff":
    return run_text()
  if _BACKBONE.value == "stylegan2" or _METHOD.value == "stit":
    return run_gan()
  checkpoint = _CHECKPOINT.value
  try:
    if checkpoint is None:
      raise edit_job.EditError("--checkpoint is required")
    if _CACHE.value and pathlib.Path(checkpoint).is_dir():
      # Persist compiled DDIM programs too, so a sweep of CLI runs compiles once.
      root = pathlib.Path(_CACHE_DIR.value or pathlib.Path(checkpoint) / "edit_cache")
      jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if _LIST_ATTRIBUTES.value:
      _, names, source = edit_job.load_edit_fn(
          _EDITOR.value, checkpoint, _CLASSIFIER.value, _S3EDITOR.value
      )
      if names is None:
        raise edit_job.EditError(f"the editor at {source} does not list its attributes")
      print("\n".join(names))
      return 0
    if _COMPARE_PLAIN.value and _EDITOR.value != "s3editor":
      raise edit_job.EditError("--compare-plain needs --editor s3editor")
    run = edit_job.run_comparison if _COMPARE_PLAIN.value else edit_job.run_edit
    clip_kwargs = {}
    if _CLIP_PROMPT.value:
      if _COMPARE_PLAIN.value:
        raise edit_job.EditError("--clip-prompt and --compare-plain do not go together")
      clip_kwargs = dict(
          clip_prompt=_CLIP_PROMPT.value,
          clip_source_prompt=_CLIP_SOURCE_PROMPT.value,
          clip_dir=_CLIP_DIR.value,
          clip_iterations=_CLIP_ITERATIONS.value,
      )
    report = run(
        checkpoint,
        _INPUT.value,
        _ATTRIBUTE.value,
        _STRENGTH.value,
        _OUT.value,
        steps=_STEPS.value,
        blend=_BLEND.value,
        side_by_side=_SIDE_BY_SIDE.value,
        max_frames=_MAX_FRAMES.value,
        classifier=_CLASSIFIER.value,
        editor=_EDITOR.value,
        s3editor=_S3EDITOR.value,
        png_dir=_PNG_DIR.value,
        cache_dir=_CACHE_DIR.value,
        cache=_CACHE.value,
        chunk=_CHUNK.value,
        metrics=_METRICS.value,
        progress=_PROGRESS.value,
        command=" ".join(shlex.quote(a) for a in sys.argv),
        on_stage=_print_stage if _PROGRESS.value else None,
        reference=_REFERENCE.value,
        renormalize_identity=_RENORMALIZE_IDENTITY.value,
        paste_space=_PASTE_SPACE.value,
        align_border=_ALIGN_BORDER.value,
        alignment_mode=_ALIGNMENT.value,
        **clip_kwargs,
    )
  except edit_job.EditError as e:
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


def run_gan() -> int:
  """--backbone stylegan2: STIT's edit."""
  from s3jax.gan import video_edit  # the GAN stack loads only for this backbone

  defaults = video_edit.GANEditSettings()
  settings = video_edit.GANEditSettings(
      pti_epochs=defaults.pti_epochs if _PTI_EPOCHS.value is None else _PTI_EPOCHS.value,
      stitch_steps=defaults.stitch_steps if _STITCH_STEPS.value is None else _STITCH_STEPS.value,
      frames_per_chunk=_CHUNK.value,
      outer_mask_dilation=_OUTER_MASK_DILATION.value,
      blend=_BLEND.value or defaults.blend,
      progress=_PROGRESS.value,
  )
  if settings.blend not in ("hard", "feather"):
    return fail("--blend must be hard or feather with --backbone stylegan2")
  return run_in_memory_job(
      edit_job.run_gan_edit,
      settings,
      _INPUT.value,
      _DIRECTION.value,
      _STRENGTH.value,
      _OUT.value,
      _GENERATOR.value,
      _ENCODER.value,
  )


def run_text() -> int:
  """--method ipfacediff: IP-FaceDiff's text edit."""
  from s3jax.sd import video_edit  # the SD stack loads only for this method

  chosen = {
      "n_inversion_steps": _INVERSION_STEPS.value,
      "n_timesteps": _STEPS.value,
      "guidance_scale": _GUIDANCE_SCALE.value,
      "pnp_f_t": _PNP_F_T.value,
      "pnp_attn_t": _PNP_ATTN_T.value,
      "batch_size": _TOKENFLOW_BATCH.value,
      "negative_prompt": _NEGATIVE_PROMPT.value,
      "seed": _SEED.value,
      "blend": _BLEND.value,
  }
  settings = video_edit.TextEditSettings(
      whole_frame=_WHOLE_FRAME.value,
      progress=_PROGRESS.value,
      **{k: v for k, v in chosen.items() if v is not None},
  )
  return run_in_memory_job(
      edit_job.run_text_edit,
      settings,
      _INPUT.value,
      _PROMPT.value,
      _SOURCE_PROMPT.value,
      _OUT.value,
      _SD.value,
  )


def fail(message: str) -> int:
  print(f"s3jax.edit: error: {message}", file=sys.stderr)
  sys.exit(1)


def run_in_memory_job(job, settings, *args) -> int:
  """``edit_job.run_gan_edit`` / ``run_text_edit`` with the shared output flags; prints the
  summary line, or the user error (exit status 1)."""
  try:
    report = job(
        *args,
        settings=settings,
        side_by_side=_SIDE_BY_SIDE.value,
        max_frames=_MAX_FRAMES.value,
        png_dir=_PNG_DIR.value,
        metrics=_METRICS.value,
        command=" ".join(shlex.quote(a) for a in sys.argv),
        on_stage=_print_stage if _PROGRESS.value else None,
    )
  except edit_job.EditError as e:
    return fail(str(e))
  ident = report.get("identity") or {}
  print(
      f"wrote {report['output']} ({report['num_frames']} frames) in "
      f"{report['timings_s']['total']:.1f}s; TL-ID {ident.get('tl_id')}, TG-ID "
      f"{ident.get('tg_id')}; report {report['report_path']}"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
