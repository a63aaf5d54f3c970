"""Golden-vector check of STIT's stitching tuning (`golden/stit/stitching_tuning_io.npz`).

`check(golden_dir, backend='jax'|'torch')` returns one row per output, `{'name', 'rel_err',
'tol', 'ok'}` (plus 'metric' when it is not `||out - ref|| / ||ref||`):

- the masks at half resolution (`*_mask_half`, also the `alt_*` set that exercises the inner
  dilation and `whole_image_border`): exact ('max_abs' must be 0);
- the upsampled masks, `inversion`, `edited`, `border_loss_steps`, `loss_steps` and
  `content_loss_steps[1:]`: relative error <= 1e-5; `content_loss_steps[0]` (rounding noise,
  ~2e-12) absolute <= 1e-6;
- `tuned` (the image after the 5 Adam steps): relative <= 1e-4;
- the tuned state dict (`stitching_tuned_state_dict.npz`): relative <= 1e-4 *per tensor* (the
  row holds the largest per-tensor error) and overall (all tensors as one vector); the
  mapping and the buffers must come back bit-identical.

The JAX backend runs `gan.stitching.StitchingTuner` (the batched, jitted code, here with one
frame); the torch backend the reference procedure on the PyTorch twin. `w_edit` is float64 in
the file; both backends cast it to float32 where the reference's synthesis does.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from s3jax.gan import stitching
from s3jax.models import stylegan2
from s3jax.porting.state_dict import load_state_dict
from s3jax.porting.stylegan2_keys import state_dict_from_variables, variables_from_state_dict

# The torch backend needs torch, an optional extra (pip install s3jax[torch]): it and the
# PyTorch twin are imported inside `run_torch` only.

GENERATOR_STATE_DICT = "stylegan2_ada_tiny_state_dict.npz"
GENERATOR_IO = "stylegan2_ada_tiny_io.npz"
IO_FILE = "stitching_tuning_io.npz"
TUNED_STATE_DICT = "stitching_tuned_state_dict.npz"
REL_TOL = 1e-5
TUNED_TOL = 1e-4
CONTENT_STEP0_ABS_TOL = 1e-6
MASKS = ("content", "border", "full")
MASK_SETS = ("", "alt_")
INIT_KWARGS = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def generator_init_kwargs(golden_dir) -> dict:
  """The tiny generator's init_kwargs, from the `config` of its io file."""
  with np.load(pathlib.Path(golden_dir) / GENERATOR_IO) as z:
    config = json.loads(str(z["config"]))
  return {k: config[k] for k in INIT_KWARGS}


def load_golden_generator(golden_dir):
  """(GeneratorConfig, variables) of the golden tiny generator."""
  golden_dir = pathlib.Path(golden_dir)
  config = stylegan2.GeneratorConfig.from_init_kwargs(generator_init_kwargs(golden_dir))
  sd = load_state_dict(golden_dir / GENERATOR_STATE_DICT)
  return config, variables_from_state_dict(sd, config)


def mask_settings(config: dict, prefix: str) -> dict:
  """calc_masks' arguments for the main ('') or the alternative ('alt_') mask set."""
  c = config if prefix == "" else config["alt_masks"]
  outer = c["outer_mask_dilation"]
  return dict(
      border_pixels=config["border_pixels"] if prefix == "" else outer,  # = outer in STIT
      inner_mask_dilation=c["inner_mask_dilation"],
      outer_mask_dilation=outer,
      whole_image_border=c["whole_image_border"],
  )


