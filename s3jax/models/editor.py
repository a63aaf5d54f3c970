"""S3Editor: semantic-disentangled, region-sparse transformations of z_id.

Our reading of S3Editor (Wang et al. 2024; see docs/design.md "S3Editor"):

* **Clusters of edits.** The edit directions ``d_a`` (one per attribute, e.g.
  ``sqrt(D) * w_a / ||w_a||`` from the linear attribute classifiers) are
  grouped into K clusters by cosine k-means (:func:`kmeans`).
* **One transformation per cluster.** ``T_k(z) = z + W2 σ(W1 z + b1) + b2``, a
  residual MLP on z_id whose output layer starts at zero, so every ``T_k`` is
  the identity at initialisation. An edit is
  ``x̂ = T(denorm(norm(x) + γ·d_a))`` with ``norm(x) = (x - mean) / std``.
  Hard routing (default) uses only ``T_{cluster(a)}``; soft routing mixes all
  ``T_k`` with ``softmax(cos(d, centroid_k) / temperature)``.
* **Region-tied neuron groups.** The hidden layer has ``R * neurons_per_region``
  neurons; neuron ``i`` belongs to facial region ``i // neurons_per_region``.
  Regions are clusters of the 68 dlib landmarks of a mean face
  (:func:`landmark_regions`). :func:`group_spec_for_editor` builds the
  group-lasso spec (see :mod:`s3jax.optim`): a group is one region's neurons
  in one ``T_k`` — their fan-in (columns of the flax ``W1`` kernel, i.e. rows
  of ``W1`` in ``W1 z`` notation), their ``b1`` entries and their fan-out
  (rows of the flax ``W2`` kernel). A zero group switches those neurons off.
  Groups in regions outside the targets of the cluster's attributes get the
  larger ``lam_out``.

Flax parameter layout (``Editor(...).init(...)['params']``)::

    transform_{k}/W1 (D, H)   transform_{k}/b1 (H,)
    transform_{k}/W2 (H, D)   transform_{k}/b2 (D,)      k = 0..K-1
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s3jax import optim

__all__ = [
    "CELEBA_ATTRIBUTES",
    "SEMANTIC_PARTS",
    "DEFAULT_ATTRIBUTE_PARTS",
    "MEAN_LANDMARKS_68",
    "kmeans",
    "landmark_regions",
    "part_regions",
    "attribute_target_regions",
    "cluster_target_regions",
    "region_of_neuron",
    "EditStats",
    "make_edit_stats",
    "ResidualTransform",
    "Editor",
    "group_spec_for_editor",
    "attribute_regions_used",
]

# ---------------------------------------------------------------------------
# Attributes, semantic parts and the mean face
# ---------------------------------------------------------------------------

# The 40 CelebA(-HQ) attributes in the dataset's standard column order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

# dlib 68-point indexing.
SEMANTIC_PARTS: Dict[str, tuple] = {
    "jaw": tuple(range(0, 17)),  # face outline, cheeks and chin
    "brows": tuple(range(17, 27)),  # also the proxy for forehead / hairline
    "nose": tuple(range(27, 36)),
    "eyes": tuple(range(36, 48)),
    "mouth": tuple(range(48, 68)),
}
_ALL = ("jaw", "brows", "nose", "eyes", "mouth")

# Default attribute -> semantic parts it should be allowed to change.
# Landmarks do not cover hair, ears or neck: hair/hat/forehead attributes use
# the brows (the landmarks next to the hairline) and the face outline; ears
# and neck accessories use the outline. Global attributes use every part.
DEFAULT_ATTRIBUTE_PARTS: Dict[str, tuple] = {
    "5_o_Clock_Shadow": ("jaw", "mouth"),
    "Arched_Eyebrows": ("brows",),
    "Attractive": _ALL,
    "Bags_Under_Eyes": ("eyes",),
    "Bald": ("brows", "jaw"),
    "Bangs": ("brows",),
    "Big_Lips": ("mouth",),
    "Big_Nose": ("nose",),
    "Black_Hair": ("brows", "jaw"),
    "Blond_Hair": ("brows", "jaw"),
    "Blurry": _ALL,
    "Brown_Hair": ("brows", "jaw"),
    "Bushy_Eyebrows": ("brows",),
    "Chubby": ("jaw",),
    "Double_Chin": ("jaw",),
    "Eyeglasses": ("eyes", "brows", "nose"),
    "Goatee": ("mouth", "jaw"),
    "Gray_Hair": ("brows", "jaw"),
    "Heavy_Makeup": ("eyes", "brows", "mouth"),
    "High_Cheekbones": ("jaw", "eyes"),
    "Male": _ALL,
    "Mouth_Slightly_Open": ("mouth",),
    "Mustache": ("mouth", "nose"),
    "Narrow_Eyes": ("eyes",),
    "No_Beard": ("jaw", "mouth"),
    "Oval_Face": ("jaw",),
    "Pale_Skin": _ALL,
    "Pointy_Nose": ("nose",),
    "Receding_Hairline": ("brows",),
    "Rosy_Cheeks": ("jaw", "nose"),
    "Sideburns": ("jaw",),
    "Smiling": ("mouth", "eyes", "jaw"),
    "Straight_Hair": ("brows", "jaw"),
    "Wavy_Hair": ("brows", "jaw"),
    "Wearing_Earrings": ("jaw",),
    "Wearing_Hat": ("brows",),
    "Wearing_Lipstick": ("mouth",),
    "Wearing_Necklace": ("jaw",),
    "Wearing_Necktie": ("jaw",),
    "Young": _ALL,
}

# Target parts of the attributes the classifier demo *measures* on the sample
# (s3jax.training.classifier.MEASURED_ATTRIBUTES); photometric ones are global.
MEASURED_ATTRIBUTE_PARTS: Dict[str, tuple] = {
    "Bright_Face": _ALL,
    "Warm_Tint": _ALL,
    "Lit_From_Left": _ALL,
    "Mouth_Wide": ("mouth",),
    "Eyes_Open": ("eyes",),
}
# Every attribute S3Editor knows the target parts of.
PART_TABLE: Dict[str, tuple] = {**DEFAULT_ATTRIBUTE_PARTS, **MEASURED_ATTRIBUTE_PARTS}

# A mean frontal face in dlib 68-point order, (x, y) in [0, 1] of the face
# box (y grows downwards; the chin reaches ~1.06). Values are the widely used
# OpenFace mean-shape template (Apache-2.0), rounded to 3 decimals. It is only
# the default input of `landmark_regions`; pass your data set's mean instead.
MEAN_LANDMARKS_68 = np.array(
    [
        (0.079, 0.339),
        (0.083, 0.457),
        (0.097, 0.576),
        (0.122, 0.692),
        (0.169, 0.800),
        (0.240, 0.896),
        (0.326, 0.977),
        (0.422, 1.043),
        (0.532, 1.061),
        (0.641, 1.040),
        (0.738, 0.972),
        (0.824, 0.890),
        (0.895, 0.792),
        (0.939, 0.682),
        (0.961, 0.562),
        (0.971, 0.442),
        (0.971, 0.322),
        (0.164, 0.249),
        (0.218, 0.204),
        (0.291, 0.192),
        (0.367, 0.204),
        (0.439, 0.233),
        (0.586, 0.228),
        (0.660, 0.196),
        (0.737, 0.182),
        (0.813, 0.193),
        (0.871, 0.235),
        (0.515, 0.319),
        (0.516, 0.396),
        (0.517, 0.474),
        (0.518, 0.553),
        (0.434, 0.604),
        (0.476, 0.621),
        (0.521, 0.634),
        (0.566, 0.619),
        (0.607, 0.602),
        (0.252, 0.331),
        (0.299, 0.303),
        (0.356, 0.303),
        (0.404, 0.339),
        (0.353, 0.350),
        (0.297, 0.350),
        (0.631, 0.334),
        (0.679, 0.296),
        (0.736, 0.295),
        (0.783, 0.321),
        (0.740, 0.342),
        (0.685, 0.344),
        (0.353, 0.746),
        (0.415, 0.719),
        (0.478, 0.707),
        (0.523, 0.717),
        (0.570, 0.705),
        (0.635, 0.716),
        (0.700, 0.739),
        (0.639, 0.805),
        (0.576, 0.835),
        (0.525, 0.842),
        (0.476, 0.838),
        (0.414, 0.810),
        (0.380, 0.750),
        (0.478, 0.745),
        (0.523, 0.749),
        (0.571, 0.743),
        (0.672, 0.744),
        (0.573, 0.777),
        (0.524, 0.783),
        (0.478, 0.778),
    ],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------
# Clustering
# ---------------------------------------------------------------------------


def _relabel_by_first_appearance(assign, centroids):
  order = []
  for a in assign:
    if a not in order:
      order.append(int(a))
  order += [k for k in range(len(centroids)) if k not in order]
  remap = np.empty(len(order), np.int64)
  remap[order] = np.arange(len(order))
  return remap[assign], centroids[order]


def kmeans(directions, K: int, seed: int = 0, *, n_init: int = 8, max_iter: int = 100):
  """Cosine (spherical) k-means on edit directions, k-means++ initialised.

  Args:
    directions: (A, D) edit directions; rows are L2-normalised first.
    K: number of clusters (1 <= K <= A).
    seed: numpy seed; the result is a deterministic function of
      (directions, K, seed, n_init, max_iter).
  Returns:
    ``(assignments (A,) int32, centroids (K, D) float32)``; centroids are
    unit vectors, every cluster is non-empty, and clusters are numbered in
    order of first appearance along the attribute axis.
  """
  x = np.asarray(directions, np.float64)
  if x.ndim != 2:
    raise ValueError(f"directions must be (A, D), got {x.shape}")
  n = x.shape[0]
  if not 1 <= K <= n:
    raise ValueError(f"K={K} must be between 1 and the number of directions {n}")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if np.any(norms == 0):
    raise ValueError("zero edit direction cannot be clustered by cosine")
  x = x / norms
  rng = np.random.default_rng(seed)
  best = None
  for _ in range(max(1, n_init)):
    # k-means++ with distance 1 - cos.
    idx = [int(rng.integers(n))]
    for _k in range(1, K):
      dist = np.clip(1.0 - np.max(x @ x[idx].T, axis=1), 0.0, None)
      dist[idx] = 0.0
      p = dist**2
      if p.sum() <= 0:  # all remaining points coincide with centres
        cand = [i for i in range(n) if i not in idx]
        idx.append(int(cand[rng.integers(len(cand))]))
      else:
        idx.append(int(rng.choice(n, p=p / p.sum())))
    c = x[idx].copy()
    assign = None
    for _it in range(max_iter):
      sim = x @ c.T
      new = np.argmax(sim, axis=1)
      # Re-seed empty clusters with the worst-fitted point.
      for k in range(K):
        if not np.any(new == k):
          fit = sim[np.arange(n), new]
          counts = np.bincount(new, minlength=K)
          order = np.argsort(fit, kind="stable")
          j = next(int(i) for i in order if counts[new[i]] > 1)
          new[j] = k
      if assign is not None and np.array_equal(new, assign):
        break
      assign = new
      for k in range(K):
        m = x[assign == k].sum(axis=0)
        nm = np.linalg.norm(m)
        c[k] = m / nm if nm > 0 else x[assign == k][0]
    score = float(np.sum(x * c[assign]))
    if best is None or score > best[0] + 1e-12:
      best = (score, assign.copy(), c.copy())
  assign, c = _relabel_by_first_appearance(best[1], best[2])
  return assign.astype(np.int32), c.astype(np.float32)


def landmark_regions(
    mean_landmarks68=None, R: int = 6, seed: int = 0, *, n_init: int = 8, max_iter: int = 100
) -> np.ndarray:
  """Partition the 68 landmarks into R regions by Euclidean k-means.

  Args:
    mean_landmarks68: (68, 2) mean landmark positions (default
      :data:`MEAN_LANDMARKS_68`).
    R: number of regions (1 <= R <= 68).
  Returns:
    (68,) int32 region id per landmark. Every region is non-empty; regions
    are numbered top-to-bottom then left-to-right by their centroid.
  """
  pts = np.asarray(MEAN_LANDMARKS_68 if mean_landmarks68 is None else mean_landmarks68, np.float64)
  if pts.shape != (68, 2):
    raise ValueError(f"expected (68, 2) landmarks, got {pts.shape}")
  if not 1 <= R <= 68:
    raise ValueError(f"R={R} must be in [1, 68]")
  n = 68
  rng = np.random.default_rng(seed)
  best = None
  for _ in range(max(1, n_init)):
    idx = [int(rng.integers(n))]
    for _k in range(1, R):
      d2 = np.min(((pts[:, None] - pts[idx][None]) ** 2).sum(-1), axis=1)
      d2[idx] = 0.0
      idx.append(
          int(rng.choice(n, p=d2 / d2.sum()))
          if d2.sum() > 0
          else int(next(i for i in range(n) if i not in idx))
      )
    c = pts[idx].copy()
    assign = None
    for _it in range(max_iter):
      d2 = ((pts[:, None] - c[None]) ** 2).sum(-1)
      new = np.argmin(d2, axis=1)
      for k in range(R):
        if not np.any(new == k):
          fit = d2[np.arange(n), new]
          counts = np.bincount(new, minlength=R)
          order = np.argsort(-fit, kind="stable")
          j = next(int(i) for i in order if counts[new[i]] > 1)
          new[j] = k
      if assign is not None and np.array_equal(new, assign):
        break
      assign = new
      c = np.stack([pts[assign == k].mean(0) for k in range(R)])
    inertia = float(((pts - c[assign]) ** 2).sum())
    if best is None or inertia < best[0] - 1e-12:
      best = (inertia, assign.copy(), c.copy())
  _, assign, c = best
  order = np.lexsort((np.round(c[:, 0], 6), np.round(c[:, 1], 6)))  # by y, then x
  remap = np.empty(R, np.int64)
  remap[order] = np.arange(R)
  return remap[assign].astype(np.int32)


def part_regions(
    region_of_landmark,
    parts: Mapping[str, Sequence[int]] = None,
    min_points: int = 1,
    min_fraction: float = 0.0,
) -> Dict[str, tuple]:
  """Semantic part -> sorted ids of the regions its landmarks fall in.

  Region ``r`` serves part ``p`` when at least ``min_points`` of p's
  landmarks lie in ``r`` and they make up at least ``min_fraction`` of r's
  landmarks. The defaults (any landmark) follow the letter of "which
  landmarks fall in each region"; since the 17 jaw points spread over the
  whole outline, ``min_fraction`` around 0.25 keeps regions that are mostly
  eyes/brows from also counting as "jaw". A part that would get no region
  gets the one holding most of its landmarks.
  """
  parts = SEMANTIC_PARTS if parts is None else parts
  reg = np.asarray(region_of_landmark)
  region_size = np.bincount(reg, minlength=int(reg.max()) + 1)
  out = {}
  for name, idx in parts.items():
    r, counts = np.unique(reg[list(idx)], return_counts=True)
    keep = tuple(
        int(v) for v, c in zip(r, counts) if c >= min_points and c >= min_fraction * region_size[v]
    )
    # Never leave a part without a region: fall back to the region that
    # holds most of its landmarks.
    out[name] = keep if keep else (int(r[np.argmax(counts)]),)
  return out


def attribute_target_regions(
    region_of_landmark,
    attributes: Sequence[str] = CELEBA_ATTRIBUTES,
    table: Mapping[str, Sequence[str]] = None,
    parts: Mapping[str, Sequence[int]] = None,
    min_points: int = 1,
    min_fraction: float = 0.0,
) -> list:
  """Per attribute, the set of regions covering its semantic parts."""
  table = DEFAULT_ATTRIBUTE_PARTS if table is None else table
  pr = part_regions(region_of_landmark, parts, min_points, min_fraction)
  out = []
  for a in attributes:
    if a not in table:
      raise KeyError(f"attribute {a!r} has no entry in the part table")
    out.append(frozenset(r for p in table[a] for r in pr[p]))
  return out


def target_table(region_sets, num_regions: int) -> np.ndarray:
  """(attributes, R) bool: row i marks the regions of ``region_sets[i]``."""
  table = np.zeros((len(region_sets), num_regions), bool)
  for i, regions in enumerate(region_sets):
    table[i, sorted(regions)] = True
  return table


def cluster_target_regions(assignments, attr_target_regions, K: Optional[int] = None) -> list:
  """Per cluster, the union of its attributes' target regions."""
  assignments = np.asarray(assignments)
  K = int(assignments.max()) + 1 if K is None else K
  out = [set() for _ in range(K)]
  for a, k in enumerate(assignments):
    out[int(k)] |= set(attr_target_regions[a])
  return [frozenset(s) for s in out]


