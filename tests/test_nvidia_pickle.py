"""The safe NVIDIA network-pickle reader: the golden pickle, hostile pickles, broken files and
protocol 2/4 pickles written here with the standard library only (no torch)."""

import collections
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from s3jax.porting import nvidia_pickle as npk
from s3jax.porting.state_dict import StateDictError, read_golden_npz

SHARED = pathlib.Path(
    os.environ.get("S3JAX_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")
)
STIT = SHARED / "golden" / "stit"
PICKLE = STIT / "stylegan2_ada_tiny.pkl"


@pytest.fixture(scope="module")
def golden_pickle():
  if not PICKLE.is_file():
    pytest.skip(f"golden pickle not found at {PICKLE} (../shared is absent)")
  return PICKLE


# ----------------------------------------------------------------------------------------
# A tiny pickle writer: names any global without importing it, so tests can write the
# format (and hostile variants) with the standard library only.
# ----------------------------------------------------------------------------------------
class Global:
  """Pickles as the GLOBAL opcode ``module\\nname``; never called."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable
    raise AssertionError("a Global stands for a name only")


class Call:
  """Pickles as REDUCE(func, args)."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


class FilledCall(Call):
  """REDUCE(func, ()) followed by SETITEMS, the way a dict subclass is filled."""

  def __init__(self, func, items):
    super().__init__(func)
    self.items = items

  def __reduce__(self):
    return (self.func, (), None, None, iter(self.items.items()))


class StorageRef:

  def __init__(self, pid):
    self.pid = pid


class Writer(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
  dispatch = pickle._Pickler.dispatch.copy()

  def save_named_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Global] = save_named_global

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, StorageRef) else None


def dumps(obj, protocol) -> bytes:
  f = io.BytesIO()
  Writer(f, protocol=protocol).dump(obj)
  return f.getvalue()


def storage_blob(arr, storage="FloatStorage", key="0", numel=None) -> bytes:
  """A legacy ``torch.save(storage)``: five protocol-2 pickles, then numel and the data."""
  arr = np.ascontiguousarray(arr).reshape(-1)
  n = arr.size if numel is None else numel
  f = io.BytesIO()
  sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
  for obj in (npk.LEGACY_MAGIC, 1001, sys_info):
    pickle.dump(obj, f, protocol=2)
  ref = StorageRef(("storage", Global("torch", storage), key, "cpu", n, None))
  Writer(f, protocol=2).dump(ref)
  pickle.dump([key], f, protocol=2)
  f.write(struct.pack("<q", arr.size) + arr.tobytes())
  return f.getvalue()


