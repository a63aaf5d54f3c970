"""IP-FaceDiff pipeline: SD-DDIM scheduler, DDIM inversion, TokenFlow-PnP edit, SD directories.

- the scheduler against diffusers' DDIMScheduler (the oracle) built from the golden config;
- the golden check (`s3jax.parity.ipfacediff`, float32 and float64 rows, in its own processes,
  started with the first test and collected by the last);
- the edit's batch passes in chunks, and over 2 (fake CPU) devices, equal the one-pass run
  (up to float32 rounding);
- `StableDiffusion.load` errors, `save_sd_dir` -> `load` round trip, diffusers reads the dir.
Tiny random models share one config, so the jitted edit/inversion compile once per process.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.sd import tokenflow, unet
from s3jax.sd.clip import CLIPTextConfig
from s3jax.sd.pipeline import StableDiffusion, save_sd_dir
from s3jax.sd.scheduler import SDScheduler
from s3jax.sd.vae import VAEConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_UNET = unet.SDUNetConfig(
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
    sample_size=8,
)
TINY_VAE = VAEConfig(
    block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16
)
# The golden tokenizer's 554 tokens (bos 552, eos = pad 553).
TINY_TEXT = CLIPTextConfig(
    vocab_size=554,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    bos_token_id=552,
    eos_token_id=553,
    pad_token_id=553,
    projection_dim=16,
)
# One static setting for every tiny run (compiled once): 8 frames in batches of 2, 2 edit steps
# (conv and Q/K injection in the first), 10 inversion steps.
N_FRAMES, BATCH, N_EDIT, N_INV = 8, 2, 2, 10
EDIT_KW = dict(n_timesteps=N_EDIT, guidance_scale=7.5, pnp_f_t=0.8, pnp_attn_t=0.5)


@pytest.fixture(scope="module")
def ipfd_dir(golden_dir):
  path = golden_dir.parent / "ipfacediff"
  if not (path / "io.npz").exists():
    pytest.skip(f"IP-FaceDiff golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def golden_scheduler_config(ipfd_dir):
  return json.loads((ipfd_dir / "scheduler_config.json").read_text())


# ------------------------------------------------------------------------------- scheduler
def test_scheduler_resolves_pndm_config_to_ddim_defaults(golden_scheduler_config):
  s = SDScheduler.from_diffusers(golden_scheduler_config)
  assert s == SDScheduler(clip_sample=True, set_alpha_to_one=False, steps_offset=1)
  assert SDScheduler.from_diffusers({}).beta_schedule == "linear"  # DDIM's own defaults
  assert not SDScheduler.from_diffusers({"clip_sample": False}).clip_sample
  for bad in (
      {"prediction_type": "v_prediction"},
      {"beta_schedule": "squaredcos_cap_v2"},
      {"timestep_spacing": "trailing"},
      {"thresholding": True},
      {"rescale_betas_zero_snr": True},
      {"trained_betas": [0.1] * 1000},
  ):
    with pytest.raises(ValueError, match=next(iter(bad))):
      SDScheduler.from_diffusers({**golden_scheduler_config, **bad})


@pytest.mark.parametrize("clip_sample", [True, False])
def test_scheduler_matches_diffusers_ddim(golden_scheduler_config, clip_sample):
  import torch  # the oracle (test dependency)
  from diffusers import DDIMScheduler

  config = {**golden_scheduler_config, "clip_sample": clip_sample}
  ours = SDScheduler.from_diffusers(config)
  ref = DDIMScheduler.from_config(config)
  np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
  assert ours.final_alpha_cumprod == ref.final_alpha_cumprod.numpy()
  for n in (1, 3, 10, 20, 50, 500, 1000):
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps(n), ref.timesteps.numpy())
  rng = np.random.default_rng(0)
  step = jax.jit(ours.step, static_argnums=3)  # t traced, as inside the edit scan
  for n in (10, 50):
    ref.set_timesteps(n)
    for t in ours.timesteps(n):
      x = (3 * rng.standard_normal((2, 4, 4, 4))).astype(np.float32)
      eps = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
      want = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(x)).prev_sample.numpy()
      got = np.asarray(step(eps, int(t), x, n))
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"n={n} t={t}")
  x0, eps = rng.standard_normal((2, 3, 4, 4), dtype=np.float32), rng.standard_normal(
      (2, 3, 4, 4), dtype=np.float32
  )
  for t in (1, 500, 999):
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.tensor([t])).numpy()
    np.testing.assert_allclose(np.asarray(ours.add_noise(x0, eps, t)), want, rtol=1e-6, atol=1e-7)


def test_inversion_step_inverts_an_unclipped_step(golden_scheduler_config):
  """SPEC §4: the inversion step from t - r to t undoes the unclipped DDIM step at the same eps;
  its first step starts from final_alpha_cumprod (ᾱ[0]), not 1."""
  s = SDScheduler.from_diffusers(golden_scheduler_config)
  rng = np.random.default_rng(1)
  x, eps = rng.standard_normal((2, 4, 4, 4), dtype=np.float32), rng.standard_normal(
      (2, 4, 4, 4), dtype=np.float32
  )
  for t in s.timesteps(20):
    up = s.inversion_step(eps, int(t), s.step(eps, int(t), x, 20, clip=False), 20)
    np.testing.assert_allclose(np.asarray(up), x, rtol=2e-4, atol=2e-4)
  a1 = s.alphas_cumprod[1]
  x_first = np.asarray(s.inversion_step(eps, 1, x, 20))
  a0 = s.final_alpha_cumprod
  want = np.sqrt(a1) * (x - np.sqrt(1 - a0) * eps) / np.sqrt(a0) + np.sqrt(1 - a1) * eps
  np.testing.assert_allclose(x_first, want, rtol=1e-5, atol=1e-6)


def test_schedule_helpers(ipfd_dir):
  assert tokenflow.injection_counts(50, 0.8, 0.5) == (40, 25)
  assert tokenflow.injection_counts(100, 0.29, 0.29) == (28, 28)  # int(28.999...)
  assert tokenflow.usable_frames(41, 8) == 40
  with pytest.raises(ValueError):
    tokenflow.usable_frames(7, 8)
  io = np.load(ipfd_dir / "io.npz")
  s = SDScheduler()
  asc, slots, saved = tokenflow.inversion_save_plan(s, 20, s.timesteps(10))
  np.testing.assert_array_equal(saved, io["inversion_saved_timesteps"])
  assert list(slots[:3]) == [0, len(saved), 1] and slots[-1] == len(saved) - 1
  with pytest.raises(ValueError, match="not inversion timesteps"):
    tokenflow.inversion_save_plan(s, 10, s.timesteps(20))
  with pytest.raises(ValueError, match=r"\[981\]"):
    tokenflow.saved_latents_for(saved, np.zeros((11, 1)), [981])


# ------------------------------------------------------------------------------------ golden
GOLDEN_TEST = "test_golden_parity_f32_and_f64"


@pytest.fixture(scope="module", autouse=True)
def golden_rows_process(request):
  """The golden check (its own process, which starts the float64 one) runs from the first test
  of this file on, next to the tiny-model tests; the golden test (last) collects its rows."""
  if not any(item.name == GOLDEN_TEST for item in request.session.items):
    yield None
    return
  try:
    path = request.getfixturevalue("ipfd_dir")
  except pytest.skip.Exception:
    yield None
    return
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill
  proc = subprocess.Popen(
      [sys.executable, "-m", "s3jax.parity.ipfacediff", str(path)],
      stdout=out,
      stderr=err,
      text=True,
      cwd=REPO,
  )
  proc.outputs = (out, err)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  out.close()
  err.close()


# ------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def tiny_sd(ipfd_dir):
  return StableDiffusion.random(TINY_UNET, TINY_VAE, TINY_TEXT, ipfd_dir / "tokenizer", seed=0)


def make_tiny_edit_inputs(n_frames: int = N_FRAMES):
  """Random latents for the edit of n_frames frames (8x8 latents) in N_EDIT steps."""
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  shape = (n_frames, 8, 8, 4)
  x0 = 0.5 * jax.random.normal(keys[0], shape)
  saved = jax.random.normal(keys[1], (N_EDIT,) + shape)
  eps = jax.random.normal(keys[2], shape)
  embeds = tuple(jax.random.normal(k, (1, 77, 16)) for k in jax.random.split(keys[3], 3))
  pivots = tokenflow.pivot_offsets(keys[4], N_EDIT, n_frames // BATCH, BATCH)
  return x0, saved, eps, embeds, pivots


@pytest.fixture(scope="module")
def tiny_edit_inputs():
  return make_tiny_edit_inputs()


def run_tiny_edit(sd, inputs, **kw):
  x0, saved, eps, embeds, pivots = inputs
  return tokenflow.edit(
      sd.unet_params,
      sd.unet_config,
      sd.scheduler,
      x0,
      saved,
      eps,
      embeds,
      batch_size=BATCH,
      pivots=pivots,
      **EDIT_KW,
      **kw,
  )


@pytest.fixture(scope="module")
def tiny_whole_edit(tiny_sd, tiny_edit_inputs):
  """The tiny edit in one pass (the compile edit_video shares)."""
  return np.asarray(run_tiny_edit(tiny_sd, tiny_edit_inputs))


# Same edit up to float32 rounding: XLA's kernels round differently with the batch size (chunks,
# shards), ~1e-5 after the 2 steps; a seam (a wrong batch, keyframe or store) is O(0.1).
SAME_EDIT_ATOL = 1e-4


@pytest.mark.slow
def test_edit_in_frame_chunks_equals_one_pass(tiny_sd, tiny_edit_inputs, tiny_whole_edit):
  whole = tiny_whole_edit
  assert whole.shape == (N_FRAMES, 8, 8, 4) and np.isfinite(whole).all()
  chunked = run_tiny_edit(tiny_sd, tiny_edit_inputs, frame_chunk=3)  # 3 + 1 batches
  np.testing.assert_allclose(np.asarray(chunked), whole, atol=SAME_EDIT_ATOL)
  # a PRNG key draws the same keyframes as its offsets
  key = jax.random.PRNGKey(7)
  offsets = tokenflow.pivot_offsets(key, N_EDIT, N_FRAMES // BATCH, BATCH)
  from_key = run_tiny_edit(tiny_sd, tiny_edit_inputs[:4] + (key,))
  np.testing.assert_array_equal(from_key, run_tiny_edit(tiny_sd, tiny_edit_inputs[:4] + (offsets,)))
  assert np.abs(np.asarray(from_key) - whole).max() > SAME_EDIT_ATOL  # keyframes matter


def test_inversion_in_frame_chunks_equals_one_pass(tiny_sd):
  x0 = 0.5 * jax.random.normal(jax.random.PRNGKey(4), (N_FRAMES, 8, 8, 4))
  cond = jax.random.normal(jax.random.PRNGKey(5), (1, 77, 16))
  save = tiny_sd.scheduler.timesteps(N_EDIT)
  t_whole, whole = tiny_sd.invert(x0, cond, N_INV, save)
  t_chunk, chunked = tiny_sd.invert(x0, cond, N_INV, save, frame_chunk=3)  # 3 + 3 + 2 frames
  np.testing.assert_array_equal(t_whole, list(save[::-1]) + [901])
  np.testing.assert_array_equal(t_chunk, t_whole)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=3e-5)  # rounding


TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, sys.argv[1])
    import test_sd_tokenflow as t
    from s3jax.sd import unet
    from s3jax.sd.pipeline import random_params
    from s3jax.sd.scheduler import SDScheduler
    assert jax.device_count() == 2, jax.devices()
    class SD:  # only the UNet is needed (tiny_sd's: the same seed)
      unet_config = t.TINY_UNET
      unet_params = random_params(unet.abstract_params(t.TINY_UNET), 0)
      scheduler = SDScheduler()
    one = np.load(sys.argv[2])  # the one-device, one-pass edit of the parent
    mesh = Mesh(np.array(jax.devices()), ("frames",))
    two = t.run_tiny_edit(SD, t.make_tiny_edit_inputs(), mesh=mesh, frame_chunk=2)
    print(json.dumps({"max_abs_diff": float(np.abs(np.asarray(two) - one).max()),
                      "n_shards": len(two.sharding.device_set),
                      "spec": str(two.sharding.spec)}))
    """)


