"""Golden-vector check of the stylegan2-ada generator and the network-pickle reader
(``golden/stit/stylegan2_ada_tiny_*``).

``check(golden_dir, backend='jax')`` returns one row ``{'name', 'rel_err', 'tol', 'ok'}`` per
array of ``stylegan2_ada_tiny_io.npz`` (``||out - ref|| / ||ref||``, tol 1e-5):
- ``ws_*``: mapping with the file's truncation settings;
- ``img_*``: fused synthesis (``noise_mode='const'``) of the matching golden ws;
- ``feat_psi1_0_sample0_b*``: the block outputs of sample 0;
- ``img_mix``, ``img_mix_noise_none``, ``img_mix_clamped`` (the same weights with
  ``conv_clamp = conv_clamp_test``), and ``img_mix_nonfused``: ``img_mix`` through the
  non-fused (train) path.
Pickle rows (from ``stylegan2_ada_tiny.pkl``, read with :mod:`s3jax.porting.nvidia_pickle`):
``pickle_G_ema_state_dict`` (``rel_err`` is the max abs difference to the golden state dict;
tol 0, also key order, shapes and dtypes must match), ``pickle_G_ema_init_kwargs`` (0 when the
init_kwargs equal the io config's) and ``pickle_G_differs`` (0 when the pickle's ``G`` has
different weights, i.e. the reader takes the network it is asked for).

The model runs from the golden state dict through :mod:`s3jax.porting.stylegan2_keys`, with
the config from the io file. There is no PyTorch twin of the generator: backend 'jax' only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import numpy as np

from s3jax.models import stylegan2
from s3jax.parity.unet import rel_row
from s3jax.porting import nvidia_pickle
from s3jax.porting.state_dict import load_state_dict
from s3jax.porting.stylegan2_keys import variables_from_state_dict

IO_FILE = "stylegan2_ada_tiny_io.npz"
STATE_DICT_FILE = "stylegan2_ada_tiny_state_dict.npz"
PICKLE_FILE = "stylegan2_ada_tiny.pkl"
TOL = 1e-5
BACKENDS = ("jax",)  # no PyTorch twin of the generator
# ws array -> (truncation_psi, truncation_cutoff); the image of each is img_<suffix>.
TRUNCATIONS = {
    "ws_psi1_0": (1.0, None),
    "ws_psi0_7": (0.7, None),
    "ws_psi0_5_cutoff4": (0.5, 4),
}
INIT_KWARGS_KEYS = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
)


def resolve_golden_dir(golden_dir) -> pathlib.Path:
  """Accept the directory holding the files or its parent (``golden/`` -> ``golden/stit``)."""
  d = pathlib.Path(golden_dir)
  if not (d / IO_FILE).exists() and (d / "stit" / IO_FILE).exists():
    d = d / "stit"
  return d


def io_init_kwargs(config_json: dict) -> dict:
  """The ``Generator(**init_kwargs)`` part of the io file's config JSON."""
  return {k: config_json[k] for k in INIT_KWARGS_KEYS}


@functools.lru_cache(maxsize=8)
def jitted_mapping(config: stylegan2.GeneratorConfig, truncation_psi, truncation_cutoff):
  return jax.jit(
      lambda v, z: stylegan2.mapping(config, v, z, None, truncation_psi, truncation_cutoff)
  )


