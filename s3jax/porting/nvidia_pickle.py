"""Read NVIDIA network pickles (stylegan2-ada ``network-snapshot-*.pkl``, ``ffhq.pkl``) without
running any of their code, and without torch.

A plain ``pickle.load`` of such a file calls ``torch_utils.persistence.
_reconstruct_persistent_obj``, which ``exec``s the Python source stored in the file
(``module_src``). Here a restricted unpickler maps exactly the globals these files use to
harmless numpy replacements (``../shared/golden/stit/README.md`` §2) and refuses every other
global by name (:class:`RefusedGlobalError`):

=============================================  =============================================
``torch_utils.persistence._reconstruct_...``   :class:`PersistentObject`, a record of ``meta``
``torch._utils._rebuild_tensor_v2``            a bounds-checked strided copy of the storage
``torch._utils._rebuild_parameter[_with_...]`` the tensor itself
``torch.storage._load_from_bytes``             :func:`parse_legacy_storage` (numpy 1-D array)
``collections.OrderedDict``                    ``OrderedDict``
``dnnlib.util.EasyDict``                       ``dict``
``numpy[._]core.multiarray.scalar``            ``np.frombuffer(data, dtype)[0]``
``numpy.dtype``                                numeric kinds only (bool, int, uint, float, complex)
``builtins.set`` / ``__builtin__.set``         ``set`` (protocol 2/3 files)
``_codecs.encode``                             ``str.encode('latin1')`` only (protocol 2 bytes)
=============================================  =============================================

A storage blob is a legacy ``torch.save(storage)``: five protocol-2 pickles (magic number,
protocol version, sys_info, the storage as a persistent id ``('storage', torch.FloatStorage,
key, location, numel, None)``, the key list), then per key an int64 ``numel`` and the raw
data. Its only globals are the storage types, mapped to numpy dtypes.

The state dict is the walk of each module's ``_parameters``, persistent ``_buffers`` and
``_modules``, joined by '.', as ``nn.Module.state_dict()`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pathlib
import pickle
import struct
from typing import Any, Optional

import numpy as np

from s3jax.porting.state_dict import StateDictError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
NUMERIC_DTYPE_KINDS = "biufc"
# torch.<Name>Storage -> numpy dtype of one element (bfloat16 is widened to float32 on read).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# Errors a corrupt or truncated stream raises inside the unpickler.
_STREAM_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    OverflowError,
    RecursionError,
)


class NetworkPickleError(StateDictError):
  """An NVIDIA network pickle is missing a network, corrupt, truncated or not one at all."""


class RefusedGlobalError(NetworkPickleError, pickle.UnpicklingError):
  """The pickle asks for a global outside the allow list (e.g. ``os.system``); nothing of it
  was called."""

  def __init__(self, module: str, name: str, where: str = "network pickle"):
    self.module, self.name = module, name
    super().__init__(
        f"refusing global {module}.{name} in the {where}: a network pickle may only name the "
        "torch/numpy/persistence globals its format uses, so this file is not a plain "
        "stylegan2-ada network pickle (it would run code when unpickled)"
    )


@dataclasses.dataclass
class PersistentObject:
  """What ``_reconstruct_persistent_obj(meta)`` was asked to build; ``module_src`` is kept as
  text and never run."""

  meta: Any

  def __setstate__(self, state):  # a BUILD on the record is not part of the format
    raise pickle.UnpicklingError("BUILD on a persistent object record")

  def _field(self, key):
    meta = getattr(self, "meta", None)  # NEWOBJ could build a record without meta
    if not isinstance(meta, dict) or key not in meta:
      raise NetworkPickleError(f"persistent object meta lacks {key!r}")
    return meta[key]

  @property
  def class_name(self) -> str:
    return str(self._field("class_name"))

  @property
  def state(self) -> dict:
    state = self._field("state")
    if not isinstance(state, dict):
      raise NetworkPickleError(f"{self.class_name}: state is a {type(state).__name__}, not a dict")
    return state


@dataclasses.dataclass(frozen=True)
class StorageType:
  """``torch.<Name>Storage`` as named in a storage blob's persistent id."""

  name: str


class PickledDtype:
  """``numpy.dtype(name, align, copy)`` of a numeric kind; the BUILD that follows may set
  the byte order only."""

  def __init__(self, name, align=False, copy=True):
    if not isinstance(name, str):
      raise pickle.UnpicklingError(f"numpy.dtype of {type(name).__name__}")
    dtype = np.dtype(name)
    if dtype.kind not in NUMERIC_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype:
      raise pickle.UnpicklingError(f"numpy.dtype {name!r} is not a plain numeric dtype")
    self.dtype = dtype

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
      raise pickle.UnpicklingError(f"unexpected numpy.dtype state {state!r}")
    if any(s is not None for s in state[2:5]):  # subarray, names, fields
      raise pickle.UnpicklingError("numpy.dtype state with fields or a subarray")
    if state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])


