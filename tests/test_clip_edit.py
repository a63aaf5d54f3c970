"""DVA CLIP editing (s3jax.clip_edit) with a tiny random DVA and a tiny random CLIP.

The optimisation runs on the first frame of a sample video (32 px records: crop, landmarks,
dlib z_id, z_lnd) through ``CLIPEditor.edit_fn_for_video``, as the edit CLI calls it. One
compile of the z_id optimisation serves every test (the loss weights and lr are traced).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax import clip_edit, diffusion, editing, input_pipeline
from s3jax.models import autoencoder
from s3jax.models.editor import l2_normalize
from s3jax.porting import sd_vae_clip_keys
from s3jax.sd import clip as clip_lib

from sd_helpers import CLIP_CONFIG, random_params, write_byte_level_tokenizer
from train_helpers import tiny_edit_config

SIZE = 32
ITERATIONS = 5
FRAMES = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_data_32):
  root = tmp_path_factory.mktemp("clip_edit")
  tok = write_byte_level_tokenizer(root / "tokenizer")
  clip_abstract = jax.eval_shape(lambda: clip_lib.init_params(CLIP_CONFIG, jax.random.key(0)))
  sd_vae_clip_keys.save_clip_dir(root / "clip", random_params(clip_abstract, 4), CLIP_CONFIG)
  cfg = tiny_edit_config()
  cfg.model.unet.channel_mult = (1,)  # one level: compiles fast
  model = autoencoder.make_dva(cfg.model)
  params = random_params(
      jax.eval_shape(lambda: autoencoder.init_params(model, cfg.model, jax.random.key(0))), 0
  )
  editor = editing.VideoEditor(root / "dva", steps=10, model=(model, params, cfg), cache=False)
  src = input_pipeline.open_split(sample_data_32, "train")
  recs = [src[i] for i in range(FRAMES)]
  crops = np.stack([input_pipeline.decode_image(r["image"]) for r in recs])
  z_frames = np.stack([r["z_id"] for r in recs])
  code = editing.VideoCode(  # what VideoEditor.encode_aligned gives, without its inversion
      num_frames=FRAMES,
      frame_shape=(SIZE, SIZE, 3),
      frame_indices=np.arange(FRAMES),
      quads=np.zeros((FRAMES, 4, 2), np.float32),
      crops=crops,
      masks=None,
      landmarks=np.stack([r["landmarks"] for r in recs]),
      z_lnd=np.stack([r["z_lnd"] for r in recs]),
      z_id_frames=z_frames,
      z_id=editing.average_identity(z_frames),
      x_T=None,
      has_face=np.ones(FRAMES, bool),
      interpolated=np.zeros(FRAMES, bool),
      passthrough=[],
      align_report={},
  )
  clip_editor = clip_edit.CLIPEditor(
      root / "clip",
      "face with a beard",
      "face",
      clip_edit.CLIPEditSettings(iterations=ITERATIONS),
      tokenizer_dir=tok,
  )
  return dict(editor=editor, code=code, clip_editor=clip_editor, model=model, params=params)


@pytest.fixture(scope="module")
def edits(setup):
  ce, editor, code = setup["clip_editor"], setup["editor"], setup["code"]
  fn = ce.edit_fn_for_video(editor, code, landmarks_size=SIZE)
  frozen = ce.edit_fn_for_video(
      editor,
      code,
      landmarks_size=SIZE,
      settings=dataclasses.replace(ce.settings, clip_weight=0.0),
  )
  return fn, frozen


def test_directional_loss_falls_and_z_id_moves(edits):
  fn, _ = edits
  h = fn.history
  assert all(len(v) == ITERATIONS and np.all(np.isfinite(v)) for v in h.values())
  # Iteration 0 is at the start: edited == unedited, so L1 and ID are 0 and L_dir takes the
  # reference's zero-difference branch; from then on the directional loss falls.
  assert h["l1"][0] == 0 and h["id"][0] == 0
  assert h["direction"][-1] < h["direction"][1], h["direction"]
  assert h["l1"][-1] > 0 and h["id"][-1] > 0
  assert np.linalg.norm(fn.delta) > 0
  assert fn.report["settings"]["iterations"] == ITERATIONS
  assert fn.report["target_prompt"] == "face with a beard"


def test_zero_clip_weight_leaves_z_id_unchanged(edits):
  _, frozen = edits
  assert np.all(frozen.delta == 0)
  assert np.all(frozen.history["id"] == 0) and np.all(frozen.history["l1"] == 0)
  assert np.all(frozen.history["loss"] == 0)


def test_edit_fn_is_the_reference_edit(edits, setup):
  fn, _ = edits
  z = setup["code"].z_id[None]
  np.testing.assert_allclose(fn(z, "", 0.0), l2_normalize(z), rtol=1e-6)
  out = fn(np.repeat(z, 3, 0), "ignored", 2.0)
  np.testing.assert_allclose(out, np.repeat(l2_normalize(z + 2.0 * fn.delta), 3, 0), rtol=1e-6)
  # What VideoEditor.edit_video / edit_stream take as edit_fn.
  z_new = setup["editor"].edited_identity(fn, setup["code"].z_id, "clip", 1.0)
  assert z_new.shape == setup["code"].z_id.shape


def test_one_step_moves_follow_the_trajectory(setup):
  """step_each (every point its own timestep, one call) under the start z reproduces the
  trajectory's next points, which were decoded one step at a time."""
  model, params, code = setup["model"], setup["params"], setup["code"]
  z, lnd = jnp.asarray(code.z_id_frames[0]), jnp.asarray(code.z_lnd[0])
  image = jnp.asarray(code.crops[0], jnp.float32) / 127.5 - 1.0
  inputs = clip_edit.clip_edit_inputs(model, params, image, z, lnd, 5)
  consts = {k: jnp.asarray(v) for k, v in diffusion.ddim_constants(5, "decode").items()}
  assert list(consts["t"]) == [800, 600, 400, 200, 0]

  @jax.jit
  def moved(inputs):
    cond = clip_edit.z_face(model, params, z[None], lnd[None])
    return clip_edit.step_each(clip_edit.dva_eps_fn(model, params), inputs, cond, consts)

  out = moved(inputs)
  np.testing.assert_allclose(out[:-1], inputs[1:], rtol=1e-4, atol=1e-5)