def region_of_neuron(num_regions: int, neurons_per_region: int) -> np.ndarray:
  """Region id of each hidden neuron: contiguous blocks of ``neurons_per_region``."""
  return np.repeat(np.arange(num_regions, dtype=np.int32), neurons_per_region)


# ---------------------------------------------------------------------------
# The editor module
# ---------------------------------------------------------------------------


def _array_module(*xs):
  """numpy when every input is host data, else jax.numpy (traced or device arrays)."""
  host = all(isinstance(x, (np.ndarray, np.generic, float, int)) for x in xs)
  return np if host else jnp


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) over the last axis, in x's array module and dtype."""
  xp = _array_module(x)
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


def edit_direction(weight, scale: Optional[float] = None):
  """``scale * w / ||w||`` over the last axis; scale defaults to sqrt(D).

  docs/design.md "Classifier editing": a classifier weight column becomes
  the step in normalised z_id space.
  """
  xp = _array_module(weight)
  d = weight.shape[-1]
  scale = float(np.sqrt(d)) if scale is None else float(scale)
  return scale * weight / xp.maximum(xp.linalg.norm(weight, axis=-1, keepdims=True), 1e-12)


def classifier_edit(z, direction, strength, mean, std, normalize: bool = False):
  """The one z_id edit: ``denorm(norm(z) + strength * direction)``, optionally L2-normalised.

  ``norm``/``denorm`` use the classifier's per-dimension mean/std; ``direction``
  comes from :func:`edit_direction`. Works on numpy (in its dtype, e.g. float64
  for the editor's host path) and on jax arrays (inside jit); ``strength``
  broadcasts against ``z`` (pass (B, 1) for per-row strengths).
  """
  x = ((z - mean) / std + strength * direction) * std + mean
  return l2_normalize(x) if normalize else x


