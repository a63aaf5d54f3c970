"""STIT's stitching tuning (Tzaban et al. 2022, `edit_video_stitching_tuning.py`), batched.

The reference tunes a fresh copy of the generator for every frame, one frame after the other:
Adam on all synthesis parameters so that the edited frame matches the original crop on a band
around the face (the border mask) and the naive edit inside it (the content mask). Here every
frame's copy is tuned at once: the synthesis parameters are broadcast to a leading frame axis,
and one jitted `lax.scan` over the steps runs `jax.vmap` of (non-fused synthesis forward, loss,
gradient, Adam update) over the frames, split over the devices of a 1-D mesh, in chunks of
`frames_per_chunk` frames to bound memory. Frames never interact, so a batch equals the same
frames tuned one at a time (tests/test_stitching.py).

Masks (README §4 of the golden set): built at half the generator resolution from a {0,1} face
mask (as BiSeNet gives it to the reference at 512 for 1024 frames) with the halved
`border_pixels` / dilations, then upsampled x2, bilinear with align_corners=True.

Images and masks are NHWC float32; images in [-1, 1].
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s3jax import optim
from s3jax.models import stylegan2
from s3jax.models.face_encoders import resize_bilinear_align_corners

# STIT's defaults, with their source in the reference repository (rotemtzaban/STIT):
STITCHING_LR = 3e-4  # configs/hyperparameters.py: stitching_tuning_lr
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults (optimize_border)
NUM_STEPS = 100  # edit_video_stitching_tuning.py: --num_steps
CONTENT_LOSS_LAMBDA = 0.01  # edit_video_stitching_tuning.py: --content_loss_lambda
BORDER_LOSS_THRESHOLD = 0.0  # --border_loss_threshold: stop when border loss < it (never at 0)
OUTER_MASK_DILATION_1024 = 50  # --outer_mask_dilation, for 1024 px frames
INNER_MASK_DILATION = 0  # --inner_mask_dilation
WHOLE_IMAGE_BORDER = False  # --whole_image_border
REFERENCE_RESOLUTION = 1024  # the FFHQ generator STIT edits with
FRAMES_PER_CHUNK = 8  # ours: frames tuned per jitted call (memory bound)


def scaled_outer_dilation(resolution: int) -> int:
  """STIT's outer dilation (50 px at 1024) scaled to `resolution`, rounded up to even.

  The reference halves it for the half-resolution masks, so an even number keeps that exact;
  `border_pixels` equals it in the reference (`calc_masks(..., border_pixels=outer, ...)`).
  """
  d = math.ceil(OUTER_MASK_DILATION_1024 * resolution / REFERENCE_RESOLUTION)
  return d + d % 2


# ----------------------------------------------------------------------------------------
# Masks and loss.
# ----------------------------------------------------------------------------------------
def dilation(mask: jax.Array, radius: int) -> jax.Array:
  """Flat max over a (2r+1)^2 square on NHWC; pixels outside the image are ignored.

  `utils/morphology.dilation(engine='convolution')` with 'geodesic' borders; on {0,1} masks
  this is binary dilation.
  """
  if radius == 0:
    return mask
  k = 2 * radius + 1
  pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
  return jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1), pad)


def create_masks(
    border_pixels: int,
    face_mask_half: jax.Array,
    inner_dilation: int = 0,
    outer_dilation: int = 0,
    whole_image_border: bool = False,
):
  """The reference's `create_masks` on (N, S, S, 1) {0,1} masks: (content, border, full).

  edge = the `border_pixels`-wide band at the image edge; temp = the mask (dilated by
  `inner_dilation` if non-zero); full = temp dilated by `outer_dilation`; border =
  max(min(edge, temp), full - temp) (or 1 - temp with `whole_image_border`), clipped;
  content = clip(mask - border) with the *undilated* mask.
  """
  mask = jnp.asarray(face_mask_half, jnp.float32)
  size = mask.shape[1]
  idx = np.arange(size)
  edge_1d = (idx < border_pixels) | (idx >= size - border_pixels)
  edge = (edge_1d[:, None] | edge_1d[None, :]).astype(np.float32)[None, :, :, None]
  temp = dilation(mask, inner_dilation) if inner_dilation != 0 else mask
  border = jnp.minimum(jnp.asarray(edge), temp)
  full = dilation(temp, outer_dilation)
  border = jnp.maximum(border, 1.0 - temp if whole_image_border else full - temp)
  border = jnp.clip(border, 0.0, 1.0)
  content = jnp.clip(mask - border, 0.0, 1.0)
  return content, border, full


def calc_masks(
    face_mask_half: jax.Array,
    border_pixels: int,
    inner_mask_dilation: int,
    outer_mask_dilation: int,
    whole_image_border: bool,
    image_size: int,
):
  """The reference's `calc_masks` after segmentation: the loss masks at `image_size`.

  `create_masks(border_pixels // 2, mask, inner // 2, outer // 2, whole)`, each mask then
  upsampled bilinearly with align_corners=True. Returns (content, border, full), NHWC.
  """
  masks = create_masks(
      border_pixels // 2,
      face_mask_half,
      inner_mask_dilation // 2,
      outer_mask_dilation // 2,
      whole_image_border,
  )
  return tuple(resize_bilinear_align_corners(m, (image_size, image_size)) for m in masks)


def masked_l2(x: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """sum((x*m - t*m)^2) / sum(m) over the whole arrays (the reference's `masked_l2`).

  The numerator sums over the colour channels too, the denominator is over the one-channel
  mask: not divided by 3. The mask multiplies before squaring (soft edges weigh m^2).
  """
  return jnp.sum(jnp.square(x * mask - target * mask)) / jnp.sum(mask)


def stitching_loss(image, crop, edited, border_mask, content_mask, content_loss_lambda):
  """border + lambda * content of one frame -> (loss, (border loss, content loss))."""
  border = masked_l2(image, crop, border_mask)
  content = masked_l2(image, edited, content_mask)
  return border + content_loss_lambda * content, (border, content)


def stitching_optimizer(lr: float = STITCHING_LR) -> optax.GradientTransformation:
  """`optimize_border`'s optimizer: torch.optim.Adam(lr) with its defaults."""
  return optim.torch_adam(lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)


# ----------------------------------------------------------------------------------------
# Batched tuning.
# ----------------------------------------------------------------------------------------
Synthesis = Callable[[Any, Any, jax.Array], jax.Array]


def frame_mesh(mesh: Optional[Mesh] = None) -> Mesh:
  """The mesh frames are split over: `mesh`, or one axis over every device."""
  return mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))