def test_directional_clip_loss():
  r = np.random.default_rng(0)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  src, edit, d = unit(r.normal(size=(4, 8))), unit(r.normal(size=(4, 8))), unit(r.normal(size=8))
  diff = unit(edit - src)
  want = np.mean(1 - diff @ d)
  got = clip_edit.directional_clip_loss(jnp.asarray(src), jnp.asarray(edit), jnp.asarray(d))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # No difference at all: the reference scores the edited features themselves.
  same = clip_edit.directional_clip_loss(jnp.asarray(edit), jnp.asarray(edit), jnp.asarray(d))
  np.testing.assert_allclose(same, np.mean(1 - edit @ d), rtol=1e-5)
  grad = jax.grad(lambda e: clip_edit.directional_clip_loss(e, e, jnp.asarray(d)), argnums=0)
  assert np.all(np.isfinite(grad(jnp.asarray(edit))))


def test_text_direction(setup):
  ce = setup["clip_editor"]
  np.testing.assert_allclose(np.linalg.norm(ce.direction), 1.0, rtol=1e-5)
  bare = clip_edit.text_direction(ce.clip_model, ce.clip_params, ce.tokenizer, "face", "x", ())
  ids = ce.tokenizer(["face", "x"])
  f = np.asarray(
      ce.clip_model.apply({"params": ce.clip_params}, ids, method=clip_lib.CLIPModel.text_features)
  )
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  want = (f[1] - f[0]) / np.linalg.norm(f[1] - f[0])
  np.testing.assert_allclose(bare, want, rtol=1e-5, atol=1e-6)
  assert len(clip_edit.IMAGENET_TEMPLATES) == 79
