"""The `sd_finetune` trainer task (s3jax.training.sd_finetune) on the sample data with tiny random
models: the loss goes down, resume is exact, the export loads, the identity and directional CLIP
terms run; plus the recipe's pieces (AdamW against torch, the reference's EMA, captions).

The tiny Stable Diffusion (1-level UNet, 2-level VAE, 1-layer text encoder), CLIP and byte-level
tokenizer come from tests/sd_helpers.py, so nothing under ../shared is needed.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from s3jax import checkpointing, input_pipeline
from s3jax.models import face_encoders, id_standin
from s3jax.porting import encoder_keys, sd_vae_clip_keys
from s3jax.sd import clip as clip_lib
from s3jax.sd import pipeline
from s3jax.training import loop
from s3jax.training import sd_finetune as F
from s3jax.training import state as state_lib

from safetensors import numpy as safetensors_np
from sd_helpers import BOS, CLIP_CONFIG, EOS, SIZE, random_params, tiny_sd, write_byte_level_tokenizer

STEPS = 16  # the straight run; the split run stops at STEPS // 2 and resumes


@pytest.fixture(scope="module")
def assets(tmp_path_factory, sample_data_32):
  """The tiny SD dir, a caption file over the sample's train split, a tiny CLIP and identity
  stand-in."""
  root = tmp_path_factory.mktemp("sd_finetune")
  tok = write_byte_level_tokenizer(root / "tokenizer")
  sd = tiny_sd(tok)
  pipeline.save_sd_dir(root / "sd", sd)
  # Captions: a third of the videos by video id, a third by the first frame only, a third none.
  src = input_pipeline.open_split(sample_data_32, "train")
  captions = {}
  for j, v in enumerate(input_pipeline.video_index(src)):
    if j % 3 == 0:
      captions[v["video_id"]] = f"a face, video {j}"
    elif j % 3 == 1:
      first = int(src[v["start"]]["frame_index"])
      captions[f"{v['video_id']}/{first}"] = f"the first frame of video {j}"
  (root / "captions.json").write_text(json.dumps(captions))
  clip_abstract = jax.eval_shape(lambda: clip_lib.init_params(CLIP_CONFIG, jax.random.key(0)))
  sd_vae_clip_keys.save_clip_dir(root / "clip", random_params(clip_abstract, 4), CLIP_CONFIG)
  # An id_standin workdir: a tiny random IdentityNet and the config it is rebuilt from.
  id_config = configs.get("id_standin")
  id_config.model.update(dict(features=16, width=4, depth=2, input_size=SIZE))
  idnet = id_standin.make_identity_net(id_config.model)
  id_params = random_params(
      jax.eval_shape(lambda: id_standin.init_params(idnet, jax.random.key(0))), 5
  )
  ck = checkpointing.Checkpointer(root / "id_standin", async_save=False)
  ck.save(0, {"params": id_params}, config=id_config, force=True)
  ck.close()
  return {"root": root, "sd": sd, "data": sample_data_32}


def tiny_config(assets, total_steps=STEPS, **loss):
  c = configs.get("sd_finetune:released")
  c.sd_dir = str(assets["root"] / "sd")
  c.captions.file = str(assets["root"] / "captions.json")
  c.data.data_dir = str(assets["data"])
  c.data.image_size = SIZE
  c.data.batch_size = 4
  c.data.flip = True
  c.resolution = SIZE
  c.optim.lr = 1e-3
  c.ema = "reference_bug"
  c.loss.update(loss)
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = STEPS // 2
  c.sample_every = 10_000
  return c


def run(config, workdir):
  task = F.SDFinetuneTask(config, state_lib.make_mesh(config.mesh), workdir)
  return loop.train(config, str(workdir), task)


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sd_finetune_straight")
  return workdir, run(tiny_config(assets), workdir)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
@pytest.mark.slow  # compiles the tiny SD train step
def test_loss_goes_down(straight):
  _, out = straight
  mse = np.array([m["mse"] for _, m in out["history"]])
  assert len(mse) == STEPS and np.all(np.isfinite(mse))
  assert mse[-4:].mean() < 0.8 * mse[:4].mean(), mse
  # Records without a caption took the template, the others theirs.
  share = np.array([m["caption_template"] for _, m in out["history"]])
  assert 0 < share.mean() < 1
  # The reference's EMA: its weight of the old average is 1 - d_s, 0.5 from step 8 on.
  ema = np.array([m["ema_weight"] for _, m in out["history"]])
  np.testing.assert_allclose(ema[0], 2.0 / 11.0, rtol=1e-6)
  assert np.all(ema[7:] == 0.5)


@pytest.mark.slow
def test_resume_is_exact(straight, assets, tmp_path):
  workdir, out = straight
  run(tiny_config(assets, total_steps=STEPS // 2), tmp_path)
  resumed = run(tiny_config(assets), tmp_path)
  assert resumed["step"] == STEPS
  a = checkpointing.restore_saved_state(workdir)
  b = checkpointing.restore_saved_state(tmp_path)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  tail = {s: m for s, m in out["history"] if s > STEPS // 2}
  for s, m in resumed["history"]:
    assert m == tail[s]


@pytest.mark.slow
def test_export_loads_as_a_diffusers_dir(straight, assets, tmp_path):
  workdir, _ = straight
  saved = checkpointing.restore_saved_state(workdir)
  exported = pipeline.StableDiffusion.load(workdir / F.EXPORT_SUBDIR)  # written at the last step
  for x, y in zip(jax.tree.leaves(saved["ema_params"]), jax.tree.leaves(exported.unet_params)):
    np.testing.assert_array_equal(x, y)
  assert any(  # the reference's EMA is not the params
      not np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(saved["ema_params"]), jax.tree.leaves(saved["params"]))
  )
  for x, y in zip(jax.tree.leaves(assets["sd"].vae_params), jax.tree.leaves(exported.vae_params)):
    np.testing.assert_array_equal(x, y)  # the frozen parts travel unchanged
  again = pipeline.StableDiffusion.load(F.export_finetuned(workdir, tmp_path / "again"))
  for x, y in zip(jax.tree.leaves(exported.unet_params), jax.tree.leaves(again.unet_params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # compiles the tiny SD train step
def test_identity_and_clip_terms(assets, sample_data_32, tmp_path):
  root = assets["root"]
  config = tiny_config(
      assets,
      id=0.5,
      dir=0.25,
      id_net="standin",
      id_dir=str(root / "id_standin"),
      clip_dir=str(root / "clip"),
      dir_target="caption",
      aux_t_max=600,
  )
  task = F.SDFinetuneTask(config, state_lib.make_mesh(config.mesh), tmp_path)
  state = task.init_state()
  batch = task.global_batch(next(task.data_iterator))
  assert "clip_ids" in batch
  state, metrics = task.train_step(state, batch)
  m = {k: float(v) for k, v in metrics.items()}
  for key in ("mse", "l_id", "l_dir", "aux_share"):
    assert key in m and np.isfinite(m[key]), (key, m)
  assert 0 <= m["l_id"] <= 2 and 0 <= m["l_dir"] <= 2
  np.testing.assert_allclose(m["loss"], m["mse"] + 0.5 * m["l_id"] + 0.25 * m["l_dir"], rtol=1e-5)
  assert m["finite"] == 1.0 and int(state.step) == 1


FSDP_STEPS = 3


def fsdp_main(out):
  """Run in a subprocess that sees 2 fake CPU devices: FSDP_STEPS train steps of the same batches
  with mesh fsdp=2 and with pure data parallelism (data=2, fsdp=1), on a UNet wide enough (128
  channels: its 3x3 kernels pass `state.param_sharding`'s size floor) for FSDP to split it.
  Writes out/result.json: each run's losses and where its parameters live."""
  out = pathlib.Path(out)
  spec = json.loads((out / "spec.json").read_text())
  tokenizer = write_byte_level_tokenizer(out / "tokenizer")
  pipeline.save_sd_dir(out / "sd", tiny_sd(tokenizer, unet_channels=128))
  (out / "captions.json").write_text(pathlib.Path(spec["captions"]).read_text())
  runs = {}
  for fsdp in (1, 2):
    config = tiny_config({"root": out, "data": spec["data"]}, total_steps=FSDP_STEPS)
    config.mesh.fsdp = fsdp
    mesh = state_lib.make_mesh(config.mesh)
    task = F.SDFinetuneTask(config, mesh, out / f"fsdp{fsdp}")
    state = task.init_state()
    mse = []
    for _ in range(FSDP_STEPS):
      state, metrics = task.train_step(state, task.global_batch(next(task.data_iterator)))
      mse.append(float(metrics["mse"]))
    params = jax.tree.leaves(state.params)
    split = [x for x in params if "fsdp" in str(x.sharding.spec)]
    runs[fsdp] = dict(
        mesh=dict(mesh.shape),
        mse=mse,
        params=len(params),
        split=len(split),
        split_bytes=sum(x.nbytes for x in split),
        split_bytes_on_device0=sum(x.addressable_shards[0].data.nbytes for x in split),
        adam_split=sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)),
    )
  (out / "result.json").write_text(json.dumps(runs))