class TuningState(NamedTuple):
  """Every frame's tuned copy: parameters and Adam state with a leading frame axis, and
  whether the frame is still tuning (the reference's `border_loss_threshold` break)."""

  params: Any
  opt_state: Any
  active: jax.Array


def start_tuning(params, num_frames: int, lr: float = STITCHING_LR) -> TuningState:
  """`num_frames` copies of `params` (the reference's deepcopy per frame) and fresh Adam."""
  p = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_frames,) + x.shape), params)
  return TuningState(p, jax.vmap(stitching_optimizer(lr).init)(p), jnp.ones((num_frames,), bool))


def tuning_steps(
    synthesis: Synthesis,
    frozen,
    state: TuningState,
    ws: jax.Array,
    crops: jax.Array,
    edited: jax.Array,
    border_masks: jax.Array,
    content_masks: jax.Array,
    *,
    num_steps: int,
    lr: float = STITCHING_LR,
    content_loss_lambda: float = CONTENT_LOSS_LAMBDA,
    border_loss_threshold: float = BORDER_LOSS_THRESHOLD,
):
  """`num_steps` Adam steps of every frame at once: `lax.scan` over the steps of `vmap` over
  the frames of (non-fused forward, `stitching_loss`, gradient, Adam update).

  `synthesis(params, frozen, ws (1, num_ws, w_dim)) -> (1, H, W, 3)` is one frame's
  train-mode forward. Returns (state, losses {'border', 'content', 'loss'}: (N, num_steps),
  each evaluated before its step's update, as the reference logs them).
  """
  n = ws.shape[0]
  opt = stitching_optimizer(lr)

  def frame_loss(p, w, crop, ed, bm, cm):
    image = synthesis(p, frozen, w[None])[0]
    return stitching_loss(image, crop, ed, bm, cm, content_loss_lambda)

  grad_fn = jax.vmap(jax.value_and_grad(frame_loss, has_aux=True))

  def step(state, _):
    p, s, active = state
    (loss, (border, content)), g = grad_fn(p, ws, crops, edited, border_masks, content_masks)
    upd, s_new = jax.vmap(opt.update)(g, s, p)
    p_new = optax.apply_updates(p, upd)
    if border_loss_threshold > 0:  # the reference's early `break`, per frame
      active = active & (border >= border_loss_threshold)

      def keep(new, old):
        return jnp.where(active.reshape((n,) + (1,) * (new.ndim - 1)), new, old)

      p_new, s_new = jax.tree.map(keep, p_new, p), jax.tree.map(keep, s_new, s)
    return TuningState(p_new, s_new, active), (border, content, loss)

  state, (border, content, loss) = jax.lax.scan(step, state, None, length=num_steps)
  return state, {"border": border.T, "content": content.T, "loss": loss.T}


