"""e4e (pSp) checkpoints -> Flax variables of :class:`s3jax.models.e4e.Encoder4Editing`.

The layout is pSp's, as in the published ``e4e_ffhq_encode.pt`` and in
``golden/stit/e4e_tiny_state_dict.npz``:

* ``.pt``/``.pth``: ``{'state_dict': {'encoder.*', 'decoder.*'}, 'opts': {...},
  'latent_avg': (n_styles, 512), ...}``, read with ``torch.load(weights_only=True)`` only
  (:func:`s3jax.porting.state_dict.torch_load`; a pickle of arbitrary objects is refused). A
  flat dict of tensors (``encoder.*`` + ``latent_avg``) is accepted too. Other top-level
  entries (a discriminator or optimizer state) are not read.
* ``.safetensors`` / golden ``.npz``: the flat ``encoder.*`` + ``latent_avg`` tensors.

``decoder.*`` (the rosinality StyleGAN2 inside pSp) is ignored: STIT renders with its own
stylegan2-ada generator and takes only the W+ codes from e4e. ``num_batches_tracked`` buffers
may hold any value or be absent.

The config: ``stylegan_size`` comes from ``opts`` when the file has them, else from the
number of ``encoder.styles.*`` blocks (``n_styles = 2*log2(size) - 2``); both must agree.
``latent_avg`` may be stored as (n_styles, 512) or as one (512,)/(1, 512) row, which pSp's
``latent_avg.repeat(B, 1, 1)`` broadcasts the same way; it is returned as (n_styles, 512).
With ``opts['start_from_latent_avg'] == False`` pSp adds nothing, and zeros are returned.
"""

from __future__ import annotations

import functools
import pathlib
import re
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from s3jax.models.e4e import INPUT_SIZE, STYLE_DIM, E4EConfig, Encoder4Editing
from s3jax.porting import encoder_keys
from s3jax.porting.encoder_keys import EncoderKeyError
from s3jax.porting.state_dict import (
    PT_SUFFIXES,
    StateDictError,
    load_state_dict,
    to_numpy,
    torch_load,
)

ENCODER_PREFIX = "encoder."
LATENT_AVG_KEY = "latent_avg"
IGNORED_PREFIXES = ("decoder.",)  # STIT never uses pSp's own generator
E4E_ENCODER_TYPE = "Encoder4Editing"
_STYLE_KEY = re.compile(r"^encoder\.styles\.(\d+)\.")

# kind -> (torch suffix, flax collection, flax leaf) per tensor.
_LEAVES = {
    "conv": (("weight", "params", "kernel"),),
    "conv_bias": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "bn": (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ),
    "prelu": (("weight", "params", "alpha"),),
    "equal_linear": (("weight", "params", "kernel"), ("bias", "params", "bias")),
}