@pytest.mark.slow
def test_edit_sharded_over_two_devices_equals_one(tmp_path, tiny_whole_edit):
  """4 batches in chunks of 2, each chunk split over 2 fake CPU devices."""
  np.save(tmp_path / "one.npy", tiny_whole_edit)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, "-c", TWO_DEVICE_SCRIPT, str(REPO / "tests"), str(tmp_path / "one.npy")],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["n_shards"] == 2 and "frames" in result["spec"], result
  assert result["max_abs_diff"] <= SAME_EDIT_ATOL, result


# ----------------------------------------------------------------------------- directories
def test_load_names_the_missing_file(tmp_path, ipfd_dir, tiny_sd):
  flat = tmp_path / "flat"
  shutil.copytree(ipfd_dir, flat, ignore=shutil.ignore_patterns("io*.npz"))
  for p in flat.rglob("*"):
    p.chmod(0o755 if p.is_dir() else 0o644)
  (flat / "vae.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="vae.safetensors"):
    StableDiffusion.load(flat)
  (flat / "tokenizer" / "merges.txt").unlink()
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    StableDiffusion.load(flat)
  diffusers_dir = save_sd_dir(tmp_path / "sd", tiny_sd)
  (diffusers_dir / "scheduler" / "scheduler_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    StableDiffusion.load(diffusers_dir)
  with pytest.raises(FileNotFoundError, match="not a Stable Diffusion directory"):
    StableDiffusion.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="not found"):
    StableDiffusion.load(tmp_path / "absent")


def test_save_load_round_trip_and_diffusers_reads_the_dir(tmp_path, tiny_sd):
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
  from transformers import CLIPTextModel

  d = save_sd_dir(tmp_path / "sd", tiny_sd)
  back = StableDiffusion.load(d)
  for name in ("unet_params", "vae_params", "text_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(back, name), getattr(tiny_sd, name))
  assert (back.unet_config, back.vae_config, back.text_config, back.scheduler) == (
      tiny_sd.unet_config,
      tiny_sd.vae_config,
      tiny_sd.text_config,
      tiny_sd.scheduler,
  )
  ids = np.asarray(tiny_sd.tokenizer(["a man talking"]))
  np.testing.assert_array_equal(back.tokenizer(["a man talking"]), ids)

  # diffusers / transformers read every folder; the UNet gives our eps
  ref_unet = UNet2DConditionModel.from_pretrained(d / "unet").eval()
  ref_vae = AutoencoderKL.from_pretrained(d / "vae")
  ref_text = CLIPTextModel.from_pretrained(d / "text_encoder")
  ref_sched = DDIMScheduler.from_pretrained(d / "scheduler")
  assert SDScheduler.from_diffusers(dict(ref_sched.config)) == tiny_sd.scheduler
  assert list(ref_vae.config.block_out_channels) == [8, 8]
  x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
  ctx = np.asarray(tiny_sd.text_embeds(["a man talking"]))
  with torch.no_grad():
    want = ref_unet(torch.from_numpy(x), 501, torch.from_numpy(ctx)).sample.numpy()
    want_ctx = ref_text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  np.testing.assert_allclose(ctx, want_ctx, rtol=1e-4, atol=1e-5)
  got = jax.jit(tokenflow.unet_apply(tiny_sd.unet_module()))(
      tiny_sd.unet_params, jnp.asarray(x.transpose(0, 2, 3, 1)), 501, jnp.asarray(ctx)
  )
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-5)


def test_edit_video_tiny(tiny_sd, tiny_edit_inputs):
  frames = np.random.default_rng(2).uniform(size=(N_FRAMES + 1, 16, 16, 3)).astype(np.float32)
  kw = dict(n_inversion_steps=N_INV, batch_size=BATCH, seed=1, **EDIT_KW)
  out = tiny_sd.edit_video(frames, "a man with blonde hair", "a man talking", **kw)
  assert out.shape == (N_FRAMES, 16, 16, 3)  # 9 frames -> 8, as the reference drops the rest
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
  t0 = time.perf_counter()
  again = tiny_sd.edit_video(frames, "a man with blonde hair", "a man talking", **kw)
  print(
      f"tiny edit_video ({N_FRAMES} frames, {N_INV}+{N_EDIT} steps, compiled): "
      f"{time.perf_counter() - t0:.2f} s"
  )
  np.testing.assert_array_equal(again, out)
  with pytest.raises(ValueError, match="multiple"):
    tiny_sd.edit_video(frames, "a", "b", **{**kw, "n_inversion_steps": 7})


# runs last: it collects the rows of the check started at the first test
@pytest.mark.slow
def test_golden_parity_f32_and_f64(ipfd_dir, golden_rows_process):
  golden_rows_process.wait(timeout=1800)
  stdout, stderr = (f.seek(0) or f.read() for f in golden_rows_process.outputs)
  assert golden_rows_process.returncode == 0, stderr[-3000:]
  rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
  names = {r["name"] for r in rows}
  with np.load(ipfd_dir / "io_f64.npz") as z:
    assert {f"f64/{k}" for k in z.files} <= names
  for key in ("inversion_latents", "edit_latents[10]", "edit_nn_idx", "e2e/edit_frames"):
    assert key in names
  bad = [r for r in rows if not r["ok"]]
  assert not bad, bad
