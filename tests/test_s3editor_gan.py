"""S3Editor on the GAN backbone (s3jax.training.s3editor_gan) with the golden tiny StyleGAN2.

The generator is ../shared/golden/stit/stylegan2_ada_tiny.pkl (64 px, w_dim 64, 10 ws, random
weights), the directions four seeded random unit vectors, K = 2, R = 4 (configs/s3editor_gan.py
:tiny). These test the machinery, not the quality of edits.
"""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from s3jax import checkpointing, gan_edit, loading, optim
from s3jax.models import editor as E
from s3jax.models import id_standin
from s3jax.training import loop, runner
from s3jax.training import s3editor_gan as G
from s3jax.training import state as state_lib

PKL = "stylegan2_ada_tiny.pkl"


@pytest.fixture(scope="module")
def stit_dir(golden_dir):
  path = golden_dir.parent / "stit"
  if not (path / PKL).is_file():
    pytest.skip(f"the tiny StyleGAN2 pickle is not at {path / PKL}")
  return path


def _config(stit_dir, total_steps=6, lam_from="attribution"):
  c = configs.get("s3editor_gan:tiny")
  c.generator.path = str(stit_dir / PKL)
  c.sparsity.lam_from = lam_from
  c.sparsity.attribution_every = 2
  c.sparsity.attribution_frames = 2
  c.total_steps = total_steps
  c.log_every = 2
  c.checkpoint_every = 1000
  c.sample_every = 1000
  c.num_sample_rows = 2
  return c


@pytest.fixture(scope="module")
def prereqs(stit_dir):
  return G.load_prerequisites(_config(stit_dir))


def _task(config, prereqs, workdir):
  mesh = state_lib.make_mesh(config.mesh)
  return G.S3EditorGanTask(config, mesh, workdir, prereqs=prereqs)


def test_configs_and_registration():
  assert runner.TASKS["s3editor_gan"] is G.S3EditorGanTask
  paper = configs.get("s3editor_gan")
  assert paper.trainer == "s3editor_gan" and paper.generator.fused_modconv
  assert sorted(paper.directions.keys())[0] == "age" and paper.random_directions == 0
  assert all(n in G.INTERFACEGAN_PARTS for n in paper.directions.keys())
  tiny = configs.get("s3editor_gan:tiny")
  assert tiny.random_directions == 4 and tiny.editor.num_clusters == 2
  with pytest.raises(ValueError, match="unknown config variant"):
    configs.get("s3editor_gan:demo")


def test_ffhq_mean_layout_and_missing_generator(tmp_path):
  lm = G.ffhq_mean_landmarks()
  np.testing.assert_allclose(lm[36:42].mean(0), [0.375, 0.473], atol=2e-3)
  np.testing.assert_allclose(lm[42:48].mean(0), [0.625, 0.473], atol=2e-3)
  assert np.all((lm > 0) & (lm < 1))
  c = configs.get("s3editor_gan:tiny")
  c.generator.path = str(tmp_path / "nothing.pkl")
  with pytest.raises(FileNotFoundError, match="generator.path"):
    G.load_prerequisites(c)


