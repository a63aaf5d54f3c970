"""DDIM inversion and the TokenFlow-PnP edit loop of IP-FaceDiff (golden SPEC §4-§5), as scans.

- `invert`: the DDIM inversion of §4 as one `lax.scan` over the ascending timesteps
  (`ddim_path`, which also runs the reference's preview reconstruction). Only the latents at
  the save timesteps (plus the noisiest, always) are kept: the scan carries a buffer of them
  and writes each save step in place, so memory does not grow with the step count (one scan,
  one UNet trace, even when the gaps between save points differ).
- `edit`: the main loop of §5 as one jitted `lax.scan` over the edit timesteps. Each step runs
  the keyframe pass (3·n_kf samples; only its TokenFlow store is kept), then the batch passes
  of all N/B batches (vmapped; `frame_chunk` batches at a time under `lax.map` for long videos,
  which is exact), classifier-free guidance and the SD-DDIM step (`scheduler.SDScheduler`).
  With a `jax.sharding.Mesh` the batch axis is sharded over its first axis.
- The setup pieces of §5: `usable_frames` (N rounded down to a multiple of B),
  `injection_counts` (int(n·frac), a Python float product truncated), `pivot_offsets`
  (keyframe offsets per step from a PRNG key; the reference draws them with torch.randint),
  `ddim_eps` (ε* from the noisiest saved latent) and `start_latent` (add_noise(x0, ε*, t_0)).

All latents are NHWC. The UNet is `s3jax.sd.unet.SDUNet` with its TokenFlow modes.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from s3jax.sd.scheduler import SDScheduler, ddim_move
from s3jax.sd.unet import SDUNet, SDUNetConfig, TokenFlowCall, blend_weights_for_batch

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, t, context) -> eps


# --------------------------------------------------------------------------------- the setup
def usable_frames(n_frames: int, batch_size: int) -> int:
  """The reference's frame count: n_frames rounded down to a multiple of batch_size."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = (n_frames // batch_size) * batch_size
  if n == 0:
    raise ValueError(f"{n_frames} frames make no batch of {batch_size}")
  return n


def injection_counts(n_timesteps: int, pnp_f_t: float, pnp_attn_t: float) -> tuple[int, int]:
  """(k_f, k_a): PnP conv / Q-K injection in the first k timesteps, int(n * frac) as the
  reference computes it (a Python float product, truncated: int(100 * 0.29) == 28)."""
  return int(n_timesteps * pnp_f_t), int(n_timesteps * pnp_attn_t)


def pivot_offsets(key: jax.Array, n_timesteps: int, n_batches: int, batch_size: int):
  """Keyframe offset inside each batch, per step: int32 (n_timesteps, n_batches) in [0, B)."""
  return jax.random.randint(key, (n_timesteps, n_batches), 0, batch_size, dtype=jnp.int32)


def is_prng_key(a) -> bool:
  """A typed key (jax.random.key) or a raw uint32 (2,) one (jax.random.PRNGKey); pivot
  offsets are 2-D, so neither is ambiguous."""
  if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return True
  return np.ndim(a) == 1 and np.shape(a) == (2,) and np.asarray(a).dtype == np.uint32


def ddim_eps(scheduler: SDScheduler, noisiest_latent, latents_x0, noisiest_t: int):
  """TokenFlow's `get_ddim_eps`: ε* = (z_T* - sqrt(ᾱ_T*) x0) / sqrt(1 - ᾱ_T*)."""
  return scheduler.eps_from_noisy(noisiest_latent, latents_x0, noisiest_t)


def start_latent(scheduler: SDScheduler, latents_x0, eps_star, n_timesteps: int):
  """The edit's first latent, add_noise(x0, ε*, timesteps[0]) (not an inverted latent)."""
  return scheduler.add_noise(latents_x0, eps_star, int(scheduler.timesteps(n_timesteps)[0]))


def branch_context(embeds: Sequence[jax.Array], n: int) -> jax.Array:
  """Text context of a 3-branch UNet call: each (1, L, C) embedding repeated n times, in the
  order given ([source, uncond, cond]) -> (3n, L, C)."""
  return jnp.concatenate([jnp.repeat(e, n, axis=0) for e in embeds], axis=0)


