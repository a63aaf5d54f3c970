"""Optax chains: the standard DVA optimizer and the group-lasso proximal step.

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
row, bias entry and fan-out column form one group). For each regularised
leaf, :class:`LeafGroups` names the leaf's neuron axes and holds an int array
``group_ids`` with the shape of the leaf along those axes: entry ``i`` of
those axes belongs to group ``group_ids[i]`` (``-1``: not regularised). All
other axes of the leaf (the fan-in/fan-out dimension) are summed into the
group norm. Leaves are addressed by their path of names in the parameter tree
(``('params', 'transform_0', 'W1')``), see :func:`leaf_paths`.
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
    "leaf_paths",
    "group_norms",
    "group_lasso_apply_prox",
    "group_lasso_prox",
    "zero_groups_like",
    "sparsity_report",
    "learning_rate_schedule",
    "make_optimizer",
]

Path = Tuple[str, ...]


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


@dataclasses.dataclass(frozen=True, eq=False)
class GroupSpec:
  """Which parameter entries form which group, plus per-group lambda scale.

  leaves: mapping from leaf path (tuple of names) to :class:`LeafGroups`.
  num_groups: G, the number of groups (ids are ``0..G-1``).
  group_lam: optional (G,) per-group lambda; the effective lambda of
      :func:`group_lasso_prox` is ``lam * group_lam`` (``group_lam``
      defaults to ones).
  group_info: optional length-G sequence of dicts describing each group
      (e.g. ``{'cluster': k, 'region': r, 'on_target': True}``), used by
      :func:`sparsity_report`.
  """

  leaves: Mapping[Path, LeafGroups]
  num_groups: int
  group_lam: Optional[np.ndarray] = None
  group_info: Optional[Sequence[Mapping[str, Any]]] = None

  def __post_init__(self):
    leaves = {tuple(k): v for k, v in dict(self.leaves).items()}
    object.__setattr__(self, "leaves", leaves)
    for path, lg in leaves.items():
      if lg.group_ids.size and int(lg.group_ids.max()) >= self.num_groups:
        raise ValueError(
            f"leaf {path}: group id {lg.group_ids.max()} >= num_groups " f"{self.num_groups}"
        )
    if self.group_lam is not None:
      lam = np.asarray(self.group_lam, np.float32)
      if lam.shape != (self.num_groups,):
        raise ValueError(f"group_lam shape {lam.shape} != ({self.num_groups},)")
      object.__setattr__(self, "group_lam", lam)
    if self.group_info is not None and len(self.group_info) != self.num_groups:
      raise ValueError("group_info must have one entry per group")

  def lam_vector(self, lam=1.0):
    """Effective per-group lambda ``lam * group_lam`` as a (G,) array."""
    base = np.ones((self.num_groups,), np.float32) if self.group_lam is None else self.group_lam
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape[0] != self.num_groups):
      raise ValueError(f"lam must be a scalar or shape ({self.num_groups},), got {lam.shape}")
    return lam * jnp.asarray(base)


SpecLike = Union[GroupSpec, Callable[[Any], GroupSpec]]


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_paths(tree) -> list:
  """Paths (tuples of names) of the leaves of ``tree``, in flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(_key_name(k) for k in path) for path, _ in flat]


def _resolve(spec: SpecLike, params) -> GroupSpec:
  if isinstance(spec, GroupSpec):
    return spec
  out = spec(params)
  if not isinstance(out, GroupSpec):
    raise TypeError(f"group spec function returned {type(out)}, expected GroupSpec")
  return out


def _check_paths(spec: GroupSpec, params):
  paths = set(leaf_paths(params))
  missing = [p for p in spec.leaves if p not in paths]
  if missing:
    raise KeyError(f"group spec names leaves not in params: {missing[:5]}")


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


def _group_sq_norms(params, spec: GroupSpec):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  total = jnp.zeros((spec.num_groups,), jnp.float32)
  for path, leaf in flat:
    lg = spec.leaves.get(tuple(_key_name(k) for k in path))
    if lg is None:
      continue
    sq = _leaf_sq_sums(leaf, lg)
    ids = lg.group_ids
    if sq.shape != ids.shape:
      raise ValueError(f"leaf {path}: neuron axes have shape {sq.shape}, " f"group_ids {ids.shape}")
    valid = ids >= 0
    total = total + jax.ops.segment_sum(
        jnp.where(jnp.asarray(valid), sq, 0.0).reshape(-1),
        np.where(valid, ids, 0).reshape(-1),
        num_segments=spec.num_groups,
    )
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


def group_lasso_apply_prox(params, spec: SpecLike, threshold):
  """Apply ``w_g <- w_g * max(0, 1 - threshold_g / ||w_g||)`` to ``params``.

  ``threshold`` is ``eta * lam_g`` (scalar or (G,)). Groups with zero norm
  map to exactly zero. Leaves not in the spec are returned unchanged.
  """
  spec = _resolve(spec, params)
  norms = jnp.sqrt(_group_sq_norms(params, spec))
  thr = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), norms.shape)
  scale = jnp.where(norms > thr, 1.0 - thr / jnp.where(norms > 0, norms, 1.0), 0.0)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, leaf in flat:
    lg = spec.leaves.get(tuple(_key_name(k) for k in path))
    out.append(leaf if lg is None else _scale_leaf(leaf, lg, scale))
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------
# The optax transformation
# ---------------------------------------------------------------------------