def region_map(landmarks, region_of_landmark, size: int, resolution: int = 64):
  """(n, 68, 2) crop-pixel landmarks -> (n, size, size) region id of the nearest landmark.

  Computed on a ``min(size, resolution)`` grid and repeated up to ``size``
  (nearest-neighbour), which keeps the (pixels x 68) distance table small.
  """
  res = min(size, resolution)
  if size % res:
    res = size
  scale = size / res
  c = (jnp.arange(res, dtype=jnp.float32) + 0.5) * scale - 0.5
  gy, gx = jnp.meshgrid(c, c, indexing="ij")
  grid = jnp.stack([gx, gy], -1).reshape(-1, 2)  # (P, 2) as (x, y)
  lm = jnp.asarray(landmarks, jnp.float32)
  d2 = (
      jnp.sum(grid**2, -1)[None, :, None]
      - 2.0 * jnp.einsum("pc,nlc->npl", grid, lm)
      + jnp.sum(lm**2, -1)[:, None, :]
  )
  nearest = jnp.argmin(d2, axis=-1)
  reg = jnp.asarray(region_of_landmark, jnp.int32)[nearest].reshape(-1, res, res)
  if res != size:
    f = size // res
    reg = jnp.repeat(jnp.repeat(reg, f, axis=1), f, axis=2)
  return reg


