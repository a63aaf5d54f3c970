"""Reference frozen-encoder state dicts <-> Flax variables of :class:`OfficialEncoders`.

Torch layout (as in ``golden/dva/encoders_state_dict.npz``; the full DVA adds ``encoder.``):
``idnet.backbone.*`` (IR-SE50), ``lndnet.backbone.*`` (MobileNetV2-GDConv),
``bgnet.backbone.*`` (BiSeNet). ``linear.*`` (the 614->512 fusion) belongs to
:mod:`s3jax.models.autoencoder` and is skipped here by default.

Two quirks of the reference are handled:

* The landmark net registers torchvision's MobileNetV2 twice: ``pretrain_net.features.*``
  and ``base_net.0.*`` are the *same* modules. ``load_state_dict`` copies both key sets
  into those modules in registration order, so ``base_net.0.*`` wins; import therefore
  takes ``base_net.0.*`` (a mismatching ``pretrain_net.features.*`` copy is only
  shape-checked) and export writes the one tensor under both names.
* ``pretrain_net.classifier.1`` (ImageNet head) is unused in the forward pass; it is
  kept as ``lndnet/classifier_kernel|bias`` so checkpoints round-trip.

``num_batches_tracked`` buffers are accepted (any value) or may be absent on import;
export writes them as int64 zeros unless ``num_batches_tracked=False``.

Published files (``import_published_encoder``): ``model_ir_se50.pth`` is a bare IR-SE50
``Backbone`` state dict, ``mobilenet_224_model_best_gdconv_external.pth.tar`` is
``{'state_dict': {'module.' + key: ...}, ...}`` of ``MobileNet_GDConv``, and
``79999_iter.pth`` is a bare ``BiSeNet(19)`` state dict.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from s3jax.models import face_encoders as fe

NETS = ("idnet", "lndnet", "bgnet")
# kind -> torch parameter suffixes (num_batches_tracked handled separately for 'bn').
_KIND_SUFFIXES = {
    "conv": ("weight",),
    "dense": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "prelu": ("weight",),
}


class EncoderKeyError(KeyError):
  """Missing / unexpected / wrongly shaped encoder parameter (message names it)."""

  def __str__(self):  # KeyError quotes its message; keep it readable
    return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------
# Layout tables: (torch module prefix, flax module path, kind).
# ----------------------------------------------------------------------------------------
def irse50_body_layout() -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(torch module, flax module path, kind) of IR-SE50's input layer and 24 body units: the
  ArcFace net's and e4e's (``porting.e4e_keys``) share them."""
  yield "input_layer.0", ("input_conv",), "conv"
  yield "input_layer.1", ("input_bn",), "bn"
  yield "input_layer.2", ("input_prelu",), "prelu"
  for i, (cin, depth, _) in enumerate(fe.IRSE50_UNITS):
    t, f = f"body.{i}", f"body_{i}"
    if cin != depth:
      yield f"{t}.shortcut_layer.0", (f, "shortcut_conv"), "conv"
      yield f"{t}.shortcut_layer.1", (f, "shortcut_bn"), "bn"
    yield f"{t}.res_layer.0", (f, "bn0"), "bn"
    yield f"{t}.res_layer.1", (f, "conv1"), "conv"
    yield f"{t}.res_layer.2", (f, "prelu"), "prelu"
    yield f"{t}.res_layer.3", (f, "conv2"), "conv"
    yield f"{t}.res_layer.4", (f, "bn2"), "bn"
    yield f"{t}.res_layer.5.fc1", (f, "se_fc1"), "conv"
    yield f"{t}.res_layer.5.fc2", (f, "se_fc2"), "conv"


def _irse50_layout() -> Iterator[tuple[str, tuple[str, ...], str]]:
  yield from irse50_body_layout()
  yield "output_layer.0", ("output_bn",), "bn"
  yield "output_layer.3", ("output_linear",), "dense"
  yield "output_layer.4", ("output_bn1d",), "bn"


def _convbn(t: str, f: tuple[str, ...], conv="0", bn="1"):
  yield f"{t}.{conv}", f + ("conv",), "conv"
  yield f"{t}.{bn}", f + ("bn",), "bn"