def saved_latents_for(saved_timesteps, saved_latents, timesteps) -> jax.Array:
  """Rows of `saved_latents` (as returned by `invert`) at `timesteps`, in that order; a
  ValueError names any timestep the inversion did not save."""
  index = {int(t): i for i, t in enumerate(np.asarray(saved_timesteps))}
  missing = [int(t) for t in timesteps if int(t) not in index]
  if missing:
    raise ValueError(
        f"no inverted latent at timesteps {missing}: the save schedule must contain the edit "
        f"schedule (saved: {sorted(index)})"
    )
  return jnp.take(saved_latents, jnp.asarray([index[int(t)] for t in timesteps]), axis=0)


# ---------------------------------------------------------------------------- shared helpers
def leading_axis_constraint(mesh: Optional[Mesh]):
  """A function putting the leading axis of every array of a pytree on the mesh's first axis
  (identity without a mesh)."""
  if mesh is None:
    return lambda tree: tree
  sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  return lambda tree: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def warn_if_uneven(mesh: Optional[Mesh], n: int, chunk: Optional[int], what: str) -> None:
  """XLA keeps an axis that does not split evenly over the mesh replicated: say so."""
  if mesh is None:
    return
  devices = mesh.shape[mesh.axis_names[0]]
  rows = n if chunk is None or chunk >= n else chunk
  if rows % devices or (n % rows and (n % rows) % devices):
    logging.warning(
        "%d %s (%s at a time) do not split evenly over %d devices: they run replicated",
        n,
        what,
        "all" if rows == n else rows,
        devices,
    )