@pytest.mark.slow  # a subprocess compiles the SD train step twice on 2 fake devices
def test_fsdp2_splits_the_unet_and_matches_data_parallel(assets, tmp_path):
  from train_helpers import start_with_fake_devices  # noqa: PLC0415

  spec = {"data": str(assets["data"]), "captions": str(assets["root"] / "captions.json")}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  proc = start_with_fake_devices("test_sd_finetune", "fsdp_main", tmp_path, devices=2)
  stdout, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
  runs = json.loads((tmp_path / "result.json").read_text())
  dp, fsdp = runs["1"], runs["2"]
  assert dp["mesh"] == {"data": 2, "fsdp": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 2}
  assert dp["split"] == 0 and dp["adam_split"] == 0
  # The big kernels are split: device 0 holds half of each, and Adam's moments follow them.
  assert fsdp["split"] > 0 and fsdp["adam_split"] >= 2 * fsdp["split"]
  assert fsdp["split_bytes_on_device0"] * 2 == fsdp["split_bytes"]
  # The same losses as data parallelism, to float32 reduction-order noise.
  np.testing.assert_allclose(fsdp["mse"], dp["mse"], rtol=2e-5)
  assert len(set(dp["mse"])) == FSDP_STEPS  # the steps really differ


# ---------------------------------------------------------------------------
# The recipe's pieces
# ---------------------------------------------------------------------------
def test_adamw_matches_torch():
  import torch  # the oracle

  c = configs.get("sd_finetune").optim
  c.lr = 1e-2
  tx = F.make_adamw(c)
  r = np.random.default_rng(0)
  p0 = r.standard_normal(10).astype(np.float32)
  grads = [3.0 * r.standard_normal(10).astype(np.float32) for _ in range(4)]
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    u, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, u)
  w = torch.nn.Parameter(torch.tensor(p0))
  opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
  for g in grads:
    w.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    opt.step()
  np.testing.assert_allclose(np.asarray(p), w.detach().numpy(), rtol=2e-6, atol=1e-7)
  c.weight_decay = 0.1
  with pytest.raises(ValueError, match="decoupled"):
    F.make_adamw(c)


