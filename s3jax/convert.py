"""PyTorch <-> s3jax conversion tools.

    python -m s3jax.convert parity --golden DIR [--backend jax|torch|both]

Subcommands register themselves in `SUBCOMMANDS` (name -> (add_arguments, run)); `import` and
`export` plug in the same way. `run(args)` returns the process exit code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                             Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run):
        SUBCOMMANDS[name] = (add_arguments, run)
        return run
    return register


# ------------------------------------------------------------------------------- parity
def _parity_args(p: argparse.ArgumentParser):
    p.add_argument("--golden", required=True,
                   help="directory with the golden files (…/golden/dva or its parent)")
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
            _emit(dict(name=module_name, status="skipped", ok=None,
                       error=f"{module_name} is not available yet; {trigger} was not checked"))
            continue
        for backend in backends:
            try:
                rows = module.check(golden, backend=backend)
            except Exception as e:  # report and keep going with the other checks
                _emit(dict(name=f"{backend}/{module_name}", ok=False,
                           error=f"{type(e).__name__}: {e}"))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s3jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
