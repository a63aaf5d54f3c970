"""Optax chains: the one optimizer factory and the group-lasso proximal step.

Group lasso (S3Editor "structured sparsity")
--------------------------------------------
``group_lasso_prox`` is an optax ``GradientTransformation`` meant to sit *last*
in a chain, after the optimizer has produced its update ``u``::

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr),
                     group_lasso_prox(spec, lam=1e-2, learning_rate=lr))

It rewrites ``u`` into ``u'`` so that ``p + u' = prox(p + u)`` with the
proximal operator of ``eta * sum_g lam_g ||w_g||_2``::

    prox(w)_g = w_g * max(0, 1 - eta * lam_g / ||w_g||)

where ``eta`` is the learning rate of this step (a float or an optax schedule,
evaluated at the same step count as ``optax.adam(schedule)`` uses). A group
whose norm after the optimizer step is at most ``eta * lam_g`` becomes exactly
zero (``u' = -p`` for that group, so ``p + u'`` is exactly 0.0), and a zero
group stays exactly zero as long as the optimizer's step for it has norm at
most ``eta * lam_g``. Note that Adam normalises step sizes: a group of ``n``
entries gets a step of norm about ``eta * sqrt(n)`` whenever its gradient is
consistently non-zero, whatever its size, so with Adam a zero group stays off
only if its gradient is tiny/noisy or ``lam_g`` is of order ``sqrt(n)``. With
SGD the threshold is the textbook one (``||grad_g|| <= lam_g``).

Group spec
----------
A :class:`GroupSpec` says which entries of which parameter leaves belong to
which group. Groups may span several leaves (e.g. a hidden neuron's fan-in
row, bias entry and fan-out column form one group). Like an optax mask, its
``group_ids`` is a pytree shaped like the params (or a prefix of them)::

    params = {'mlp': {'W1': (D, H), 'b1': (H,), 'W2': (H, O), 'b2': (O,)}}
    group_ids = {'mlp': {'W1': LeafGroups(1, ids), 'b1': LeafGroups(0, ids),
                         'W2': LeafGroups(0, ids), 'b2': None}}

Each of its leaves is ``None`` (that leaf, or the whole subtree at that
position, is not regularised) or a :class:`LeafGroups`, which names the
leaf's neuron axes and holds an int array ``group_ids`` with the shape of the
leaf along those axes: entry ``i`` of those axes belongs to group
``group_ids[i]`` (``-1``: not regularised). All other axes of the leaf (the
fan-in/fan-out dimension) are summed into the group norm. Since ``None`` is
an empty pytree for JAX, walk the id tree with :func:`map_groups` (or
``jax.tree.map(..., is_leaf=is_group_leaf)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LeafGroups",
    "GroupSpec",
    "GroupLassoProxState",
    "is_group_leaf",
    "map_groups",
    "group_norms",
    "group_lasso_apply_prox",
    "group_lasso_prox",
    "zero_groups_like",
    "with_group_lam",
    "group_lam_of",
    "sparsity_report",
    "learning_rate_schedule",
    "learning_rate_at",
    "make_optimizer",
]


# ---------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LeafGroups:
  """Group assignment of one parameter leaf.

  axes: the leaf's neuron axes (negative allowed), e.g. ``(1,)`` for a flax
      Dense kernel ``(in, hidden)`` whose columns are neurons.
  group_ids: int array, shape = leaf.shape at ``axes``; ``-1`` = ungrouped.
  """

  axes: Tuple[int, ...]
  group_ids: np.ndarray

  def __post_init__(self):
    axes = (self.axes,) if isinstance(self.axes, int) else tuple(self.axes)
    object.__setattr__(self, "axes", axes)
    ids = np.asarray(self.group_ids, dtype=np.int32)
    if ids.ndim != len(axes):
      raise ValueError(f"group_ids has {ids.ndim} dims but {len(axes)} axes given")
    object.__setattr__(self, "group_ids", ids)


def is_group_leaf(x) -> bool:
  """``is_leaf`` for group-id trees: ``None`` and :class:`LeafGroups`."""
  return x is None or isinstance(x, LeafGroups)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupSpec:
  """Which parameter entries form which group, plus per-group lambda scale.

  group_ids: pytree with the structure of the params, or a prefix of it;
      each leaf is ``None`` (not regularised) or a :class:`LeafGroups`.
  num_groups: G, the number of groups (ids are ``0..G-1``).
  group_lam: optional (G,) per-group lambda; the effective lambda of
      :func:`group_lasso_prox` is ``lam * group_lam`` (``group_lam``
      defaults to ones).
  group_info: optional length-G sequence of dicts describing each group
      (e.g. ``{'cluster': k, 'region': r, 'on_target': True}``), used by
      :func:`sparsity_report`.
  """

  group_ids: Any
  num_groups: int
  group_lam: Optional[np.ndarray] = None
  group_info: Optional[Sequence[Mapping[str, Any]]] = None

  def __post_init__(self):
    for lg in self.grouped_leaves():
      if lg.group_ids.size and int(lg.group_ids.max()) >= self.num_groups:
        raise ValueError(f"group id {lg.group_ids.max()} >= num_groups {self.num_groups}")
    if self.group_lam is not None:
      lam = np.asarray(self.group_lam, np.float32)
      if lam.shape != (self.num_groups,):
        raise ValueError(f"group_lam shape {lam.shape} != ({self.num_groups},)")
      object.__setattr__(self, "group_lam", lam)
    if self.group_info is not None and len(self.group_info) != self.num_groups:
      raise ValueError("group_info must have one entry per group")

  def grouped_leaves(self) -> list:
    """The :class:`LeafGroups` of the id tree, in flatten order."""
    leaves = jax.tree.leaves(self.group_ids, is_leaf=is_group_leaf)
    bad = [x for x in leaves if not is_group_leaf(x)]
    if bad:
      raise TypeError(f"group_ids leaves must be None or LeafGroups, got {type(bad[0])}")
    return [x for x in leaves if x is not None]

  def lam_vector(self, lam=1.0):
    """Effective per-group lambda ``lam * group_lam`` as a (G,) array."""
    base = np.ones((self.num_groups,), np.float32) if self.group_lam is None else self.group_lam
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape[0] != self.num_groups):
      raise ValueError(f"lam must be a scalar or shape ({self.num_groups},), got {lam.shape}")
    return lam * jnp.asarray(base)


SpecLike = Union[GroupSpec, Callable[[Any], GroupSpec]]


def map_groups(f, spec: GroupSpec, *trees):
  """``f(leaf_groups_or_None, *subtrees)`` over ``spec.group_ids``.

  ``spec.group_ids`` must be a prefix of every tree; where it holds ``None``
  the subtrees passed to ``f`` may be whole subtrees of the params.
  """
  return jax.tree.map(f, spec.group_ids, *trees, is_leaf=is_group_leaf)


def _resolve(spec: SpecLike, params) -> GroupSpec:
  if isinstance(spec, GroupSpec):
    return spec
  out = spec(params)
  if not isinstance(out, GroupSpec):
    raise TypeError(f"group spec function returned {type(out)}, expected GroupSpec")
  return out


class _LeafMismatch(ValueError):
  pass


def _check_against(spec: GroupSpec, params):
  """Raise unless ``spec.group_ids`` is a prefix of ``params`` with grouped
  leaves of matching shape (works on abstract params too)."""
  spec.grouped_leaves()  # leaf types

  def check(path, lg, x):
    if lg is None:
      return None
    shape = getattr(x, "shape", None)
    if shape is None:
      raise _LeafMismatch(f"group_ids{jax.tree_util.keystr(path)}: not an array leaf of params")
    axes, _ = _other_axes(len(shape), lg.axes)
    if tuple(shape[a] for a in axes) != lg.group_ids.shape:
      raise _LeafMismatch(
          f"group_ids{jax.tree_util.keystr(path)}: leaf shape {tuple(shape)} at axes "
          f"{lg.axes} != group_ids shape {lg.group_ids.shape}"
      )
    return None

  try:
    jax.tree_util.tree_map_with_path(check, spec.group_ids, params, is_leaf=is_group_leaf)
  except _LeafMismatch:
    raise
  except ValueError as e:
    raise ValueError(f"group spec's group_ids is not a prefix of the params tree: {e}") from e


def _other_axes(ndim, axes):
  axes = tuple(a % ndim for a in axes)
  return axes, tuple(a for a in range(ndim) if a not in axes)


def _leaf_sq_sums(x, lg: LeafGroups):
  """Squared norm of ``x`` per neuron entry (shape = group_ids.shape)."""
  axes, other = _other_axes(x.ndim, lg.axes)
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=other)
  # jnp.sum keeps remaining axes in their original order; group_ids follow
  # the order given in lg.axes.
  order = np.argsort(np.argsort(axes))  # position of each given axis among sorted
  return jnp.transpose(sq, order) if sq.ndim > 1 else sq


def _leaf_group_sq(x, lg: LeafGroups, num_groups):
  """(G,) squared norms of this leaf's slice of every group."""
  sq = _leaf_sq_sums(x, lg)
  ids = lg.group_ids
  if sq.shape != ids.shape:
    raise ValueError(f"neuron axes have shape {sq.shape}, group_ids {ids.shape}")
  valid = ids >= 0
  return jax.ops.segment_sum(
      jnp.where(jnp.asarray(valid), sq, 0.0).reshape(-1),
      np.where(valid, ids, 0).reshape(-1),
      num_segments=num_groups,
  )


