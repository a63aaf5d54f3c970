"""Tests for s3jax.optim: the group-lasso proximal transform and make_optimizer."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import serialization
from scipy import optimize

from s3jax import optim

D_IN, H, D_OUT = 5, 6, 4
NEURON_GROUP = np.array([0, 0, 1, 1, 2, 2])  # 3 groups of 2 neurons


def _params(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "mlp": {
          "W1": jnp.asarray(scale * rng.normal(size=(D_IN, H)), jnp.float32),
          "b1": jnp.asarray(scale * rng.normal(size=(H,)), jnp.float32),
          "W2": jnp.asarray(scale * rng.normal(size=(H, D_OUT)), jnp.float32),
          "b2": jnp.asarray(scale * rng.normal(size=(D_OUT,)), jnp.float32),
      }
  }


def _group_ids():
  """The id tree of `_params`: hidden neurons grouped, b2 not."""
  return {
      "mlp": {
          "W1": optim.LeafGroups((1,), NEURON_GROUP),
          "b1": optim.LeafGroups((0,), NEURON_GROUP),
          "W2": optim.LeafGroups((0,), NEURON_GROUP),
          "b2": None,
      }
  }


def _spec(group_lam=None, group_info=None):
  return optim.GroupSpec(_group_ids(), num_groups=3, group_lam=group_lam, group_info=group_info)


def _np_group_vectors(p):
  """Each group flattened to one numpy vector (fan-in, bias, fan-out)."""
  p = jax.tree.map(np.asarray, p)["mlp"]
  return [
      np.concatenate(
          [
              p["W1"][:, NEURON_GROUP == g].ravel(),
              p["b1"][NEURON_GROUP == g],
              p["W2"][NEURON_GROUP == g].ravel(),
          ]
      )
      for g in range(3)
  ]


def _np_prox(v, t):
  n = np.linalg.norm(v)
  return np.zeros_like(v) if n <= t else v * (1 - t / n)


def _np_prox_tree(w, thresholds):
  """Reference prox of a whole `_params` tree, in numpy, group by group."""
  out = jax.tree.map(lambda x: np.array(x, np.float32), w)
  m = out["mlp"]
  for g, vec in enumerate(_np_group_vectors(w)):
    new = _np_prox(vec.astype(np.float64), thresholds[g]).astype(np.float32)
    cols = NEURON_GROUP == g
    n_w1, n_b1 = D_IN * cols.sum(), cols.sum()
    m["W1"][:, cols] = new[:n_w1].reshape(D_IN, -1)
    m["b1"][cols] = new[n_w1 : n_w1 + n_b1]
    m["W2"][cols] = new[n_w1 + n_b1 :].reshape(-1, D_OUT)
  return out


def _bits(tree):
  """Leaves as raw bytes, so chex equality is bit-exact (-0.0 != 0.0)."""
  return jax.tree.map(lambda x: np.asarray(x).reshape(-1).view(np.uint8), tree)


# ---------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------


def test_spec_is_a_tree_like_the_params():
  spec = _spec()
  assert jax.tree.structure(spec.group_ids, is_leaf=optim.is_group_leaf) == jax.tree.structure(
      _params()
  )
  assert len(spec.grouped_leaves()) == 3
  assert optim.map_groups(lambda lg, x: lg is None, spec, _params()) == {
      "mlp": {"W1": False, "b1": False, "W2": False, "b2": True}
  }
  with pytest.raises(ValueError, match="num_groups"):
    optim.GroupSpec(_group_ids(), num_groups=2)
  with pytest.raises(ValueError, match="group_lam"):
    _spec(group_lam=np.ones(4))
  with pytest.raises(ValueError, match="group_info"):
    _spec(group_info=[{}])
  with pytest.raises(TypeError, match="LeafGroups"):
    optim.GroupSpec({"w": np.zeros(3, np.int32)}, 1).grouped_leaves()
  # init checks the id tree against the params: structure, then leaf shapes.
  tx = optim.group_lasso_prox(_spec(), 1.0, 0.1)
  with pytest.raises(ValueError, match="prefix"):
    tx.init({"other": _params()["mlp"]})
  bad = _group_ids()
  bad["mlp"]["W1"] = optim.LeafGroups((0,), NEURON_GROUP)  # axis 0 has D_IN entries
  with pytest.raises(ValueError, match=r"\['mlp'\]\['W1'\].*shape"):
    optim.group_lasso_prox(optim.GroupSpec(bad, 3), 1.0, 0.1).init(_params())
  with pytest.raises(ValueError, match="not an array leaf"):
    optim.group_lasso_prox(optim.GroupSpec({"mlp": optim.LeafGroups(0, [0])}, 1), 1.0, 0.1).init(
        _params()
    )


# ---------------------------------------------------------------------------
# Closed form vs brute force
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.1, 0.7, 1.3, 3.0])
def test_prox_matches_brute_force_minimiser(t):
  rng = np.random.default_rng(int(t * 10))
  v = rng.normal(size=5)
  obj = lambda w: 0.5 * np.sum((w - v) ** 2) + t * np.linalg.norm(w)  # noqa: E731
  closed = _np_prox(v, t)
  # General-purpose derivative-free minimisation from several starts.
  best = min(
      (
          optimize.minimize(
              obj, x0, method="Powell", options=dict(xtol=1e-10, ftol=1e-14, maxiter=20000)
          )
          for x0 in [v, np.zeros(5) + 1e-3, rng.normal(size=5)]
      ),
      key=lambda r: r.fun,
  )
  assert obj(closed) <= best.fun + 1e-9
  np.testing.assert_allclose(closed, best.x, atol=2e-4)
  # Subgradient optimality.
  if np.linalg.norm(closed) > 0:
    g = closed - v + t * closed / np.linalg.norm(closed)
    np.testing.assert_allclose(g, 0, atol=1e-12)
  else:
    assert np.linalg.norm(v) <= t
  # Our JAX implementation on a single-group leaf.
  spec = optim.GroupSpec({"w": optim.LeafGroups((0,), np.zeros(5, np.int32))}, 1)
  ours = jax.jit(lambda p: optim.group_lasso_apply_prox(p, spec, t))({"w": jnp.asarray(v)})
  chex.assert_trees_all_close(ours, {"w": closed.astype(np.float32)}, atol=1e-6)
  if np.linalg.norm(v) <= t:
    chex.assert_trees_all_equal(ours, {"w": np.zeros(5, np.float32)})


def test_transform_update_is_prox_of_step_across_leaves():
  p = _params(0)
  u = jax.tree.map(lambda x: 0.1 * x + 0.05, _params(1))
  lam = np.array([0.5, 80.0, 2.0], np.float32)
  lr = 0.1
  tx = optim.group_lasso_prox(_spec(), lam, lr)
  state = tx.init(p)
  u2, state2 = jax.jit(tx.update)(u, state, p)
  chex.assert_trees_all_equal_shapes_and_dtypes(u2, u)
  assert int(state2.count) == 1
  new = optax.apply_updates(p, u2)
  w = optax.apply_updates(p, u)
  chex.assert_trees_all_close(new, _np_prox_tree(w, lr * lam), rtol=1e-5, atol=1e-6)
  # The threshold 8.0 kills group 1: exactly 0.0 in every leaf it spans.
  chex.assert_trees_all_equal(_np_group_vectors(new)[1], np.zeros(2 * (D_IN + 1 + D_OUT)))
  # Leaves outside the spec keep the plain update.
  chex.assert_trees_all_equal(u2["mlp"]["b2"], u["mlp"]["b2"])
  # jit does not change the result.
  chex.assert_trees_all_close(tx.update(u, state, p)[0], u2, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(u, state)


def test_id_tree_may_be_a_prefix_of_the_params():
  """`None` over a whole subtree (S3Editor's {'editor', 'dva'}) = every leaf None."""
  p = {"editor": _params(0), "dva": {"conv": {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}}}
  u = jax.tree.map(lambda x: 0.3 * x - 0.1, p)
  prefix = optim.GroupSpec({"editor": _group_ids(), "dva": None}, 3)
  full = optim.GroupSpec({"editor": _group_ids(), "dva": jax.tree.map(lambda _: None, p["dva"])}, 3)
  lam = np.array([0.5, 80.0, 2.0], np.float32)
  outs = []
  for spec in (prefix, full):
    tx = optim.group_lasso_prox(spec, lam, 0.1)
    outs.append(jax.jit(tx.update)(u, tx.init(p), p)[0])
  chex.assert_trees_all_equal(outs[0], outs[1])
  chex.assert_trees_all_equal(outs[0]["dva"], u["dva"])
  # ...and the editor part is what the editor-only spec gives.
  tx = optim.group_lasso_prox(_spec(), lam, 0.1)
  chex.assert_trees_all_equal(
      outs[0]["editor"], jax.jit(tx.update)(u["editor"], tx.init(p["editor"]), p["editor"])[0]
  )
  chex.assert_trees_all_equal(optim.group_norms(p, prefix), optim.group_norms(p["editor"], _spec()))


def test_group_norms_and_multi_axis_spec():
  p = _params(2)
  chex.assert_trees_all_close(
      optim.group_norms(p, _spec()),
      np.array([np.linalg.norm(v) for v in _np_group_vectors(p)], np.float32),
      rtol=1e-6,
  )
  # A stacked leaf (K, D, H) with groups over axes (0, 2), given in either order.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  ids = np.arange(8).reshape(2, 4) // 2  # (K, H) -> 4 groups
  exp = np.zeros(4)
  for k in range(2):
    for h in range(4):
      exp[ids[k, h]] += np.sum(x[k, :, h] ** 2)
  killed = x.copy()
  killed[np.broadcast_to((ids == 2)[:, None, :], x.shape)] = 0.0  # kill group 2 only
  for axes, gid in [((0, 2), ids), ((2, 0), ids.T), ((0, -1), ids)]:
    spec = optim.GroupSpec({"x": optim.LeafGroups(axes, gid)}, 4)
    chex.assert_trees_all_close(
        optim.group_norms({"x": x}, spec) ** 2, exp.astype(np.float32), rtol=1e-5
    )
    out = optim.group_lasso_apply_prox({"x": x}, spec, np.array([0, 0, 1e9, 0.0]))
    chex.assert_trees_all_equal(out, {"x": killed})


# ---------------------------------------------------------------------------
# Training behaviour: exact zeros, stays zero, chains, schedules
# ---------------------------------------------------------------------------


def _toy_problem(seed=0):
  """Regress y = f(x) with an MLP; group 2's neurons are only weakly useful."""
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(64, D_IN)), jnp.float32)
  teacher = _params(7)
  teacher["mlp"]["W2"] = teacher["mlp"]["W2"].at[4:].multiply(0.01)

  def fwd(p, x):
    h = jnp.tanh(x @ p["mlp"]["W1"] + p["mlp"]["b1"])
    return h @ p["mlp"]["W2"] + p["mlp"]["b2"]

  ys = fwd(teacher, xs)

  def loss(p):
    return jnp.mean((fwd(p, xs) - ys) ** 2)

  return loss