def test_reference_ema_matches_its_code():
  """ema <- ema - d (ema - theta) with the overwritten decay, as the reference's EMAModel."""
  r = np.random.default_rng(0)
  thetas = r.standard_normal((12, 3))
  ema_ref, decay = thetas[0].copy(), 0.9999
  ema, weight = thetas[0].copy(), F.ema_weight_fn("reference_bug")
  for step, theta in enumerate(thetas[1:]):
    decay = 1 - min(decay, (1 + step + 1) / (10 + step + 1))
    ema_ref = ema_ref - decay * (ema_ref - theta)
    w = float(weight(jnp.asarray(step)))
    ema = ema * w + (1 - w) * theta
  np.testing.assert_allclose(ema, ema_ref, rtol=1e-6)
  assert float(F.ema_weight_fn("none")(3)) == 0.0
  assert float(F.ema_weight_fn("0.9999")(3)) == np.float32(0.9999)
  with pytest.raises(ValueError, match="config.ema"):
    F.ema_weight_fn("sometimes")


def test_captions(tmp_path, assets):
  assert F.caption_key("/mnt/data/celeba_hq_256/11504.jpg") == "11504"
  assert F.caption_key("id10001/1zcIwhmdeo4/17") == "id10001/1zcIwhmdeo4/17"
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"a/b.png": "x", "v1/3": "frame three", "v1": "video one"}))
  table = F.CaptionTable(F.read_captions(path), "a face")
  assert table.caption_for("v1", 3) == ("frame three", False)
  assert table.caption_for("v1", 4) == ("video one", False)
  assert table.caption_for("b", 0) == ("x", False)
  assert table.caption_for("v2", 0) == ("a face", True)
  assert table.texts()[-1] == "a face"
  with pytest.raises(F.CaptionError, match="missing='error'"):
    F.CaptionTable(table.captions, "a face", "error").caption_for("v2", 0)
  with pytest.raises(F.CaptionError, match="not found"):
    F.read_captions(tmp_path / "absent.json")
  c = configs.get("sd_finetune").captions
  with pytest.raises(F.CaptionError, match="captions.file is empty"):
    F.CaptionTable.from_config(c)
  tok = assets["sd"].tokenizer
  ids = F.tokenize_texts(tok, ["ab", "abcd"], "longest_in_file")
  assert ids.shape == (2, 6) and ids[0, 0] == BOS and ids[1, 5] == EOS
  assert F.tokenize_texts(tok, ["ab"], "max_length").shape == (1, 77)


def test_official_identity_net_loads_the_published_file(tmp_path):
  """model_ir_se50 (here its .safetensors twin) -> the idnet variables, usable alone."""
  from train_helpers import random_encoder_variables

  full = random_encoder_variables()
  idnet = {coll: tree["idnet"] for coll, tree in full.items()}
  safetensors_np.save_file(
      encoder_keys.export_published_encoder("idnet", idnet),
      str(tmp_path / "model_ir_se50.safetensors"),
  )
  net, variables = F.load_identity_net("official", tmp_path)
  assert isinstance(net.module, face_encoders.OfficialEncoders)
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(idnet)):
    np.testing.assert_array_equal(x, y)
  out = jax.eval_shape(net.embed, variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 512)