def render_frames(synthesis: Synthesis, params, frozen, ws: jax.Array) -> jax.Array:
  """Each frame rendered with its own parameters (leading frame axis): (N, H, W, 3)."""
  return jax.vmap(lambda p, w: synthesis(p, frozen, w[None])[0])(params, ws)


def tune_frames(
    synthesis: Synthesis,
    params,
    frozen,
    ws: jax.Array,
    crops: jax.Array,
    edited: jax.Array,
    border_masks: jax.Array,
    content_masks: jax.Array,
    *,
    num_steps: int = NUM_STEPS,
    lr: float = STITCHING_LR,
    content_loss_lambda: float = CONTENT_LOSS_LAMBDA,
    border_loss_threshold: float = BORDER_LOSS_THRESHOLD,
):
  """The reference's `optimize_border` for every frame at once, as one traceable function.

  Per frame: a copy of `params` (what Adam tunes; `frozen` is never touched), `num_steps` Adam
  steps on `stitching_loss`, one final forward. Returns (images (N, H, W, 3), losses
  {'border', 'content', 'loss'}: (N, num_steps), tuned params with a leading frame axis).
  """
  state = start_tuning(params, ws.shape[0], lr)
  state, losses = tuning_steps(
      synthesis,
      frozen,
      state,
      ws,
      crops,
      edited,
      border_masks,
      content_masks,
      num_steps=num_steps,
      lr=lr,
      content_loss_lambda=content_loss_lambda,
      border_loss_threshold=border_loss_threshold,
  )
  return render_frames(synthesis, state.params, frozen, ws), losses, state.params


def generator_synthesis(
    config: stylegan2.GeneratorConfig, fused_modconv: bool, precision: str = "highest"
) -> Synthesis:
  """`(synthesis params, buffers, ws) -> image` of a stylegan2 generator, noise 'const'.

  `fused_modconv=False` is the reference's train mode (what `optimize_border` runs), True its
  eval mode (what renders the naive edit).
  """

  def fn(params, buffers, ws):
    variables = {"params": {"synthesis": params}, "buffers": buffers}
    return stylegan2.synthesis(config, variables, ws, "const", fused_modconv, precision=precision)

  return fn