@functools.lru_cache(maxsize=8)
def jitted_synthesis(
    config: stylegan2.GeneratorConfig, noise_mode="const", fused_modconv=True, features=False
):
  return jax.jit(
      lambda v, ws: stylegan2.synthesis(
          config, v, ws, noise_mode, fused_modconv, return_features=features
      )
  )


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def run_jax(config: stylegan2.GeneratorConfig, sd: dict, io: dict) -> dict[str, np.ndarray]:
  """Every golden output, computed by the Flax generator, in the golden (NCHW) layout."""
  variables = variables_from_state_dict(sd, config)
  out = {}
  for name, (psi, cutoff) in TRUNCATIONS.items():
    out[name] = np.asarray(jitted_mapping(config, psi, cutoff)(variables, io["z"]))
  # One fused call for every golden ws (one compile): the three truncations, then ws_mix.
  names = list(TRUNCATIONS) + ["ws_mix"]
  img, feats = jitted_synthesis(config, features=True)(
      variables, np.concatenate([io[n] for n in names])
  )
  starts = np.cumsum([0] + [len(io[n]) for n in names])
  for name, a, b in zip(names, starts[:-1], starts[1:]):
    out["img" + name[2:]] = nchw(img[a:b])
  for res, x in feats.items():  # sample 0 of ws_psi1_0 is row 0
    out[f"feat_psi1_0_sample0_b{res}"] = nchw(x[:1])
  out["img_mix_noise_none"] = nchw(jitted_synthesis(config, "none")(variables, io["ws_mix"]))
  out["img_mix_nonfused"] = nchw(jitted_synthesis(config, "const", False)(variables, io["ws_mix"]))
  clamped = dataclasses.replace(config, conv_clamp=float(io["conv_clamp_test"]))
  out["img_mix_clamped"] = nchw(jitted_synthesis(clamped)(variables, io["ws_mix"]))
  return out


def reference_name(name: str) -> str:
  return "img_mix" if name == "img_mix_nonfused" else name


def pickle_rows(golden_dir: pathlib.Path, sd: dict, init_kwargs: dict) -> list[dict]:
  path = golden_dir / PICKLE_FILE
  kw, sd_pkl = nvidia_pickle.read_network_pickle(path, which="G_ema")
  same_layout = list(sd_pkl) == list(sd) and all(
      sd_pkl[k].shape == sd[k].shape and sd_pkl[k].dtype == sd[k].dtype for k in sd
  )
  diff = (
      max(float(np.max(np.abs(sd_pkl[k] - sd[k]), initial=0.0)) for k in sd)
      if same_layout
      else float("inf")
  )
  _, sd_g = nvidia_pickle.read_network_pickle(path, which="G")
  g_same = list(sd_g) == list(sd) and all(np.array_equal(sd_g[k], sd[k]) for k in sd)
  return [
      dict(name="pickle_G_ema_state_dict", rel_err=diff, tol=0.0, ok=diff == 0.0),
      dict(
          name="pickle_G_ema_init_kwargs",
          rel_err=float(kw != init_kwargs),
          tol=0.0,
          ok=kw == init_kwargs,
      ),
      dict(name="pickle_G_differs", rel_err=float(g_same), tol=0.0, ok=not g_same),
  ]


def check(golden_dir, backend: str = "jax") -> list[dict]:
  """Run the generator on the golden inputs and compare every golden output; then the pickle."""
  if backend not in BACKENDS:
    raise ValueError(
        f"the stylegan2 check has a 'jax' backend only (no PyTorch twin), got {backend!r}"
    )
  golden_dir = resolve_golden_dir(golden_dir)
  with np.load(golden_dir / IO_FILE) as z:
    io = {k: z[k] for k in z.files}
  init_kwargs = io_init_kwargs(json.loads(str(io["config"])))
  config = stylegan2.GeneratorConfig.from_init_kwargs(init_kwargs)
  sd = load_state_dict(golden_dir / STATE_DICT_FILE)
  outputs = run_jax(config, sd, io)
  rows = [rel_row(name, out, io[reference_name(name)], TOL) for name, out in outputs.items()]
  covered = {reference_name(n) for n in outputs}
  n = int(io["num_ws"])
  rows.append(
      dict(name="num_ws", rel_err=float(abs(config.num_ws - n)), tol=0.0, ok=config.num_ws == n)
  )
  inputs = {"config", "num_ws", "z", "c", "ws_mix", "conv_clamp_test"}
  missed = sorted(set(io) - covered - inputs)
  if missed:  # a golden array this check does not compare yet
    rows.append(
        dict(
            name="uncovered_arrays",
            rel_err=float(len(missed)),
            tol=0.0,
            ok=False,
            error=f"not compared: {missed}",
        )
    )
  if (golden_dir / PICKLE_FILE).exists():
    rows += pickle_rows(golden_dir, sd, init_kwargs)
  return rows
