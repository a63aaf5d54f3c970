"""Tests for s3jax.models.editor (S3Editor routed, region-sparse transformations)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s3jax import optim
from s3jax.models import editor as E

D, K, R, NPR = 8, 3, 4, 2


def _separable_directions(n_per=(3, 4, 2), d=D, spread=0.1, seed=0):
  """Directions from well-separated cones, shuffled; returns (dirs, true labels)."""
  rng = np.random.default_rng(seed)
  centres = np.linalg.qr(rng.normal(size=(d, d)))[0][: len(n_per)]  # orthonormal
  dirs, labels = [], []
  for k, n in enumerate(n_per):
    for _ in range(n):
      dirs.append(3.0 * (centres[k] + spread * rng.normal(size=d)))
      labels.append(k)
  perm = rng.permutation(len(dirs))
  return np.array(dirs)[perm].astype(np.float32), np.array(labels)[perm]


@pytest.fixture(scope="module")
def setup():
  dirs, _ = _separable_directions()
  assign, cents = E.kmeans(dirs, K, seed=0)
  rng = np.random.default_rng(1)
  stats = E.EditStats(
      mean=jnp.asarray(rng.normal(size=D) * 0.1, jnp.float32),
      std=jnp.asarray(rng.uniform(0.5, 2.0, D), jnp.float32),
      directions=jnp.asarray(dirs),
      assignments=jnp.asarray(assign),
      centroids=jnp.asarray(cents),
  )
  model = E.Editor(num_clusters=K, num_regions=R, neurons_per_region=NPR)
  z = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)
  params = model.init(jax.random.key(0), z, jnp.zeros(5, jnp.int32), 0.5, stats=stats)
  return model, stats, params, z


def _randomised(params, seed=0):
  """Params with non-zero output layers so every weight gets gradient."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


# ---------------------------------------------------------------------------
# Clustering
# ---------------------------------------------------------------------------


def test_kmeans_separable_and_deterministic():
  dirs, labels = _separable_directions()
  a1, c1 = E.kmeans(dirs, K, seed=0)
  a2, c2 = E.kmeans(dirs, K, seed=0)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(c1, c2)
  # Same partition as the truth (up to label names), and labels are numbered
  # by first appearance.
  for k in range(K):
    assert len(set(a1[labels == k])) == 1
  assert len(set(a1)) == K
  first = [int(a) for i, a in enumerate(a1) if a not in a1[:i]]
  assert first[:K] == list(range(K))
  np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-6)
  # Other seeds find the same partition on separable data.
  for seed in (1, 2, 3):
    a, _ = E.kmeans(dirs, K, seed=seed)
    np.testing.assert_array_equal(a, a1)
  # Cosine: scaling a direction does not change its cluster.
  scaled = dirs * np.linspace(0.1, 10, len(dirs))[:, None]
  np.testing.assert_array_equal(E.kmeans(scaled, K, 0)[0], a1)
  with pytest.raises(ValueError):
    E.kmeans(dirs, len(dirs) + 1, 0)


def test_kmeans_nonseparable_every_cluster_nonempty():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 16))
  for k in (1, 5, 13, 40):
    a, c = E.kmeans(x, k, seed=4)
    assert sorted(set(a.tolist())) == list(range(k))
    assert c.shape == (k, 16)