def _layout(config: E4EConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(torch module, flax module path, kind), without the ``encoder.`` prefix."""
  yield from encoder_keys.irse50_body_layout()
  for i in range(config.n_styles):
    for j in range(config.num_style_convs(i)):  # Sequential(conv, lrelu, conv, lrelu, ...)
      yield f"styles.{i}.convs.{2 * j}", (f"styles_{i}", f"convs_{j}"), "conv_bias"
    yield f"styles.{i}.linear", (f"styles_{i}", "linear"), "equal_linear"
  yield "latlayer1", ("latlayer1",), "conv_bias"
  yield "latlayer2", ("latlayer2",), "conv_bias"


def _to_flax(suffix: str, a: np.ndarray) -> np.ndarray:
  if suffix != "weight":
    return a
  if a.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
    return a.transpose(2, 3, 1, 0)
  if a.ndim == 2:  # Linear (out, in) -> (in, out)
    return a.T
  return a


def _torch_shape(flax_shape: tuple[int, ...], suffix: str) -> tuple[int, ...]:
  if suffix == "weight" and len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  if suffix == "weight" and len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


@functools.lru_cache(maxsize=4)
def _expected_shapes(config: E4EConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, module path..., leaf): shape} of the Flax model, from jax.eval_shape."""
  model = Encoder4Editing(config)
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return {
      tuple(p.key for p in path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_keys(config: E4EConfig) -> list[str]:
  """Every ``encoder.*`` key (without ``num_batches_tracked``) the importer reads."""
  return [
      f"{ENCODER_PREFIX}{t}.{suffix}"
      for t, _, kind in _layout(config)
      for suffix, _, _ in _LEAVES[kind]
  ]


def infer_config(sd: Mapping[str, Any], opts: Optional[Mapping[str, Any]] = None) -> E4EConfig:
  """The e4e config: ``opts['stylegan_size']`` when given, checked against the style blocks."""
  if opts is not None:
    encoder_type = opts.get("encoder_type", E4E_ENCODER_TYPE)
    if encoder_type != E4E_ENCODER_TYPE:
      raise StateDictError(
          f"the checkpoint's encoder_type is {encoder_type!r}; only {E4E_ENCODER_TYPE!r} "
          "(e4e) is supported"
      )
  indices = {int(m.group(1)) for k in sd if (m := _STYLE_KEY.match(k))}
  if not indices:
    raise EncoderKeyError("no 'encoder.styles.*' keys: not an e4e (pSp) checkpoint")
  n_styles = max(indices) + 1
  if n_styles % 2 or n_styles < 2:
    raise EncoderKeyError(f"{n_styles} style blocks: n_styles = 2*log2(size) - 2 must be even")
  inferred = 2 ** ((n_styles + 2) // 2)
  size = inferred
  if opts is not None and opts.get("stylegan_size") is not None:
    size = int(opts["stylegan_size"])
    if size != inferred:
      raise EncoderKeyError(
          f"opts['stylegan_size'] = {size} needs {E4EConfig(size).n_styles} style blocks, "
          f"the state dict has {n_styles}"
      )
  return E4EConfig(stylegan_size=size)


def e4e_variables_from_torch(sd: Mapping[str, Any], config: E4EConfig) -> dict:
  """pSp ``encoder.*`` tensors -> ``{'params', 'batch_stats'}`` of :class:`Encoder4Editing`.

  Keys outside ``encoder.`` are not looked at here. Raises :class:`EncoderKeyError` naming
  the key on a missing, unexpected or wrongly shaped ``encoder.*`` tensor.
  """
  expected = _expected_shapes(config)
  rest = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
  found = []  # every key and shape is checked before anything is converted
  for tprefix, fpath, kind in _layout(config):
    full = f"{ENCODER_PREFIX}{tprefix}"
    for suffix, coll, leaf in _LEAVES[kind]:
      key = f"{full}.{suffix}"
      path = (coll,) + fpath + (leaf,)
      if key not in rest:
        raise EncoderKeyError(f"missing e4e parameter {key!r} (-> flax {'/'.join(path)})")
      a = to_numpy(rest.pop(key))
      want = _torch_shape(expected[path], suffix)
      if a.shape != want:
        raise EncoderKeyError(
            f"shape mismatch for e4e parameter {key!r}: got {a.shape}, expected {want}"
        )
      found.append((path, suffix, a))
    if kind == "bn":
      rest.pop(f"{full}.num_batches_tracked", None)
  if rest:
    names = sorted(rest)
    raise EncoderKeyError(
        f"unexpected e4e parameter(s) {names[:5]}"
        + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    )
  out: dict = {}
  for path, suffix, a in found:
    _set(out, path, np.ascontiguousarray(_to_flax(suffix, np.asarray(a, np.float32))))
  return out


def latent_avg_from(sd: Mapping[str, Any], config: E4EConfig, opts=None) -> np.ndarray:
  """``latent_avg`` as (n_styles, 512) float32 (zeros when pSp would not add it)."""
  if opts is not None and opts.get("start_from_latent_avg") is False:
    return np.zeros((config.n_styles, STYLE_DIM), np.float32)
  if LATENT_AVG_KEY not in sd:
    raise EncoderKeyError(f"missing {LATENT_AVG_KEY!r}: pSp adds it to the e4e codes")
  a = np.asarray(to_numpy(sd[LATENT_AVG_KEY]), np.float32)
  if a.shape not in ((config.n_styles, STYLE_DIM), (1, STYLE_DIM), (STYLE_DIM,)):
    raise EncoderKeyError(
        f"shape mismatch for {LATENT_AVG_KEY!r}: got {a.shape}, expected "
        f"({config.n_styles}, {STYLE_DIM}) or ({STYLE_DIM},)"
    )
  return np.ascontiguousarray(np.broadcast_to(a, (config.n_styles, STYLE_DIM)))


def e4e_from_state_dict(
    sd: Mapping[str, Any], opts: Optional[Mapping[str, Any]] = None
) -> tuple[E4EConfig, dict, np.ndarray]:
  """A flat pSp state dict (+ optional ``opts``) -> (config, variables, latent_avg).

  ``decoder.*`` keys are ignored; any other key outside ``encoder.*`` and ``latent_avg`` is
  an :class:`EncoderKeyError`.
  """
  stray = sorted(
      k
      for k in sd
      if not k.startswith((ENCODER_PREFIX,) + IGNORED_PREFIXES) and k != LATENT_AVG_KEY
  )
  if stray:
    raise EncoderKeyError(f"unexpected key(s) in the e4e checkpoint: {stray[:5]}")
  config = infer_config(sd, opts)
  return config, e4e_variables_from_torch(sd, config), latent_avg_from(sd, config, opts)


def read_e4e_checkpoint(path) -> tuple[dict[str, Any], Optional[dict]]:
  """(flat state dict with ``latent_avg``, opts or None) of a .pt/.safetensors/.npz file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"e4e checkpoint not found: {path}")
  if not path.name.lower().endswith(PT_SUFFIXES):
    return load_state_dict(path), None
  obj = torch_load(path)
  if not isinstance(obj, Mapping):
    raise StateDictError(f"{path}: expected a dict, got {type(obj).__name__}")
  opts = obj.get("opts")
  if opts is not None and not isinstance(opts, Mapping):
    raise StateDictError(f"{path}: 'opts' is a {type(opts).__name__}, not a dict")
  if isinstance(obj.get("state_dict"), Mapping):
    sd = dict(obj["state_dict"])
    if LATENT_AVG_KEY in obj and obj[LATENT_AVG_KEY] is not None:
      sd.setdefault(LATENT_AVG_KEY, obj[LATENT_AVG_KEY])
  else:
    sd = {k: v for k, v in obj.items() if k != "opts"}
  return sd, (dict(opts) if opts is not None else None)


def load_e4e(path) -> tuple[E4EConfig, dict, np.ndarray]:
  """Read an e4e checkpoint: (config, Flax variables, latent_avg (n_styles, 512) float32).

  Formats and checks as in the module docstring; ``decoder.*`` is ignored.
  """
  sd, opts = read_e4e_checkpoint(path)
  return e4e_from_state_dict(sd, opts)
