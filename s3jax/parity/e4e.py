"""Golden-vector check of the e4e encoder (``golden/stit/e4e_tiny_*.npz``).

``check(golden_dir, backend='jax')`` loads ``e4e_tiny_state_dict.npz`` with
:func:`s3jax.porting.e4e_keys.load_e4e`, runs :class:`s3jax.models.e4e.Encoder4Editing` on
``e4e_tiny_io.npz['x']`` (NCHW, moved to NHWC) and returns one row per output,
``{'name', 'rel_err', 'tol', 'ok'}`` with ``rel_err = ||out - ref|| / ||ref||``: ``codes``,
``w_plus`` (``codes + latent_avg``), the spatial means ``c1_mean_hw``/``c2_mean_hw``/
``c3_mean_hw`` and ``c3_sample0`` (all tol 1e-5, the README's limit; a correct port lands
near 1e-6), and ``latent_avg`` (must be equal: tol 0). The config (stylegan_size, n_styles,
coarse/middle split, input size) is read from the io file and must match what the importer
infers from the state dict. There is no PyTorch twin of e4e, so ``backend`` is 'jax' only.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from s3jax.models.e4e import INPUT_SIZE, STYLE_DIM, E4EConfig, jitted_encoder, w_plus
from s3jax.parity.unet import rel_row
from s3jax.porting.e4e_keys import load_e4e

STATE_DICT_FILE = "e4e_tiny_state_dict.npz"
IO_FILE = "e4e_tiny_io.npz"
TOL = 1e-5
FEATURE_MEANS = ("c1_mean_hw", "c2_mean_hw", "c3_mean_hw")


def run_jax(config: E4EConfig, variables, latent_avg, x_nchw) -> dict[str, np.ndarray]:
  """e4e outputs in the golden layout (NCHW features, channel-wise spatial means)."""
  x = np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1))
  codes, feats = jitted_encoder(config, return_features=True)(variables, x)
  out = {"codes": np.asarray(codes), "w_plus": np.asarray(w_plus(codes, latent_avg))}
  for name in ("c1", "c2", "c3"):
    out[f"{name}_mean_hw"] = np.asarray(feats[name]).mean(axis=(1, 2))
  out["c3_sample0"] = np.asarray(feats["c3"][:1]).transpose(0, 3, 1, 2)
  out["latent_avg"] = np.asarray(latent_avg)
  return out


def check_config(config: E4EConfig, golden: dict) -> None:
  """Raise ValueError when the golden io config disagrees with the imported one."""
  ours = {
      "stylegan_size": config.stylegan_size,
      "n_styles": config.n_styles,
      "coarse_ind": config.coarse_ind,
      "middle_ind": config.middle_ind,
      "input_size": INPUT_SIZE,
      "style_dim": STYLE_DIM,
  }
  diff = {k: (v, golden[k]) for k, v in ours.items() if k in golden and golden[k] != v}
  if golden.get("progressive_stage", "Inference") != "Inference":
    diff["progressive_stage"] = ("Inference", golden["progressive_stage"])
  if diff:
    raise ValueError(f"e4e config mismatch (ours, golden): {diff}")


def compare(outputs: dict, io: dict) -> list[dict]:
  rows = [rel_row(name, outputs[name], io[name], TOL) for name in ("codes", "w_plus")]
  rows += [rel_row(name, outputs[name], io[name], TOL) for name in FEATURE_MEANS]
  rows.append(rel_row("c3_sample0", outputs["c3_sample0"], io["c3_sample0"], TOL))
  rows.append(rel_row("latent_avg", outputs["latent_avg"], io["latent_avg"], 0.0))
  return rows


def read_io(golden_dir) -> dict:
  with np.load(pathlib.Path(golden_dir) / IO_FILE, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


BACKENDS = ("jax",)  # no PyTorch twin of e4e


def check(golden_dir, backend: str = "jax") -> list[dict]:
  """Run e4e on the golden images and compare every output (rows as in the docstring)."""
  if backend != "jax":
    raise ValueError(f"e4e has no PyTorch twin: backend must be 'jax', got {backend!r}")
  golden_dir = pathlib.Path(golden_dir)
  config, variables, latent_avg = load_e4e(golden_dir / STATE_DICT_FILE)
  io = read_io(golden_dir)
  check_config(config, json.loads(str(io["config"])))
  return compare(run_jax(config, variables, latent_avg, io["x"]), io)
