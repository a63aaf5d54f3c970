"""Golden-vector check of the PyTorch twin of IP-FaceDiff's edit (`golden/ipfacediff`).

`check(golden_dir, backend='torch')` runs `s3jax.torch_twin.tokenflow` (diffusers / transformers
modules loaded from the golden files) through the golden run of README.md: encode the frames,
DDIM inversion (every step kept), the preview reconstruction, the TokenFlow-PnP edit with the
recorded keyframe offsets, decode; plus the propagation (f) and extended-attention (g) units.
Rows `{'name', 'rel_err', 'tol', 'ok'}` (`s3jax.parity.unet.rel_row`), at the README's float32
tolerances: inversion latents 2e-5, edit latents after step k 1e-5 * 1.8^k, edit frames 3e-3,
units 1e-6, integer arrays (keyframes, nearest-neighbour indices) exact.

`dtype='float64'` runs the twin in float64 against `io_f64.npz` (tolerance 1e-9; diffusers keeps
the float32 islands the reference has). It takes a few minutes on a CPU.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from s3jax.parity.unet import rel_row

# torch, diffusers and transformers (test extras) are imported by the twin, inside its functions.

IO_FILE = "io.npz"
IO_F64_FILE = "io_f64.npz"
BACKENDS = ("torch",)
# README.md "Tolerances", float32 column.
TOL_MODEL = 1e-5  # one UNet / VAE / text-encoder call, latents_x0
TOL_INVERSION = 2e-5
TOL_RECON = 2e-4
TOL_EDIT_START = 5e-5  # edit_eps, edit_noisy_latents, edit_step0_unet_*
TOL_EDIT = 3e-3  # all edit latents, edit frames, the last step's UNet call
TOL_UNIT = 1e-6  # propagation and extended attention alone
TOL_F64 = 1e-9


def step_tolerance(k: int) -> float:
  """README: edit_latents[k] to 1e-5 * 1.8^k in float32 (rounding grows ~1.6x per step)."""
  return 1e-5 * 1.8**k


def read_npz(path) -> dict:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def unet_calls_recorder(unet):
  """Forward hook recording (input sample, output) of every UNet call; returns (calls, handle)."""
  calls = []

  def hook(module, args, kwargs, output):
    sample = args[0] if args else kwargs["sample"]
    calls.append((sample.detach().numpy().copy(), output.sample.detach().numpy().copy()))

  return calls, unet.register_forward_hook(hook, with_kwargs=True)


def nn_indices_like_golden(nn_log, table: np.ndarray, blocks) -> np.ndarray:
  """The twin's nearest-neighbour indices in the golden flat layout (`edit_nn_table` order)."""
  ours = {}
  for step, per_batch in enumerate(nn_log):
    for batch, entries in enumerate(per_batch):
      for block, chunk, idx in entries:
        ours[(step, batch, block, chunk)] = idx.numpy()
  if len(ours) != len(table):
    raise ValueError(f"{len(ours)} nearest-neighbour searches, the golden run has {len(table)}")
  out = np.zeros(int((table[:, 4] + table[:, 5]).max()), np.int64)
  for step, batch, block, chunk, offset, n_rows, _ in table:
    idx = ours[(int(step), int(batch), str(blocks[block]), int(chunk))]
    if idx.shape != (n_rows,):
      raise ValueError(f"nn indices of {blocks[block]}: shape {idx.shape}, golden ({n_rows},)")
    out[offset : offset + n_rows] = idx
  return out


def unit_outputs(models, io: dict) -> dict:
  """Golden units (f) propagation and (g) extended attention on the twin's TokenFlow UNet."""
  import torch  # test extra

  from s3jax.torch_twin import tokenflow

  def tensor(name):
    return torch.as_tensor(io[name]).to(tokenflow.torch_dtype(models.dtype))

  out = {}
  with torch.no_grad():
    out["prop_out"] = np.stack(
        [
            tokenflow.propagate_keyframe_attention(
                tensor("prop_frame_feats")[0],
                tensor("prop_keyframe_feats")[0],
                tensor("prop_keyframe_attn_out"),
                int(b),
            )[0].numpy()
            for b in io["prop_batch_idx"]
        ]
    )
    controller = tokenflow.tokenflow_controller(models.unet)
    modules = dict(models.unet.named_modules())
    controller.qk_timesteps = frozenset(int(t) for t in io["edit_qk_injection_timesteps"])
    controller.mode = "keyframe"
    try:
      attn1 = modules[str(io["ea_block"])]
      for case in ("injected", "not_injected"):
        controller.t = int(io[f"ea_t_{case}"])
        out[f"ea_out_{case}"] = attn1(tensor("ea_x")).numpy()
      out["ea_down_out"] = modules[str(io["ea_down_block"])](tensor("ea_down_x")).numpy()
    finally:
      controller.mode = None
  return out


