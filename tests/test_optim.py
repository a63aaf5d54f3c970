"""Tests for s3jax.optim: the group-lasso proximal transform and make_optimizer."""

import jax
import jax.numpy as jnp
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


def _spec(group_lam=None):
  return optim.GroupSpec(
      leaves={
          ("mlp", "W1"): optim.LeafGroups((1,), NEURON_GROUP),
          ("mlp", "b1"): optim.LeafGroups((0,), NEURON_GROUP),
          ("mlp", "W2"): optim.LeafGroups((0,), NEURON_GROUP),
      },
      num_groups=3,
      group_lam=group_lam,
  )


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
  spec = optim.GroupSpec({("w",): optim.LeafGroups((0,), np.zeros(5, np.int32))}, 1)
  ours = optim.group_lasso_apply_prox({"w": jnp.asarray(v, jnp.float32)}, spec, t)["w"]
  np.testing.assert_allclose(np.asarray(ours), closed, atol=1e-6)
  if np.linalg.norm(v) <= t:
    assert np.all(np.asarray(ours) == 0.0)


def test_transform_update_is_prox_of_step_across_leaves():
  p = _params(0)
  u = jax.tree.map(lambda x: 0.1 * x + 0.05, _params(1))
  lam = np.array([0.5, 80.0, 2.0], np.float32)
  lr = 0.1
  tx = optim.group_lasso_prox(_spec(), lam, lr)
  state = tx.init(p)
  u2, state = tx.update(u, state, p)
  new = optax.apply_updates(p, u2)
  w = jax.tree.map(lambda a, b: a + b, p, u)
  for g, (got, vec) in enumerate(zip(_np_group_vectors(new), _np_group_vectors(w))):
    np.testing.assert_allclose(got, _np_prox(vec, lr * lam[g]), rtol=1e-5, atol=1e-6)
  assert np.all(_np_group_vectors(new)[1] == 0.0)  # threshold 8.0 kills group 1
  # Leaves outside the spec keep the plain update.
  np.testing.assert_array_equal(np.asarray(u2["mlp"]["b2"]), np.asarray(u["mlp"]["b2"]))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(u, state)


