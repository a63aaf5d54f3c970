"""PyTorch <-> s3jax conversion: golden parity checks, checkpoint export and import.

  python -m s3jax.convert parity --golden ../shared/golden/dva [--backend jax|torch|both]
  python -m s3jax.convert export --checkpoint runs/demo --out demo.ckpt --lightning
  python -m s3jax.convert export --checkpoint runs/demo --out demo_ema.safetensors --ema
  python -m s3jax.convert import --src last.ckpt --workdir runs/dva_official --config configs/voxceleb.py
  python -m s3jax.convert import-classifier --src last.ckpt --out runs/classifier_official

The subcommand is the first argument:
  parity  runs the golden checks whose files are in --golden (golden/dva: unet_tiny_*,
          ddim_tiny_io.npz, encoders_*; golden/edit: edit_io.npz, the reference's classifier
          edit; golden/stit: the StyleGAN2 generator and its NVIDIA pickle, e4e, the latent
          editor, stitching tuning; golden/ipfacediff: the SD-1.x UNet, VAE, CLIP text encoder
          and tokenizer, DDIM inversion and the whole TokenFlow-PnP edit, in float32 and, in a
          subprocess with x64, float64; its torch backend is our PyTorch twin of the
          reference's procedure on diffusers modules) and prints one JSON line per output
          ("ok": true|false). Checks without a torch backend (edit, stit) run for jax only.
  export  writes the DVA of an s3jax workdir under the reference's key names: .pt, .pth or
          .safetensors (--ema: the EMA weights), or a Lightning .ckpt (--lightning: both sets).
          --step picks the checkpoint step (default: the newest). Prints one JSON line.
  import  reads reference-named DVA weights (.pt/.pth/.ckpt/.safetensors) into a new s3jax
          workdir, checking every key and shape against the model --config builds
          (--config.<field>=<value> overrides fields). --step is the step to store (default 0),
          --which ema|model loads one set of a Lightning file. Prints one JSON line.
  import-classifier  reads the reference's CelebA-HQ attribute classifier (a Lightning ClsModel
          checkpoint: conds_mean/std, classifier.*, ema_classifier.*; other keys are ignored)
          into --out (a directory or .npz) as classifier.npz. Edits use classifier.* as the
          reference does; --weights ema picks the EMA probe. Prints one JSON line.

Exit status: 0 on success; 1 when a parity output is out of tolerance; 2 on a usage error or
when the files cannot be converted (the message on stderr names the parameter).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from s3jax.checkpointing import CheckpointShapeError
from s3jax.models.autoencoder import LND_DIM
from s3jax.parity import e4e as parity_e4e
from s3jax.parity import edit as parity_edit
from s3jax.parity import encoders as parity_encoders
from s3jax.parity import ipfacediff as parity_ipfacediff
from s3jax.parity import ipfacediff_torch as parity_ipfacediff_torch
from s3jax.parity import latent_edit as parity_latent_edit
from s3jax.parity import stitching as parity_stitching
from s3jax.parity import stylegan2 as parity_stylegan2
from s3jax.parity import unet as parity_unet
from s3jax.porting import classifier as classifier_import
from s3jax.porting import dva_checkpoint
from s3jax.porting.state_dict import StateDictError
from s3jax.porting.unet_keys import KeyMismatchError

# parity
_GOLDEN = flags.DEFINE_string(
    "golden", None, "parity: directory with the golden files (.../golden/dva or its parent)."
)
_BACKEND = flags.DEFINE_enum(
    "backend", "jax", ["jax", "torch", "both"], "parity: the implementation(s) to check."
)
# export
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "export: the s3jax workdir to read (its checkpoints/<step>)."
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "export: output file: .pt, .pth, .safetensors (or .ckpt with --lightning); "
    "import-classifier: output directory (classifier.npz) or .npz file.",
)
_EMA = flags.DEFINE_bool(
    "ema",
    False,
    "export: write the EMA weights (what editing uses); default: the raw params. "
    "With --lightning both sets are written anyway.",
)
_LIGHTNING = flags.DEFINE_bool(
    "lightning",
    False,
    "export: wrap as the reference's Lightning checkpoint: "
    "{'state_dict': {'model.*', 'ema_model.*'}, 'global_step'}.",
)
# export and import
_STEP = flags.DEFINE_integer(
    "step",
    None,
    "export: the checkpoint step to read (default: the newest); "
    "import: the step to store the checkpoint at (default: 0).",
    lower_bound=0,
)
# import
_SRC = flags.DEFINE_string(
    "src",
    None,
    "import: reference-named DVA weights: .pt/.pth, a Lightning .ckpt or .safetensors "
    "(read with torch.load(weights_only=True)); import-classifier: the reference's classifier "
    "checkpoint.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "import: the new s3jax workdir to write.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "import: config file whose model the weights fit, e.g. configs/voxceleb.py (paper) or "
    "configs/voxceleb.py:demo; model.face_features follows the weights.",
    lock_config=True,
)
_WHICH = flags.DEFINE_enum(
    "which",
    None,
    ["ema", "model"],
    "import: from a Lightning file load only this set (into params and EMA). "
    "Default: model.* -> params, ema_model.* -> EMA.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "import: allow a workdir that already holds checkpoints; "
    "import-classifier: replace an existing classifier.npz.",
)
# import-classifier
_WEIGHTS = flags.DEFINE_enum(
    "weights",
    "classifier",
    ["classifier", "ema"],
    "import-classifier: the probe edits use: classifier.* (the reference's choice) or "
    "ema_classifier.*; both are stored.",
)

# (module with `check(golden_dir, backend)`, trigger file): a check runs when its trigger file
# is in the golden directory, for the backends in the module's BACKENDS.
PARITY_CHECKS = (
    (parity_unet, "unet_tiny_io.npz"),
    (parity_encoders, "encoders_io.npz"),
    (parity_edit, "edit_io.npz"),
    (parity_stylegan2, "stylegan2_ada_tiny_io.npz"),
    (parity_e4e, "e4e_tiny_io.npz"),
    (parity_latent_edit, "latent_edit_io.npz"),
    (parity_stitching, "stitching_tuning_io.npz"),
    (parity_ipfacediff, "io_f64.npz"),
    (parity_ipfacediff_torch, "io_f64.npz"),
)

# Errors that mean "these files cannot be converted": one line on stderr, exit status 2.
CONVERT_ERRORS = (
    classifier_import.ClassifierImportError,
    dva_checkpoint.DVACheckpointError,
    KeyMismatchError,
    StateDictError,
    CheckpointShapeError,
    FileNotFoundError,
    FileExistsError,
)


def emit(row: dict) -> None:
  print(json.dumps(row), flush=True)


def report_error(e: BaseException) -> int:
  print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
  return 2


def run_parity() -> int:
  golden = parity_unet.resolve_golden_dir(_GOLDEN.value)
  if not golden.is_dir():
    print(f"error: golden directory not found: {golden}", file=sys.stderr)
    return 2
  backends = ("jax", "torch") if _BACKEND.value == "both" else (_BACKEND.value,)
  failed, ran = False, 0
  for module, trigger in PARITY_CHECKS:
    if not (golden / trigger).exists():
      continue
    for backend in backends:
      if backend not in module.BACKENDS:
        print(f"note: {module.__name__} has no {backend} backend; skipped", file=sys.stderr)
        continue
      try:
        rows = module.check(golden, backend=backend)
      except Exception as e:  # report and keep going with the other checks
        emit(dict(name=f"{backend}/{module.__name__}", ok=False, error=f"{type(e).__name__}: {e}"))
        failed = True
        continue
      for row in rows:
        row = dict(row)
        row.setdefault("backend", backend)
        emit(row)
        ran += 1
        failed |= not row.get("ok", False)
  if ran == 0 and not failed:
    print(f"error: no golden files found in {golden}", file=sys.stderr)
    return 2
  return 1 if failed else 0


def run_export() -> int:
  """JAX workdir -> reference-named PyTorch weights (.pt/.safetensors, optionally Lightning)."""
  try:
    res = dva_checkpoint.export_checkpoint(
        _CHECKPOINT.value, _OUT.value, ema=_EMA.value, lightning=_LIGHTNING.value, step=_STEP.value
    )
  except CONVERT_ERRORS as e:
    return report_error(e)
  emit(
      {
          "wrote": str(res.path),
          "step": res.step,
          "keys": res.num_keys,
          "lightning": res.lightning,
          "weights": "model+ema" if res.lightning else ("ema" if res.ema else "model"),
          "face_features": res.face_features,
          "frozen_encoders": res.frozen_encoders,
      }
  )
  if res.face_features != "official":
    print(
        f"note: this DVA uses the {res.face_features} features, so encoder.linear is "
        f"(512, {128 + LND_DIM}); the published code expects (512, {512 + LND_DIM}) and "
        "its own face encoders",
        file=sys.stderr,
    )
  return 0


def run_import() -> int:
  """Reference-named PyTorch weights -> a new orbax workdir to train or edit from."""
  config = _CONFIG.value
  try:
    config.model  # config_flags reports a config file it could not load only on first use
  except (OSError, AttributeError) as e:
    raise usage_error(f"--config: {e}") from None
  try:
    res = dva_checkpoint.import_checkpoint(
        _SRC.value,
        _WORKDIR.value,
        config,
        which=_WHICH.value,
        step=0 if _STEP.value is None else _STEP.value,
        overwrite=_OVERWRITE.value,
    )
  except CONVERT_ERRORS + (ValueError,) as e:
    return report_error(e)
  emit(
      {
          "workdir": str(res.workdir),
          "step": res.step,
          "face_features": res.face_features,
          "params_and_ema_from_separate_sets": res.lightning_sets,
          "num_params": res.num_params,
          "frozen_encoders": str(res.frozen_encoders) if res.frozen_encoders else None,
      }
  )
  return 0


def run_import_classifier() -> int:
  """The reference's attribute classifier checkpoint -> classifier.npz."""
  try:
    res = classifier_import.import_classifier(
        _SRC.value, _OUT.value, edit_weights=_WEIGHTS.value, overwrite=_OVERWRITE.value
    )
  except CONVERT_ERRORS as e:
    return report_error(e)
  emit(
      {
          "wrote": str(res.path),
          "attributes": res.num_attributes,
          "dim": res.dim,
          "edit_weights": res.edit_weights,
          "ema_stored": res.has_ema,
          "ignored_keys": res.ignored_keys,
          "epoch": res.epoch,
          "global_step": res.global_step,
      }
  )
  return 0