def numpy_scalar(dtype, data):
  if not isinstance(dtype, PickledDtype) or not isinstance(data, bytes):
    raise pickle.UnpicklingError("numpy scalar needs a numeric dtype and bytes")
  if len(data) != dtype.dtype.itemsize:
    raise pickle.UnpicklingError(f"numpy scalar of {len(data)} bytes for {dtype.dtype}")
  return np.frombuffer(data, dtype.dtype)[0]


def latin1_encode(text, encoding="latin1"):
  """``_codecs.encode(str, 'latin1')``: how protocol 2 writes ``bytes``."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
  return text.encode("latin1")


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  """``torch._utils._rebuild_tensor_v2`` as a copy of ``storage[offset:]`` viewed with
  ``size``/``stride`` (in elements); every index is checked to lie inside the storage."""
  del requires_grad, hooks, metadata
  if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and storage.flags.c_contiguous):
    raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}")
  ints = lambda t: isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t)
  if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride)):
    raise pickle.UnpicklingError(f"tensor offset/size/stride {offset!r}/{size!r}/{stride!r}")
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(
        f"tensor of size {size}, stride {stride}, offset {offset} overruns its storage of "
        f"{storage.size} elements"
    )
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False
  )
  return np.array(view, copy=True)


def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  """``_rebuild_parameter`` / ``_rebuild_parameter_with_state``: the tensor itself."""
  del requires_grad, hooks, state
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f"parameter of {type(data).__name__}")
  return data


class _StorageUnpickler(pickle.Unpickler):
  """One of a storage blob's protocol-2 pickles: no globals but the storage types."""

  def find_class(self, module, name):
    if module == "torch" and name in STORAGE_DTYPES:
      return StorageType(name)
    raise RefusedGlobalError(module, name, where="tensor storage blob")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a storage blob")
    _, storage_type, key, _location, numel, view = pid
    if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
      raise pickle.UnpicklingError(f"unexpected storage persistent id {pid!r}")
    if view is not None:
      raise pickle.UnpicklingError("storage views are not supported in storage blobs")
    return (str(key), storage_type, numel)


def _load_one(f, what: str):
  try:
    return _StorageUnpickler(f).load()
  except RefusedGlobalError:
    raise
  except _STREAM_ERRORS as e:
    raise pickle.UnpicklingError(f"storage blob: cannot read the {what}: {e}") from e


def parse_legacy_storage(blob) -> np.ndarray:
  """``torch.storage._load_from_bytes(blob)``: a legacy ``torch.save(storage)`` -> 1-D array."""
  if not isinstance(blob, (bytes, bytearray)):
    raise pickle.UnpicklingError(f"storage blob is a {type(blob).__name__}, not bytes")
  f = io.BytesIO(blob)
  if _load_one(f, "magic number") != LEGACY_MAGIC:
    raise pickle.UnpicklingError("storage blob: wrong magic number (not a legacy torch.save)")
  if _load_one(f, "protocol version") != LEGACY_PROTOCOL:
    raise pickle.UnpicklingError("storage blob: unsupported legacy protocol version")
  sys_info = _load_one(f, "sys_info")
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  obj = _load_one(f, "storage")
  if not (isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[1], StorageType)):
    raise pickle.UnpicklingError("storage blob: the object is not one storage")
  key, storage_type, numel = obj
  keys = _load_one(f, "key list")
  if keys != [key]:
    raise pickle.UnpicklingError(f"storage blob: key list {keys!r} does not hold key {key!r}")
  header = f.read(8)
  if len(header) != 8:
    raise pickle.UnpicklingError("storage blob: truncated before the data")
  (n,) = struct.unpack("<q" if little else ">q", header)
  if n != numel:
    raise pickle.UnpicklingError(f"storage blob: {n} elements stored, {numel} announced")
  kind = STORAGE_DTYPES[storage_type.name]
  bfloat16 = kind == "bfloat16"
  dtype = np.dtype(np.uint16 if bfloat16 else kind).newbyteorder("<" if little else ">")
  data = f.read(n * dtype.itemsize)
  if len(data) != n * dtype.itemsize:
    raise pickle.UnpicklingError(
        f"storage blob: truncated data ({len(data)} of {n * dtype.itemsize} bytes)"
    )
  if f.read(1):
    raise pickle.UnpicklingError("storage blob: trailing bytes after the data")
  arr = np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))
  if bfloat16:
    arr = (arr.astype(np.uint32) << 16).view(np.float32)
  return arr


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): parse_legacy_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy", "dtype"): PickledDtype,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): latin1_encode,
}