def test_trains_with_exact_zero_groups_and_the_loss_falls(stit_dir, prereqs, tmp_path):
  """Index-tied lambdas (lam_out = 1000 > sqrt(group size) ~ 72, so lr * lam_out exceeds the
  init norm of a group, ~2, at once): every off-target group (regions 0-1, the eyes/brows
  half: every cluster targets only {2, 3}) is exactly zero, in the params and in the EMA; the
  on-target ones live; the loss falls below the plain edit's on the same edits."""
  steps = 30
  cfg = _config(stit_dir, total_steps=steps, lam_from="index")
  cfg.sparsity.lam_out = 1000.0
  task = _task(cfg, prereqs, tmp_path)
  assert [set(t) for t in task.cluster_targets] == [{2, 3}, {2, 3}]
  state = task.init_state()
  # T starts as the identity: the edit is STIT's InterFaceGAN edit w + (factor / 2) d.
  w = np.asarray(task.base_latents(task.frozen, jnp.arange(2)))
  x = task.editor.apply(
      {"params": state.params["editor"]},
      jnp.asarray(w),
      jnp.int32(1),
      1.5,
      stats=task.stats,
  )
  want = gan_edit.interfacegan_edits(
      w.reshape(2, 10, 64), prereqs.directions[1][None].astype(np.float64), [3.0]
  )[0]
  np.testing.assert_allclose(np.asarray(x).reshape(2, 10, 64), want, rtol=1e-6, atol=1e-6)

  curve = []
  for _ in range(steps):
    state, m = task.train_step(state, task.global_batch(next(task.data_iterator)))
    curve.append({k: float(v) for k, v in jax.device_get(m).items()})
  # Each step also scores the same edits done plainly (what T starts as): paired gains.
  gain = np.array([m["loss"] - m["plain_loss"] for m in curve])
  loc_gain = np.array([m["l_loc"] - m["plain_l_loc"] for m in curve])
  print(
      f"\nloss - plain_loss: step 1 {gain[0]:.2e}, steps 1-10 {gain[:10].mean():.4f}, 11-20 "
      f"{gain[10:20].mean():.4f}, 21-30 {gain[20:].mean():.4f}; l_loc - plain: 21-30 "
      f"{loc_gain[20:].mean():.4f} (plain {np.mean([m['plain_l_loc'] for m in curve[20:]]):.4f});"
      f" l_faith 21-30 {np.mean([m['l_faith'] for m in curve[20:]]):.2e}; zero groups per step"
      f" {[int(m['zero_groups']) for m in curve]}"
  )
  assert all(np.isfinite(m["loss"]) for m in curve)
  assert abs(gain[0]) < 1e-6  # step 1 scores the initial T, the identity
  assert gain[10:20].mean() < 0 and gain[20:].mean() < 0 and loc_gain[20:].mean() < 0
  rep = optim.sparsity_report(jax.device_get(state.params), task.group_spec)
  off = [g for g, i in enumerate(task.group_spec.group_info) if not i["on_target"]]
  assert rep["zero_groups"] == off == [0, 1, 4, 5]
  ema = optim.group_norms(state.ema_params, task.group_spec)
  assert set(np.flatnonzero(np.asarray(ema) == 0)) == set(off)
  assert curve[-1]["zero_groups_off_target"] == 4 and curve[-1]["zero_groups_on_target"] == 0