def _run(tx, p, loss, steps):
  state = tx.init(p)

  @jax.jit
  def step(p, state):
    g = jax.grad(loss)(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  hist = []
  for _ in range(steps):
    p, state = step(p, state)
    hist.append(np.asarray(optim.group_norms(p, _spec())))
  return p, state, np.array(hist)


def test_exact_zeros_and_stay_zero_with_sgd():
  loss = _toy_problem()
  lr = 0.05
  lam = np.array([0.0, 0.0, 0.6], np.float32)
  tx = optax.chain(optax.sgd(lr), optim.group_lasso_prox(_spec(), lam, lr))
  p, _, hist = _run(tx, _params(3, 0.5), loss, 300)
  first_zero = np.argmax(hist[:, 2] == 0)
  assert hist[first_zero, 2] == 0.0 and first_zero < 250
  # Once zero, exactly zero on every later step (gradient pull < lambda).
  assert np.all(hist[first_zero:, 2] == 0.0)
  chex.assert_trees_all_equal(_np_group_vectors(p)[2], np.zeros(2 * (D_IN + 1 + D_OUT)))
  assert np.all(hist[-1, :2] > 0.1)
  # At the fixed point the group's gradient pull is below lambda (for a
  # whole switched-off neuron it is exactly zero: a dead tanh/silu neuron
  # with zero fan-in and fan-out is a stationary point of the loss).
  g = _np_group_vectors(jax.grad(loss)(p))[2]
  assert np.linalg.norm(g) <= lam[2]


def test_chain_with_clip_adam_schedule_jit():
  loss = _toy_problem(1)
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 300)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adam(sched),
      optim.group_lasso_prox(_spec(), np.array([0.0, 0.0, 30.0]), sched),
  )
  p0 = _params(3, 0.5)
  p, state, hist = _run(tx, p0, loss, 200)
  assert int(state[-1].count) == 200
  assert np.all(hist[-100:, 2] == 0.0) and np.all(hist[-1, :2] > 0)
  assert float(loss(p)) < float(loss(p0))
  # Schedule: at count 0 the learning rate is 0, so neither adam nor the
  # prox move anything.
  u, _ = jax.jit(tx.update)(jax.grad(loss)(p0), tx.init(p0), p0)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, p0))