def test_landmark_regions_cover_all_points():
  for r in (1, 3, 6, 10):
    reg = E.landmark_regions(E.MEAN_LANDMARKS_68, r, seed=0)
    assert reg.shape == (68,) and reg.dtype == np.int32
    assert sorted(set(reg.tolist())) == list(range(r))  # all regions non-empty
    np.testing.assert_array_equal(reg, E.landmark_regions(None, r, seed=0))
    # k-means fixed point: each landmark is nearest its own region's centroid.
    pts = E.MEAN_LANDMARKS_68.astype(np.float64)
    cents = np.stack([pts[reg == k].mean(0) for k in range(r)])
    d2 = ((pts[:, None] - cents[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.argmin(d2, 1), reg)
  # Region ids run top to bottom.
  reg = E.landmark_regions(None, 6, 0)
  cy = [E.MEAN_LANDMARKS_68[reg == k, 1].mean() for k in range(6)]
  assert cy == sorted(cy)


def test_part_and_attribute_tables():
  assert len(E.CELEBA_ATTRIBUTES) == 40 == len(set(E.CELEBA_ATTRIBUTES))
  assert set(E.DEFAULT_ATTRIBUTE_PARTS) == set(E.CELEBA_ATTRIBUTES)
  for parts in E.DEFAULT_ATTRIBUTE_PARTS.values():
    assert parts and set(parts) <= set(E.SEMANTIC_PARTS)
  all_idx = sorted(i for v in E.SEMANTIC_PARTS.values() for i in v)
  assert all_idx == list(range(68))
  reg = E.landmark_regions(None, 6, 0)
  pr = E.part_regions(reg)
  for name, idx in E.SEMANTIC_PARTS.items():
    assert set(pr[name]) == set(reg[list(idx)].tolist())
  assert set().union(*map(set, pr.values())) == set(range(6))
  # With a majority-style threshold mouth-only regions do not count as jaw.
  strict = E.part_regions(reg, min_fraction=0.25)
  assert set(strict["jaw"]) <= set(pr["jaw"])
  assert all(strict[name] for name in E.SEMANTIC_PARTS)  # no part left without a region
  targets = E.attribute_target_regions(reg)
  assert len(targets) == 40
  assert targets[E.CELEBA_ATTRIBUTES.index("Big_Lips")] == frozenset(pr["mouth"])
  assert targets[E.CELEBA_ATTRIBUTES.index("Young")] == frozenset(range(6))
  ct = E.cluster_target_regions([0, 1, 0] + [1] * 37, targets, K=2)
  assert ct[0] == targets[0] | targets[2]


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


def test_param_layout_and_identity_at_init(setup):
  model, stats, params, z = setup
  shapes = jax.tree.map(jnp.shape, params)["params"]
  assert set(shapes) == {f"transform_{k}" for k in range(K)}
  assert shapes["transform_0"] == {
      "W1": (D, R * NPR),
      "b1": (R * NPR,),
      "W2": (R * NPR, D),
      "b2": (D,),
  }
  for k in range(K):
    assert np.all(np.asarray(params["params"][f"transform_{k}"]["W2"]) == 0)
  attrs = jnp.arange(5) % stats.directions.shape[0]
  out = model.apply(params, z, attrs, 0.0, stats=stats)
  np.testing.assert_allclose(np.asarray(out), np.asarray(z), atol=1e-6)
  # With gamma != 0 and T = identity: x̂ = denorm(norm(z) + γ d_a).
  g = jnp.linspace(-2, 2, 5)
  out = model.apply(params, z, attrs, g, stats=stats)
  exp = (
      (z - stats.mean) / stats.std + g[:, None] * stats.directions[attrs]
  ) * stats.std + stats.mean
  np.testing.assert_allclose(np.asarray(out), np.asarray(exp), atol=1e-5)
  # single vector, scalar index
  out1 = model.apply(params, z[0], jnp.int32(2), 1.0, stats=stats)
  assert out1.shape == (D,)
  # soft routing is also the identity at init
  soft = model.apply(params, z, attrs, 0.0, stats=stats, routing="soft")
  np.testing.assert_allclose(np.asarray(soft), np.asarray(z), atol=1e-5)


def _grad_norms_per_transform(model, params, stats, z, attrs, routing="hard"):
  def loss(p):
    out = model.apply(p, z, attrs, 0.7, stats=stats, routing=routing)
    return jnp.sum(out**2)

  g = jax.grad(loss)(params)["params"]
  return {k: [np.asarray(x) for x in jax.tree.leaves(g[f"transform_{k}"])] for k in range(K)}


def test_hard_routing_gradient_reaches_only_own_cluster(setup):
  model, stats, params, z = setup
  p = _randomised(params)
  assign = np.asarray(stats.assignments)
  for a in range(len(assign)):
    grads = _grad_norms_per_transform(model, p, stats, z, jnp.full((5,), a, jnp.int32))
    for k in range(K):
      if k == assign[a]:
        assert all(np.abs(g).sum() > 0 for g in grads[k])  # every leaf gets gradient
      else:
        assert all(np.all(g == 0.0) for g in grads[k])  # exact zeros
  # Mixed batch: exactly the used clusters get gradient.
  attrs = np.array([0, 0, 1, 1, 0])
  used = set(assign[attrs].tolist())
  grads = _grad_norms_per_transform(model, p, stats, z, jnp.asarray(attrs))
  for k in range(K):
    assert (k in used) == any(np.abs(g).sum() > 0 for g in grads[k])
  # Soft routing reaches all of them.
  grads = _grad_norms_per_transform(model, p, stats, z, jnp.asarray(attrs), routing="soft")
  assert all(np.abs(g).sum() > 0 for k in range(K) for g in grads[k])


def test_routing_by_raw_direction(setup):
  model, stats, params, z = setup
  p = _randomised(params, 1)
  for a in range(stats.directions.shape[0]):
    by_index, w = model.apply(
        p, z, jnp.full((5,), a, jnp.int32), 0.3, stats=stats, return_weights=True
    )
    by_dir, w2 = model.apply(p, z, stats.directions[a], 0.3, stats=stats, return_weights=True)
    np.testing.assert_allclose(np.asarray(by_index), np.asarray(by_dir), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w2))
    assert int(np.argmax(w[0])) == int(stats.assignments[a])
  _, w = model.apply(
      p, z, jnp.zeros(5, jnp.int32), 0.3, stats=stats, routing="soft", return_weights=True
  )
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
  assert int(np.argmax(w[0])) == int(stats.assignments[0])
  jitted = jax.jit(lambda p, z, a: model.apply(p, z, a, 0.3, stats=stats))
  np.testing.assert_allclose(
      np.asarray(jitted(p, z, jnp.arange(5) % 3)),
      np.asarray(model.apply(p, z, jnp.arange(5) % 3, 0.3, stats=stats)),
      atol=1e-6,
  )


def test_make_edit_stats():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 16))
  st = E.make_edit_stats(w, np.zeros(16), np.ones(16), 2, seed=0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(st.directions), axis=1), 4.0, rtol=1e-5)
  assert st.assignments.shape == (6,) and st.centroids.shape == (2, 16)


