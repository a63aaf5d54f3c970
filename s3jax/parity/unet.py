"""Golden-vector checks for the UNet and the DDIM sampler.

`check(golden_dir, backend)` reads `unet_tiny_io.npz` + `unet_tiny_state_dict.npz` (eps) and,
when present, `ddim_tiny_io.npz` (for every step count T it holds: `timestep_map_T`, `xT_T`
from inverting `x0`, and `rec_T` from sampling the golden `xT_T`). The model config comes from
the io file's `config` JSON. backend 'jax' runs the Flax UNet with `s3jax.diffusion`; 'torch'
runs the PyTorch twin with a plain-loop DDIM that uses the same float64 schedule.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from s3jax import diffusion
from s3jax.models.unet import UNet, UNetConfig
from s3jax.porting.state_dict import load_state_dict
from s3jax.porting.unet_keys import unet_params_from_torch

# The torch backend needs torch, an optional extra (pip install s3jax[torch]): it and the
# PyTorch twin are imported inside the torch functions only.

TOL = 1e-4


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  den = np.linalg.norm(ref)
  num = np.linalg.norm(out - ref)
  return float(num / den) if den > 0 else float(num)


def rel_row(name, out, ref, tol=TOL) -> dict:
  if np.shape(out) != np.shape(ref):
    return dict(
        name=name,
        rel_err=float("inf"),
        tol=tol,
        ok=False,
        error=f"shape {np.shape(out)} != reference {np.shape(ref)}",
    )
  e = rel_err(out, ref)
  return dict(name=name, rel_err=e, tol=tol, ok=bool(e <= tol))


def resolve_golden_dir(golden_dir) -> pathlib.Path:
  """Accept either the directory holding the files or its parent (`golden/` -> `golden/dva`)."""
  d = pathlib.Path(golden_dir)
  if not (d / "unet_tiny_io.npz").exists() and (d / "dva" / "unet_tiny_io.npz").exists():
    d = d / "dva"
  return d


def _ddim_counts(files) -> list[int]:
  return sorted(int(m.group(1)) for f in files if (m := re.fullmatch(r"xT_(\d+)", f)))


# ----------------------------------------------------------------------------- JAX backend
def _jax_runner(cfg_json, sd):
  cfg = UNetConfig.from_json(cfg_json)
  params = unet_params_from_torch(sd, cfg)
  model = UNet(cfg)

  def eps_fn(x, t, cond):
    return model.apply({"params": params}, x, t, cond)

  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
  nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))  # noqa: E731

  def eps(x, t, cond):
    return nchw(jax.jit(eps_fn)(nhwc(x), jnp.asarray(t, jnp.int32), jnp.asarray(cond)))

  def invert(x0, cond, n):
    f = jax.jit(functools.partial(diffusion.ddim_invert, eps_fn, num_steps=n))
    return nchw(f(nhwc(x0), jnp.asarray(cond)))

  def sample(xT, cond, n):
    f = jax.jit(functools.partial(diffusion.ddim_sample, eps_fn, num_steps=n))
    return nchw(f(nhwc(xT), jnp.asarray(cond)))

  return eps, invert, sample


# --------------------------------------------------------------------------- torch backend
def _torch_ddim(model, x, cond, n, invert, clip=True):
  import torch  # Lazy: optional extra.

  s = diffusion.respaced_schedule(n)
  ac = s["alphas_cumprod"]
  f32 = lambda a, i: torch.tensor(np.float32(a[i]))  # noqa: E731
  sr, srm1 = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1.0)
  target = s["alphas_cumprod_next"] if invert else s["alphas_cumprod_prev"]
  steps = range(n - 1) if invert else reversed(range(n))
  with torch.no_grad():
    for i in steps:
      t = torch.full((x.shape[0],), int(s["timesteps"][i]), dtype=torch.int64)
      eps = model(x, t, cond)
      x0 = f32(sr, i) * x - f32(srm1, i) * eps
      if clip:
        x0 = x0.clamp(-1, 1)
      eps = (f32(sr, i) * x - x0) / f32(srm1, i)
      a = f32(target, i)
      x = x0 * torch.sqrt(a) + torch.sqrt(1 - a) * eps
  return x


def _torch_runner(cfg_json, sd):
  import torch  # Lazy: optional extra.

  from s3jax.torch_twin.unet import from_state_dict  # imports torch

  model = from_state_dict(json.loads(cfg_json), sd)
  T = torch.from_numpy

  def eps(x, t, cond):
    with torch.no_grad():
      return model(T(x), T(np.asarray(t, np.int64)), T(cond)).numpy()

  def invert(x0, cond, n):
    return _torch_ddim(model, T(x0), T(cond), n, invert=True).numpy()

  def sample(xT, cond, n):
    return _torch_ddim(model, T(xT), T(cond), n, invert=False).numpy()

  return eps, invert, sample


BACKENDS = ("jax", "torch")


def check(golden_dir, backend: str = "jax") -> list[dict]:
  """Run the UNet/DDIM golden checks; rows are dict(name, rel_err, tol, ok)."""
  if backend not in ("jax", "torch"):
    raise ValueError(f"backend must be 'jax' or 'torch', got {backend!r}")
  d = resolve_golden_dir(golden_dir)
  io_path, sd_path = d / "unet_tiny_io.npz", d / "unet_tiny_state_dict.npz"
  for p in (io_path, sd_path):
    if not p.exists():
      raise FileNotFoundError(f"golden file not found: {p}")
  io = np.load(io_path)
  cfg_json = str(io["config"])
  sd = load_state_dict(sd_path)
  eps, invert, sample = (_jax_runner if backend == "jax" else _torch_runner)(cfg_json, sd)

  rows = [rel_row(f"{backend}/unet_tiny/eps", eps(io["x"], io["t"], io["cond"]), io["eps"])]
  ddim_path = d / "ddim_tiny_io.npz"
  if ddim_path.exists():
    dd = np.load(ddim_path)
    for n in _ddim_counts(dd.files):
      if f"timestep_map_{n}" in dd.files:
        rows.append(
            rel_row(
                f"{backend}/ddim_tiny/timestep_map_{n}",
                diffusion.respaced_timesteps(n),
                dd[f"timestep_map_{n}"],
                tol=0.0,
            )
        )
      rows.append(
          rel_row(f"{backend}/ddim_tiny/xT_{n}", invert(dd["x0"], dd["cond"], n), dd[f"xT_{n}"])
      )
      if f"rec_{n}" in dd.files:
        rows.append(
            rel_row(
                f"{backend}/ddim_tiny/rec_{n}", sample(dd[f"xT_{n}"], dd["cond"], n), dd[f"rec_{n}"]
            )
        )
  return rows