def test_zero_groups_stay_zero_under_schedule_and_spec_fn():
  p = _params(4)
  p["mlp"]["W1"] = p["mlp"]["W1"].at[:, 0:2].set(0.0)
  p["mlp"]["b1"] = p["mlp"]["b1"].at[0:2].set(0.0)
  p["mlp"]["W2"] = p["mlp"]["W2"].at[0:2].set(0.0)
  sched = optax.linear_schedule(0.1, 0.01, 50)
  tx = optax.chain(optax.sgd(sched), optim.group_lasso_prox(lambda params: _spec(), 1.0, sched))
  update = jax.jit(tx.update)
  state = tx.init(p)
  rng = np.random.default_rng(0)
  for i in range(20):
    g = jax.tree.map(
        lambda x: jnp.asarray(0.05 * rng.normal(size=x.shape) / np.sqrt(x.size), jnp.float32), p
    )
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    chex.assert_trees_all_equal(_np_group_vectors(p)[0], np.zeros(2 * (D_IN + 1 + D_OUT)))
  # A pull above the threshold (|g| * lr > lr * lam) re-activates the group.
  g = jax.tree.map(lambda x: jnp.full(x.shape, 2.0, jnp.float32), p)
  u, state = update(g, state, p)
  assert np.linalg.norm(_np_group_vectors(optax.apply_updates(p, u))[0]) > 0