def _group_sq_norms(params, spec: GroupSpec):
  per_leaf = map_groups(
      lambda lg, x: None if lg is None else _leaf_group_sq(x, lg, spec.num_groups),
      spec,
      params,
  )
  total = jnp.zeros((spec.num_groups,), jnp.float32)
  for sq in jax.tree.leaves(per_leaf):  # the Nones drop out
    total = total + sq
  return total


def group_norms(params, spec: SpecLike):
  """L2 norm of every group, shape (G,)."""
  spec = _resolve(spec, params)
  return jnp.sqrt(_group_sq_norms(params, spec))


def _scale_leaf(leaf, lg: LeafGroups, scale_g):
  ids = lg.group_ids
  s = jnp.where(jnp.asarray(ids >= 0), scale_g[np.where(ids >= 0, ids, 0)], 1.0)
  axes, _ = _other_axes(leaf.ndim, lg.axes)
  # Arrange s so its dims follow the leaf's axis order, then broadcast.
  perm = np.argsort(axes)
  s = jnp.transpose(s, perm) if s.ndim > 1 else s
  shape = [1] * leaf.ndim
  for a in sorted(axes):
    shape[a] = leaf.shape[a]
  return (leaf * s.reshape(shape).astype(leaf.dtype)).astype(leaf.dtype)