class EditStats(NamedTuple):
  """Constant tables an :class:`Editor` call needs (a pytree of arrays).

  mean, std: (D,) normalisation statistics of z_id.
  directions: (A, D) edit direction per attribute (already scaled).
  assignments: (A,) int cluster of each attribute.
  centroids: (K, D) unit cluster centroids (for soft routing / raw directions).
  """

  mean: Any
  std: Any
  directions: Any
  assignments: Any
  centroids: Any


def make_edit_stats(
    classifier_weights, mean, std, num_clusters: int, seed: int = 0, scale: Optional[float] = None
) -> EditStats:
  """Edit directions ``scale * w_a / ||w_a||`` (scale defaults to sqrt(D), as in
  docs/design.md "Classifier editing") and their cosine k-means clusters."""
  dirs = edit_direction(np.asarray(classifier_weights, np.float32), scale)
  assign, cents = kmeans(dirs, num_clusters, seed)
  return EditStats(
      mean=jnp.asarray(mean, jnp.float32),
      std=jnp.asarray(std, jnp.float32),
      directions=jnp.asarray(dirs),
      assignments=jnp.asarray(assign),
      centroids=jnp.asarray(cents),
  )


class ResidualTransform(nn.Module):
  """``z + W2 σ(W1 z + b1) + b2`` with zero-initialised ``W2``, ``b2``."""

  hidden: int
  activation: Callable = nn.silu
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, z):
    d = z.shape[-1]
    w1 = self.param("W1", self.kernel_init, (d, self.hidden), jnp.float32)
    b1 = self.param("b1", nn.initializers.zeros, (self.hidden,), jnp.float32)
    w2 = self.param("W2", nn.initializers.zeros, (self.hidden, d), jnp.float32)
    b2 = self.param("b2", nn.initializers.zeros, (d,), jnp.float32)
    return residual_transform(z, w1, b1, w2, b2, self.activation)[0]