# ---------------------------------------------------------------------------
# Group spec and sparse training
# ---------------------------------------------------------------------------


def test_group_spec_marks_expected_groups(setup):
  model, stats, params, z = setup
  ron = model.region_of_neuron()
  np.testing.assert_array_equal(ron, [0, 0, 1, 1, 2, 2, 3, 3])
  targets = [{0}, {1, 2}, {3}]
  spec = E.group_spec_for_editor(params, ron, 0.1, 1.0, targets)
  assert spec.num_groups == K * R
  for k in range(K):
    for r in range(R):
      g = k * R + r
      assert spec.group_info[g]["cluster"] == k and spec.group_info[g]["region"] == r
      assert spec.group_info[g]["neurons"] == (2 * r, 2 * r + 1)
      assert spec.group_lam[g] == (0.1 if r in targets[k] else 1.0)
  # The id tree mirrors the params: W1 columns, b1 entries and W2 rows of
  # every transform are grouped, b2 is not.
  assert jax.tree.structure(spec.group_ids, is_leaf=optim.is_group_leaf) == jax.tree.structure(
      params
  )
  assert len(spec.grouped_leaves()) == 3 * K
  for k in range(K):
    ids = spec.group_ids["params"][f"transform_{k}"]
    assert ids["b2"] is None
    assert (ids["W1"].axes, ids["b1"].axes, ids["W2"].axes) == ((1,), (0,), (0,))
    for name in ("W1", "b1", "W2"):
      np.testing.assert_array_equal(ids[name].group_ids, k * R + ron)
  # Killing exactly one group zeroes that region's neurons in that transform only:
  # their W1 columns, b1 entries and W2 rows.
  p = _randomised(params, 2)
  thr = np.zeros(K * R)
  thr[1 * R + 2] = 1e9  # cluster 1, region 2 -> neurons 4, 5
  out = jax.jit(lambda p: optim.group_lasso_apply_prox(p, spec, thr))(p)
  expected = jax.tree.map(np.array, p)
  t1 = expected["params"]["transform_1"]
  t1["W1"][:, [4, 5]] = 0.0
  t1["b1"][[4, 5]] = 0.0
  t1["W2"][[4, 5]] = 0.0
  chex.assert_trees_all_equal(out, expected)
  rep = optim.sparsity_report(out, spec)
  assert rep["zero_groups"] == [1 * R + 2]
  assert rep["per_cluster"][1]["zero_regions"] == [2]
  used = E.attribute_regions_used(out, spec, stats.assignments, [f"a{i}" for i in range(9)])
  for i, a in enumerate(np.asarray(stats.assignments)):
    assert used[f"a{i}"] == ((0, 1, 3) if a == 1 else (0, 1, 2, 3))
  # Per-neuron granularity.
  spec_n = E.group_spec_for_editor(params, ron, 0.1, 1.0, targets, per_neuron=True)
  assert spec_n.num_groups == K * R * NPR
  assert spec_n.group_lam[1 * 8 + 3] == 0.1 and spec_n.group_lam[1 * 8 + 6] == 1.0
  with pytest.raises(ValueError):
    E.group_spec_for_editor(params, ron, 0.1, 1.0, targets[:2])