def _mobilenet_features_layout(tprefix: str):
  yield from _convbn(f"{tprefix}.0", ("features_0",))
  for i, (_, _, _, t) in enumerate(fe.MOBILENET_V2_BLOCKS, start=1):
    tp, fp = f"{tprefix}.{i}.conv", f"features_{i}"
    j = 0
    if t != 1:
      yield from _convbn(f"{tp}.0", (fp, "expand"))
      j = 1
    yield from _convbn(f"{tp}.{j}", (fp, "dw"))
    yield from _convbn(tp, (fp, "project"), conv=str(j + 1), bn=str(j + 2))
  last = len(fe.MOBILENET_V2_BLOCKS) + 1
  yield from _convbn(f"{tprefix}.{last}", (f"features_{last}",))


def _mobilenet_layout():
  # The effective copy (see module docstring) comes first.
  yield from _mobilenet_features_layout("base_net.0")
  yield from _convbn("linear7", ("linear7",), conv="conv", bn="bn")
  yield from _convbn("linear1", ("linear1",), conv="conv", bn="bn")
  yield "pretrain_net.classifier.1", ("classifier",), "dense_flat"


def _mobilenet_aliases():
  """(alias torch prefix, canonical torch prefix) for the shared torchvision features."""
  for (a, _, _), (c, _, _) in zip(
      _mobilenet_features_layout("pretrain_net.features"), _mobilenet_features_layout("base_net.0")
  ):
    yield a, c


def _bisenet_layout():
  r = "cp.resnet"
  yield f"{r}.conv1", ("cp", "resnet", "conv1"), "conv"
  yield f"{r}.bn1", ("cp", "resnet", "bn1"), "bn"
  cin = 64
  for li, cout, stride in ((1, 64, 1), (2, 128, 2), (3, 256, 2), (4, 512, 2)):
    for b in range(2):
      t, f = f"{r}.layer{li}.{b}", ("cp", "resnet", f"layer{li}_{b}")
      yield f"{t}.conv1", f + ("conv1",), "conv"
      yield f"{t}.bn1", f + ("bn1",), "bn"
      yield f"{t}.conv2", f + ("conv2",), "conv"
      yield f"{t}.bn2", f + ("bn2",), "bn"
      if b == 0 and (cin != cout or stride != 1):
        yield f"{t}.downsample.0", f + ("downsample_conv",), "conv"
        yield f"{t}.downsample.1", f + ("downsample_bn",), "bn"
    cin = cout
  for arm in ("arm16", "arm32"):
    yield from _convbn(f"cp.{arm}.conv", ("cp", arm, "conv"), conv="conv", bn="bn")
    yield f"cp.{arm}.conv_atten", ("cp", arm, "conv_atten"), "conv"
    yield f"cp.{arm}.bn_atten", ("cp", arm, "bn_atten"), "bn"
  for head in ("conv_head32", "conv_head16", "conv_avg"):
    yield from _convbn(f"cp.{head}", ("cp", head), conv="conv", bn="bn")
  yield from _convbn("ffm.convblk", ("ffm", "convblk"), conv="conv", bn="bn")
  yield "ffm.conv1", ("ffm", "conv1"), "conv"
  yield "ffm.conv2", ("ffm", "conv2"), "conv"
  for out in ("conv_out", "conv_out16", "conv_out32"):
    yield from _convbn(f"{out}.conv", (out, "conv"), conv="conv", bn="bn")
    yield f"{out}.conv_out", (out, "conv_out"), "conv"


_LAYOUTS = {"idnet": _irse50_layout, "lndnet": _mobilenet_layout, "bgnet": _bisenet_layout}


# ----------------------------------------------------------------------------------------
# Per-kind tensor conversion.
# ----------------------------------------------------------------------------------------
def _leaf_entries(kind: str) -> list[tuple[str, str, str]]:
  """(torch suffix, flax collection, flax leaf name) for a module kind."""
  if kind == "conv":
    return [("weight", "params", "kernel")]
  if kind == "dense":
    return [("weight", "params", "kernel"), ("bias", "params", "bias")]
  if kind == "dense_flat":  # params declared directly on the parent module
    return [("weight", "params", "classifier_kernel"), ("bias", "params", "classifier_bias")]
  if kind == "bn":
    return [
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ]
  if kind == "prelu":
    return [("weight", "params", "alpha")]
  raise ValueError(kind)