def test_group_norms_and_multi_axis_spec():
  p = _params(2)
  vecs = _np_group_vectors(p)
  np.testing.assert_allclose(
      np.asarray(optim.group_norms(p, _spec())), [np.linalg.norm(v) for v in vecs], rtol=1e-6
  )
  # A stacked leaf (K, D, H) with groups over axes (0, 2), given in either order.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  ids = np.arange(8).reshape(2, 4) // 2  # (K, H) -> 4 groups
  exp = np.zeros(4)
  for k in range(2):
    for h in range(4):
      exp[ids[k, h]] += np.sum(x[k, :, h] ** 2)
  for axes, gid in [((0, 2), ids), ((2, 0), ids.T), ((0, -1), ids)]:
    spec = optim.GroupSpec({("x",): optim.LeafGroups(axes, gid)}, 4)
    np.testing.assert_allclose(np.asarray(optim.group_norms({"x": x}, spec)) ** 2, exp, rtol=1e-5)
    # kill group 2 only
    out = optim.group_lasso_apply_prox({"x": x}, spec, np.array([0, 0, 1e9, 0.0]))["x"]
    out = np.asarray(out)
    for k in range(2):
      for h in range(4):
        if ids[k, h] == 2:
          assert np.all(out[k, :, h] == 0)
        else:
          np.testing.assert_array_equal(out[k, :, h], x[k, :, h])


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
  assert np.all(_np_group_vectors(p)[2] == 0.0)
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
  st = tx.init(p0)
  u, _ = tx.update(jax.grad(loss)(p0), st, p0)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_zero_groups_stay_zero_under_schedule_and_spec_fn():
  p = _params(4)
  p["mlp"]["W1"] = p["mlp"]["W1"].at[:, 0:2].set(0.0)
  p["mlp"]["b1"] = p["mlp"]["b1"].at[0:2].set(0.0)
  p["mlp"]["W2"] = p["mlp"]["W2"].at[0:2].set(0.0)
  sched = optax.linear_schedule(0.1, 0.01, 50)
  tx = optax.chain(optax.sgd(sched), optim.group_lasso_prox(lambda params: _spec(), 1.0, sched))
  state = tx.init(p)
  rng = np.random.default_rng(0)
  for i in range(20):
    g = jax.tree.map(
        lambda x: jnp.asarray(0.05 * rng.normal(size=x.shape) / np.sqrt(x.size), jnp.float32), p
    )
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    assert np.all(_np_group_vectors(p)[0] == 0.0)
  # A pull above the threshold (|g| * lr > lr * lam) re-activates the group.
  g = jax.tree.map(lambda x: jnp.full(x.shape, 2.0, jnp.float32), p)
  u, state = tx.update(g, state, p)
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
  assert np.all(_np_group_vectors(p)[2] == 0.0)
  # The EMA of a group that switched off is small but not exactly zero;
  # zero_groups_like gives it the raw params' sparsity pattern.
  assert np.linalg.norm(_np_group_vectors(ema)[2]) > 0
  ema_sparse = optim.zero_groups_like(ema, p, _spec())
  assert np.all(_np_group_vectors(ema_sparse)[2] == 0.0)
  for g in (0, 1):
    np.testing.assert_array_equal(_np_group_vectors(ema_sparse)[g], _np_group_vectors(ema)[g])

  # Round trip (params, opt state, ema) through flax msgpack bytes.
  blob = serialization.to_bytes({"params": p, "opt": state, "ema": ema})
  template = {"params": _params(9), "opt": tx.init(_params(9)), "ema": _params(9)}
  restored = serialization.from_bytes(template, blob)
  for a, b in zip(
      jax.tree.leaves({"params": p, "opt": state, "ema": ema}), jax.tree.leaves(restored)
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()
  p2, s2, e2 = restored["params"], restored["opt"], restored["ema"]
  for _ in range(10):
    p, state, ema = step(p, state, ema)
    p2, s2, e2 = step(p2, s2, e2)
  for a, b in zip(jax.tree.leaves((p, state, ema)), jax.tree.leaves((p2, s2, e2))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert np.all(_np_group_vectors(p2)[2] == 0.0)


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
  spec = optim.GroupSpec(_spec().leaves, 3, group_info=info)
  rep = optim.sparsity_report(p, spec)
  assert rep["num_groups"] == 3 and rep["num_zero"] == 1 and rep["zero_groups"] == [1]
  assert rep["per_leaf"]["mlp/W1"] == {"groups": 3, "zero": 1}
  assert rep["per_leaf"]["mlp/W2"] == {"groups": 3, "zero": 2}
  assert rep["per_cluster"][0]["zero_regions"] == [1]
  assert rep["per_cluster"][0]["active_regions"] == [0]
  assert rep["per_cluster"][1] == {
      "groups": 1,
      "zero": 0,
      "zero_regions": [],
      "active_regions": [0],
  }


def test_make_optimizer_matches_manual_chain():
  import ml_collections

  loss = _toy_problem(3)
  p = _params(6)
  g = jax.tree.map(lambda x: 50.0 * x, jax.grad(loss)(p))  # large: clipping matters
  cfg = ml_collections.ConfigDict({"lr": 1e-3, "grad_clip": 1.0, "b1": 0.8, "b2": 0.99})
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, b1=0.8, b2=0.99))
  for tx in (optim.make_optimizer(cfg), optim.make_optimizer(cfg.to_dict())):
    s, sr = tx.init(p), ref.init(p)
    pa, pb = p, p
    for _ in range(3):
      ua, s = tx.update(g, s, pa)
      ub, sr = ref.update(g, sr, pb)
      pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Warm-up: linear from 0.
  tx = optim.make_optimizer({"lr": 1e-3, "warmup_steps": 4})
  s = tx.init(p)
  u, s = tx.update(g, s, p)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, s = tx.update(g, s, p)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u)) == pytest.approx(
      0.25e-3, rel=1e-3
  )
  with pytest.raises(ValueError, match="lr"):
    optim.make_optimizer({})