def test_sparse_training_kills_off_target_regions_first():
  """A few hundred Adam+prox steps on a toy regression: the off-target groups
  (larger lambda) become exactly zero, before any on-target group does."""
  d, k_total, r_total, npr = 8, 2, 4, 4
  rng = np.random.default_rng(0)
  base = rng.normal(size=(2, d))
  dirs = np.concatenate(
      [base[0] + 0.1 * rng.normal(size=(2, d)), base[1] + 0.1 * rng.normal(size=(2, d))]
  ).astype(np.float32)
  assign, cents = E.kmeans(dirs, k_total, 0)
  np.testing.assert_array_equal(assign, [0, 0, 1, 1])
  stats = E.EditStats(
      jnp.zeros(d), jnp.ones(d), jnp.asarray(dirs), jnp.asarray(assign), jnp.asarray(cents)
  )
  model = E.Editor(k_total, r_total, npr)
  z = jnp.asarray(rng.normal(size=(64, d)), jnp.float32)
  attrs = jnp.asarray(rng.integers(0, 4, 64))
  gam = jnp.asarray(rng.uniform(-1, 1, 64), jnp.float32)
  params = model.init(jax.random.key(0), z, attrs, gam, stats=stats)
  # Every region's neurons are equally useful for the target mapping.
  m = jnp.asarray(rng.normal(size=(k_total, d, d)) / np.sqrt(d), jnp.float32)
  x = z + gam[:, None] * stats.directions[attrs]
  target = x + jnp.tanh(jnp.einsum("bd,bde->be", x, m[stats.assignments[attrs]]))
  targets = [{0, 1}, {2, 3}]
  spec = E.group_spec_for_editor(params, model.region_of_neuron(), 4.0, 8.0, targets)
  tx = optim.make_optimizer({"lr": 1e-2, "grad_clip": 1.0}, group_spec=spec, group_lam=1.0)
  state = tx.init(params)

  def loss(p):
    return jnp.mean((model.apply(p, z, attrs, gam, stats=stats) - target) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  l0 = float(loss(params))
  first_zero = np.full(k_total * r_total, np.inf)
  for i in range(250):
    params, state, l = step(params, state)
    n = np.asarray(optim.group_norms(params, spec))
    first_zero[(n == 0) & np.isinf(first_zero)] = i
  off = np.array([not info["on_target"] for info in spec.group_info])
  assert np.all(np.isfinite(first_zero[off]))  # every off-target group died
  assert first_zero[off].max() < first_zero[~off].min()  # ...before any on-target one
  assert float(l) < 0.5 * l0
  rep = optim.sparsity_report(params, spec)
  assert rep["per_cluster"][0]["zero_regions"] == [2, 3]
  assert rep["per_cluster"][1]["zero_regions"] == [0, 1]
  # The output now depends only on the target regions' neurons.
  used = E.attribute_regions_used(params, spec, assign, ["a", "b", "c", "d"])
  assert used == {"a": (0, 1), "b": (0, 1), "c": (2, 3), "d": (2, 3)}


def test_group_spec_for_s3editor_params_leaves_dva_ungrouped(setup):
  """S3Editor builds the spec from jax.eval_shape of {'editor': ..., 'dva': ...}."""
  model, stats, params, z = setup
  ron = model.region_of_neuron()
  targets = [{0}, {1, 2}, {3}]
  dva = {"enc": {"conv": {"kernel": jnp.ones((3, 3, 4)), "bias": jnp.ones(4)}}}
  init = lambda: {"editor": params["params"], "dva": dva}  # noqa: E731
  spec = E.group_spec_for_editor(jax.eval_shape(init), ron, 0.1, 1.0, targets)
  full = init()
  assert jax.tree.structure(spec.group_ids, is_leaf=optim.is_group_leaf) == jax.tree.structure(full)
  assert jax.tree.leaves(spec.group_ids["dva"]) == []  # all None
  assert len(spec.grouped_leaves()) == 3 * K
  # Same groups and lambdas as the spec of the bare editor params.
  bare = E.group_spec_for_editor(params, ron, 0.1, 1.0, targets)
  np.testing.assert_array_equal(spec.group_lam, bare.group_lam)
  assert spec.group_info == bare.group_info
  p = _randomised(full, 3)
  chex.assert_trees_all_equal(
      optim.group_norms(p, spec), optim.group_norms({"params": p["editor"]}, bare)
  )
  # Fine-tuning chain: the dva gets exactly its own adam's update, untouched
  # by the prox, even with a lambda large enough to kill every editor group.
  cfg = {"lr": 1e-2, "grad_clip": 0.0}
  tx = optim.make_optimizer(cfg, spec, 1e5, lr_by_key={"dva": 1e-4})
  g = _randomised(full, 4)
  u, _ = jax.jit(tx.update)(g, tx.init(p), p)
  ref = optax.adam(1e-4)
  u_dva, _ = jax.jit(ref.update)(g["dva"], ref.init(p["dva"]), p["dva"])
  chex.assert_trees_all_equal(u["dva"], u_dva)
  new = optax.apply_updates(p, u)
  assert optim.sparsity_report(new, spec)["num_zero"] == K * R
  # A second transform_k subtree (e.g. inside the DVA) is refused, not merged.
  with pytest.raises(ValueError, match="twice"):
    E.group_spec_for_editor({"editor": params, "dva": params}, ron, 0.1, 1.0, targets)


# ---------------------------------------------------------------------------
# Attribution-tied sparsity
# ---------------------------------------------------------------------------


def test_group_ablations_match_the_editor(setup):
  """x_hat is the Editor's output; switching group g off equals zeroing its W2 rows."""
  model, stats, params, z = setup
  params = _randomised(params)
  attr = jnp.array([0, 3, 5, 8, 1])
  gamma = jnp.array([0.5, -1.0, 0.7, 1.2, -0.3])
  for normalize in (False, True):
    m = E.Editor(K, R, NPR, normalize_output=normalize)
    x_hat, without, act = E.group_ablations(
        params["params"],
        z,
        attr,
        gamma,
        stats=stats,
        num_groups=R,
        neurons_per_group=NPR,
        normalize_output=normalize,
    )
    np.testing.assert_allclose(x_hat, m.apply(params, z, attr, gamma, stats=stats), atol=1e-5)
    assert without.shape == (R, 5, D) and act.shape == (R, 5)
    for g in range(R):
      off = jax.tree.map(lambda x: x, params)
      for k in range(K):
        w2 = off["params"][f"transform_{k}"]["W2"]
        off["params"][f"transform_{k}"]["W2"] = w2.at[g * NPR : (g + 1) * NPR].set(0.0)
      np.testing.assert_allclose(without[g], m.apply(off, z, attr, gamma, stats=stats), atol=1e-5)


def _planted_editor():
  """One cluster, two neuron groups, a linear 'decoder' whose z dims 0-3 paint the left
  half of a 4x4 image (the target region) and dims 4-7 the right half (off target).
  Group 0's fan-out writes only into dims 4-7: it moves only off-target pixels. Group 1
  writes only into dims 0-3. The index reading calls group 0 "region 0", a target."""
  d, npr = 8, 2
  rng = np.random.default_rng(0)
  stats = E.EditStats(
      jnp.zeros(d),
      jnp.ones(d),
      jnp.asarray(rng.normal(size=(2, d)), jnp.float32),
      jnp.zeros(2, jnp.int32),
      jnp.asarray(rng.normal(size=(1, d)), jnp.float32),
  )
  model = E.Editor(1, 2, npr)
  z = jnp.asarray(rng.normal(size=(6, d)), jnp.float32)
  params = model.init(jax.random.key(0), z, jnp.zeros(6, jnp.int32), 0.5, stats=stats)
  p = jax.tree.map(lambda x: x, params)["params"]["transform_0"]
  w2 = np.zeros((2 * npr, d), np.float32)
  w2[:npr, 4:] = rng.normal(size=(npr, 4))  # group 0 -> right half only
  w2[npr:, :4] = rng.normal(size=(npr, 4))  # group 1 -> left half only
  p["W2"] = jnp.asarray(w2)
  p["b1"] = jnp.full((2 * npr,), 0.5)
  params = {"params": {"transform_0": p}}
  paint = np.zeros((d, 4, 4), np.float32)
  for i in range(4):
    paint[i, :, :2] = rng.uniform(0.5, 1.5, (4, 2))
    paint[4 + i, :, 2:] = rng.uniform(0.5, 1.5, (4, 2))
  decode = lambda x: jnp.einsum("bd,dhw->bhw", x, jnp.asarray(paint))  # noqa: E731
  regmap = jnp.broadcast_to(jnp.asarray(np.repeat([[0, 0, 1, 1]], 4, 0)), (6, 4, 4))
  return model, stats, params, z, decode, regmap, npr


def test_attribution_finds_and_prox_removes_a_planted_off_target_group():
  model, stats, params, z, decode, regmap, npr = _planted_editor()
  attr = jnp.array([0, 1, 0, 1, 0, 1])
  gamma = jnp.array([0.8, -0.6, 1.0, 0.5, -0.9, 0.7])

  def measure(p):
    x_hat, without, act = E.group_ablations(
        p["params"],
        z,
        attr,
        gamma,
        stats=stats,
        num_groups=2,
        neurons_per_group=npr,
        normalize_output=False,
    )
    change = jnp.abs(decode(x_hat)[None] - jax.vmap(decode)(without))
    cluster = jnp.zeros(6, jnp.int32)
    table = E.group_attribution(change, regmap, act, cluster, 1, 2)
    share = E.group_off_target_share(change, regmap == 0, cluster, 1)
    return table, share

  table, share = measure(params)
  assert table.shape == (1, 2, 2)
  # Group 0 moves only the right half, group 1 only the left.
  assert table[0, 0, 0] == 0 and table[0, 0, 1] > 0
  assert table[0, 1, 1] == 0 and table[0, 1, 0] > 0
  np.testing.assert_allclose(share, [[1.0, 0.0]])
  lam_in, lam_out = 0.1, 48.0
  lam = E.attribution_lambda(share, jnp.full(2, lam_in), lam_in, lam_out)
  np.testing.assert_allclose(lam, [lam_out, lam_in])
  # Nothing measured (NaN) keeps the previous lambda.
  np.testing.assert_allclose(
      E.attribution_lambda(jnp.array([[jnp.nan, 0.75]]), jnp.array([3.0, 3.0]), 1.0, 9.0),
      [3.0, 5.0],
  )

  # Train both groups towards brighter pixels everywhere (both are useful to this loss).
  # Index-tied lambdas call group 0 "region 0", a target, and group 1 off target.
  # Attribution-tied lambdas put lam_out on group 0: the prox removes it, group 1 stays.
  def run(group_lam):
    spec = E.group_spec_for_editor(params, model.region_of_neuron(), lam_in, lam_out, [{0}])
    tx = optim.make_optimizer({"lr": 1e-2, "grad_clip": 1.0}, group_spec=spec)
    opt_state = optim.with_group_lam(tx.init(params), group_lam)
    loss = lambda p: -jnp.mean(decode(model.apply(p, z, attr, gamma, stats=stats)))  # noqa

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    p = params
    for _ in range(40):
      p, opt_state = step(p, opt_state)
    return np.asarray(optim.group_norms(p, spec)), spec, p

  index_lam = E.group_spec_for_editor(
      params, model.region_of_neuron(), lam_in, lam_out, [{0}]
  ).lam_vector()
  np.testing.assert_allclose(index_lam, [lam_in, lam_out])  # the index reading is backwards
  norms_index, spec, _ = run(index_lam)
  # Index-tied: the malicious group survives and the useful one is switched off.
  assert norms_index[0] > 0 and norms_index[1] == 0.0
  norms_attr, _, trained = run(lam)
  assert norms_attr[0] == 0.0 and norms_attr[1] > 0
  # Measured again, the removed group moves nothing (NaN: nothing to attribute).
  _, share_after = measure(trained)
  assert np.isnan(share_after[0, 0]) and np.isfinite(share_after[0, 1])


def test_with_group_lam_replaces_the_prox_lambda_and_checks_its_shape(setup):
  model, stats, params, z = setup
  spec = E.group_spec_for_editor(params, model.region_of_neuron(), 1.0, 5.0, [{0}, {1}, {2}])
  tx = optim.make_optimizer({"lr": 1e-2}, group_spec=spec)
  state = tx.init(params)
  np.testing.assert_allclose(optim.group_lam_of(state), spec.lam_vector())
  new = optim.with_group_lam(state, jnp.arange(K * R, dtype=jnp.float32))
  np.testing.assert_allclose(optim.group_lam_of(new), np.arange(K * R))
  with pytest.raises(ValueError, match="lam shape"):
    optim.with_group_lam(state, jnp.ones(3))