def tensor(arr, offset=0, size=None, stride=None, storage=None, blob=None):
  """``_rebuild_parameter(_rebuild_tensor_v2(_load_from_bytes(blob), ...))``."""
  arr = np.asarray(arr, np.float32)
  size = arr.shape if size is None else size
  if stride is None:
    stride = tuple(int(s) // arr.itemsize for s in arr.strides)
  flat = arr.reshape(-1) if storage is None else storage
  data = Call(Global("torch.storage", "_load_from_bytes"), blob or storage_blob(flat))
  hooks = collections.OrderedDict()
  t = Call(
      Global("torch._utils", "_rebuild_tensor_v2"),
      data,
      offset,
      tuple(size),
      tuple(stride),
      False,
      hooks,
  )
  return Call(Global("torch._utils", "_rebuild_parameter"), t, True, hooks)


def persistent(class_name, state, module_src="raise SystemExit('never run')"):
  meta = {
      "type": "class",
      "version": 6,
      "class_name": class_name,
      "module_src": module_src,
      "state": state,
  }
  return Call(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


def module_state(params=None, buffers=None, modules=None, non_persistent=(), **attrs):
  state = {
      "training": False,
      "_parameters": collections.OrderedDict(params or {}),
      "_buffers": collections.OrderedDict(buffers or {}),
      "_non_persistent_buffers_set": set(non_persistent),
      "_forward_hooks": collections.OrderedDict(),
      "_modules": collections.OrderedDict(modules or {}),
  }
  state.update(attrs)
  return state


INIT_KWARGS = {"z_dim": 8, "c_dim": 0, "w_dim": 8, "img_resolution": 8, "img_channels": 3}


def mini_network_pickle(protocol, seed=0, module_src="raise SystemExit('never run')"):
  """A network pickle with the format's features: a strided (transposed) tensor, a 0-d
  tensor, a non-persistent buffer, a None parameter and module, a numpy float64 attribute and
  an EasyDict; returns (bytes, the state dict a reader must give)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((3, 4)).astype(np.float32)
  base = rng.standard_normal((4, 3)).astype(np.float32)  # stored (4,3), viewed transposed
  strength = np.float32(rng.standard_normal())
  noise = rng.standard_normal((2, 2)).astype(np.float32)
  fc = persistent(
      "FullyConnectedLayer",
      module_state(
          params={"weight": tensor(w), "bias": None},
          _init_args=(4, 3),
          _init_kwargs={},
          weight_gain=np.float64(0.5),
      ),
      module_src=module_src,
  )
  layer = persistent(
      "SynthesisLayer",
      module_state(
          params={
              "weight": tensor(base, size=(3, 4), stride=(1, 3)),
              "noise_strength": tensor(strength),
          },
          buffers={"noise_const": tensor(noise), "scratch": tensor(noise * 2)},
          modules={"affine": fc, "unused": None},
          non_persistent=("scratch",),
          _init_args=(),
          _init_kwargs={},
      ),
      module_src=module_src,
  )
  easy = FilledCall(
      Global("dnnlib.util", "EasyDict"),
      dict(INIT_KWARGS, mapping_kwargs={"num_layers": 2}),
  )
  g = persistent(
      "Generator",
      module_state(modules={"layer": layer}, _init_args=(), _init_kwargs=easy),
      module_src,
  )
  top = {"training_set_kwargs": None, "G_ema": g, "augment_pipe": None}
  expected = {
      "layer.weight": base.T,
      "layer.noise_strength": np.asarray(strength),
      "layer.noise_const": noise,
      "layer.affine.weight": w,
  }
  return dumps(top, protocol), expected


def write(tmp_path, name, data: bytes) -> pathlib.Path:
  p = tmp_path / name
  p.write_bytes(data)
  return p


# ----------------------------------------------------------------------------------------
# The golden pickle.
# ----------------------------------------------------------------------------------------
def test_golden_pickle_g_ema_equals_state_dict(golden_pickle):
  init_kwargs, sd = npk.read_network_pickle(golden_pickle)
  ref = read_golden_npz(STIT / "stylegan2_ada_tiny_state_dict.npz")
  assert list(sd) == list(ref)  # the walk order is G.state_dict()'s
  for k, v in ref.items():
    assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  with np.load(STIT / "stylegan2_ada_tiny_io.npz") as z:
    config = json.loads(str(z["config"]))
  assert init_kwargs == {k: config[k] for k in init_kwargs}
  assert set(init_kwargs) == {
      "z_dim",
      "c_dim",
      "w_dim",
      "img_resolution",
      "img_channels",
      "mapping_kwargs",
      "synthesis_kwargs",
  }
  _, sd_g = npk.read_network_pickle(golden_pickle, which="G")
  assert list(sd_g) == list(ref)
  assert any(not np.array_equal(sd_g[k], ref[k]) for k in ref)  # G is a different network


def test_list_networks(golden_pickle):
  assert npk.list_networks(golden_pickle) == {
      "G": "Generator",
      "D": "Discriminator",
      "G_ema": "Generator",
  }


def test_reader_needs_no_torch(golden_pickle):
  code = (
      "import sys\n"
      "from s3jax.porting import nvidia_pickle\n"
      f"nvidia_pickle.read_network_pickle({str(golden_pickle)!r})\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------
# Pickles written here: protocol 2 (bytes via _codecs.encode, __builtin__.set) and 4.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4])
def test_mini_pickle_protocols(tmp_path, protocol):
  data, expected = mini_network_pickle(protocol)
  if protocol == 2:  # the protocol-2 spellings the reader must allow
    assert b"_codecs\nencode" in data and b"__builtin__\nset" in data
  init_kwargs, sd = npk.read_network_pickle(write(tmp_path, "mini.pkl", data))
  assert list(sd) == list(expected)
  for k, v in expected.items():
    assert sd[k].shape == v.shape and sd[k].dtype == np.float32, k
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  assert init_kwargs == dict(INIT_KWARGS, mapping_kwargs={"num_layers": 2})


def test_numpy_scalar_and_dtype_protocol2(tmp_path):
  # numpy writes its scalars itself: numpy.dtype + BUILD, numpy.*.multiarray.scalar, bytes.
  obj = {"G_ema": None, "gain": np.float64(0.125), "n": np.int32(-3)}
  data = pickle.dumps(obj, protocol=2)
  out = npk.load_pickle(write(tmp_path, "s.pkl", data))
  assert out["gain"] == 0.125 and out["gain"].dtype == np.float64
  assert out["n"] == -3 and out["n"].dtype == np.int32


# ----------------------------------------------------------------------------------------
# Hostile pickles: refused by name, and nothing ran.
# ----------------------------------------------------------------------------------------
class SystemCall:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def hostile_cases(marker: pathlib.Path):
  touch = f"touch {marker}"
  write_marker = f"open({str(marker)!r}, 'w').write('ran')"
  ok_tensor = tensor(np.ones(2))
  return {
      "os.system": (pickle.dumps({"G_ema": SystemCall(touch)}, protocol=4), "system"),
      "builtins.exec": (
          dumps({"G_ema": Call(Global("builtins", "exec"), write_marker)}, 4),
          "builtins.exec",
      ),
      "builtins.eval p2": (
          dumps({"G_ema": Call(Global("__builtin__", "eval"), write_marker)}, 2),
          "__builtin__.eval",
      ),
      "subprocess in a module": (
          dumps(
              {
                  "G_ema": persistent(
                      "Generator",
                      module_state(
                          params={"w": ok_tensor},
                          x=Call(Global("subprocess", "call"), ["touch", str(marker)]),
                      ),
                  )
              },
              4,
          ),
          "subprocess.call",
      ),
      "global inside a storage blob": (
          dumps(
              {"G_ema": tensor(np.ones(2), blob=storage_blob(np.ones(2), storage="os.system"))}, 4
          ),
          "torch.os.system",
      ),
      "os.system as a storage type": (
          dumps(
              {
                  "G_ema": Call(
                      Global("torch.storage", "_load_from_bytes"),
                      storage_blob_with_global(Global("os", "system"), marker),
                  )
              },
              4,
          ),
          "os.system",
      ),
  }


def storage_blob_with_global(glob, marker):
  f = io.BytesIO()
  for obj in (npk.LEGACY_MAGIC, 1001, {"little_endian": True}):
    pickle.dump(obj, f, protocol=2)
  Writer(f, protocol=2).dump(
      StorageRef(("storage", Call(glob, f"touch {marker}"), "0", "cpu", 1, None))
  )
  return f.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "os.system",
        "builtins.exec",
        "builtins.eval p2",
        "subprocess in a module",
        "global inside a storage blob",
        "os.system as a storage type",
    ],
)
def test_hostile_pickle_refused_and_nothing_ran(tmp_path, case):
  marker = tmp_path / "marker"
  data, refused = hostile_cases(marker)[case]
  path = write(tmp_path, "hostile.pkl", data)
  with pytest.raises(npk.RefusedGlobalError) as e:
    npk.read_network_pickle(path)
  assert refused in str(e.value) and "refusing global" in str(e.value)
  assert isinstance(e.value, StateDictError)
  with pytest.raises(npk.RefusedGlobalError):
    npk.list_networks(path)
  assert not marker.exists()


def test_module_src_is_never_run(tmp_path):
  # A well-formed network pickle whose module_src (what persistence exec()s) writes a marker:
  # the reader returns the tensors and ignores the source.
  marker = tmp_path / "marker"
  src = f"open({str(marker)!r}, 'w').write('ran')\nimport os\nos.system('touch {marker}')\n"
  data, expected = mini_network_pickle(4, module_src=src)
  _, sd = npk.read_network_pickle(write(tmp_path, "src.pkl", data))
  assert list(sd) == list(expected)
  assert not marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        (Call(Global("numpy", "dtype"), "O", False, True), "not a plain numeric dtype"),
        # a tensor view reaching past its storage (would read foreign memory if unchecked)
        (tensor(np.ones(4), size=(4, 4), stride=(4, 1)), "overruns its storage"),
        (tensor(np.ones(4), offset=4, size=(1,), stride=(1,)), "overruns its storage"),
        (tensor(np.ones(4), blob=storage_blob(np.ones(4, np.float32), numel=5)), "elements stored"),
        (tensor(np.ones(4), blob=storage_blob(np.ones(4, np.float32))[:-3]), "truncated data"),
        (tensor(np.ones(4), blob=storage_blob(np.ones(4, np.float32)) + b"\0"), "trailing"),
        (Call(Global("torch.storage", "_load_from_bytes"), b"\x80\x02K\x01."), "magic"),
    ],
)
def test_malformed_contents(tmp_path, obj, message):
  path = write(tmp_path, "bad.pkl", dumps({"G_ema": obj}, 4))
  with pytest.raises(npk.NetworkPickleError, match=message):
    npk.read_network_pickle(path)


# ----------------------------------------------------------------------------------------
# Broken files.
# ----------------------------------------------------------------------------------------
def test_truncated_pickle(tmp_path, golden_pickle):
  data = golden_pickle.read_bytes()
  for cut in (len(data) // 2, len(data) - 1, 3):
    path = write(tmp_path, "cut.pkl", data[:cut])
    with pytest.raises(npk.NetworkPickleError, match="truncated or corrupt"):
      npk.read_network_pickle(path)


def test_missing_file_and_network(tmp_path):
  with pytest.raises(FileNotFoundError, match="network pickle not found"):
    npk.read_network_pickle(tmp_path / "absent.pkl")
  data, _ = mini_network_pickle(4)
  path = write(tmp_path, "mini.pkl", data)
  with pytest.raises(npk.NetworkPickleError, match=r"no 'G' network.*G_ema"):
    npk.read_network_pickle(path, which="G")
  with pytest.raises(npk.NetworkPickleError, match="not a persistent network"):
    npk.read_network_pickle(path, which="augment_pipe")
  path = write(tmp_path, "list.pkl", pickle.dumps([1, 2], protocol=4))
  with pytest.raises(npk.NetworkPickleError, match="expected a dict of networks"):
    npk.read_network_pickle(path)
  path = write(tmp_path, "text.pkl", b"not a pickle at all")
  with pytest.raises(npk.NetworkPickleError, match="truncated or corrupt"):
    npk.read_network_pickle(path)