def map_chunks(fn, xs, chunk: Optional[int], constrain=lambda tree: tree):
  """fn (batched over a leading axis) applied to `xs` `chunk` rows at a time under lax.map
  (all at once when chunk is None); a remainder runs as one more call. The rows are
  independent, so there are no seams; only float rounding depends on the batch size."""
  n = jax.tree.leaves(xs)[0].shape[0]
  run = lambda part: constrain(fn(constrain(part)))  # noqa: E731
  if chunk is None or chunk >= n:
    return run(xs)
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  n_full = (n // chunk) * chunk
  head = jax.tree.map(lambda a: a[:n_full].reshape((n // chunk, chunk) + a.shape[1:]), xs)
  out = jax.lax.map(run, head)
  out = jax.tree.map(lambda a: a.reshape((n_full,) + a.shape[2:]), out)
  if n_full < n:
    tail = run(jax.tree.map(lambda a: a[n_full:], xs))
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), out, tail)
  return out


def unet_apply(unet: SDUNet):
  """(params, sample, t scalar, context, tokenflow=None) -> the SDUNet output (eps cast to the
  sample dtype; a TokenFlow mode's store / nn indices passed through)."""

  def apply(params, sample, t, context, tokenflow=None):
    tvec = jnp.full((sample.shape[0],), t, jnp.int32)
    out = unet.apply({"params": params}, sample, tvec, context, tokenflow)
    if isinstance(out, tuple):
      return (out[0].astype(sample.dtype),) + tuple(out[1:])
    return out.astype(sample.dtype)

  return apply


# ------------------------------------------------------------------ inversion, reconstruction
def inversion_save_plan(
    scheduler: SDScheduler, n_steps: int, save_timesteps
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ascending timesteps, slot per step, saved timesteps) of the §4 inversion.

  A step at a save timestep writes its latent to slot i of the saved list (ascending); the
  last (noisiest) step is always saved; other steps write to a scratch slot past the end.
  ValueError when a save timestep is not an inversion timestep.
  """
  asc = scheduler.timesteps(n_steps)[::-1].copy()
  save = sorted({int(t) for t in np.asarray(save_timesteps).reshape(-1)})
  extra = sorted(set(save) - {int(t) for t in asc})
  if extra:
    raise ValueError(
        f"save timesteps {extra} are not inversion timesteps ({n_steps} steps: 1000//save_steps "
        "must be a multiple of 1000//n_steps)"
    )
  saved = sorted(set(save) | {int(asc[-1])})
  slot_of = {t: i for i, t in enumerate(saved)}
  slots = np.asarray([slot_of.get(int(t), len(saved)) for t in asc], np.int32)
  return asc, slots, np.asarray(saved, np.int64)


def inversion_path(scheduler: SDScheduler, n_steps: int, save_timesteps):
  """(path, saved timesteps) of the §4 inversion for `ddim_path`: ascending t, each step from
  ᾱ[t - r] (final_alpha_cumprod at the first) to ᾱ[t] with eps at the new t, unclipped."""
  asc, slots, saved_t = inversion_save_plan(scheduler, n_steps, save_timesteps)
  a_t, a_prev = scheduler.alpha_pair(asc, n_steps)
  path = {"t": jnp.asarray(asc, jnp.int32), "a_from": a_prev, "a_to": a_t, "slot": slots}
  return path, saved_t


def reconstruction_path(scheduler: SDScheduler, n_steps: int, n_saved: int = 0) -> dict:
  """The reference's preview reconstruction (§4) for `ddim_path`: the DDIM steps of
  `timesteps(n_steps)` without clipping, nothing saved (every step writes the scratch slot
  `n_saved`, so the path can share a compiled `ddim_path` with an inversion saving n_saved)."""
  desc = scheduler.timesteps(n_steps)
  a_t, a_prev = scheduler.alpha_pair(desc, n_steps)
  slots = np.full(len(desc), n_saved, np.int32)
  return {"t": jnp.asarray(desc, jnp.int32), "a_from": a_t, "a_to": a_prev, "slot": slots}


def ddim_path(
    unet_fn: EpsFn,
    x: jax.Array,
    cond: jax.Array,
    path: dict,
    n_saved: int,
    frame_chunk: Optional[int] = None,
    mesh: Optional[Mesh] = None,
):
  """Unclipped DDIM moves along `path` (`inversion_path` / `reconstruction_path`) as one
  lax.scan; traceable (jit it with the params as arguments, as `pipeline` does).

  unet_fn(x (n,h,w,c), t int32 scalar, context (n,L,C)) -> eps; x (N,h,w,c); cond (1,L,C)
  (no guidance). Each step evaluates eps at path["t"] and moves x from ᾱ = path["a_from"] to
  path["a_to"] (`s3jax.sd.scheduler.ddim_move`); the result is written to slot path["slot"] of a buffer of
  n_saved latents plus one scratch slot, in place. Frames run `frame_chunk` at a time (all at
  once by default); `mesh` shards them. Returns (final x, saved (n_saved, N,h,w,c)).
  """
  warn_if_uneven(mesh, x.shape[0], frame_chunk, "frames")
  constrain = leading_axis_constraint(mesh)
  context = jnp.repeat(cond.astype(x.dtype), x.shape[0], axis=0)

  def body(carry, step):
    x, buf = carry
    t = step["t"]
    eps = map_chunks(lambda xc: unet_fn(xc[0], t, xc[1]), (x, context), frame_chunk, constrain)
    x = constrain(ddim_move(x, eps, step["a_from"], step["a_to"], None))
    return (x, buf.at[step["slot"]].set(x)), None

  buf = jnp.zeros((n_saved + 1,) + x.shape, x.dtype)
  path = {k: jnp.asarray(v) for k, v in path.items()}
  (x, buf), _ = jax.lax.scan(body, (constrain(x), buf), path)
  return x, buf[:n_saved]


def invert(
    unet_fn: EpsFn,
    latents_x0: jax.Array,
    cond: jax.Array,
    scheduler: SDScheduler,
    n_steps: int,
    save_timesteps,
    frame_chunk: Optional[int] = None,
    mesh: Optional[Mesh] = None,
):
  """DDIM inversion (SPEC §4) as one lax.scan (`ddim_path`); traceable.

  latents_x0 (N,h,w,c); cond (1,L,C), the inversion prompt's embedding. Returns
  (saved_timesteps int64 (k,) ascending, latents (k, N,h,w,c)): the latents right after the
  steps at `save_timesteps`, plus the noisiest, last. Only those are kept in memory.
  """
  path, saved_t = inversion_path(scheduler, n_steps, save_timesteps)
  _, saved = ddim_path(unet_fn, latents_x0, cond, path, len(saved_t), frame_chunk, mesh)
  return saved_t, saved


def reconstruct(unet_fn: EpsFn, latents_t, cond, scheduler: SDScheduler, n_steps: int):
  """The preview DDIM reconstruction of the reference's preprocessing (§4): n_steps
  unclipped DDIM steps down from the noisiest inverted latent. Traceable."""
  x, _ = ddim_path(unet_fn, latents_t, cond, reconstruction_path(scheduler, n_steps), 0)
  return x


# -------------------------------------------------------------------------------------- edit
def edit_step(
    apply,
    params,
    scheduler: SDScheduler,
    x,
    t,
    inject_conv,
    inject_qk,
    offsets,
    source_latents,
    embeds,
    n_timesteps: int,
    guidance_scale: float,
    batch_size: int,
    frame_chunk: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    return_nn: bool = False,
    return_unet_io: bool = False,
):
  """One step of the TokenFlow-PnP loop (SPEC §5 `batched_denoise_step`). Traceable.

  x, source_latents (N,h,w,c): the current latents and the inversion latent at t; offsets
  (N/B,) int: the keyframe of batch b is frame b·B + offsets[b]; embeds = (source, uncond,
  cond) each (1,L,C). Returns (x_next, extras) with extras holding, when asked, "nn"
  {block: int32 (N/B, 2, B·S)} and "unet_in"/"unet_out" (3·n_kf + 3N, h,w,c) in the
  reference's call order (keyframe pass, then batch 0, 1, ...).
  """
  n = x.shape[0]
  n_batches = n // batch_size
  constrain = leading_axis_constraint(mesh)
  pivots = jnp.arange(n_batches, dtype=jnp.int32) * batch_size + offsets.astype(jnp.int32)
  x_kf = jnp.take(x, pivots, axis=0)
  kf_in = jnp.concatenate([jnp.take(source_latents, pivots, axis=0), x_kf, x_kf], axis=0)
  kf_eps, store = apply(
      params,
      kf_in,
      t,
      branch_context(embeds, n_batches),
      TokenFlowCall(mode="keyframe", inject_conv=inject_conv, inject_qk=inject_qk),
  )
  batch_context = branch_context(embeds, batch_size)

  def denoise_batch(args):
    b, xb, src = args
    unet_in = jnp.concatenate([src, xb, xb], axis=0)
    call = TokenFlowCall(
        mode="batch",
        inject_conv=inject_conv,
        inject_qk=inject_qk,
        store=store,
        batch_index=b,
        blend_weights=blend_weights_for_batch(b, batch_size, xb.dtype),
        return_nn=return_nn,
    )
    out = apply(params, unet_in, t, batch_context, call)
    eps, nn_idx = out if return_nn else (out, None)
    _, eps_u, eps_c = jnp.split(eps, 3, axis=0)
    guided = eps_u + guidance_scale * (eps_c - eps_u)
    x_prev = scheduler.step(guided, t, xb, n_timesteps)
    extras = {}
    if return_nn:
      extras["nn"] = nn_idx
    if return_unet_io:
      extras["unet_in"], extras["unet_out"] = unet_in, eps
    return x_prev, extras

  per_batch = lambda a: a.reshape((n_batches, batch_size) + a.shape[1:])  # noqa: E731
  batches = (jnp.arange(n_batches, dtype=jnp.int32), per_batch(x), per_batch(source_latents))
  x_next, extras = map_chunks(jax.vmap(denoise_batch), batches, frame_chunk, constrain)
  x_next = x_next.reshape(x.shape)
  if return_unet_io:
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    extras["unet_in"] = jnp.concatenate([kf_in, flat(extras["unet_in"])], axis=0)
    extras["unet_out"] = jnp.concatenate([kf_eps, flat(extras["unet_out"])], axis=0)
  return x_next, extras


@functools.lru_cache(maxsize=16)
def jitted_edit(
    unet: SDUNet,
    scheduler: SDScheduler,
    n_timesteps: int,
    guidance_scale: float,
    batch_size: int,
    frame_chunk: Optional[int],
    mesh: Optional[Mesh],
    return_trajectory: bool,
    return_nn: bool,
    return_unet_io: bool,
):
  """The compiled edit scan for one static setting (cached)."""
  apply = unet_apply(unet)
  step = functools.partial(
      edit_step,
      apply,
      scheduler=scheduler,
      n_timesteps=n_timesteps,
      guidance_scale=guidance_scale,
      batch_size=batch_size,
      frame_chunk=frame_chunk,
      mesh=mesh,
      return_nn=return_nn,
      return_unet_io=return_unet_io,
  )
  constrain = leading_axis_constraint(mesh)

  def run(params, x_start, saved, embeds, steps):
    def body(x, s):
      x_next, extras = step(
          params,
          x=x,
          t=s["t"],
          inject_conv=s["conv"],
          inject_qk=s["qk"],
          offsets=s["offsets"],
          source_latents=s["source"],
          embeds=embeds,
      )
      x_next = constrain(x_next)
      if return_trajectory:
        extras["trajectory"] = x_next
      return x_next, extras

    steps = dict(steps, source=saved)
    x, extras = jax.lax.scan(body, constrain(x_start), steps)
    if return_trajectory:
      extras["trajectory"] = jnp.concatenate([x_start[None], extras["trajectory"]], axis=0)
    return x, extras

  return jax.jit(run)


def edit(
    unet_params,
    unet_config: SDUNetConfig,
    scheduler: SDScheduler,
    latents_x0,
    saved_latents,
    eps_star,
    text_embeds,
    n_timesteps: int,
    guidance_scale: float,
    pnp_f_t: float,
    pnp_attn_t: float,
    batch_size: int,
    pivots,
    frame_chunk: Optional[int] = None,
    return_trajectory: bool = False,
    mesh: Optional[Mesh] = None,
    dtype=jnp.float32,
    return_nn: bool = False,
    return_unet_io: bool = False,
    unet_module: Optional[SDUNet] = None,
):
  """The TokenFlow-PnP edit (SPEC §5) as one jitted lax.scan over the edit timesteps.

  latents_x0 (N,h,w,c) with N a multiple of batch_size (see `usable_frames`); saved_latents
  (n_timesteps, N,h,w,c): the inverted latent at each edit timestep, in edit (descending)
  order (`saved_latents_for`); eps_star (N,h,w,c): ε* (`ddim_eps`); text_embeds = (uncond,
  cond, source) each (1,L,C); pivots: int (n_timesteps, N/B) keyframe offsets, or a PRNG key
  (`pivot_offsets`). frame_chunk: batches per UNet call in the batch passes (None: all).
  mesh: shard the frames (the batch axis) over the mesh's first axis. dtype: UNet compute;
  unet_module: the SDUNet to run (default SDUNet(unet_config, dtype)).

  Returns the final latents (N,h,w,c); or (latents, extras) when any of return_trajectory
  ("trajectory": (n_timesteps+1, N,h,w,c), [0] the start latent), return_nn ("nn": {block:
  int32 (n_timesteps, N/B, 2, B·S)}) or return_unet_io ("unet_in"/"unet_out" per step in
  call order) is set.
  """
  n = latents_x0.shape[0]
  if n % batch_size:
    raise ValueError(f"{n} frames are not a multiple of batch_size {batch_size}")
  n_batches = n // batch_size
  timesteps = scheduler.timesteps(n_timesteps)
  if saved_latents.shape != (n_timesteps,) + latents_x0.shape:
    raise ValueError(
        f"saved_latents {saved_latents.shape} != {(n_timesteps,) + latents_x0.shape} "
        "(one inverted latent per edit timestep)"
    )
  k_f, k_a = injection_counts(n_timesteps, pnp_f_t, pnp_attn_t)
  warn_if_uneven(mesh, n_batches, frame_chunk, "batches")
  if is_prng_key(pivots):
    pivots = pivot_offsets(pivots, n_timesteps, n_batches, batch_size)
  pivots = jnp.asarray(pivots, jnp.int32)
  if pivots.shape != (n_timesteps, n_batches):
    raise ValueError(f"pivots {pivots.shape} != {(n_timesteps, n_batches)}")
  steps = {
      "t": jnp.asarray(timesteps, jnp.int32),
      "conv": jnp.arange(n_timesteps) < k_f,
      "qk": jnp.arange(n_timesteps) < k_a,
      "offsets": pivots,
  }
  x_start = start_latent(scheduler, latents_x0, eps_star, n_timesteps)
  uncond, cond, source = text_embeds
  embeds = tuple(e.astype(latents_x0.dtype) for e in (source, uncond, cond))
  run = jitted_edit(
      unet_module or SDUNet(unet_config, dtype=jnp.dtype(dtype)),
      scheduler,
      n_timesteps,
      float(guidance_scale),
      batch_size,
      frame_chunk,
      mesh,
      return_trajectory,
      return_nn,
      return_unet_io,
  )
  x, extras = run(unet_params, x_start, saved_latents, embeds, steps)
  if return_trajectory or return_nn or return_unet_io:
    return x, extras
  return x