class StitchingTuner:
  """STIT's stitching tuning of a stylegan2 generator, all frames of a chunk at once.

  Frames go through in chunks of `frames_per_chunk` (the last one padded by repeating its last
  frame), each chunk split over the devices of `mesh` with `shard_map` (frames never
  interact, so there are no collectives). One jitted program per chunk size renders each
  frame's naive edit (eval, fused), builds its masks from its half-resolution face mask
  (`calc_masks`) and runs `tune_frames` (per-frame copies, `lax.scan` over the Adam steps of
  `vmap` over the frames, final render).

  Args:
    config, variables: the generator (`s3jax.models.stylegan2`): `{'params', 'buffers'}`.
      Only `params['synthesis']` is tuned (the mapping gets no gradient in the reference and
      buffers are never updated).
    num_steps, lr, content_loss_lambda, border_loss_threshold: STIT's defaults.
    outer_mask_dilation: default `scaled_outer_dilation(resolution)` (50 at 1024).
    border_pixels: default `outer_mask_dilation`, as the reference passes it.
    inner_mask_dilation, whole_image_border: STIT's defaults (0, False).
    frames_per_chunk: frames per call (rounded up to a multiple of the device count).
    mesh: a 1-D `Mesh` the frames are split over. Default: every device.
    return_params: also return each frame's tuned synthesis parameters (N copies on the host).
    precision: of the generator's convolutions ('highest' for parity).
  """

  def __init__(
      self,
      config: stylegan2.GeneratorConfig,
      variables,
      *,
      num_steps: int = NUM_STEPS,
      lr: float = STITCHING_LR,
      content_loss_lambda: float = CONTENT_LOSS_LAMBDA,
      border_loss_threshold: float = BORDER_LOSS_THRESHOLD,
      outer_mask_dilation: Optional[int] = None,
      border_pixels: Optional[int] = None,
      inner_mask_dilation: int = INNER_MASK_DILATION,
      whole_image_border: bool = WHOLE_IMAGE_BORDER,
      frames_per_chunk: int = FRAMES_PER_CHUNK,
      mesh: Optional[Mesh] = None,
      return_params: bool = False,
      precision: str = "highest",
  ):
    self.config = config
    self.size = int(config.img_resolution)
    self.num_steps = int(num_steps)
    outer = scaled_outer_dilation(self.size) if outer_mask_dilation is None else outer_mask_dilation
    self.mask_args = dict(
        border_pixels=outer if border_pixels is None else border_pixels,
        inner_mask_dilation=inner_mask_dilation,
        outer_mask_dilation=outer,
        whole_image_border=whole_image_border,
    )
    self.mesh = frame_mesh(mesh)
    self.num_devices = int(self.mesh.size)
    self.frames_per_chunk = int(frames_per_chunk)
    self.return_params = return_params
    axes = tuple(self.mesh.axis_names)
    self._repl = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P(axes))
    self.params = jax.device_put(variables["params"]["synthesis"], self._repl)
    self.buffers = jax.device_put(variables["buffers"], self._repl)
    self._compiled = {}
    train = generator_synthesis(config, fused_modconv=False, precision=precision)
    evaluate = generator_synthesis(config, fused_modconv=True, precision=precision)

    def run(params, buffers, ws, crops, face_masks_half):
      # Each device's frames get their own copies: mark the parameters device-varying, or
      # shard_map would sum their gradients over the devices (a replicated value's rule).
      params = jax.lax.pcast(params, axes, to="varying")
      edited = evaluate(params, buffers, ws)
      content, border, _ = calc_masks(face_masks_half, image_size=self.size, **self.mask_args)
      images, losses, tuned = tune_frames(
          train,
          params,
          buffers,
          ws,
          crops,
          edited,
          border,
          content,
          num_steps=self.num_steps,
          lr=lr,
          content_loss_lambda=content_loss_lambda,
          border_loss_threshold=border_loss_threshold,
      )
      out = {"images": images, "losses": losses, "edited": edited}
      if return_params:
        out["params"] = tuned
      return out

    # Frames never interact: each device works on its own (no collectives). shard_map also
    # keeps XLA's SPMD partitioner away from the vmapped convolutions, whose per-frame kernels
    # become grouped convolutions it failed to split (a feature_group_count error).
    frames = P(axes)
    local = jax.shard_map(
        run, mesh=self.mesh, in_specs=(P(), P(), frames, frames, frames), out_specs=frames
    )
    r, b = self._repl, self._batch
    self._jit = jax.jit(local, in_shardings=(r, r, b, b, b), out_shardings=b)

  def chunk_size(self, num_frames: int) -> int:
    """Frames per call for `num_frames` frames: a multiple of the device count."""
    n = min(self.frames_per_chunk, max(int(num_frames), 1))
    return -(-n // self.num_devices) * self.num_devices

  def lower(self, chunk: int):
    """The chunk program lowered for `chunk` frames (abstract inputs)."""
    cfg, s = self.config, self.size
    frames = lambda *shape: jax.ShapeDtypeStruct((chunk, *shape), jnp.float32, sharding=self._batch)
    return self._jit.lower(
        self.params,
        self.buffers,
        frames(cfg.num_ws, cfg.w_dim),
        frames(s, s, cfg.img_channels),
        frames(s // 2, s // 2, 1),
    )

  def compiled(self, chunk: int):
    """(the chunk program AOT-compiled for `chunk` frames, compile seconds spent now: 0 when
    cached)."""
    if chunk in self._compiled:
      return self._compiled[chunk], 0.0
    t0 = time.perf_counter()
    self._compiled[chunk] = self.lower(chunk).compile()
    return self._compiled[chunk], time.perf_counter() - t0

  def tune(self, w_edits, crops, face_masks_half, timings: Optional[dict] = None) -> dict:
    """Stitching-tune every frame.

    w_edits (N, num_ws, w_dim) (float64 edits are cast to float32, as the reference's
    synthesis does), crops (N, S, S, 3) in [-1, 1] (the original frames, the border target),
    face_masks_half (N, S/2, S/2, 1) in {0, 1}. Returns numpy {'images' (N, S, S, 3),
    'edited' (N, S, S, 3) (the naive edits, the content target), 'losses': {'border',
    'content', 'loss'}: (N, num_steps) [, 'params': tuned synthesis params, leading N axis]}.
    Adds 'tune' (and 'compile') seconds to `timings`.
    """
    timings = {} if timings is None else timings
    m = len(w_edits)
    if not (len(crops) == len(face_masks_half) == m):
      raise ValueError(
          f"w_edits, crops and face_masks_half differ in length: {m}, {len(crops)}, "
          f"{len(face_masks_half)}"
      )
    chunk = self.chunk_size(m)
    fn, compile_s = self.compiled(chunk)
    if compile_s:
      timings["compile"] = timings.get("compile", 0.0) + compile_s
    t0 = time.perf_counter()
    outs = []
    for begin in range(0, m, chunk):
      sl = slice(begin, min(begin + chunk, m))
      pad = chunk - (sl.stop - sl.start)

      def padded(a):
        a = np.asarray(a[sl], np.float32)
        return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

      args = [jax.device_put(padded(a), self._batch) for a in (w_edits, crops, face_masks_half)]
      outs.append((fn(self.params, self.buffers, *args), sl.stop - sl.start))
    got = [jax.tree.map(lambda x, k=k: np.asarray(x)[:k], jax.device_get(o)) for o, k in outs]
    timings["tune"] = timings.get("tune", 0.0) + time.perf_counter() - t0
    return jax.tree.map(lambda *xs: np.concatenate(xs), *got)


def stitching_tune(config, variables, w_edits, crops, face_masks_half, **tuner_kwargs) -> dict:
  """`StitchingTuner(config, variables, **tuner_kwargs).tune(w_edits, crops, face_masks_half)`.

  Compiles on every call; keep a `StitchingTuner` to tune several videos or edits.
  """
  return StitchingTuner(config, variables, **tuner_kwargs).tune(w_edits, crops, face_masks_half)