class NetworkUnpickler(pickle.Unpickler):
  """Unpickles a network pickle with :data:`ALLOWED_GLOBALS` only; no persistent ids."""

  def find_class(self, module, name):
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise RefusedGlobalError(module, name) from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a network pickle")


def load_pickle(path) -> Any:
  """The unpickled file, with networks as :class:`PersistentObject` records and tensors as
  numpy arrays."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"network pickle not found: {path}")
  with open(path, "rb") as f:
    try:
      return NetworkUnpickler(f).load()
    except NetworkPickleError:
      raise
    except _STREAM_ERRORS as e:
      raise NetworkPickleError(
          f"{path}: not a readable network pickle (truncated or corrupt?): "
          f"{type(e).__name__}: {e}"
      ) from e


def _networks(obj, path) -> dict:
  if not isinstance(obj, dict):
    raise NetworkPickleError(
        f"{path}: expected a dict of networks ({{'G', 'D', 'G_ema', ...}}), got "
        f"{type(obj).__name__}"
    )
  return obj


def list_networks(path) -> dict[str, str]:
  """{top-level key: class name} of the networks in the pickle (e.g. ``G``, ``D``, ``G_ema``)."""
  obj = _networks(load_pickle(path), path)
  return {k: v.class_name for k, v in obj.items() if isinstance(v, PersistentObject)}


def module_state_dict(module: PersistentObject, prefix: str = "") -> dict[str, np.ndarray]:
  """``nn.Module.state_dict()`` of a record: ``_parameters``, persistent ``_buffers``, then
  ``_modules`` recursively, keys joined by '.'."""
  if not isinstance(module, PersistentObject):
    raise NetworkPickleError(f"{prefix or 'network'}: a {type(module).__name__}, not a module")
  state = module.state
  out: dict[str, np.ndarray] = {}
  for field in ("_parameters", "_buffers", "_modules"):
    if not isinstance(state.get(field), dict):
      raise NetworkPickleError(f"{prefix or module.class_name}: state lacks the {field} dict")
  skip = state.get("_non_persistent_buffers_set") or set()
  entries = list(state["_parameters"].items()) + [
      (k, v) for k, v in state["_buffers"].items() if k not in skip
  ]
  for name, value in entries:
    if value is None:
      continue
    if not isinstance(value, np.ndarray):
      raise NetworkPickleError(f"{prefix}{name}: a {type(value).__name__}, not a tensor")
    out[prefix + name] = value
  for name, child in state["_modules"].items():
    if child is not None:
      out.update(module_state_dict(child, f"{prefix}{name}."))
  return out


def plain(obj):
  """Dicts (EasyDict, OrderedDict) / lists / tuples / numpy scalars -> plain JSON-like values."""
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


# The reference's Generator(z_dim, c_dim, w_dim, img_resolution, img_channels,
# mapping_kwargs={}, synthesis_kwargs={}): positional _init_args map onto these names.
GENERATOR_ARG_NAMES = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
)


def init_kwargs_of(network: PersistentObject, arg_names: Optional[tuple] = None) -> dict:
  """A network's constructor arguments: ``_init_kwargs`` plus ``_init_args`` named by
  ``arg_names``."""
  state = network.state
  args = tuple(state.get("_init_args") or ())
  kwargs = state.get("_init_kwargs")
  if not isinstance(kwargs, dict):
    raise NetworkPickleError(f"{network.class_name}: no _init_kwargs dict in its state")
  out = plain(kwargs)
  if args:
    if arg_names is None or len(args) > len(arg_names):
      raise NetworkPickleError(f"{network.class_name}: cannot name its positional args {args}")
    out.update({n: plain(a) for n, a in zip(arg_names, args)})
  return out


def read_network_pickle(path, which: str = "G_ema") -> tuple[dict, dict[str, np.ndarray]]:
  """(init_kwargs, state dict) of network ``which`` (``'G_ema'``, what STIT loads; ``'G'``,
  ``'D'``) of a stylegan2-ada network pickle, read without running any of its code."""
  obj = _networks(load_pickle(path), path)
  if which not in obj:
    raise NetworkPickleError(f"{path}: no {which!r} network; the pickle holds {sorted(obj)}")
  network = obj[which]
  if not isinstance(network, PersistentObject):
    raise NetworkPickleError(
        f"{path}: {which!r} is a {type(network).__name__}, not a persistent network"
    )
  names = GENERATOR_ARG_NAMES if network.class_name == "Generator" else None
  return init_kwargs_of(network, names), module_state_dict(network)