class GroupLassoProxState(NamedTuple):
  count: jax.Array  # int32 step counter, used to evaluate a schedule


def group_lasso_prox(
    groups_fn_or_spec: SpecLike, lam, learning_rate
) -> optax.GradientTransformation:
  """Proximal group-lasso step as the last link of an optax chain.

  Args:
    groups_fn_or_spec: a :class:`GroupSpec`, or ``params -> GroupSpec``
      (called at trace time; the spec must not depend on parameter values).
    lam: global lambda, scalar or (G,); multiplied by ``spec.group_lam``.
    learning_rate: float or optax schedule ``count -> lr``; use the same one
      as the optimizer so the threshold is ``lr_t * lam_g``.

  ``update(updates, state, params)`` requires ``params``. Leaves outside the
  spec pass through unchanged.
  """

  def init_fn(params):
    spec = _resolve(groups_fn_or_spec, params)
    _check_paths(spec, params)
    return GroupLassoProxState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("group_lasso_prox needs params: call " "tx.update(grads, opt_state, params)")
    spec = _resolve(groups_fn_or_spec, params)
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    thr = jnp.asarray(eta, jnp.float32) * spec.lam_vector(lam)
    new_params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    proxed = group_lasso_apply_prox(new_params, spec, thr)
    flat_u, treedef = jax.tree_util.tree_flatten_with_path(updates)
    flat_p = jax.tree_util.tree_leaves(params)
    flat_w = jax.tree_util.tree_leaves(proxed)
    out = []
    for (path, u), p, w in zip(flat_u, flat_p, flat_w):
      if tuple(_key_name(k) for k in path) in spec.leaves:
        # Where the prox zeroed an entry use -p so that p + u' == 0.0
        # exactly; elsewhere u' = w - p.
        out.append(jnp.where(w == 0, -p, w - p).astype(u.dtype))
      else:
        out.append(u)
    return (
        jax.tree_util.tree_unflatten(treedef, out),
        GroupLassoProxState(count=optax.safe_increment(state.count)),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def zero_groups_like(params, reference, spec: SpecLike):
  """Zero the groups of ``params`` that are exactly zero in ``reference``.

  Use it to give an EMA of parameters the sparsity pattern of the raw
  parameters (an average of a group that switched off at step t is only
  approximately zero).
  """
  spec = _resolve(spec, reference)
  dead = group_norms(reference, spec) == 0
  return group_lasso_apply_prox(params, spec, jnp.where(dead, jnp.inf, 0.0))


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
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in flat:
    name = tuple(_key_name(k) for k in path)
    lg = spec.leaves.get(name)
    if lg is None:
      continue
    sq = np.asarray(_leaf_sq_sums(leaf, lg))
    ids = lg.group_ids
    present = np.unique(ids[ids >= 0])
    per = np.zeros(spec.num_groups)
    np.add.at(per, ids[ids >= 0], sq[ids >= 0])
    rep["per_leaf"]["/".join(name)] = {
        "groups": int(present.size),
        "zero": int((per[present] == 0).sum()),
    }
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
# Standard DVA optimizer
# ---------------------------------------------------------------------------


def _cfg_get(config, name, default=None):
  if isinstance(config, Mapping):
    return config.get(name, default)
  try:
    return getattr(config, name)
  except AttributeError:
    return default


def learning_rate_schedule(config):
  """``config.lr``, with a linear warm-up from 0 over ``config.warmup_steps``."""
  lr = _cfg_get(config, "lr")
  if lr is None:
    raise ValueError("optimizer config needs `lr`")
  warmup = int(_cfg_get(config, "warmup_steps", 0) or 0)
  if warmup > 0:
    return optax.linear_schedule(0.0, float(lr), warmup)
  return float(lr)


def learning_rate_at(config, step):
  """The learning rate at `step` as a float32 array (for logging inside jit)."""
  sched = learning_rate_schedule(config)
  return sched(step) if callable(sched) else jnp.asarray(sched, jnp.float32)


def make_optimizer(
    config, group_spec: Optional[SpecLike] = None, group_lam=None
) -> optax.GradientTransformation:
  """The DVA chain: ``clip_by_global_norm(grad_clip)`` then ``adam``.

  Config fields (dict, ConfigDict or any attribute object): ``lr``
  (required), ``grad_clip`` (default 1.0; 0/None disables), ``b1`` (0.9),
  ``b2`` (0.999), ``eps`` (1e-8), ``warmup_steps`` (optional linear warm-up).
  With ``group_spec`` the group-lasso prox is appended with the same
  learning-rate schedule and ``lam = group_lam`` (default
  ``config.group_lasso_lam``, else 1.0), as S3Editor training uses.
  """
  sched = learning_rate_schedule(config)
  clip = _cfg_get(config, "grad_clip", 1.0)
  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(
      optax.adam(
          sched,
          b1=float(_cfg_get(config, "b1", 0.9)),
          b2=float(_cfg_get(config, "b2", 0.999)),
          eps=float(_cfg_get(config, "eps", 1e-8)),
      )
  )
  if group_spec is not None:
    if group_lam is None:
      group_lam = _cfg_get(config, "group_lasso_lam", 1.0)
    parts.append(group_lasso_prox(group_spec, group_lam, sched))
  return optax.chain(*parts)