def residual_transform(z, w1, b1, w2, b2, activation=nn.silu):
  """``(z + W2 σ(W1 z + b1) + b2, hidden activations σ(W1 z + b1))`` (batched over the front)."""
  h = activation(jnp.einsum("...d,...dh->...h", z, w1) + b1)
  return z + jnp.einsum("...h,...hd->...d", h, w2) + b2, h


def _cos_to_centroids(d, centroids):
  d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
  c = centroids / jnp.maximum(jnp.linalg.norm(centroids, axis=-1, keepdims=True), 1e-12)
  return d @ c.T


class Editor(nn.Module):
  """K routed residual transformations of z_id (S3Editor).

  Attributes:
    num_clusters: K.
    num_regions: R, number of landmark regions owning neuron groups.
    neurons_per_region: hidden width is ``R * neurons_per_region``.
    routing: ``'hard'`` (only the attribute's cluster) or ``'soft'``.
    temperature: soft-routing softmax temperature over cosine similarities.
    activation: σ.
    normalize_output: L2-normalise x̂ (z_id is unit-norm in DVA); off by
      default so that the module is exactly ``T(denorm(norm(x)+γd))``.
  """

  num_clusters: int
  num_regions: int
  neurons_per_region: int = 16
  routing: str = "hard"
  temperature: float = 0.1
  activation: Callable = nn.silu
  normalize_output: bool = False

  @property
  def hidden(self) -> int:
    return self.num_regions * self.neurons_per_region

  def region_of_neuron(self) -> np.ndarray:
    return region_of_neuron(self.num_regions, self.neurons_per_region)

  @nn.compact
  def __call__(
      self,
      z_id,
      direction_or_attr_index,
      strength,
      *,
      stats: EditStats,
      routing: Optional[str] = None,
      return_weights: bool = False,
  ):
    """Edit ``z_id`` (B, D) or (D,).

    ``direction_or_attr_index``: integer attribute index (scalar or (B,)),
    looked up in ``stats.directions`` and routed by ``stats.assignments``;
    or a float direction (D,) or (B, D), routed to the centroid of highest
    cosine (hard) or by softmax of cosines (soft).
    ``strength``: γ, scalar or (B,).
    Returns x̂ (same shape as ``z_id``), plus the (B, K) routing weights if
    ``return_weights``.
    """
    routing = self.routing if routing is None else routing
    if routing not in ("hard", "soft"):
      raise ValueError(f"routing must be 'hard' or 'soft', got {routing!r}")
    z = jnp.asarray(z_id, jnp.float32)
    squeeze = z.ndim == 1
    if squeeze:
      z = z[None]
    b = z.shape[0]
    sel = jnp.asarray(direction_or_attr_index)
    if jnp.issubdtype(sel.dtype, jnp.integer):
      attr = jnp.broadcast_to(sel, (b,))
      d = jnp.take(jnp.asarray(stats.directions, jnp.float32), attr, axis=0)
      cluster = jnp.take(jnp.asarray(stats.assignments), attr, axis=0)
    else:
      d = jnp.broadcast_to(sel.astype(jnp.float32), z.shape)
      cluster = None
    gamma = jnp.broadcast_to(jnp.asarray(strength, jnp.float32), (b,))[:, None]
    mean = jnp.asarray(stats.mean, jnp.float32)
    std = jnp.asarray(stats.std, jnp.float32)
    x = classifier_edit(z, d, gamma, mean, std)

    k_total = self.num_clusters
    if routing == "hard":
      if cluster is None:
        cluster = jnp.argmax(_cos_to_centroids(d, jnp.asarray(stats.centroids)), axis=-1)
      weights = jax.nn.one_hot(cluster, k_total, dtype=jnp.float32)
    else:
      cos = _cos_to_centroids(d, jnp.asarray(stats.centroids, jnp.float32))
      weights = jax.nn.softmax(cos / self.temperature, axis=-1)

    out = jnp.zeros_like(x)
    for k in range(k_total):
      yk = ResidualTransform(self.hidden, self.activation, name=f"transform_{k}")(x)
      wk = weights[:, k : k + 1]
      if routing == "hard":
        # `where`, not multiply: the unselected transforms get exactly
        # zero cotangent (even if their output were inf/nan).
        out = out + jnp.where(wk > 0, yk, 0.0)
      else:
        out = out + wk * yk
    if self.normalize_output:
      out = l2_normalize(out)
    if squeeze:
      out = out[0]
    return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------