# ---------------------------------------------------------------------------
# EMA + serialization
# ---------------------------------------------------------------------------


def test_ema_and_serialization_roundtrip_bit_exact():
  loss = _toy_problem(2)
  tx = optim.make_optimizer(
      {"lr": 0.02, "grad_clip": 1.0},
      group_spec=_spec(),
      group_lam=np.array([0.0, 0.0, 30.0], np.float32),
  )
  p = _params(3, 0.5)
  state = tx.init(p)
  ema = p
  decay = 0.9

  @jax.jit
  def step(p, state, ema):
    g = jax.grad(loss)(p)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    ema = jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ema, p)
    return p, state, ema

  for _ in range(60):
    p, state, ema = step(p, state, ema)
  zeros = np.zeros(2 * (D_IN + 1 + D_OUT), np.float32)
  chex.assert_trees_all_equal(_np_group_vectors(p)[2], zeros)
  # The EMA of a group that switched off is small but not exactly zero;
  # zero_groups_like gives it the raw params' sparsity pattern.
  assert np.linalg.norm(_np_group_vectors(ema)[2]) > 0
  ema_sparse = jax.jit(lambda e, r: optim.zero_groups_like(e, r, _spec()))(ema, p)
  chex.assert_trees_all_equal(_np_group_vectors(ema_sparse)[2], zeros)
  chex.assert_trees_all_equal(_np_group_vectors(ema_sparse)[:2], _np_group_vectors(ema)[:2])
  chex.assert_trees_all_equal(ema_sparse["mlp"]["b2"], ema["mlp"]["b2"])

  # Round trip (params, opt state, ema) through flax msgpack bytes.
  blob = serialization.to_bytes({"params": p, "opt": state, "ema": ema})
  template = {"params": _params(9), "opt": tx.init(_params(9)), "ema": _params(9)}
  restored = serialization.from_bytes(template, blob)
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, {"params": p, "opt": state, "ema": ema})
  chex.assert_trees_all_equal(_bits(restored), _bits({"params": p, "opt": state, "ema": ema}))
  p2, s2, e2 = restored["params"], restored["opt"], restored["ema"]
  for _ in range(10):
    p, state, ema = step(p, state, ema)
    p2, s2, e2 = step(p2, s2, e2)
  chex.assert_trees_all_equal(_bits((p, state, ema)), _bits((p2, s2, e2)))
  chex.assert_trees_all_equal(_np_group_vectors(p2)[2], zeros)


# ---------------------------------------------------------------------------
# Report and make_optimizer
# ---------------------------------------------------------------------------