# Array methods only (no np.* calls), so the mapping also runs under jax.eval_shape.
def _to_flax(kind: str, suffix: str, a):
  if suffix == "weight" and kind == "conv":
    return a.transpose(2, 3, 1, 0)  # (O, I/g, kh, kw) -> (kh, kw, I/g, O)
  if suffix == "weight" and kind in ("dense", "dense_flat"):
    return a.transpose(1, 0)  # (O, I) -> (I, O)
  return a


def _to_torch(kind: str, suffix: str, a):
  if suffix == "weight" and kind == "conv":
    return a.transpose(3, 2, 0, 1)
  if suffix == "weight" and kind in ("dense", "dense_flat"):
    return a.transpose(1, 0)
  return a


def _torch_shape(kind: str, suffix: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if suffix == "weight" and kind == "conv":
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  if suffix == "weight" and kind in ("dense", "dense_flat"):
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def _flax_path(net: str, fpath: tuple[str, ...], kind: str, leaf: str) -> tuple[str, ...]:
  return (net,) + (fpath[:-1] if kind == "dense_flat" else fpath) + (leaf,)


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, net, ..., leaf): shape} of OfficialEncoders via jax.eval_shape."""
  abstract = fe.init_variables()
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def _entries(net: str):
  """Yield (torch_key (no net prefix), kind, suffix, flax (collection, path...))."""
  for tprefix, fpath, kind in _LAYOUTS[net]():
    for suffix, coll, leaf in _leaf_entries(kind):
      yield f"{tprefix}.{suffix}", kind, suffix, (coll,) + _flax_path(net, fpath, kind, leaf)


def _num_batches_keys(net: str) -> list[str]:
  keys = [f"{t}.num_batches_tracked" for t, _, k in _LAYOUTS[net]() if k == "bn"]
  if net == "lndnet":
    keys += [
        f"{a}.num_batches_tracked"
        for a, c in _mobilenet_aliases()
        if f"{c}.num_batches_tracked" in keys
    ]
  return keys


def _to_array(v, dtype=None):
  """numpy array from a tensor/array; JAX tracers (under eval_shape/jit) pass through."""
  if hasattr(v, "detach"):  # torch.Tensor without importing torch
    v = v.detach().cpu().numpy()
  if _is_tracer(v):
    return v if dtype is None else v.astype(dtype)
  return np.asarray(v, dtype)


def _is_tracer(v) -> bool:
  return isinstance(v, jax.core.Tracer)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------
def encoders_params_from_torch(
    sd: Mapping[str, Any],
    *,
    prefix: str = "",
    nets: tuple[str, ...] = NETS,
    ignore_prefixes: tuple[str, ...] = ("linear.",),
) -> dict:
  """Reference encoder state dict -> Flax variables ``{'params':..., 'batch_stats':...}``.

  ``sd`` maps ``prefix + '<net>.backbone.<key>'`` to arrays/tensors (torch layout);
  keys without ``prefix`` are ignored, as are keys starting with ``prefix`` +
  one of ``ignore_prefixes``. Raises :class:`EncoderKeyError` naming the parameter on a
  missing key, an unexpected key or a shape mismatch.
  """
  expected = _expected_shapes()
  rest = {}
  for k, v in sd.items():
    if not k.startswith(prefix):
      continue
    k = k[len(prefix) :]
    if any(k.startswith(p) for p in ignore_prefixes):
      continue
    rest[k] = v
  out: dict = {}
  for net in nets:
    bp = f"{net}.backbone."
    for tkey, kind, suffix, fpath in _entries(net):
      full = bp + tkey
      if full not in rest:
        raise EncoderKeyError(
            f"missing encoder parameter {prefix + full!r} " f"(-> flax {'/'.join(fpath)})"
        )
      a = _to_array(rest.pop(full), np.float32)
      want = expected[fpath]
      if tuple(a.shape) != _torch_shape(kind, suffix, want):
        raise EncoderKeyError(
            f"shape mismatch for encoder parameter {prefix + full!r}: got torch shape "
            f"{tuple(a.shape)}, expected {_torch_shape(kind, suffix, want)} "
            f"(flax {'/'.join(fpath)} {want})"
        )
      _set(out, fpath, _to_flax(kind, suffix, a))
    if net == "lndnet":  # duplicate registration of torchvision features
      for alias, canon in _mobilenet_aliases():
        for tkey, kind, suffix, fpath in _entries_for_prefix(canon):
          akey = bp + alias + tkey[len(canon) :]
          if akey not in rest:
            raise EncoderKeyError(
                f"missing encoder parameter {prefix + akey!r} " f"(alias of {prefix + bp + tkey!r})"
            )
          a = rest.pop(akey)
          want = _torch_shape(kind, suffix, expected[fpath])
          if tuple(a.shape) != want:
            raise EncoderKeyError(
                f"shape mismatch for encoder parameter "
                f"{prefix + akey!r}: got {tuple(a.shape)}, "
                f"expected {tuple(want)}"
            )
    for nb in _num_batches_keys(net):
      rest.pop(bp + nb, None)
  if rest:
    names = sorted(rest)
    raise EncoderKeyError(
        f"unexpected encoder parameter(s) {[prefix + n for n in names[:5]]}"
        + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    )
  return out


@functools.lru_cache(maxsize=None)
def _lnd_entries_by_prefix() -> dict[str, list]:
  table: dict[str, list] = {}
  for tkey, kind, suffix, fpath in _entries("lndnet"):
    table.setdefault(tkey.rsplit(".", 1)[0], []).append((tkey, kind, suffix, fpath))
  return table


def _entries_for_prefix(canon_prefix: str):
  return _lnd_entries_by_prefix()[canon_prefix]


def encoders_params_to_torch(
    variables: Mapping,
    *,
    prefix: str = "",
    nets: tuple[str, ...] = NETS,
    num_batches_tracked: bool = True,
) -> dict[str, np.ndarray]:
  """Flax variables of :class:`OfficialEncoders` -> reference state dict (numpy arrays).

  Keys are ``prefix + '<net>.backbone.<key>'`` in the reference's registration order;
  ``lndnet`` writes its shared torchvision features under both ``pretrain_net.features``
  and ``base_net.0``.
  """
  out: dict[str, np.ndarray] = {}
  for net in nets:
    bp = prefix + f"{net}.backbone."
    tensors = {}
    for tkey, kind, suffix, fpath in _entries(net):
      a = _to_torch(kind, suffix, _to_array(_get(variables, fpath), np.float32))
      tensors[tkey] = a if _is_tracer(a) else np.ascontiguousarray(a)
    nbt = set(_num_batches_keys(net)) if num_batches_tracked else set()
    for tkey in _torch_key_order(net, num_batches_tracked):
      if tkey in nbt:
        out[bp + tkey] = np.zeros((), np.int64)
      elif tkey in tensors:
        out[bp + tkey] = tensors[tkey]
      else:  # lndnet alias
        out[bp + tkey] = tensors[_alias_to_canon(tkey)]
  return out


def _alias_to_canon(tkey: str) -> str:
  for a, c in _mobilenet_aliases():
    if tkey.startswith(a + "."):
      return c + tkey[len(a) :]
  raise KeyError(tkey)


@functools.lru_cache(maxsize=None)
def _torch_key_order_cached(net: str, nbt: bool) -> tuple[str, ...]:
  def module_keys(tprefix, kind):
    keys = [f"{tprefix}.{s}" for s in _KIND_SUFFIXES.get(kind, ("weight", "bias"))]
    if kind == "bn" and nbt:
      keys.append(f"{tprefix}.num_batches_tracked")
    return keys

  keys: list[str] = []
  if net == "lndnet":
    # torch registration order: pretrain_net (features, classifier), base_net, linear7, linear1
    for tprefix, _, kind in _mobilenet_features_layout("pretrain_net.features"):
      keys += module_keys(tprefix, kind)
    keys += module_keys("pretrain_net.classifier.1", "dense")
    for tprefix, _, kind in _mobilenet_layout():
      if not tprefix.startswith("pretrain_net."):
        keys += module_keys(tprefix, kind)
  elif net == "idnet":
    # torch order: input_layer, output_layer, body (registration order in Backbone)
    layout = list(_irse50_layout())
    for grp in ("input_layer.", "output_layer.", "body."):
      for tprefix, _, kind in layout:
        if tprefix.startswith(grp):
          keys += module_keys(tprefix, kind)
  else:
    for tprefix, _, kind in _bisenet_layout():
      keys += module_keys(tprefix, kind)
  return tuple(keys)


def _torch_key_order(net: str, nbt: bool) -> tuple[str, ...]:
  return _torch_key_order_cached(net, nbt)


def torch_keys(
    nets: tuple[str, ...] = NETS, prefix: str = "", num_batches_tracked: bool = True
) -> list[str]:
  """All reference state-dict keys this module reads/writes."""
  return [
      prefix + f"{n}.backbone." + k for n in nets for k in _torch_key_order(n, num_batches_tracked)
  ]


# ----------------------------------------------------------------------------------------
# Published weight files.
# ----------------------------------------------------------------------------------------
_KIND_TO_NET = {
    "ir_se50": "idnet",
    "idnet": "idnet",
    "arcface": "idnet",
    "mobilenet_gdconv": "lndnet",
    "lndnet": "lndnet",
    "landmarks": "lndnet",
    "bisenet": "bgnet",
    "bgnet": "bgnet",
    "parsing": "bgnet",
}
PUBLISHED_FILES = {
    "idnet": "model_ir_se50.pth",
    "lndnet": "mobilenet_224_model_best_gdconv_external.pth.tar",
    "bgnet": "79999_iter.pth",
}


def _net_of(kind: str) -> str:
  try:
    return _KIND_TO_NET[kind.lower()]
  except KeyError:
    raise ValueError(f"unknown encoder kind {kind!r}; use one of {sorted(_KIND_TO_NET)}") from None


def published_to_encoder_state_dict(kind: str, sd: Mapping[str, Any]) -> dict[str, Any]:
  """A published file's loaded content -> ``'<net>.backbone.*'`` keys (as the reference loads it).

  For the landmark file, ``sd`` may be the whole checkpoint (``{'state_dict': ...}``) or
  the inner dict; like the reference, a leading ``module.`` is stripped (keys that do not
  start with ``module`` are dropped when the file uses the prefix at all).
  """
  net = _net_of(kind)
  if net == "lndnet":
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
      sd = sd["state_dict"]
    if any(k.startswith("module") for k in sd):
      sd = {k[7:]: v for k, v in sd.items() if k.startswith("module")}
  return {f"{net}.backbone.{k}": v for k, v in sd.items()}


def import_published_encoder(kind: str, sd: Mapping[str, Any]) -> dict:
  """Flax variables of one network (``IRSE50`` / ``MobileNetGDConv`` / ``BiSeNet``) from the
  content of its published file (``torch.load(path, weights_only=True)``).

  ``kind``: ``'ir_se50'`` (model_ir_se50.pth), ``'mobilenet_gdconv'``
  (mobilenet_224_model_best_gdconv_external.pth.tar) or ``'bisenet'`` (79999_iter.pth);
  aliases ``idnet|lndnet|bgnet``. Strict: errors name the offending parameter.
  """
  net = _net_of(kind)
  full = encoders_params_from_torch(
      published_to_encoder_state_dict(kind, sd), nets=(net,), ignore_prefixes=()
  )
  return {coll: tree[net] for coll, tree in full.items()}


def export_published_encoder(kind: str, variables: Mapping) -> dict[str, np.ndarray]:
  """Inverse of :func:`import_published_encoder`: the published file's layout
  (the landmark file as ``{'state_dict': {'module.<key>': ...}}``)."""
  net = _net_of(kind)
  wrapped = {coll: {net: tree} for coll, tree in variables.items()}
  sd = encoders_params_to_torch(wrapped, nets=(net,))
  bp = f"{net}.backbone."
  bare = {k[len(bp) :]: v for k, v in sd.items()}
  if net == "lndnet":
    return {"state_dict": {f"module.{k}": v for k, v in bare.items()}}
  return bare


def merge_published(idnet: Mapping, lndnet: Mapping, bgnet: Mapping) -> dict:
  """Combine three per-network variable dicts into :class:`OfficialEncoders` variables."""
  out: dict = {}
  for net, v in (("idnet", idnet), ("lndnet", lndnet), ("bgnet", bgnet)):
    for coll, tree in v.items():
      out.setdefault(coll, {})[net] = tree
  return out