def test_attribution_resume_and_edit_fn(stit_dir, prereqs, tmp_path):
  """Attribution-tied lambdas (the default): measured every 2 steps through the generator,
  the prox's lambdas in the state are attribution_lambda of the logged shares; a run split
  3 + 3 equals the straight run exactly; load_editor edits W+ with the EMA transformations."""
  n = 6
  straight = tmp_path / "straight"
  cfg = _config(stit_dir, total_steps=n)
  out = loop.train(cfg, str(straight), _task(cfg, prereqs, straight))
  assert out["step"] == n and np.isfinite(out["loss"])
  split = tmp_path / "split"
  half = _config(stit_dir, total_steps=n // 2)
  task = _task(cfg, prereqs, split)
  loop.train(half, str(split), task)
  loop.train(cfg, str(split), task)  # resumes at 3 (same task: its compiled step is reused)
  saved = checkpointing.restore_saved_state(straight)
  chex.assert_trees_all_equal(saved, checkpointing.restore_saved_state(split))

  rep = json.loads((straight / "sparsity.json").read_text())
  assert list((straight / "samples").glob("*.png"))
  att = rep["attribution"]
  assert att["step"] == 4
  table = np.asarray(att["table"])
  assert table.shape == (2, 4, 4) and np.all(np.isfinite(table)) and table.max() > 0
  share = np.asarray(att["off_target_share"], dtype=float)
  measured = ~np.isnan(share)
  assert measured.any() and np.all((share[measured] >= 0) & (share[measured] <= 1))
  lam = np.asarray(rep["group_lam"], np.float32)
  want = E.attribution_lambda(
      jnp.asarray(share, jnp.float32),
      jnp.full(8, cfg.sparsity.lam_in),
      cfg.sparsity.lam_in,
      cfg.sparsity.lam_out,
      cfg.sparsity.attribution_threshold,
  )
  np.testing.assert_allclose(lam[measured], np.asarray(want).reshape(2, 4)[measured], rtol=1e-6)
  assert set(rep["eval"]) >= {"eval/T/loc_out", "eval/plain/loc_out", "eval/T/faith_reached"}

  edit = loading.load_editor(straight)
  assert edit.attributes == ("random_0", "random_1", "random_2", "random_3")
  assert edit.latent_shape == (10, 64)
  w_plus = np.asarray(task.base_latents(task.frozen, jnp.arange(3))).reshape(3, 10, 64)
  edited = np.asarray(edit(w_plus, "random_2", 1.5))
  assert edited.shape == (3, 10, 64) and np.all(np.isfinite(edited))
  meta = loading.load_editor_meta(straight)
  assert meta["hparams"]["latent_shape"] == [10, 64]
  direct = task.editor.apply(
      {"params": jax.tree.map(jnp.asarray, saved["ema_params"]["editor"])},
      jnp.asarray(w_plus.reshape(3, -1)),
      jnp.int32(2),
      1.5,
      stats=task.stats,
  )
  np.testing.assert_allclose(edited.reshape(3, -1), np.asarray(direct), rtol=1e-6, atol=1e-6)
  plain = w_plus + 1.5 * prereqs.directions[2]
  assert np.abs(edited - plain).max() > 0  # T was trained: not the plain edit any more
  with pytest.raises(loading.UnknownAttributeError, match="random_0"):
    edit(w_plus, "smile", 1.0)
  with pytest.raises(ValueError, match="latents"):
    edit(w_plus[:, :5], "random_0", 1.0)


def test_interfacegan_files_pivots_and_the_identity_net(stit_dir, prereqs, tmp_path):
  """Directions from InterFaceGAN .npy files (the golden smile direction, cut to w_dim 64,
  and a second one), W+ pivots from an .npy, and L_id through an identity network."""
  with np.load(stit_dir / "latent_edit_io.npz") as z:
    smile, pivots = z["direction_file"], z["w_pivots"]
  np.save(tmp_path / "smile.npy", smile)
  other = np.random.default_rng(1).normal(size=(1, 64))
  np.save(tmp_path / "eyes_open.npy", np.repeat(other / np.linalg.norm(other), 10, 0))
  np.save(tmp_path / "pivots.npy", pivots)
  c = _config(stit_dir)
  c.random_directions = 0
  c.directions = {n: str(tmp_path / f"{n}.npy") for n in ("smile", "eyes_open")}
  c.latents.pivots = str(tmp_path / "pivots.npy")
  p = G.load_prerequisites(c)
  assert p.names == ["eyes_open", "smile"] and p.pivots.shape == (3, 10, 64)
  np.testing.assert_allclose(p.directions[1], smile[0], rtol=1e-6)
  idm = id_standin.IdentityNet(features=16, width=4, depth=2, input_size=32)
  # jitted: eager flax init and apply of the net take ~15 s on CPU, op by op
  idp = jax.jit(idm.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  p = dataclasses.replace(p, id_model=idm, id_params=idp)
  task = _task(c, p, tmp_path / "run")
  assert task.pool_names == ["eyes_open", "smile"] and task.num_clusters == 2
  # smile -> mouth, eyes, jaw (regions 0-3 of the R = 4 map); eyes_open -> eyes (0-1).
  assert [sorted(t) for t in task.attr_targets] == [[0, 1], [0, 1, 2, 3]]
  w = task.base_latents(task.frozen, jnp.array([2, 0]))
  np.testing.assert_array_equal(np.asarray(w), pivots[[2, 0]].reshape(2, -1))
  it = G.make_latent_iterator(c, num_pivots=3)
  seen = np.concatenate([next(it)["index"] for _ in range(3)])
  assert sorted(seen[:3]) == [0, 1, 2] and seen.max() < 3  # every pivot once per epoch
  img = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  dist = jax.jit(task.identity_distance)
  got = dist(task.frozen, img, jnp.stack([img[1], img[0]]), w, w)
  e = jax.jit(idm.apply)({"params": idp}, img)
  np.testing.assert_allclose(got, 1.0 - np.sum(e * e[::-1], -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dist(task.frozen, img, img, w, w), 0, atol=1e-6)
  c.latents.pivots = str(tmp_path / "smile.npy")  # (10, 64): not W+ pivots
  with pytest.raises(ValueError, match="pivots have shape"):
    _task(c, G.load_prerequisites(c), tmp_path / "bad")