# Attribution: which facial regions each neuron group moves
# ---------------------------------------------------------------------------


def group_ablations(
    editor_params,
    z_id,
    attr,
    gamma,
    *,
    stats: EditStats,
    num_groups: int,
    neurons_per_group: int,
    normalize_output: bool,
    activation: Callable = nn.silu,
):
  """The hard-routed edit of each row, and the same edit with each neuron group of its own
  ``T_k`` switched off (that group's hidden units contribute nothing).

  ``editor_params``: the :class:`Editor`'s params (``transform_k/{W1,b1,W2,b2}``). Group
  ``g`` is hidden units ``g*neurons_per_group ... (g+1)*neurons_per_group - 1``, as in
  :func:`group_spec_for_editor`. Returns ``(x_hat (B, D), x_without (G, B, D), activation
  (G, B))``, where ``activation`` is the mean absolute activation of the group's units.
  """
  z = jnp.asarray(z_id, jnp.float32)
  attr = jnp.asarray(attr)
  d = jnp.take(jnp.asarray(stats.directions, jnp.float32), attr, axis=0)
  cluster = jnp.take(jnp.asarray(stats.assignments), attr, axis=0)
  gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), attr.shape)[:, None]
  x = classifier_edit(z, d, gamma, jnp.asarray(stats.mean), jnp.asarray(stats.std))
  k_total = len([k for k in editor_params if k.startswith("transform_")])
  stacked = {
      n: jnp.stack([editor_params[f"transform_{k}"][n] for k in range(k_total)])[cluster]
      for n in ("W1", "b1", "W2", "b2")
  }
  y, h = residual_transform(
      x, stacked["W1"], stacked["b1"], stacked["W2"], stacked["b2"], activation
  )
  b = h.shape[0]
  h_groups = h.reshape(b, num_groups, neurons_per_group)
  w2_groups = stacked["W2"].reshape(b, num_groups, neurons_per_group, -1)
  # (G, B, D): each group's share of the residual.
  contribution = jnp.einsum("bgn,bgnd->gbd", h_groups, w2_groups)
  without = y[None] - contribution
  post = l2_normalize if normalize_output else (lambda v: v)
  return post(y), post(without), jnp.mean(jnp.abs(h_groups), axis=-1).T