def _prox_scales(params, spec: GroupSpec, threshold):
  """(G,) factors ``max(0, 1 - threshold_g / ||w_g||)``, 0 for zero groups."""
  norms = jnp.sqrt(_group_sq_norms(params, spec))
  thr = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), norms.shape)
  return jnp.where(norms > thr, 1.0 - thr / jnp.where(norms > 0, norms, 1.0), 0.0)


def group_lasso_apply_prox(params, spec: SpecLike, threshold):
  """Apply ``w_g <- w_g * max(0, 1 - threshold_g / ||w_g||)`` to ``params``.

  ``threshold`` is ``eta * lam_g`` (scalar or (G,)). Groups with zero norm
  map to exactly zero. Leaves not in the spec are returned unchanged.
  """
  spec = _resolve(spec, params)
  scale = _prox_scales(params, spec, threshold)
  return map_groups(lambda lg, x: x if lg is None else _scale_leaf(x, lg, scale), spec, params)


# ---------------------------------------------------------------------------
# The optax transformation
# ---------------------------------------------------------------------------


class GroupLassoProxState(NamedTuple):
  count: jax.Array  # int32 step counter, used to evaluate a schedule
  # (G,) effective per-group lambda: `lam * spec.group_lam` at init; a trainer may replace
  # it (`with_group_lam`), e.g. from measured attributions. In the state so that it is
  # checkpointed with the run and a resumed run uses the same lambdas.
  lam: jax.Array