def test_sparsity_report():
  p = _params(5)
  p["mlp"]["W1"] = p["mlp"]["W1"].at[:, 2:4].set(0.0)
  p["mlp"]["b1"] = p["mlp"]["b1"].at[2:4].set(0.0)
  p["mlp"]["W2"] = p["mlp"]["W2"].at[2:4].set(0.0)
  p["mlp"]["W2"] = p["mlp"]["W2"].at[4:6].set(0.0)  # only W2 part of group 2
  info = [{"cluster": 0, "region": 0}, {"cluster": 0, "region": 1}, {"cluster": 1, "region": 0}]
  spec = _spec(group_info=info)
  rep = optim.sparsity_report(p, spec)
  assert rep["num_groups"] == 3 and rep["num_zero"] == 1 and rep["zero_groups"] == [1]
  assert rep["zero_fraction"] == pytest.approx(1 / 3)
  np.testing.assert_allclose(
      rep["group_norms"], [np.linalg.norm(v) for v in _np_group_vectors(p)], rtol=1e-6
  )
  assert rep["per_leaf"] == {
      "mlp/W1": {"groups": 3, "zero": 1},
      "mlp/b1": {"groups": 3, "zero": 1},
      "mlp/W2": {"groups": 3, "zero": 2},
  }
  assert rep["per_cluster"][0]["zero_regions"] == [1]
  assert rep["per_cluster"][0]["active_regions"] == [0]
  assert rep["per_cluster"][1] == {
      "groups": 1,
      "zero": 0,
      "zero_regions": [],
      "active_regions": [0],
  }


def _run_both(tx, ref, grads, p, steps=3):
  """`steps` jitted updates of `tx` and `ref` from `p`; the two (params, state)."""
  out = []
  for t in (tx, ref):
    update = jax.jit(t.update)
    q, s = p, t.init(p)
    for g in grads[:steps] if isinstance(grads, list) else [grads] * steps:
      u, s = update(g, s, q)
      q = optax.apply_updates(q, u)
    out.append((q, s))
  return out


def test_make_optimizer_matches_manual_chain():
  loss = _toy_problem(3)
  p = _params(6)
  g = jax.tree.map(lambda x: 50.0 * x, jax.grad(loss)(p))  # large: clipping matters
  # Gradients of varying norm, so clipping changes Adam's result (a constant
  # rescale would not).
  gs = [g, jax.tree.map(lambda x: 1e-3 * x, g), g]
  cfg = ml_collections.ConfigDict({"lr": 1e-3, "grad_clip": 1.0, "b1": 0.8, "b2": 0.99})
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, b1=0.8, b2=0.99))
  for tx in (optim.make_optimizer(cfg), optim.make_optimizer(cfg.to_dict())):
    (pa, sa), (pb, sb) = _run_both(tx, ref, gs, p)
    chex.assert_trees_all_equal(pa, pb)
    chex.assert_trees_all_equal(sa, sb)
  # The clip is really there: without it the result differs.
  (pa, _), (pb, _) = _run_both(optim.make_optimizer(dict(cfg, grad_clip=0.0)), ref, gs, p)
  assert not np.allclose(pa["mlp"]["W1"], pb["mlp"]["W1"])
  # Warm-up: linear from 0.
  tx = optim.make_optimizer({"lr": 1e-3, "warmup_steps": 4})
  update = jax.jit(tx.update)
  s = tx.init(p)
  u, s = update(g, s, p)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, p))
  u, s = update(g, s, p)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u)) == pytest.approx(
      0.25e-3, rel=1e-3
  )
  with pytest.raises(ValueError, match="lr"):
    optim.make_optimizer({})