def nchw(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def run_jax(golden_dir, io: dict, config: dict) -> dict:
  """JAX outputs in the golden layout (NCHW), the tuned state dict included."""
  gen_config, variables = load_golden_generator(golden_dir)
  out = {}
  inversion = stylegan2.synthesis(gen_config, variables, io["w_pivot"].astype(np.float32))
  out["inversion"] = nchw(jax.device_get(inversion))
  size = gen_config.img_resolution
  for prefix in MASK_SETS:
    s = mask_settings(config, prefix)
    half = stitching.create_masks(
        s["border_pixels"] // 2,
        nhwc(io["face_mask_half"]),
        s["inner_mask_dilation"] // 2,
        s["outer_mask_dilation"] // 2,
        s["whole_image_border"],
    )
    full = stitching.calc_masks(nhwc(io["face_mask_half"]), image_size=size, **s)
    for name, h, f in zip(MASKS, half, full):
      out[f"{prefix}{name}_mask_half"] = nchw(h)
      out[f"{prefix}{name}_mask"] = nchw(f)
  tuner = stitching.StitchingTuner(
      gen_config,
      variables,
      num_steps=config["num_steps"],
      lr=config["lr"],
      content_loss_lambda=config["content_loss_lambda"],
      frames_per_chunk=1,
      return_params=True,
      **mask_settings(config, ""),
  )
  res = tuner.tune(io["w_edit"], nhwc(io["crop"]), nhwc(io["face_mask_half"]))
  out["edited"] = nchw(res["edited"])
  out["tuned"] = nchw(res["images"])
  for k in ("border", "content"):
    out[f"{k}_loss_steps"] = res["losses"][k][0]
  out["loss_steps"] = res["losses"]["loss"][0]
  tuned = jax.tree.map(lambda x: x[0], res["params"])
  tuned_variables = {
      "params": {"mapping": variables["params"]["mapping"], "synthesis": tuned},
      "buffers": variables["buffers"],
  }
  out["tuned_state_dict"] = state_dict_from_variables(tuned_variables, gen_config)
  return out


def run_torch(golden_dir, io: dict, config: dict) -> dict:
  import torch  # Lazy: optional extra.

  from s3jax.torch_twin import stitching as twin_stitching  # imports torch
  from s3jax.torch_twin.stylegan2 import from_state_dict

  gen = from_state_dict(
      generator_init_kwargs(golden_dir), load_state_dict(golden_dir / GENERATOR_STATE_DICT)
  )
  t = lambda k: torch.as_tensor(io[k])
  out = {}
  with torch.no_grad():
    out["inversion"] = gen.synthesis(t("w_pivot"), noise_mode="const").numpy()
    edited = gen.synthesis(t("w_edit"), noise_mode="const")
  out["edited"] = edited.numpy()
  size = gen.img_resolution
  for prefix in MASK_SETS:
    s = mask_settings(config, prefix)
    half = twin_stitching.create_masks(
        s["border_pixels"] // 2,
        t("face_mask_half"),
        s["inner_mask_dilation"] // 2,
        s["outer_mask_dilation"] // 2,
        s["whole_image_border"],
    )
    full = twin_stitching.calc_masks(t("face_mask_half"), image_size=size, **s)
    for name, h, f in zip(MASKS, half, full):
      out[f"{prefix}{name}_mask_half"] = h.numpy()
      out[f"{prefix}{name}_mask"] = f.numpy()
  losses = {}
  image, tuned = twin_stitching.optimize_border(
      gen,
      t("crop"),
      edited,
      t("w_edit"),
      torch.as_tensor(out["border_mask"]),
      torch.as_tensor(out["content_mask"]),
      num_steps=config["num_steps"],
      content_loss_lambda=config["content_loss_lambda"],
      lr=config["lr"],
      losses=losses,
      return_generator=True,
  )
  out["tuned"] = image.numpy()
  for k in ("border", "content"):
    out[f"{k}_loss_steps"] = np.asarray(losses[k], np.float32)
  out["loss_steps"] = np.asarray(losses["loss"], np.float32)
  out["tuned_state_dict"] = {k: v.detach().numpy() for k, v in tuned.state_dict().items()}
  return out


def row(name, err, tol, metric="rel") -> dict:
  return {"name": name, "rel_err": float(err), "tol": tol, "ok": bool(err <= tol), "metric": metric}


def compare(out: dict, io: dict, tuned_ref: dict, original: dict) -> list[dict]:
  rows = []
  for prefix in MASK_SETS:
    for name in MASKS:
      key = f"{prefix}{name}_mask_half"
      rows.append(row(key, np.abs(out[key] - io[key]).max(), 0.0, "max_abs"))
    for name in MASKS:
      key = f"{prefix}{name}_mask"
      rows.append(row(key, rel_err(out[key], io[key]), REL_TOL))
  for key in ("inversion", "edited", "border_loss_steps", "loss_steps"):
    rows.append(row(key, rel_err(out[key], io[key]), REL_TOL))
  content, content_ref = out["content_loss_steps"], io["content_loss_steps"]
  rows.append(row("content_loss_steps[1:]", rel_err(content[1:], content_ref[1:]), REL_TOL))
  rows.append(
      row("content_loss_steps[0]", abs(content[0] - content_ref[0]), CONTENT_STEP0_ABS_TOL, "abs")
  )
  rows.append(row("loss_step0", rel_err(out["loss_steps"][0], io["loss_step0"]), REL_TOL))
  rows.append(row("tuned", rel_err(out["tuned"], io["tuned"]), TUNED_TOL))
  sd = out["tuned_state_dict"]
  if set(sd) != set(tuned_ref):
    raise KeyError(f"tuned state dict keys differ: {sorted(set(sd) ^ set(tuned_ref))}")
  per_tensor = {k: rel_err(sd[k], tuned_ref[k]) for k in tuned_ref}
  worst = max(per_tensor, key=per_tensor.get)
  rows.append(row(f"tuned_state_dict (max per tensor: {worst})", per_tensor[worst], TUNED_TOL))
  flat = lambda d: np.concatenate([np.asarray(d[k], np.float64).ravel() for k in tuned_ref])
  rows.append(row("tuned_state_dict (overall)", rel_err(flat(sd), flat(tuned_ref)), TUNED_TOL))
  frozen = [
      k
      for k in tuned_ref
      if not k.startswith("synthesis.") or k.endswith(("resample_filter", "noise_const"))
  ]
  moved = max(float(np.abs(np.asarray(sd[k]) - original[k]).max()) for k in frozen)
  rows.append(row("mapping and buffers unchanged", moved, 0.0, "max_abs"))
  return rows


BACKENDS = ("jax", "torch")  # torch: the reference procedure on the twin


def check(golden_dir, backend: str = "jax") -> list[dict]:
  """Run the stitching tuning of the golden frame and compare with the reference's outputs."""
  golden_dir = pathlib.Path(golden_dir)
  with np.load(golden_dir / IO_FILE) as z:
    io = {k: z[k] for k in z.files}
  config = json.loads(str(io["config"]))
  if backend == "jax":
    out = run_jax(golden_dir, io, config)
  elif backend == "torch":
    out = run_torch(golden_dir, io, config)
  else:
    raise ValueError(f"backend must be 'jax' or 'torch', got {backend!r}")
  tuned_ref = load_state_dict(golden_dir / TUNED_STATE_DICT)
  original = load_state_dict(golden_dir / GENERATOR_STATE_DICT)
  return compare(out, io, tuned_ref, original)