def group_lasso_prox(
    groups_fn_or_spec: SpecLike, lam, learning_rate
) -> optax.GradientTransformation:
  """Proximal group-lasso step as the last link of an optax chain.

  Args:
    groups_fn_or_spec: a :class:`GroupSpec`, or ``params -> GroupSpec``
      (called at trace time; the spec must not depend on parameter values).
    lam: global lambda, scalar or (G,); multiplied by ``spec.group_lam``, this is the
      state's initial per-group lambda (replace it with :func:`with_group_lam`).
    learning_rate: float or optax schedule ``count -> lr``; use the same one
      as the optimizer so the threshold is ``lr_t * lam_g``.

  ``update(updates, state, params)`` requires ``params``. Leaves outside the
  spec pass through unchanged.
  """

  def init_fn(params):
    spec = _resolve(groups_fn_or_spec, params)
    _check_against(spec, params)
    return GroupLassoProxState(count=jnp.zeros([], jnp.int32), lam=spec.lam_vector(lam))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("group_lasso_prox needs params: call tx.update(grads, opt_state, params)")
    spec = _resolve(groups_fn_or_spec, params)
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    thr = jnp.asarray(eta, jnp.float32) * state.lam
    stepped = jax.tree.map(lambda p, u: p + u, params, updates)
    scale = _prox_scales(stepped, spec, thr)

    def leaf_update(lg, p, u, w):
      if lg is None:
        return u
      w = _scale_leaf(w, lg, scale)
      # Where the prox zeroed an entry use -p so that p + u' == 0.0
      # exactly; elsewhere u' = w - p.
      return jnp.where(w == 0, -p, w - p).astype(u.dtype)

    new_updates = map_groups(leaf_update, spec, params, updates, stepped)
    return new_updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_prox_state(x) -> bool:
  return isinstance(x, GroupLassoProxState)


def with_group_lam(opt_state, lam):
  """``opt_state`` with every :class:`GroupLassoProxState`'s per-group lambda set to ``lam``."""

  def put(x):
    if not _is_prox_state(x):
      return x
    new = jnp.asarray(lam, x.lam.dtype)
    if new.shape != x.lam.shape:
      raise ValueError(f"lam shape {new.shape} != the prox's {x.lam.shape}")
    return x._replace(lam=new)

  return jax.tree.map(put, opt_state, is_leaf=_is_prox_state)


