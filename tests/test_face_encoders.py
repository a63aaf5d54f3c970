"""Frozen face encoders: golden parity (JAX + torch twin), key mapping, published layouts."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.models import face_encoders as fe
from s3jax.parity import encoders as parity
from s3jax.porting import encoder_keys as ek

NET_PREFIXES = tuple(f"{n}.backbone." for n in ek.NETS)


# ----------------------------------------------------------------------------------------
# Session fixtures: load and compile once.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def golden_sd(golden_dir):
  return parity.load_golden_state_dict(golden_dir / parity.STATE_DICT_FILE)


@pytest.fixture(scope="session")
def golden_io(golden_dir):
  with np.load(golden_dir / parity.IO_FILE) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def enc_variables(golden_sd):
  return ek.encoders_params_from_torch(golden_sd)


@pytest.fixture(scope="session")
def jax_outputs(golden_sd, golden_io):
  return parity.run_jax(golden_sd, golden_io["x"])


@pytest.fixture(scope="session")
def torch_outputs(golden_sd, golden_io):
  pytest.importorskip("torch")
  return parity.run_torch(golden_sd, golden_io["x"])


@pytest.fixture(scope="session")
def manifest_encoder_keys(golden_dir):
  keys = json.loads((golden_dir / "dva256_state_dict_manifest.json").read_text())["keys"]
  return {
      k[len("encoder.") :]: tuple(v)
      for k, v in keys.items()
      if k.startswith("encoder.") and k[len("encoder.") :].startswith(NET_PREFIXES)
  }


def _assert_rows_ok(rows):
  assert [r["name"] for r in rows] == list(parity.FEATURES + parity.MASKS)
  for r in rows:
    assert r["ok"], r


# ----------------------------------------------------------------------------------------
# Golden parity.
# ----------------------------------------------------------------------------------------
def test_jax_golden_parity(jax_outputs, golden_io):
  rows = parity.compare(jax_outputs, golden_io)
  _assert_rows_ok(rows)
  # A correct port lands near 1e-5 or better; keep a margin below the 1e-4 contract.
  for r in rows[:3]:
    assert r["rel_err"] < 2e-5, r


def test_torch_twin_golden_parity(torch_outputs, golden_io):
  _assert_rows_ok(parity.compare(torch_outputs, golden_io))


def test_check_api_rows(golden_dir, jax_outputs):
  # jax_outputs already compiled the shared jitted forward; check() reuses it.
  rows = parity.check(golden_dir, backend="jax")
  _assert_rows_ok(rows)
  assert all(set(r) == {"name", "rel_err", "tol", "ok"} for r in rows)
  with pytest.raises(ValueError):
    parity.check(golden_dir, backend="tf")


def test_methods_match_call(enc_variables, golden_io, jax_outputs):
  """id_feats / lnd_feats / face_mask methods agree with __call__ (cheap parts only)."""
  model = fe.OfficialEncoders()
  x = jnp.asarray(golden_io["x"].transpose(0, 2, 3, 1))
  lnd = jax.jit(lambda v, x: model.apply(v, x, method=fe.OfficialEncoders.lnd_feats))(
      enc_variables, x
  )
  np.testing.assert_allclose(lnd, jax_outputs["lnd_feats"], atol=1e-6)


def test_bfloat16_compute_close(enc_variables, golden_io):
  model = fe.OfficialEncoders(dtype="bfloat16")
  x = jnp.asarray(golden_io["x"].transpose(0, 2, 3, 1))
  lnd = jax.jit(lambda v, x: model.apply(v, x, method=fe.OfficialEncoders.lnd_feats))(
      enc_variables, x
  )
  assert lnd.dtype == jnp.float32
  assert parity.rel_err(lnd, golden_io["lnd_feats"]) < 0.1
  # params stay float32 whatever the compute dtype
  shapes = fe.init_variables(model)
  assert {l.dtype for l in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}


def test_face_mask_from_parsing_classes():
  labels = jnp.arange(19, dtype=jnp.int32).reshape(1, 19)
  train = np.asarray(fe.face_mask_from_parsing(labels, for_video=False))[0]
  video = np.asarray(fe.face_mask_from_parsing(labels, for_video=True))[0]
  assert set(np.flatnonzero(train == 0)) == {0, 16, 18}
  assert set(np.flatnonzero(video == 0)) == {0, 7, 8, 14, 16, 17, 18}
  assert train.dtype == np.float32


def test_torch_style_resizes():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 7, 2)).astype(np.float32)
  xt = torch.as_tensor(x.transpose(0, 3, 1, 2))
  for size in ((3, 4), (12, 9), (10, 14)):
    ref = F.interpolate(xt, size, mode="nearest").numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(fe.resize_nearest(jnp.asarray(x), size), ref)
    ref = F.interpolate(xt, size, mode="bilinear", align_corners=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        fe.resize_bilinear_align_corners(jnp.asarray(x), size), ref, atol=1e-6
    )
  y = rng.standard_normal((1, 188, 188, 2)).astype(np.float32)
  ref = F.adaptive_avg_pool2d(torch.as_tensor(y.transpose(0, 3, 1, 2)), (112, 112))
  np.testing.assert_allclose(
      fe.adaptive_avg_pool(jnp.asarray(y), (112, 112)), ref.numpy().transpose(0, 2, 3, 1), atol=1e-6
  )


# ----------------------------------------------------------------------------------------
# Key mapping.
# ----------------------------------------------------------------------------------------
def test_manifest_coverage_both_directions(manifest_encoder_keys):
  # torch -> flax: every manifest key is consumed and lands on the model's own shapes.
  abstract_sd = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in manifest_encoder_keys.items()}
  flax_shapes = jax.eval_shape(ek.encoders_params_from_torch, abstract_sd)
  want = fe.init_variables()
  to_shape = lambda t: jax.tree_util.tree_map(lambda l: tuple(l.shape), t)
  assert to_shape(flax_shapes) == to_shape(want)
  # flax -> torch: exactly the manifest's keys with its shapes (eval_shape sorts dict keys,
  # so the order is checked on the key list the exporter writes in).
  torch_shapes = jax.eval_shape(ek.encoders_params_to_torch, want)
  assert {k: tuple(v.shape) for k, v in torch_shapes.items()} == manifest_encoder_keys
  assert ek.torch_keys() == list(manifest_encoder_keys)


def test_roundtrip_golden(golden_sd, enc_variables):
  back = ek.encoders_params_to_torch(enc_variables)
  assert list(back) == [k for k in golden_sd if not k.startswith("linear.")]
  for k, v in back.items():
    if k.endswith("num_batches_tracked"):
      continue
    src = k.replace("pretrain_net.features.", "base_net.0.")  # the copy torch keeps
    np.testing.assert_array_equal(v, golden_sd[src], err_msg=k)
  # the prefixed (full DVA) layout works too
  pref = ek.encoders_params_to_torch(enc_variables, prefix="encoder.", num_batches_tracked=False)
  again = ek.encoders_params_from_torch(pref, prefix="encoder.")
  chex.assert_trees_all_equal(again, enc_variables)


def test_lnd_shared_features_take_base_net(golden_sd, enc_variables):
  # The golden file stores different values under the two aliases; torch keeps base_net.0.
  a = golden_sd["lndnet.backbone.pretrain_net.features.0.0.weight"]
  b = golden_sd["lndnet.backbone.base_net.0.0.0.weight"]
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(
      enc_variables["params"]["lndnet"]["features_0"]["conv"]["kernel"], b.transpose(2, 3, 1, 0)
  )


def test_errors_name_the_parameter(golden_sd):
  key = "idnet.backbone.body.5.res_layer.3.weight"
  bad = dict(golden_sd)
  bad[key] = np.zeros((3, 3), np.float32)
  with pytest.raises(ek.EncoderKeyError, match=r"shape mismatch.*body\.5\.res_layer\.3\.weight"):
    ek.encoders_params_from_torch(bad)
  missing = dict(golden_sd)
  del missing["bgnet.backbone.ffm.conv1.weight"]
  with pytest.raises(ek.EncoderKeyError, match=r"missing.*bgnet\.backbone\.ffm\.conv1\.weight"):
    ek.encoders_params_from_torch(missing)
  extra = dict(golden_sd)
  extra["lndnet.backbone.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ek.EncoderKeyError, match=r"unexpected.*lndnet\.backbone\.extra\.weight"):
    ek.encoders_params_from_torch(extra)
  # num_batches_tracked is optional on import
  nobt = {k: v for k, v in golden_sd.items() if not k.endswith("num_batches_tracked")}
  ek.encoders_params_from_torch(nobt)


@pytest.mark.parametrize("kind", ["ir_se50", "mobilenet_gdconv", "bisenet"])
def test_published_layouts_roundtrip(kind, enc_variables):
  torch = pytest.importorskip("torch")
  from s3jax.torch_twin import encoders as twin

  net = ek._net_of(kind)
  sub = {coll: tree[net] for coll, tree in enc_variables.items()}
  published = ek.export_published_encoder(kind, sub)
  if kind == "mobilenet_gdconv":
    assert set(published) == {"state_dict"}
    assert all(k.startswith("module.") for k in published["state_dict"])
    inner = {k[len("module.") :]: v for k, v in published["state_dict"].items()}
    module = twin.MobileNetGDConv(136)
  else:
    assert not any(k.startswith(net) for k in published)
    inner = published
    module = twin.IRSE50() if kind == "ir_se50" else twin.BiSeNet(19)
  # The reference loads each published file strictly into the bare network.
  module.load_state_dict({k: torch.as_tensor(v) for k, v in inner.items()}, strict=True)
  # ... and the adapter reads it back exactly (also from torch tensors).
  as_tensors = jax.tree_util.tree_map(torch.as_tensor, published)
  back = ek.import_published_encoder(kind, as_tensors)
  chex.assert_trees_all_equal(back, sub)
  merged = ek.merge_published(*(sub if n == net else {} for n in ek.NETS))
  assert set(merged["params"]) == {net}
  with pytest.raises(ek.EncoderKeyError):
    first = next(iter(inner))
    broken = dict(inner)
    del broken[first]
    ek.import_published_encoder(kind, broken)