def group_attribution(pixel_change, region_map, activation, cluster, num_clusters, num_regions):
  """The K x G x R attribution table.

  ``pixel_change`` (G, B, H, W): the decoded change when group g of row b's transform is
  switched off; ``region_map`` (B, H, W): each pixel's landmark region; ``activation`` (G, B);
  ``cluster`` (B,): the transform each row was routed to. Entry ``[k, g, r]`` is the mean
  change of region r's pixels per unit of group g's mean activation, averaged over the rows
  routed to k (0 where no row was).
  """
  onehot = jax.nn.one_hot(region_map, num_regions, dtype=jnp.float32)  # (B, H, W, R)
  area = jnp.maximum(jnp.sum(onehot, axis=(1, 2)), 1.0)  # (B, R)
  per_region = jnp.einsum("gbhw,bhwr->gbr", pixel_change, onehot) / area[None]
  per_unit = per_region / (activation[..., None] + 1e-6)
  routed = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.float32)  # (B, K)
  count = jnp.maximum(jnp.sum(routed, axis=0), 1.0)
  return jnp.einsum("gbr,bk->kgr", per_unit, routed) / count[:, None, None]


def group_off_target_share(pixel_change, inside, cluster, num_clusters):
  """(K, G) share of each group's change that lands outside the edits' target regions.

  Per row, the mean change per outside pixel and per inside pixel (``inside`` (B, H, W):
  1 on the row's attribute's target regions); summed over the rows routed to each cluster,
  share = outside / (outside + inside). NaN where those rows moved nothing (a group that
  is off, or a cluster no row was routed to); rows without outside or inside pixels count
  only on the side they have.
  """
  inside = inside.astype(jnp.float32)
  outside = 1.0 - inside
  mean_over = lambda m: jnp.einsum("gbhw,bhw->gb", pixel_change, m) / jnp.maximum(  # noqa: E731
      jnp.sum(m, axis=(1, 2)), 1.0
  )
  routed = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.float32)
  off = jnp.einsum("gb,bk->kg", mean_over(outside), routed)
  on = jnp.einsum("gb,bk->kg", mean_over(inside), routed)
  total = off + on
  return jnp.where(total > 0, off / jnp.where(total > 0, total, 1.0), jnp.nan)


def measure_group_attribution(
    editor_params,
    z,
    attr,
    gamma,
    *,
    stats: EditStats,
    decode_fn: Callable,
    region_map,
    targets,
    num_groups: int,
    neurons_per_group: int,
    normalize_output: bool,
    previous_lam,
    lam_in: float,
    lam_out: float,
    threshold: float = 0.5,
):
  """One attribution measurement, whatever decodes the edit (the DVA, a GAN generator).

  Decodes the hard-routed edit of every row of ``z`` and the same edit with each neuron group
  of its ``T_k`` switched off (:func:`group_ablations`), one ``decode_fn(x (B, D)) -> images
  (B, H, W, C)`` call per variant (``lax.map``: memory of one variant). ``region_map`` (B, H, W)
  holds each pixel's landmark region, ``targets`` (A, R) the attribute -> target-region table.
  Returns ``{'table': (K, G, R) group_attribution, 'off_share': (K, G), 'lam': (K * G,)}``
  with the lambda of :func:`attribution_lambda` (``previous_lam`` where nothing was measured).
  """
  x_hat, x_without, act = group_ablations(
      editor_params,
      z,
      attr,
      gamma,
      stats=stats,
      num_groups=num_groups,
      neurons_per_group=neurons_per_group,
      normalize_output=normalize_output,
  )
  decoded = jax.lax.map(decode_fn, jnp.concatenate([x_hat[None], x_without]))
  change = jnp.mean(jnp.abs(decoded[:1] - decoded[1:]), axis=-1)  # (G, B, H, W)
  inside = jnp.asarray(targets)[attr[:, None, None], region_map]
  cluster = jnp.take(jnp.asarray(stats.assignments), attr)
  k_total = int(jnp.shape(stats.centroids)[0])
  share = group_off_target_share(change, inside, cluster, k_total)
  lam = attribution_lambda(share, previous_lam, lam_in, lam_out, threshold)
  table = group_attribution(change, region_map, act, cluster, k_total, num_groups)
  return {"table": table, "off_share": share, "lam": lam}


def attribution_lambda(off_share, previous, lam_in, lam_out, threshold=0.5):
  """Per-group lambda from measured off-target shares, (K, G) -> (K * G,) in group-id order.

  A group whose share exceeds ``threshold`` is "malicious" in proportion to the excess:
  ``lam = lam_in + (lam_out - lam_in) * clip((share - threshold) / (1 - threshold), 0, 1)``.
  Where the share is NaN (nothing measured) the ``previous`` lambda stays.
  """
  excess = jnp.clip((off_share - threshold) / (1.0 - threshold), 0.0, 1.0)
  lam = lam_in + (lam_out - lam_in) * excess
  return jnp.where(jnp.isnan(off_share), previous.reshape(off_share.shape), lam).reshape(-1)


