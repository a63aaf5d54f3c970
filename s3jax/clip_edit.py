"""Text-driven DVA edits: optimise z_id with a directional CLIP loss (DVA's ``editing_CLIP.py``).

The reference's procedure, on the first edited frame of a video (x0, its z_id ``s`` and z_lnd):

1. DDIM-invert x0 over the ``ddim_steps``-step respaced schedule (5: t = 0, 200, ..., 800)
   conditioned on ``z_face(s, z_lnd)``, then decode back one step at a time: the unedited
   trajectory ``x_800, x_600, ..., x_0, x0_hat`` (``clip_edit_inputs`` keeps its first K).
2. ``z`` starts at ``s``. Each iteration takes ONE DDIM step from every trajectory point at
   once (``step_each``), conditioned on ``z_face(l2norm(z), z_lnd)``: the K "edited" images.
   Their unedited counterparts (the same steps under ``l2norm(s)``) are the trajectory's next
   points.
3. loss = ``clip_weight * -log((2 - L_dir) / 2) + id_weight * (1 - cos(z, s))
   + l1_weight * mean(|mask * (unedited - edited)|)`` with the reference's weights 3 / 5 / 5.
   ``L_dir`` is StyleGAN-NADA's directional loss as the reference's ``CLIPLoss``
   (``lambda_direction=1``, the rest 0): the mean over the K pairs of ``1 - cos(E_I(edited) -
   E_I(unedited), d_T)`` with unit CLIP image features E_I (ViT-B/16 in the reference) and the
   text direction ``d_T`` = the normalised mean over the 79 ImageNet prompt templates of
   ``E_T(template(target)) - E_T(template(source))`` (unit text features). When every image
   difference is exactly zero the reference uses ``1 - cos(E_I(edited), d_T)`` instead.
   ``mask`` is the first frame's training face mask (BiSeNet, ``for_video=False``).
4. torch Adam (lr 0.002, no weight decay) on the raw z for ``iterations`` steps (the reference
   hard-codes 2000; its ``--n_train_step 5`` is the DDIM step count above, not the iterations).
5. The video edit is ``l2norm(z̄ + scale * (z - s))`` with z̄ the video's averaged z_id, decoded
   from the usual inversion (``VideoEditor``): ``CLIPEditFn`` is that ``EditFn``.

Where this differs from the reference, and why:

* The unedited counterparts are the first iteration's own edited images (z = s): the same
  program on the same inputs, so at the start the L1 and ID terms and their gradients are
  exactly zero and z moves only through the CLIP term. The reference computes them in a
  separate pass, whose rounding noise gives L1 a sign-sized (sub)gradient that Adam
  normalises into a full step, so its z drifts even with the CLIP weight at 0.
* The ID term is written ``1/2 |l2norm(z) - l2norm(s)|^2``: the reference's
  ``1 - l2norm(z) . s`` for a unit ``s`` (ArcFace and dlib's z_id are unit), exactly zero
  at the start.
* CLIP's image preprocessing is ``sd.clip.clip_preprocess`` (antialiased bicubic resize to the
  CLIP size): the reference resizes the tensor with torchvision (bicubic; antialiasing
  depends on the torchvision version).

Public API: ``IMAGENET_TEMPLATES``, ``CLIPEditSettings``, ``CLIPEditProblem``,
``text_direction``, ``image_features``, ``directional_clip_loss``, ``clip_edit_inputs``,
``step_each``, ``clip_edit_problem``, ``clip_edit_loss``, ``settings_weights``, ``clip_edit_z_id``,
``CLIPEditFn``, ``CLIPEditor``, ``clip_settings``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from s3jax import diffusion, face_features, images, optim
from s3jax.models.editor import l2_normalize
from s3jax.porting import sd_vae_clip_keys
from s3jax.sd import clip as clip_lib
from s3jax.sd.tokenizer import CLIPTokenizer

# OpenAI CLIP's 79 ImageNet prompt templates (CLIP's zero-shot notebook), which the
# reference's CLIPLoss (StyleGAN-NADA's utils/text_templates.py) averages the text over.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
# torch.nn.CosineSimilarity's eps and the reference's guard on the edit direction's norm.
COSINE_EPS = 1e-8
DIRECTION_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class CLIPEditSettings:
  """editing_CLIP.py's knobs; the defaults are the reference's.

  iterations: Adam steps on z (the reference's hard-coded 2000).
  lr: Adam's learning rate (``--lr``).
  ddim_steps: respaced DDIM steps of the trajectory (``--n_train_step``): 5 gives t = 800,
    600, 400, 200, 0, so every iteration runs the UNet on 5 images.
  clip_weight / id_weight / l1_weight: ``--clip_loss_w`` / ``--id_loss_w`` / ``--l1_loss_w``.
  templates: average the text over ``IMAGENET_TEMPLATES`` (the reference); False uses the
    bare prompts.
  """

  iterations: int = 2000
  lr: float = 0.002
  ddim_steps: int = 5
  clip_weight: float = 3.0
  id_weight: float = 5.0
  l1_weight: float = 5.0
  templates: bool = True

  def __post_init__(self):
    diffusion.respaced_timesteps(self.ddim_steps)  # validates the step count early
    if self.iterations < 0:
      raise ValueError(f"iterations must be >= 0, got {self.iterations}")


@flax.struct.dataclass
class CLIPEditProblem:
  """The fixed inputs of one z_id optimisation (all arrays; K = ddim_steps).

  z_start: (D,) the first frame's z_id ``s``; z_lnd: (102,); inputs: (K, S, S, 3) the unedited
  trajectory's points the one-step moves start from; consts: ``diffusion.ddim_constants``
  (K entries, the step of each point); mask: (S, S, 1) float {0, 1}; direction: (E,) unit
  text direction.
  """

  z_start: jax.Array
  z_lnd: jax.Array
  inputs: jax.Array
  consts: dict
  mask: jax.Array
  direction: jax.Array


# ---------------------------------------------------------------------------
# CLIP pieces
# ---------------------------------------------------------------------------
def text_direction(
    clip_model: clip_lib.CLIPModel,
    clip_params,
    tokenizer: CLIPTokenizer,
    source: str,
    target: str,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
) -> np.ndarray:
  """CLIPLoss.compute_text_direction: normalise(mean_k(E_T(t_k(target)) - E_T(t_k(source))))
  with unit text features E_T; no ``templates`` (empty) uses the bare prompts. (E,) float32."""
  templates = tuple(templates) or ("{}",)
  prompts = [t.format(p) for p in (source, target) for t in templates]
  ids = tokenizer(prompts, max_length=clip_model.config.text.max_position_embeddings)
  feats = clip_model.apply({"params": clip_params}, ids, method=clip_lib.CLIPModel.text_features)
  feats = l2_normalize(feats)
  n = len(templates)
  direction = jnp.mean(feats[n:] - feats[:n], axis=0)
  return np.asarray(l2_normalize(direction), np.float32)


def image_features(clip_model: clip_lib.CLIPModel, clip_params, images_m11):
  """Unit CLIP image features (N, E) of [-1, 1] NHWC images (CLIPLoss.get_image_features)."""
  pixels = clip_lib.clip_preprocess(images_m11, clip_model.config.vision.image_size)
  feats = clip_model.apply(
      {"params": clip_params}, pixels, method=clip_lib.CLIPModel.image_features
  )
  return l2_normalize(feats)


def safe_norm(x, axis=-1, keepdims=True):
  """L2 norm with a finite gradient at 0 (where it is 0)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def cosine(a, b, eps: float = COSINE_EPS):
  """torch.nn.CosineSimilarity(dim=-1, eps): a.b / max(|a| |b|, eps), finite gradient at 0."""
  return jnp.sum(a * b, axis=-1) / jnp.maximum(
      safe_norm(a, keepdims=False) * safe_norm(b, keepdims=False), eps
  )


def directional_clip_loss(source_features, edited_features, direction):
  """The reference's ``CLIPLoss.clip_directional_loss`` on unit image features (N, E).

  mean(1 - cos((E_edit - E_src) / (|E_edit - E_src| + 1e-7), d_T)); when every difference is
  exactly zero, mean(1 - cos(E_edit, d_T)).
  """
  diff = edited_features - source_features
  unit_diff = diff / (safe_norm(diff) + DIRECTION_EPS)
  moved = jnp.mean(1.0 - cosine(unit_diff, direction[None]))
  still = jnp.mean(1.0 - cosine(edited_features, direction[None]))
  return jnp.where(jnp.all(diff == 0), still, moved)


# ---------------------------------------------------------------------------
# The DVA side
# ---------------------------------------------------------------------------
def dva_eps_fn(dva_model, dva_params):
  """``eps_fn(x, t, z_face)`` of a DVA for ``diffusion``'s DDIM."""

  def eps_fn(x, t, z_face):
    return dva_model.apply({"params": dva_params}, x, t, z_face, method="denoise")

  return eps_fn


def z_face(dva_model, dva_params, z_id, z_lnd):
  return dva_model.apply({"params": dva_params}, z_id, z_lnd, method="z_face")


def step_each(eps_fn, xs, cond, consts):
  """One DDIM step of every image of ``xs`` (K, ...) with its own constants (K entries of
  ``diffusion.ddim_constants``), all in one model call: the reference's ``ddim_sample`` with
  a timestep per sample. ``cond`` (1, C) is shared."""
  k = xs.shape[0]
  per_sample = {
      key: (v if key == "t" else v.reshape((k,) + (1,) * (xs.ndim - 1)))
      for key, v in consts.items()
  }
  return diffusion.ddim_step(eps_fn, xs, jnp.broadcast_to(cond, (k,) + cond.shape[1:]), per_sample)


@functools.partial(jax.jit, static_argnums=(0, 5))
def clip_edit_inputs(dva_model, dva_params, image, z_id, z_lnd, ddim_steps: int):
  """The unedited trajectory's first K points (K, S, S, 3): ``x_T`` from DDIM inversion of
  ``image`` (S, S, 3) under ``z_face(z_id, z_lnd)``, then the points the decode steps start
  from (the last step's result, the x0 estimate, is not needed)."""
  eps_fn = dva_eps_fn(dva_model, dva_params)
  cond = z_face(dva_model, dva_params, z_id[None], z_lnd[None])
  x_T = diffusion.ddim_invert(eps_fn, image[None], cond, ddim_steps)
  consts = diffusion.ddim_constants(ddim_steps, "decode")

  def decode_step(x, c):  # emits the point each step starts from
    return diffusion.ddim_step(eps_fn, x, cond, c), x

  _, points = jax.lax.scan(decode_step, x_T, consts)
  return points[:, 0]


def clip_edit_problem(
    dva_model, dva_params, image, z_id, z_lnd, mask, direction, ddim_steps: int
) -> CLIPEditProblem:
  """A ``CLIPEditProblem`` for one frame: ``image`` (S, S, 3) in [-1, 1], ``z_id`` (D,),
  ``z_lnd`` (102,), ``mask`` (S, S) {0, 1}, ``direction`` (E,) from ``text_direction``."""
  image = jnp.asarray(image, jnp.float32)
  z_id = jnp.asarray(z_id, jnp.float32)
  z_lnd = jnp.asarray(z_lnd, jnp.float32)
  inputs = clip_edit_inputs(dva_model, dva_params, image, z_id, z_lnd, int(ddim_steps))
  consts = {k: jnp.asarray(v) for k, v in diffusion.ddim_constants(ddim_steps, "decode").items()}
  return CLIPEditProblem(
      z_start=z_id,
      z_lnd=z_lnd,
      inputs=inputs,
      consts=consts,
      mask=jnp.asarray(mask, jnp.float32).reshape(image.shape[:2] + (1,)),
      direction=jnp.asarray(direction, jnp.float32),
  )


def clip_edit_loss(
    z,
    unedited,
    first,
    problem: CLIPEditProblem,
    dva_model,
    dva_params,
    clip_model,
    clip_params,
    weights,
):
  """The loss of step 3 of the module docstring at z (D,); (loss, aux).

  ``unedited`` (K, S, S, 3): the one-step images under the start z; when ``first`` (a bool
  scalar: the first iteration, where z is the start) they are this call's own edited images.
  ``weights``: (clip, id, l1) weights, an array (traced: one compile serves any weights).
  aux: the terms, and ``unedited`` for the next call.
  """
  units = l2_normalize(jnp.stack([z, problem.z_start]))  # one op: equal rows at the start
  cond = z_face(dva_model, dva_params, units[:1], problem.z_lnd[None])
  edited = step_each(dva_eps_fn(dva_model, dva_params), problem.inputs, cond, problem.consts)
  unedited = jnp.where(first, jax.lax.stop_gradient(edited), unedited)
  feats = image_features(clip_model, clip_params, jnp.concatenate([unedited, edited]))
  k = edited.shape[0]
  l_dir = directional_clip_loss(feats[:k], feats[k:], problem.direction)
  l_clip = -jnp.log((2.0 - l_dir) / 2.0)
  l_id = 0.5 * jnp.sum(jnp.square(units[0] - units[1]))
  diff = unedited * problem.mask - edited * problem.mask
  l_l1 = jnp.mean(diff * jnp.sign(diff))  # |d| with torch's gradient at 0 (0; jnp.abs has 1)
  loss = weights[0] * l_clip + weights[1] * l_id + weights[2] * l_l1
  aux = {"loss": loss, "clip": l_clip, "direction": l_dir, "id": l_id, "l1": l_l1}
  return loss, (aux, jax.lax.stop_gradient(unedited))


def settings_weights(settings: CLIPEditSettings) -> np.ndarray:
  """(clip, id, l1) weights of ``clip_edit_loss``."""
  return np.array([settings.clip_weight, settings.id_weight, settings.l1_weight], np.float32)


@functools.partial(jax.jit, static_argnums=(0, 2, 7))
def clip_edit_z_id(
    dva_model,
    dva_params,
    clip_model,
    clip_params,
    problem: CLIPEditProblem,
    weights,
    lr,
    iterations: int,
):
  """Optimises z from ``problem.z_start`` (step 4): ``iterations`` torch-Adam steps
  (``optim.torch_adam(lr)``) in one ``lax.scan``; ``weights`` and ``lr`` are arrays, so one
  compile serves any of them. Returns (z (D,), history {loss, clip, direction, id, l1:
  (iterations,)}), each history entry the loss at the z before that step."""
  tx = optim.torch_adam(lr)
  grad_fn = jax.value_and_grad(clip_edit_loss, has_aux=True)

  def body(carry, i):
    z, opt_state, unedited = carry
    (_, (aux, unedited)), grad = grad_fn(
        z, unedited, i == 0, problem, dva_model, dva_params, clip_model, clip_params, weights
    )
    updates, opt_state = tx.update(grad, opt_state, z)
    return (z + updates, opt_state, unedited), aux

  z0 = problem.z_start
  carry = (z0, tx.init(z0), jnp.zeros_like(problem.inputs))
  (z, _, _), history = jax.lax.scan(body, carry, jnp.arange(iterations))
  return z, history


# ---------------------------------------------------------------------------
# Video level: what `python -m s3jax.edit --clip-prompt ...` calls
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class CLIPEditFn:
  """The ``EditFn`` of a CLIP edit: ``l2norm(z + strength * delta)`` for z (N, D) (the
  reference's ``l2_norm(avg_cond + scale * (edit_cond - start_cond))``); ``attribute`` is
  ignored. ``report`` says what was optimised (prompts, settings, losses, |delta|)."""

  delta: np.ndarray  # (D,) z - s after the optimisation
  report: dict
  history: dict = dataclasses.field(default_factory=dict)  # clip_edit_z_id's, as float64

  def __call__(self, z, attribute: str = "", strength: float = 1.0) -> np.ndarray:
    z = np.asarray(z, np.float32)
    return np.asarray(l2_normalize(z + float(strength) * self.delta[None]), np.float32)


class CLIPEditor:
  """Loads a CLIP (transformers layout) once; ``edit_fn_for_video`` optimises the z_id edit of
  one video's first edited frame and returns its ``CLIPEditFn``.

  Args:
    clip_dir: a transformers ``CLIPModel`` folder (config.json + model.safetensors), e.g.
      openai/clip-vit-base-patch16 (the reference's ViT-B/16).
    target_prompt / source_prompt: ``--trg_txt`` / ``--src_txt`` (the reference's argparse
      default source is "face").
    settings: ``CLIPEditSettings``.
    tokenizer_dir: vocab.json + merges.txt (default ``clip_dir``; any OpenAI CLIP vocabulary).
  """

  def __init__(
      self,
      clip_dir,
      target_prompt: str,
      source_prompt: str = "face",
      settings: Optional[CLIPEditSettings] = None,
      tokenizer_dir=None,
  ):
    self.settings = settings or CLIPEditSettings()
    self.clip_dir = pathlib.Path(clip_dir)
    tok_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else self.clip_dir
    if not (tok_dir / "vocab.json").exists():
      raise FileNotFoundError(
          f"no CLIP tokenizer (vocab.json, merges.txt) in {tok_dir}; pass tokenizer_dir"
      )
    params, config = sd_vae_clip_keys.load_clip_dir(self.clip_dir)
    self.clip_model = clip_lib.CLIPModel(config)
    self.clip_params = jax.device_put(params)
    self.tokenizer = CLIPTokenizer.from_dir(tok_dir)
    self.source_prompt, self.target_prompt = str(source_prompt), str(target_prompt)
    templates = IMAGENET_TEMPLATES if self.settings.templates else ()
    self.direction = text_direction(
        self.clip_model,
        self.clip_params,
        self.tokenizer,
        self.source_prompt,
        self.target_prompt,
        templates,
    )

  def optimise(self, dva_model, dva_params, image, z_id, z_lnd, mask, settings=None) -> CLIPEditFn:
    """Steps 1-4 on one frame: ``image`` (S, S, 3) in [-1, 1] (or uint8), its ``z_id`` (D,),
    ``z_lnd`` (102,) and training face ``mask`` (S, S) -> the ``CLIPEditFn``. ``settings``
    overrides ``self.settings`` (the text direction is kept)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
      image = images.to_model(image)
    s = settings or self.settings
    problem = clip_edit_problem(
        dva_model, dva_params, image, z_id, z_lnd, mask, self.direction, s.ddim_steps
    )
    z, history = clip_edit_z_id(
        dva_model,
        dva_params,
        self.clip_model,
        self.clip_params,
        problem,
        settings_weights(s),
        np.float32(s.lr),
        s.iterations,
    )
    delta = np.asarray(z - problem.z_start, np.float32)
    history = {k: np.asarray(v, np.float64) for k, v in jax.device_get(history).items()}
    report = {
        "method": "clip (DVA editing_CLIP.py)",
        "clip_dir": str(self.clip_dir),
        "source_prompt": self.source_prompt,
        "target_prompt": self.target_prompt,
        "settings": dataclasses.asdict(s),
        "delta_norm": float(np.linalg.norm(delta)),
        "first": {k: float(v[0]) for k, v in history.items() if len(v)},
        "last": {k: float(v[-1]) for k, v in history.items() if len(v)},
    }
    return CLIPEditFn(delta=delta, report=report, history=history)

  def edit_fn_for_video(
      self, editor, code, first_frame=None, landmarks_size: Optional[int] = None, settings=None
  ) -> CLIPEditFn:
    """The ``CLIPEditFn`` of a video encoded by ``editor`` (``editing.VideoEditor``; ``code`` its
    ``VideoCode``), optimised on the first edited frame ``code.frame_indices[0]``.

    Its model-size crop is ``code.crops[0]``; a streamed code holds no crops, so pass that
    frame of the video (H, W, 3) uint8 as ``first_frame``. The mask is the training face mask:
    BiSeNet's on the official feature path, the landmark hull (``for_video=False``) on the
    dlib one, from ``code.landmarks[0]`` in pixels of ``landmarks_size`` crops (default
    ``max(editor.size, 256)``: ``VideoEditor.encode``'s; pass the given crops' size for
    ``encode_aligned`` codes).
    """
    size = int(editor.size)
    fsize = max(size, 256)
    if code.crops is not None:
      crop = np.asarray(code.crops[0])
    elif first_frame is not None:
      quad = code.quads[int(code.frame_indices[0])]
      crop = face_features.resize_crops(editor.crop_frame(first_frame, quad, fsize)[None], size)[0]
    else:
      raise ValueError("the code holds no crops (streamed): pass the first edited frame")
    if editor.features is not None:
      mask = np.asarray(editor.features(crop[None])["mask"][0], np.uint8)
      mask = np.asarray(jax.image.resize(mask.astype(np.float32), (size, size), "nearest"))
    else:
      c = int(landmarks_size or fsize)
      lnd = (np.asarray(code.landmarks[0], np.float64) + 0.5) * (size / c) - 0.5
      mask = face_features.hull_mask(lnd, size, for_video=False)
    return self.optimise(
        editor.model, editor.params, crop, code.z_id_frames[0], code.z_lnd[0], mask > 0, settings
    )


def clip_settings(**overrides: Any) -> CLIPEditSettings:
  """``CLIPEditSettings`` with every non-None override (for CLI flags that default to None)."""
  return CLIPEditSettings(**{k: v for k, v in overrides.items() if v is not None})
