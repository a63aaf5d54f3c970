"""PyTorch <-> s3jax conversion tools.

    python -m s3jax.convert parity --golden DIR [--backend jax|torch|both]
    python -m s3jax.convert export --checkpoint WORKDIR --out FILE.pt|FILE.safetensors [--ema] [--lightning]
    python -m s3jax.convert import --src FILE --workdir NEW_WORKDIR --config configs/voxceleb.py[:arg] [--which ema|model]

Subcommands register themselves in `SUBCOMMANDS` (name -> (add_arguments, run)); `import` and
`export` plug in the same way. `run(args)` returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
  def register(run):
    SUBCOMMANDS[name] = (add_arguments, run)
    return run

  return register


# ------------------------------------------------------------------------------- parity
def _parity_args(p: argparse.ArgumentParser):
  p.add_argument(
      "--golden", required=True, help="directory with the golden files (…/golden/dva or its parent)"
  )
  p.add_argument("--backend", choices=("jax", "torch", "both"), default="jax")


# (module, trigger file): a check runs when its trigger file exists in the golden dir.
PARITY_CHECKS = (
    ("s3jax.parity.unet", "unet_tiny_io.npz"),
    ("s3jax.parity.encoders", "encoders_io.npz"),
)


def _emit(row: dict):
  print(json.dumps(row), flush=True)


@subcommand("parity", _parity_args)
def run_parity(args: argparse.Namespace) -> int:
  from s3jax.parity.unet import resolve_golden_dir

  golden = resolve_golden_dir(args.golden)
  if not golden.is_dir():
    print(f"error: golden directory not found: {golden}", file=sys.stderr)
    return 2
  backends = ("jax", "torch") if args.backend == "both" else (args.backend,)
  failed, ran = False, 0
  for module_name, trigger in PARITY_CHECKS:
    if not (golden / trigger).exists():
      continue
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name != module_name:
        raise
      _emit(
          dict(
              name=module_name,
              status="skipped",
              ok=None,
              error=f"{module_name} is not available yet; {trigger} was not checked",
          )
      )
      continue
    for backend in backends:
      try:
        rows = module.check(golden, backend=backend)
      except Exception as e:  # report and keep going with the other checks
        _emit(dict(name=f"{backend}/{module_name}", ok=False, error=f"{type(e).__name__}: {e}"))
        failed = True
        continue
      for row in rows:
        row = dict(row)
        row.setdefault("backend", backend)
        _emit(row)
        ran += 1
        failed |= not row.get("ok", False)
  if ran == 0:
    print(f"error: no golden files found in {golden}", file=sys.stderr)
    return 2
  return 1 if failed else 0


# ------------------------------------------------------------------------------- export / import
# The logic lives in s3jax.porting.dva_checkpoint; imported lazily so `--help` stays fast.
def _export_args(p: argparse.ArgumentParser):
  p.add_argument(
      "--checkpoint", required=True, help="s3jax workdir (holds config.json and checkpoints/<step>)"
  )
  p.add_argument(
      "--out",
      required=True,
      help="output file: .pt, .pth, .safetensors (or .ckpt with --lightning)",
  )
  p.add_argument(
      "--ema",
      action="store_true",
      help="write the EMA weights (what editing uses); default: the raw params. "
      "With --lightning both sets are written anyway",
  )
  p.add_argument(
      "--lightning",
      action="store_true",
      help="wrap as the reference's Lightning checkpoint: {'state_dict': "
      "{'model.*', 'ema_model.*'}, 'global_step'}",
  )
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")


@subcommand("export", _export_args)
def run_export(args: argparse.Namespace) -> int:
  """JAX workdir -> reference-named PyTorch weights (.pt/.safetensors, optionally Lightning)."""
  from s3jax.porting.dva_checkpoint import run_export as run

  return run(args)


def _import_args(p: argparse.ArgumentParser):
  p.add_argument(
      "--src",
      required=True,
      help="reference-named DVA weights: .pt/.pth, a Lightning .ckpt or "
      ".safetensors (read with torch.load(weights_only=True))",
  )
  p.add_argument("--workdir", required=True, help="new s3jax workdir to write")
  p.add_argument(
      "--config",
      required=True,
      help="config file[:arg] whose model the weights fit, e.g. "
      "configs/voxceleb.py (paper) or configs/voxceleb.py:demo; "
      "model.face_features follows the file",
  )
  p.add_argument(
      "--which",
      choices=("ema", "model"),
      default=None,
      help="Lightning files: load only this set (into params and EMA). Default: "
      "model.* -> params, ema_model.* -> EMA",
  )
  p.add_argument("--step", type=int, default=0, help="step to store the checkpoint at")
  p.add_argument(
      "--overwrite", action="store_true", help="allow a workdir that already holds checkpoints"
  )


@subcommand("import", _import_args)
def run_import(args: argparse.Namespace) -> int:
  """Reference-named PyTorch weights -> a new orbax workdir to train or edit from."""
  from s3jax.porting.dva_checkpoint import run_import as run

  return run(args)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m s3jax.convert",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_arguments, _) in SUBCOMMANDS.items():
    add_arguments(sub.add_parser(name))
  args = parser.parse_args(argv)
  return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
  sys.exit(main())