def test_make_optimizer_weight_decay_is_the_classifier_chain():
  """(a) weight_decay: the classifier's add_decayed_weights -> adam, no clip."""
  loss = _toy_problem(4)
  p = _params(8)
  grads = [jax.grad(loss)(jax.tree.map(lambda x: x * (1 + 0.1 * i), p)) for i in range(3)]
  cfg = ml_collections.ConfigDict({"lr": 1e-2, "grad_clip": 0.0, "weight_decay": 0.3})
  ref = optax.chain(optax.add_decayed_weights(0.3), optax.adam(1e-2))
  (pa, sa), (pb, sb) = _run_both(optim.make_optimizer(cfg), ref, grads, p)
  chex.assert_trees_all_equal_structs(sa, sb)
  chex.assert_trees_all_equal(pa, pb)
  chex.assert_trees_all_equal(sa, sb)
  # The decay is applied: without it the params differ.
  (pc, _), _ = _run_both(optim.make_optimizer(dict(cfg, weight_decay=0.0)), ref, grads, p)
  assert not np.allclose(pa["mlp"]["W1"], pc["mlp"]["W1"])
  # Decay comes after clipping: clip(g) + wd * p, not clip(g + wd * p).
  big = jax.tree.map(lambda x: 50.0 * x, grads[0])
  tx = optim.make_optimizer(dict(cfg, grad_clip=1.0))
  ref = optax.chain(
      optax.clip_by_global_norm(1.0), optax.add_decayed_weights(0.3), optax.adam(1e-2)
  )
  (pa, sa), (pb, sb) = _run_both(tx, ref, big, p)
  chex.assert_trees_all_equal(pa, pb)
  wrong = optax.chain(
      optax.add_decayed_weights(0.3), optax.clip_by_global_norm(1.0), optax.adam(1e-2)
  )
  (pc, _), _ = _run_both(wrong, ref, big, p)
  assert not np.allclose(pa["mlp"]["W1"], pc["mlp"]["W1"])
  # weight_decay absent or 0 adds no link at all (the state is adam's alone).
  for c in ({"lr": 1e-2, "grad_clip": 0.0}, {"lr": 1e-2, "grad_clip": 0.0, "weight_decay": 0.0}):
    chex.assert_trees_all_equal_structs(
        optim.make_optimizer(c).init(p), optax.chain(optax.adam(1e-2)).init(p)
    )


def _s3editor_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "editor": _params(seed)["mlp"],
      "dva": {
          "conv": {
              "kernel": jnp.asarray(rng.normal(size=(3, 3, 2)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
          }
      },
  }


def test_make_optimizer_lr_by_key_is_the_s3editor_chain():
  """(b) lr_by_key: S3Editor's fine-tuning chain, bit for bit, state included."""
  p = _s3editor_params(0)
  spec = optim.GroupSpec({"editor": _group_ids()["mlp"], "dva": None}, 3)
  lam = np.array([0.0, 0.0, 30.0], np.float32)
  grads = [jax.tree.map(lambda x: 20.0 * x, _s3editor_params(s)) for s in (1, 2, 3)]
  cfg = ml_collections.ConfigDict(
      {"lr": 1e-2, "grad_clip": 1.0, "b1": 0.8, "b2": 0.99, "warmup_steps": 2, "unet_lr": 1e-3}
  )
  sched = optim.learning_rate_schedule(cfg)
  adam = lambda lr: optax.adam(lr, b1=0.8, b2=0.99)  # noqa: E731
  ref = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform(
          {"editor": adam(sched), "dva": adam(1e-3)},
          lambda p: {k: jax.tree.map(lambda _: k, v) for k, v in p.items()},
      ),
      optim.group_lasso_prox(spec, lam, sched),
  )
  tx = optim.make_optimizer(cfg, spec, lam, lr_by_key={"dva": cfg.unet_lr})
  (pa, sa), (pb, sb) = _run_both(tx, ref, grads, p)
  chex.assert_trees_all_equal_structs(sa, sb)
  chex.assert_trees_all_equal(sa, sb)
  chex.assert_trees_all_equal(pa, pb)
  # Each key really has its own lr: at step 0 the editor's warm-up lr is 0,
  # while the dva's constant unet_lr moves every entry by 1e-3 (adam).
  u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
  chex.assert_trees_all_close(u["dva"], jax.tree.map(lambda x: jnp.full_like(x, -1e-3), p["dva"]))
  chex.assert_trees_all_equal(u["editor"], jax.tree.map(jnp.zeros_like, p["editor"]))
  # Without lr_by_key everything follows the schedule, with one plain adam.
  (pc, sc), _ = _run_both(optim.make_optimizer(cfg, spec, lam), ref, grads, p)
  plain = optax.chain(
      optax.clip_by_global_norm(1.0), adam(sched), optim.group_lasso_prox(spec, lam, sched)
  )
  chex.assert_trees_all_equal_structs(sc, plain.init(p))
  assert not np.allclose(pc["dva"]["conv"]["kernel"], pa["dva"]["conv"]["kernel"])
  with pytest.raises(KeyError, match="unet"):
    optim.make_optimizer(cfg, lr_by_key={"unet": 1e-3}).init(p)
  with pytest.raises(TypeError, match="dict"):
    optim.make_optimizer(cfg, lr_by_key={"dva": 1e-3}).init([p["dva"]])