# ---------------------------------------------------------------------------
# Group-lasso spec for the editor
# ---------------------------------------------------------------------------


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _transform_leaf(path):
  """(k, name) if ``path`` ends in ``transform_k/{W1,b1,W2}``, else None."""
  names = [_key_name(k) for k in path]
  if len(names) >= 2 and names[-2].startswith("transform_") and names[-1] in ("W1", "b1", "W2"):
    return int(names[-2][len("transform_") :]), names[-1]
  return None


def group_spec_for_editor(
    params,
    region_of_neuron,
    lam_in: float,
    lam_out: float,
    target_regions_per_cluster: Sequence[Sequence[int]],
    *,
    per_neuron: bool = False,
) -> optim.GroupSpec:
  """Group-lasso spec for :class:`Editor` params.

  ``params`` (arrays or ``jax.eval_shape`` structs) may be the editor's own
  (``{'params': {'transform_k': ...}}``) or any tree holding them, e.g.
  S3Editor's ``{'editor': ..., 'dva': ...}``; the spec's id tree mirrors the
  whole of it, with every leaf outside ``transform_k/{W1,b1,W2}`` ungrouped.

  A group is the set of hidden neurons of one region in one ``T_k``
  (``per_neuron=True``: every neuron its own group), spanning their ``W1``
  fan-in, ``b1`` entry and ``W2`` fan-out; ``b2`` is not regularised.
  Group ids: ``k * R + r`` (per neuron: ``k * H + i``). ``group_lam`` is
  ``lam_in`` where the region is one of ``target_regions_per_cluster[k]``,
  else ``lam_out``. ``group_info`` records cluster, region, on_target and
  the neuron indices of every group (used by ``optim.sparsity_report``).
  Use with ``optim.group_lasso_prox(spec, lam=1.0, learning_rate=lr)``.

  Note: a switched-off group (zero fan-in, bias and fan-out, and σ(0) = 0
  as for silu/tanh/relu) receives exactly zero gradient, so it is a
  stationary point and does not come back by itself; only leftover Adam
  momentum from before it was zeroed can push it out again, and only while
  that step exceeds ``lr * lam_g``.
  """
  ron = np.asarray(region_of_neuron, np.int32)
  h = ron.shape[0]
  r_total = int(ron.max()) + 1
  found: Dict[int, set] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    hit = _transform_leaf(path)
    if hit is not None:
      k, name = hit
      if name in found.setdefault(k, set()):
        # Two transform_k subtrees (e.g. one inside the DVA) would share ids.
        raise ValueError(f"transform_{k}/{name} found twice in params")
      found[k].add(name)
  if not found:
    raise ValueError("no transform_k/W1,b1,W2 leaves found in params")
  k_total = max(found) + 1
  if sorted(found) != list(range(k_total)):
    raise ValueError(f"transform indices {sorted(found)} are not 0..K-1")
  if len(target_regions_per_cluster) != k_total:
    raise ValueError(
        f"{len(target_regions_per_cluster)} target-region sets given "
        f"for {k_total} transformations"
    )
  ids_of = {}
  lam = []
  info = []
  for k in range(k_total):
    missing = {"W1", "b1", "W2"} - found[k]
    if missing:
      raise ValueError(f"transform_{k} has no {sorted(missing)[0]}")
    targets = {int(r) for r in target_regions_per_cluster[k]}
    if per_neuron:
      ids_of[k] = k * h + np.arange(h, dtype=np.int32)
      for i in range(h):
        on = int(ron[i]) in targets
        lam.append(lam_in if on else lam_out)
        info.append({"cluster": k, "region": int(ron[i]), "on_target": on, "neurons": (i,)})
    else:
      ids_of[k] = k * r_total + ron
      for r in range(r_total):
        on = r in targets
        lam.append(lam_in if on else lam_out)
        info.append(
            {
                "cluster": k,
                "region": r,
                "on_target": on,
                "neurons": tuple(int(i) for i in np.flatnonzero(ron == r)),
            }
        )
  neuron_axis = {"W1": 1, "b1": 0, "W2": 0}  # W1 columns, b1 entries, W2 rows

  def leaf_groups(path, _):
    hit = _transform_leaf(path)
    if hit is None:
      return None
    k, name = hit
    return optim.LeafGroups(axes=(neuron_axis[name],), group_ids=ids_of[k])

  return optim.GroupSpec(
      group_ids=jax.tree_util.tree_map_with_path(leaf_groups, params),
      num_groups=len(lam),
      group_lam=np.asarray(lam, np.float32),
      group_info=tuple(info),
  )


def attribute_regions_used(
    params, spec: optim.GroupSpec, assignments, attributes: Sequence[str] = CELEBA_ATTRIBUTES
) -> dict:
  """For each attribute, the regions whose neuron groups in its cluster's
  transformation are still active (non-zero), after sparse training."""
  rep = optim.sparsity_report(params, spec)["per_cluster"]
  assignments = np.asarray(assignments)
  return {
      name: tuple(rep[int(assignments[a])]["active_regions"])
      for a, name in enumerate(attributes[: len(assignments)])
  }