# subcommand -> (run, required flags, optional flags)
SUBCOMMANDS = {
    "parity": (run_parity, ("golden",), ("backend",)),
    "export": (run_export, ("checkpoint", "out"), ("ema", "lightning", "step")),
    "import": (run_import, ("src", "workdir", "config"), ("which", "step", "overwrite")),
    "import-classifier": (run_import_classifier, ("src", "out"), ("weights", "overwrite")),
}
_ALL_FLAGS = {f for _, required, optional in SUBCOMMANDS.values() for f in required + optional}


def usage_error(message: str) -> app.UsageError:
  # Exit status 2 for every usage error, as before (argparse) and as for unconvertible files.
  return app.UsageError(f"error: {message}", exitcode=2)


def parse_flags(argv):
  """absl's flag parsing, with usage and exit status 2 on a bad flag value or unknown flag."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError) as e:  # config_flags: --config.<unknown field>=...
    app.usage(shorthelp=True, detailed_error=f"error: {e}", exitcode=2)


def main(argv):
  names = ", ".join(SUBCOMMANDS)
  if len(argv) < 2:
    raise usage_error(f"missing subcommand (one of: {names})")
  command, extra = argv[1], argv[2:]
  if command not in SUBCOMMANDS:
    raise usage_error(f"unknown subcommand {command!r} (one of: {names})")
  if extra:
    raise usage_error(f"unexpected arguments: {' '.join(extra)}")
  run, required, optional = SUBCOMMANDS[command]
  missing = [f"--{f}" for f in required if flags.FLAGS[f].value is None]
  if missing:
    raise usage_error(f"{command} needs {', '.join(missing)}")
  foreign = sorted(
      f"--{f}" for f in _ALL_FLAGS - set(required + optional) if flags.FLAGS[f].present
  )
  if foreign:
    raise usage_error(f"{command} does not take {', '.join(foreign)}")
  return run()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