def run_torch(golden_dir, dtype: str = "float32") -> dict:
  """The twin on the golden run: {golden key: our array} (NCHW, numpy)."""
  import torch  # test extra

  from s3jax.torch_twin import tokenflow

  golden_dir = pathlib.Path(golden_dir)
  io = read_npz(golden_dir / IO_FILE)
  config = json.loads((golden_dir / "meta.json").read_text())["config"]
  models = tokenflow.load_models(golden_dir, dtype)
  prompts = [str(p) for p in io["text_prompts"]]
  out = {}
  with torch.no_grad():
    ids = torch.as_tensor(io["unet_in_timesteps"])
    sample = torch.as_tensor(io["unet_in_latents"]).to(tokenflow.torch_dtype(dtype))
    context = torch.as_tensor(io["unet_in_encoder_hidden_states"]).to(sample.dtype)
    out["unet_out"] = models.unet(sample, ids, encoder_hidden_states=context).sample.numpy()
  out["text_last_hidden_state"] = tokenflow.encode_text(models, prompts).numpy()
  x0 = tokenflow.encode_frames(models, io["frames"]).numpy()
  out["latents_x0"] = x0
  out["edit_vae_recon"] = tokenflow.decode_latents(models, x0).numpy()
  inverted = tokenflow.invert(
      models, x0, config["inversion_prompt"], config["n_inversion_steps"], save_steps=None
  )
  out["inversion_latents"] = np.stack([x0] + [inverted[int(t)] for t in io["inversion_timesteps"]])
  recon = tokenflow.reconstruct(
      models, inverted[max(inverted)], config["inversion_prompt"], config["n_inversion_steps"]
  )
  out["inversion_recon_latents"] = recon
  out["inversion_recon_frames"] = tokenflow.decode_latents(models, recon).numpy()
  calls, handle = unet_calls_recorder(models.unet)
  try:
    result = tokenflow.edit(
        models,
        x0,
        inverted,
        config["prompt"],
        config["inversion_prompt"],
        negative_prompt=config["negative_prompt"],
        n_timesteps=config["n_timesteps"],
        guidance_scale=config["guidance_scale"],
        pnp_f_t=config["pnp_f_t"],
        pnp_attn_t=config["pnp_attn_t"],
        batch_size=config["batch_size"],
        pivot_offsets=io["edit_pivot_offsets"],
        record_nn=True,
    )
  finally:
    handle.remove()
  per_step = len(calls) // len(result.timesteps)
  for key, step in (("step0", 0), ("steplast", len(result.timesteps) - 1)):
    step_calls = calls[step * per_step : (step + 1) * per_step]
    out[f"edit_{key}_unet_in"] = np.concatenate([c[0] for c in step_calls])
    out[f"edit_{key}_unet_out"] = np.concatenate([c[1] for c in step_calls])
  out["edit_eps"] = result.eps
  out["edit_noisy_latents"] = result.trajectory[0]
  out["edit_latents"] = np.stack(result.trajectory)
  out["edit_frames"] = result.frames
  out["edit_pivot_idx"] = result.pivots
  out["edit_nn_idx"] = nn_indices_like_golden(
      result.nn_log, io["edit_nn_table"], [str(b) for b in io["edit_nn_blocks"]]
  )
  out.update(unit_outputs(models, io))
  return out


def compare(out: dict, io: dict, dtype: str = "float32") -> list[dict]:
  """Rows of `out` against the golden arrays of `io` (io.npz, or io_f64.npz for float64)."""
  f32 = dtype == "float32"
  tols = {
      "unet_out": TOL_MODEL,
      "text_last_hidden_state": TOL_MODEL,
      "latents_x0": TOL_MODEL,
      "edit_vae_recon": TOL_MODEL,
      "inversion_latents": TOL_INVERSION,
      "inversion_recon_latents": TOL_RECON,
      "inversion_recon_frames": TOL_RECON,
      "edit_eps": TOL_EDIT_START,
      "edit_noisy_latents": TOL_EDIT_START,
      "edit_step0_unet_in": TOL_EDIT_START,
      "edit_step0_unet_out": TOL_EDIT_START,
      "edit_steplast_unet_in": TOL_EDIT,
      "edit_steplast_unet_out": TOL_EDIT,
      "edit_latents": TOL_EDIT,
      "edit_frames": TOL_EDIT,
      "prop_out": TOL_UNIT,
      "ea_out_injected": TOL_UNIT,
      "ea_out_not_injected": TOL_UNIT,
      "ea_down_out": TOL_UNIT,
  }
  rows = []
  for name, tol in tols.items():
    if name in io:
      rows.append(rel_row(name, out[name], io[name], tol if f32 else TOL_F64))
  if "edit_latents" in io:
    for k in range(len(io["edit_latents"])):
      tol = step_tolerance(k) if f32 else TOL_F64
      rows.append(rel_row(f"edit_latents[{k}]", out["edit_latents"][k], io["edit_latents"][k], tol))
  for name in ("edit_pivot_idx", "edit_nn_idx"):
    if name in io:
      row = rel_row(name, out[name], io[name], 0.0)
      if np.shape(out[name]) == np.shape(io[name]):
        row["mismatches"] = int(np.sum(np.asarray(out[name]) != np.asarray(io[name])))
      rows.append(row)
  return rows


def resolve_golden_dir(golden_dir) -> pathlib.Path:
  """Accept the folder holding io.npz or its parent (`golden/` -> `golden/ipfacediff`)."""
  d = pathlib.Path(golden_dir)
  if not (d / IO_FILE).exists() and (d / "ipfacediff" / IO_FILE).exists():
    d = d / "ipfacediff"
  return d


def check(golden_dir, backend: str = "torch", dtype: str = "float32") -> list[dict]:
  """The twin against the golden run (rows as in the module docstring)."""
  if backend not in BACKENDS:
    raise ValueError(f"the IP-FaceDiff twin check is torch only, got backend {backend!r}")
  golden_dir = resolve_golden_dir(golden_dir)
  out = run_torch(golden_dir, dtype)
  io = read_npz(golden_dir / IO_FILE)
  if dtype == "float64":
    f64 = read_npz(golden_dir / IO_F64_FILE)
    io = {k: f64.get(k, v) for k, v in io.items() if k in f64 or k == "edit_pivot_idx"}
  return compare(out, io, dtype)