def group_lam_of(opt_state):
  """The per-group lambda of the (first) :class:`GroupLassoProxState` in ``opt_state``."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_prox_state) if _is_prox_state(x)]
  if not found:
    raise ValueError("no group_lasso_prox in this optimizer state")
  return found[0].lam


def zero_groups_like(params, reference, spec: SpecLike):
  """Zero the groups of ``params`` that are exactly zero in ``reference``.

  Use it to give an EMA of parameters the sparsity pattern of the raw
  parameters (an average of a group that switched off at step t is only
  approximately zero).
  """
  spec = _resolve(spec, reference)
  dead = group_norms(reference, spec) == 0
  return group_lasso_apply_prox(params, spec, jnp.where(dead, jnp.inf, 0.0))


def _path_name(path) -> str:
  """'a/b/c' for a key path (dict keys, attributes and sequence indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def sparsity_report(params, spec: SpecLike) -> dict:
  """Count zero groups overall, per leaf, and per ``group_info`` key.

  Returns a plain-python dict::

    {'num_groups': G, 'num_zero': z, 'zero_fraction': z/G,
     'zero_groups': [ids], 'group_norms': [G floats],
     'per_leaf': {'a/b/c': {'groups': n, 'zero': m}},
     'per_cluster': {k: {'groups': n, 'zero': m, 'zero_regions': [...],
                         'active_regions': [...]}}}   # if group_info has 'cluster'

  A leaf-group is zero when that leaf's slice of the group is all zero.
  """
  spec = _resolve(spec, params)
  norms = np.asarray(group_norms(params, spec))
  zero = norms == 0
  rep = {
      "num_groups": int(spec.num_groups),
      "num_zero": int(zero.sum()),
      "zero_fraction": float(zero.mean()) if spec.num_groups else 0.0,
      "zero_groups": [int(i) for i in np.flatnonzero(zero)],
      "group_norms": [float(v) for v in norms],
      "per_leaf": {},
  }

  def per_leaf(path, lg, leaf):
    if lg is None:
      return None
    ids = lg.group_ids
    present = np.unique(ids[ids >= 0])
    per = np.asarray(_leaf_group_sq(leaf, lg, spec.num_groups))
    rep["per_leaf"][_path_name(path)] = {
        "groups": int(present.size),
        "zero": int((per[present] == 0).sum()),
    }
    return None

  jax.tree_util.tree_map_with_path(per_leaf, spec.group_ids, params, is_leaf=is_group_leaf)
  if spec.group_info is not None and all("cluster" in i for i in spec.group_info):
    clusters = {}
    for g, info in enumerate(spec.group_info):
      c = clusters.setdefault(
          int(info["cluster"]), {"groups": 0, "zero": 0, "zero_regions": [], "active_regions": []}
      )
      c["groups"] += 1
      c["zero"] += int(zero[g])
      if "region" in info:
        key = "zero_regions" if zero[g] else "active_regions"
        if int(info["region"]) not in c[key]:
          c[key].append(int(info["region"]))
    for c in clusters.values():
      # A region counts as active if any of its groups is non-zero.
      c["zero_regions"] = sorted(set(c["zero_regions"]) - set(c["active_regions"]))
      c["active_regions"] = sorted(c["active_regions"])
    rep["per_cluster"] = dict(sorted(clusters.items()))
  return rep


# ---------------------------------------------------------------------------
# The optimizer factory
# ---------------------------------------------------------------------------


def _cfg_get(config, name, default=None):
  if isinstance(config, Mapping):
    return config.get(name, default)
  try:
    return getattr(config, name)
  except AttributeError:
    return default


def learning_rate_schedule(config):
  """``config.lr``, with a linear warm-up from 0 over ``config.warmup_steps``.

  ``config.decay='cosine'`` decays it over ``decay_steps`` to ``decay_alpha * lr``
  (optax's cosine decay; the identity stand-in uses it). Warm-up and decay
  do not combine.
  """
  lr = _cfg_get(config, "lr")
  if lr is None:
    raise ValueError("optimizer config needs `lr`")
  warmup = int(_cfg_get(config, "warmup_steps", 0) or 0)
  decay = _cfg_get(config, "decay", "") or ""
  if decay not in ("", "cosine"):
    raise ValueError(f"optim.decay must be '' or 'cosine', got {decay!r}")
  if decay == "cosine":
    if warmup > 0:
      raise ValueError("optim.warmup_steps and optim.decay='cosine' do not combine")
    return optax.cosine_decay_schedule(
        float(lr),
        int(_cfg_get(config, "decay_steps")),
        alpha=float(_cfg_get(config, "decay_alpha", 0.0)),
    )
  if warmup > 0:
    return optax.linear_schedule(0.0, float(lr), warmup)
  return float(lr)


def learning_rate_at(config, step):
  """The learning rate at `step` as a float32 array (for logging inside jit)."""
  sched = learning_rate_schedule(config)
  return sched(step) if callable(sched) else jnp.asarray(sched, jnp.float32)


def _label_by_top_level_key(tree):
  return {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()}


def _by_top_level_key(make_tx, default_lr, lr_by_key) -> optax.GradientTransformation:
  """``optax.multi_transform`` with one ``make_tx(lr)`` per top-level key.

  Labels are the keys themselves (so the state matches a hand-built
  ``multi_transform({'editor': ..., 'dva': ...}, ...)``); the key set is only
  known from the params, so the inner transformation is built per call.
  """

  def build(tree):
    if not isinstance(tree, Mapping):
      raise TypeError(f"lr_by_key needs dict params, got {type(tree).__name__}")
    missing = sorted(set(lr_by_key) - set(tree))
    if missing:
      raise KeyError(f"lr_by_key names keys not in params: {missing}")
    lr = lambda k: lr_by_key[k] if callable(lr_by_key[k]) else float(lr_by_key[k])  # noqa: E731
    return optax.multi_transform(
        {k: make_tx(lr(k) if k in lr_by_key else default_lr) for k in tree},
        _label_by_top_level_key,
    )

  def init_fn(params):
    return build(params).init(params)

  def update_fn(updates, state, params=None):
    return build(updates).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


class TorchAdamState(NamedTuple):
  count: jax.Array  # int32 step count
  mu: Any
  nu: Any


def torch_adam(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """`torch.optim.Adam(lr, betas=(b1, b2), eps)` (no weight decay) with torch's arithmetic.

  The math is `optax.adam(lr, b1, b2, eps, eps_root=0)`'s, but optax forms the bias
  corrections as `1 - b**t` in float32, where 0.999 is not representable: `1 - b2**t` is then
  off by ~1.3e-5 relative at every step, so every Adam step is ~6.4e-6 larger than torch's.
  In STIT's stitching tuning (``gan.stitching``) that bias alone took the golden `content_loss_steps` (a difference of nearly equal images)
  to 1.4e-5 relative, over the 1e-5 limit, and `tuned` to 3.7e-6. Here `1 - b**t =
  -expm1(t * log b)` with `log b` taken in float64 (accurate to float32 rounding), and the
  update is torch's: `p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`.
  """
  log_b1, log_b2 = float(np.log(b1)), float(np.log(b2))

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return TorchAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update_fn(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)  # lerp_
    nu = jax.tree.map(lambda v, g: v * b2 + g * g * (1 - b2), state.nu, grads)
    t = count.astype(jnp.float32)
    step_size = lr / -jnp.expm1(t * log_b1)
    bc2_sqrt = jnp.sqrt(-jnp.expm1(t * log_b2))
    updates = jax.tree.map(lambda m, v: -step_size * (m / (jnp.sqrt(v) / bc2_sqrt + eps)), mu, nu)
    return updates, TorchAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    config,
    group_spec: Optional[SpecLike] = None,
    group_lam=None,
    *,
    lr_by_key: Optional[Mapping[str, Any]] = None,
) -> optax.GradientTransformation:
  """The optimizer of every task (DVA, classifier, S3Editor); build them here.

  The chain is::

    clip_by_global_norm(grad_clip)      # if grad_clip
    -> add_decayed_weights(weight_decay)  # if weight_decay > 0
    -> adam(lr schedule, b1, b2, eps)     # per top-level key with lr_by_key
    -> group_lasso_prox(group_spec, group_lam, lr schedule)  # if group_spec

  Config fields (dict, ConfigDict or any attribute object): ``lr``
  (required), ``warmup_steps`` (optional linear warm-up from 0), ``grad_clip``
  (default 1.0; 0/None disables), ``weight_decay`` (default 0: none), ``b1``
  (0.9), ``b2`` (0.999), ``eps`` (1e-8).

  Args:
    config: the optimizer config above.
    group_spec: a :class:`GroupSpec` (or ``params -> GroupSpec``); appends the
      group-lasso prox with the same learning-rate schedule as adam.
    group_lam: global lambda of the prox (default ``config.group_lasso_lam``,
      else 1.0).
    lr_by_key: ``{top-level key: lr}`` (float or schedule). The params must
      then be a dict; each key named here gets its own adam at that learning
      rate (same b1/b2/eps, no warm-up) and every other top-level key the
      scheduled adam, via ``optax.multi_transform`` labelled by top-level key
      (S3Editor fine-tuning the UNet: ``lr_by_key={'dva': unet_lr}``). The
      prox's threshold always uses the schedule.
  """
  sched = learning_rate_schedule(config)
  b1 = float(_cfg_get(config, "b1", 0.9))
  b2 = float(_cfg_get(config, "b2", 0.999))
  eps = float(_cfg_get(config, "eps", 1e-8))
  adam = lambda lr: optax.adam(lr, b1=b1, b2=b2, eps=eps)  # noqa: E731
  clip = _cfg_get(config, "grad_clip", 1.0)
  weight_decay = float(_cfg_get(config, "weight_decay", 0.0) or 0.0)
  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(_by_top_level_key(adam, sched, lr_by_key) if lr_by_key else adam(sched))
  if group_spec is not None:
    if group_lam is None:
      group_lam = _cfg_get(config, "group_lasso_lam", 1.0)
    parts.append(group_lasso_prox(group_spec, group_lam, sched))
  return optax.chain(*parts)
