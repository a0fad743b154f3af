"""Merge methods: pure functions that merge ONE parameter tensor of several fine-tuned experts.

Calling convention (every entry of `METHODS`)::

  merged = fn(base, experts, weights=None, *, out_dtype=None, **params)

  base     [*shape]     the base model's tensor θ_base (`linear` ignores it and accepts None).
  experts  [n, *shape]  the experts' tensors θ_i, stacked, or a sequence of n [*shape] arrays.
  weights  [n] or None  per-expert weights w_i (None: all 1.0).
  out_dtype             dtype of the result (default: base's, else the experts'). All
                        arithmetic is float32 whatever the input dtype.

Arrays may be numpy or (sharded) jax.Arrays; the work runs in jitted kernels, so a sharded
input stays sharded (only DELLA's per-tensor ranking sort gathers the tensor it ranks). A
streaming caller applies fn parameter by parameter. Registry fields (`MergeMethod`) say what
else a method needs:
  `random`: `seed` and the parameter `name` (DARE, DELLA): expert i's random mask for
    parameter `name` comes from `parameter_key(seed, name, i)`, so a merge is reproducible
    and independent of the order in which parameters are processed.
  `magnitude_ranks(entries, n, **params)`: methods that cut task vectors at magnitude
    thresholds (TIES, Breadcrumbs) say which order statistics they cut at. By default each tensor is cut
    at its own thresholds ("per tensor", as mergekit does); to cut over the whole model (the
    TIES reference code), compute for every rank array r of `magnitude_ranks(total_entries,
    n, ...)` the r_i-th largest |τ_i| over the model with `merging.topk.kth_largest_magnitude(
    stream of stacked [n, ...] task vectors, r, batched=True)` and pass the results as
    `thresholds=(t_1, ...)` to every call.

Notation: τ_i = θ_i − θ_base (task vector), d = `density` (fraction of a task vector kept),
λ = `lam` (scale of the merged task vector), `normalize`, `consensus`. Order of operations
(mergekit's "generalized task arithmetic", which all task-vector methods here share):

  1. τ_i = θ_i − θ_base.
  2. Sparsify each τ_i on its own, weights not involved: τ'_i = S(τ_i; d_i, ...).
  3. Weight: u_i = w_i τ'_i.
  4. Consensus methods elect a sign per entry, BEFORE any normalisation and AFTER weighting:
       "mass":  s = sgn(Σ_i u_i)          "count":  s = sgn(Σ_i sgn(u_i))
     with s = +1 where the sum is 0; entry i agrees where sgn(u_i) = s (zeros never agree).
       δ = Σ_i [agree_i] u_i,   D = Σ_i [agree_i] w_i   (D = 0 -> 1)
     Without consensus: δ = Σ_i u_i, D = Σ_i w_i (|D| < 1e-8 -> 1).
  5. If normalize: δ = δ / D (the weighted disjoint mean for consensus methods).
  6. θ = θ_base + λ δ.

Magnitude cuts keep |τ| >= t (ties at a threshold are all kept) and count k = ceil(d · N)
entries of N (see `merging.topk`; `count="floor"` takes mergekit's int(d · N)). Differences from the TIES paper's code: it trims over the
whole model (pass global thresholds), breaks a zero sign sum by the sign of the total mass of
the whole vector instead of +1, and has no weights.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from merging import topk

Experts = Union[jax.Array, np.ndarray, Sequence[Any]]
PerExpert = Union[float, Sequence[float]]


# ---------------------------------------------------------------------------------------------
# Input handling.


def _as_f32(x) -> jax.Array:
  return x.astype(jnp.float32) if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)


def _prepare(base, experts: Experts, weights, out_dtype, *, needs_base: bool = True):
  """float32 base [*shape], experts [n, *shape], host weights [n] float32 and the out dtype."""
  if base is None and needs_base:
    raise ValueError("this merge method needs the base model's tensor, got base=None")
  if isinstance(experts, (jax.Array, np.ndarray)):
    stacked = _as_f32(experts)
    dtype = experts.dtype
  else:
    if not len(experts):
      raise ValueError("experts is empty; need at least one expert tensor")
    shapes = {tuple(np.shape(e)) for e in experts}
    if len(shapes) != 1:
      raise ValueError(f"experts have different shapes {sorted(shapes)}")
    stacked = jnp.stack([_as_f32(e) for e in experts])
    dtype = getattr(experts[0], "dtype", np.float32)
  if base is not None:
    if tuple(stacked.shape[1:]) != tuple(np.shape(base)):
      raise ValueError(f"experts have shape {tuple(stacked.shape[1:])} per expert, base has "
                       f"{tuple(np.shape(base))}")
    dtype = base.dtype
    base = _as_f32(base)
  n = stacked.shape[0]
  w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
  if w.shape != (n,):
    raise ValueError(f"weights must have one entry per expert ({n}), got shape {w.shape}")
  return base, stacked, w, jnp.dtype(out_dtype if out_dtype is not None else dtype)


def per_expert(value: PerExpert, n: int, what: str) -> np.ndarray:
  """A scalar or n values in [0, 1] -> float64 [n]."""
  values = np.asarray(value, np.float64)
  if values.ndim == 0:
    values = np.full(n, values)
  if values.shape != (n,):
    raise ValueError(f"{what} must be a number or one per expert ({n}), got {value!r}")
  if np.any((values < 0) | (values > 1)):
    raise ValueError(f"{what} must be in [0, 1], got {value!r}")
  return values


def _check_consensus(consensus, allow_none: bool):
  allowed = ("mass", "count") + ((None,) if allow_none else ())
  if consensus not in allowed:
    raise ValueError(f"consensus must be one of {allowed}, got {consensus!r}")


def parameter_key(seed: int, name: str, expert_index: int) -> jax.Array:
  """PRNG key for expert `expert_index`'s random mask of parameter `name`.

  fold_in(fold_in(fold_in(key(seed), h0), h1), expert_index), h0 and h1 the first two
  little-endian uint32 words of sha256(name): independent of processing order and process.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"random merge methods need the parameter name (a non-empty str) to "
                     f"derive reproducible masks, got {name!r}")
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  key = jax.random.key(seed)
  for word in (int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little"),
               expert_index):
    key = jax.random.fold_in(key, word)
  return key


def _keys(seed, name, n) -> jax.Array:
  if seed is None:
    raise ValueError("random merge methods need an integer seed, got seed=None")
  return jnp.stack([parameter_key(seed, name, i) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Sparsifiers (jittable, on stacked task vectors [n, *shape]).


def _per_row(values: jax.Array, ndim: int) -> jax.Array:
  return values.reshape((-1,) + (1,) * (ndim - 1))


def _sum_experts(stacked: jax.Array) -> jax.Array:
  """Σ_i stacked[i], unrolled over the (static, small) expert axis.

  XLA:CPU runs `stacked.sum(axis=0)` on a broadcast product as a slow strided reduction
  (~300 ns per entry measured for [3, 1536, 576]); n − 1 elementwise adds are ~100x faster
  and fuse with the producer.
  """
  total = stacked[0]
  for i in range(1, stacked.shape[0]):
    total = total + stacked[i]
  return total


def dare(delta: jax.Array, density, key: jax.Array, *, rescale: bool = True) -> jax.Array:
  """DARE (Yu et al. 2023): drop each entry of one task vector with probability p = 1 − d.

  τ' = m ⊙ τ / d with m_j ~ Bernoulli(d) (no division when rescale=False), so E[τ'] = τ.
  d = 0 gives zeros, d = 1 returns τ unchanged. Jittable; `density` may be traced.
  """
  keep = jax.random.bernoulli(key, density, delta.shape)
  scale = jnp.where(density > 0, 1.0 / jnp.maximum(density, 1e-30), 0.0) if rescale else 1.0
  return jnp.where(keep, delta * scale, 0.0)


def _magnitude_thresholds(deltas: jax.Array, ranks: jax.Array) -> jax.Array:
  """Per-expert per-tensor threshold: the ranks[i]-th largest |τ_i| ([n]; +inf for rank 0)."""
  return jax.vmap(topk.tensor_kth_largest_magnitude)(deltas, ranks)


def della_keep_probabilities(delta: jax.Array, density, epsilon,
                             rank_axis: Optional[int] = None) -> jax.Array:
  """MAGPRUNE keep probabilities for one task vector (DELLA, Deep et al. 2024, Sec. 3).

  Rank the entries by |τ| (r = 0 for the smallest; ties ranked by position) over the whole
  tensor (rank_axis None) or independently along `rank_axis`, over m entries:
  q = (d − ε) + 2ε · r / (m − 1) (q = d when m = 1; q = 1 everywhere when d >= 1).
  """
  magnitudes = jnp.abs(delta)
  if rank_axis is None:
    moved = magnitudes.reshape(-1)
  else:
    moved = jnp.moveaxis(magnitudes, rank_axis, -1)
  m = moved.shape[-1] if moved.ndim else 1
  ranks = jnp.argsort(jnp.argsort(moved, axis=-1, stable=True), axis=-1, stable=True)
  fraction = ranks / (m - 1) if m > 1 else jnp.full(moved.shape, 0.5)
  q = jnp.where(density >= 1, 1.0, density - epsilon + 2 * epsilon * fraction)
  if rank_axis is None:
    return q.reshape(delta.shape)
  return jnp.moveaxis(q, -1, rank_axis)


def della_magprune(delta: jax.Array, density, epsilon, key: jax.Array, *,
                   rank_axis: Optional[int] = None, rescale: bool = True) -> jax.Array:
  """MAGPRUNE one task vector: keep entry j with probability q_j, divide survivors by q_j.

  q from `della_keep_probabilities`: drop probabilities 1 − q_j are linearly spaced in
  [p − ε, p + ε] (p = 1 − d), the largest magnitudes dropped least. Jittable.
  """
  q = della_keep_probabilities(delta, density, epsilon, rank_axis)
  keep = jax.random.bernoulli(key, q)
  return jnp.where(keep, delta / q if rescale else delta, 0.0)


# ---------------------------------------------------------------------------------------------
# The shared kernel.


@functools.partial(jax.jit, static_argnames=("sparsifier", "ranks_given", "consensus",
                                             "normalize", "out_dtype", "rank_axis", "rescale"))
def _generalized_task_arithmetic(base, experts, weights, lam, args, *, sparsifier, ranks_given,
                                 consensus, normalize, out_dtype, rank_axis, rescale):
  """Steps 1-6 of the module docstring for one tensor; `sparsifier` picks step 2."""
  deltas = experts - base[None]
  ndim = deltas.ndim
  magnitudes = jnp.abs(deltas)
  if sparsifier == "magnitude":  # args: (thresholds or ranks [n],)
    (t,) = args
    t = _magnitude_thresholds(deltas, t) if ranks_given else t
    deltas = jnp.where(magnitudes >= _per_row(t, ndim), deltas, 0.0)
  elif sparsifier == "band":  # args: (low, high), thresholds or ranks [n] each
    low, high = args
    if ranks_given:
      low, high = _magnitude_thresholds(deltas, low), _magnitude_thresholds(deltas, high)
    keep = (magnitudes >= _per_row(low, ndim)) & (magnitudes < _per_row(high, ndim))
    deltas = jnp.where(keep, deltas, 0.0)
  elif sparsifier == "bernoulli":  # args: (keys [n], density [n])
    keys, density = args
    deltas = jax.vmap(functools.partial(dare, rescale=rescale))(deltas, density, keys)
  elif sparsifier == "della":  # args: (keys [n], density [n], epsilon)
    keys, density, epsilon = args
    prune = functools.partial(della_magprune, epsilon=epsilon, rank_axis=rank_axis,
                              rescale=rescale)
    deltas = jax.vmap(lambda delta, d, key: prune(delta, d, key=key))(deltas, density, keys)
  elif sparsifier is not None:
    raise ValueError(f"unknown sparsifier {sparsifier!r}")

  w = _per_row(weights, ndim)
  weighted = deltas * w
  if consensus is None:
    mixed = _sum_experts(weighted)
    divisor = weights.sum()
    divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
  else:
    signs = jnp.sign(weighted)
    votes = _sum_experts(weighted if consensus == "mass" else signs)
    elected = jnp.where(votes >= 0, 1.0, -1.0)
    agree = signs == elected[None]
    mixed = _sum_experts(jnp.where(agree, weighted, 0.0))
    divisor = _sum_experts(jnp.where(agree, w, 0.0))
    divisor = jnp.where(divisor == 0, 1.0, divisor)
  if normalize:
    mixed = mixed / divisor
  return (base + lam * mixed).astype(out_dtype)


def _run(prepared, lam, *, sparsifier=None, args=(), ranks_given=False, consensus=None,
         normalize=False, rank_axis=None, rescale=True):
  base, stacked, w, out_dtype = prepared
  return _generalized_task_arithmetic(base, stacked, jnp.asarray(w), jnp.float32(lam), args,
                                      sparsifier=sparsifier, ranks_given=ranks_given,
                                      consensus=consensus, normalize=normalize,
                                      out_dtype=out_dtype, rank_axis=rank_axis, rescale=rescale)


# ---------------------------------------------------------------------------------------------
# Methods.


def linear(base, experts: Experts, weights=None, *, normalize: bool = True, out_dtype=None):
  """Weighted average of the models: θ = Σ w_i θ_i / Σ w_i (normalize) or Σ w_i θ_i.

  `base` is ignored (may be None); to average the base in, pass it as one of the experts.
  """
  _, stacked, w, out_dtype = _prepare(base, experts, weights, out_dtype, needs_base=False)
  if normalize and abs(float(w.sum())) < 1e-8:
    raise ValueError(f"linear: weights {w.tolist()} sum to 0; cannot normalize")
  return _linear(stacked, jnp.asarray(w), normalize=normalize, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("normalize", "out_dtype"))
def _linear(stacked, weights, *, normalize, out_dtype):
  mixed = _sum_experts(stacked * _per_row(weights, stacked.ndim))
  return (mixed / weights.sum() if normalize else mixed).astype(out_dtype)


def task_arithmetic(base, experts: Experts, weights=None, *, lam: float = 1.0,
                    normalize: bool = False, out_dtype=None):
  """Task arithmetic (Ilharco et al. 2023): θ = θ_base + λ Σ w_i τ_i  (/ Σ w_i if normalize).

  With λ = 1 and weights summing to 1 (or normalize=True) this equals `linear`.
  """
  return _run(_prepare(base, experts, weights, out_dtype), lam, normalize=normalize)


def _thresholds_tuple(thresholds, count: int, n: int, what: str):
  parts = thresholds if isinstance(thresholds, tuple) else (thresholds,)
  if len(parts) != count:
    raise ValueError(f"{what}: thresholds must be {count} array(s) of [n] thresholds, got "
                     f"{len(parts)}")
  return tuple(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,)) for t in parts)


def ties_ranks(entries: int, n: int, *, density: PerExpert,
               count: str = "ceil") -> tuple[np.ndarray]:
  """TIES trims at one order statistic per expert: k_i = ceil(d_i · entries) (count "floor":
  mergekit's max(1, int(d_i · entries)) for 0 < d_i and entries > 0)."""
  def rank(d: float) -> int:
    k = topk.keep_count(d, entries, count)
    return max(1, k) if count == "floor" and d > 0 and entries > 0 else k
  return (np.array([rank(d) for d in per_expert(density, n, "density")], np.int64),)


def ties(base, experts: Experts, weights=None, *, density: Optional[PerExpert] = None,
         thresholds=None, lam: float = 1.0, consensus: str = "mass", normalize: bool = True,
         count: str = "ceil", out_dtype=None):
  """TIES-Merging (Yadav et al. 2023, Alg. 1): trim, elect sign, disjoint merge.

  Trim: τ'_i = τ_i ⊙ [|τ_i| >= t_i], with t_i the ceil(d_i N)-th largest |τ_i| of this tensor
  (`density`, scalar or per expert; `count="floor"` cuts at the int(d_i N)-th as mergekit
  does), or given by `thresholds` ([n] or a 1-tuple of it, e.g. computed over the whole
  model). Give exactly one of `density` and `thresholds`.
  Then u_i = w_i τ'_i, sign election by "mass" (sgn Σ u_i, the paper) or "count", and with
  normalize (default, the paper's disjoint mean) δ = Σ_agree u_i / Σ_agree w_i;
  θ = θ_base + λ δ. density 1 (no trimming) gives a sign-elected disjoint mean.
  """
  _check_consensus(consensus, allow_none=False)
  prepared = _prepare(base, experts, weights, out_dtype)
  stacked = prepared[1]
  n, entries = stacked.shape[0], math.prod(stacked.shape[1:])
  if (density is None) == (thresholds is None):
    raise ValueError("ties: give exactly one of density (per-tensor trimming) and "
                     "thresholds (e.g. global ones from merging.topk)")
  if thresholds is not None:
    args, ranks_given = _thresholds_tuple(thresholds, 1, n, "ties"), False
  elif np.all(per_expert(density, n, "density") >= 1):
    args, ranks_given = None, False
  else:
    args = tuple(jnp.asarray(r, jnp.int32)
                 for r in ties_ranks(entries, n, density=density, count=count))
    ranks_given = True
  return _run(prepared, lam, sparsifier=None if args is None else "magnitude",
              args=args or (), ranks_given=ranks_given, consensus=consensus,
              normalize=normalize)


def dare_linear(base, experts: Experts, weights=None, *, density: PerExpert, seed: int,
                name: str, lam: float = 1.0, normalize: bool = False, rescale: bool = True,
                out_dtype=None):
  """DARE + task arithmetic: θ = θ_base + λ Σ w_i DARE(τ_i; d_i)  (/ Σ w_i if normalize).

  DARE(τ; d) drops each entry with probability 1 − d and divides survivors by d (`dare`);
  expert i's mask for this tensor uses `parameter_key(seed, name, i)`.
  """
  prepared = _prepare(base, experts, weights, out_dtype)
  n = prepared[1].shape[0]
  d = per_expert(density, n, "density")
  args = (_keys(seed, name, n), jnp.asarray(d, jnp.float32))
  return _run(prepared, lam, sparsifier="bernoulli", args=args, normalize=normalize,
              rescale=rescale)


def dare_ties(base, experts: Experts, weights=None, *, density: PerExpert, seed: int,
              name: str, lam: float = 1.0, consensus: str = "mass", normalize: bool = False,
              out_dtype=None):
  """DARE-TIES: DARE sparsification, then TIES sign election and disjoint merge.

  u_i = w_i DARE(τ_i; d_i); elect s by `consensus`; δ = Σ_agree u_i (/ Σ_agree w_i when
  normalize, mergekit's default is False); θ = θ_base + λ δ.
  """
  _check_consensus(consensus, allow_none=False)
  prepared = _prepare(base, experts, weights, out_dtype)
  n = prepared[1].shape[0]
  args = (_keys(seed, name, n), jnp.asarray(per_expert(density, n, "density"), jnp.float32))
  return _run(prepared, lam, sparsifier="bernoulli", args=args,
              consensus=consensus, normalize=normalize)


def breadcrumbs_ranks(entries: int, n: int, *, density: PerExpert, gamma: float = 0.01,
                      count: str = "ceil") -> tuple[np.ndarray, np.ndarray]:
  """Breadcrumbs keeps the magnitude band (k_high, k_low] of the ranking, per expert.

  n_keep = ceil(d N), n_top = min(ceil(γ N), N − n_keep) (density wins over gamma, as in
  mergekit); returns (k_low, k_high) = (n_top + n_keep, n_top): t_low is the k_low-th and
  t_high the k_high-th largest |τ| (+inf for rank 0). count "floor" takes mergekit's
  int(d N) and int(γ N) instead of the ceilings.
  """
  topk.keep_count(gamma, 0, count)
  low, high = [], []
  for d in per_expert(density, n, "density"):
    n_keep = topk.keep_count(d, entries, count)
    n_top = min(topk.keep_count(gamma, entries, count), entries - n_keep)
    low.append(n_top + n_keep)
    high.append(n_top)
  return np.array(low, np.int64), np.array(high, np.int64)


def breadcrumbs(base, experts: Experts, weights=None, *, density: Optional[PerExpert] = None,
                gamma: float = 0.01, thresholds=None, lam: float = 1.0,
                consensus: Optional[str] = None, normalize: bool = False,
                count: str = "ceil", out_dtype=None):
  """Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest outliers and the small.

  τ'_i = τ_i ⊙ [t_low,i <= |τ_i| < t_high,i]: per tensor, the top γ fraction by magnitude is
  dropped and the next d fraction kept (`breadcrumbs_ranks`); or pass global
  `thresholds=(t_low, t_high)`. Then task arithmetic (consensus None, default) or TIES-style
  election ("mass"/"count" = mergekit's breadcrumbs_ties); δ normalised if normalize;
  θ = θ_base + λ δ. Ties at t_high are all dropped, ties at t_low all kept.
  """
  _check_consensus(consensus, allow_none=True)
  prepared = _prepare(base, experts, weights, out_dtype)
  stacked = prepared[1]
  n, entries = stacked.shape[0], math.prod(stacked.shape[1:])
  if (density is None) == (thresholds is None):
    raise ValueError("breadcrumbs: give exactly one of density (with gamma, per tensor) and "
                     "thresholds=(t_low, t_high)")
  if thresholds is not None:
    args, ranks_given = _thresholds_tuple(thresholds, 2, n, "breadcrumbs"), False
  else:
    ranks = breadcrumbs_ranks(entries, n, density=density, gamma=gamma, count=count)
    args, ranks_given = tuple(jnp.asarray(r, jnp.int32) for r in ranks), True
  return _run(prepared, lam, sparsifier="band", args=args,
              ranks_given=ranks_given, consensus=consensus, normalize=normalize)


def della(base, experts: Experts, weights=None, *, density: PerExpert, epsilon: float,
          seed: int, name: str, lam: float = 1.0, consensus: Optional[str] = "mass",
          normalize: bool = True, rank_axis: Optional[int] = None, out_dtype=None):
  """DELLA-Merging (Deep et al. 2024): MAGPRUNE, then TIES-style election and merge.

  MAGPRUNE per expert: rank the entries of τ_i by |τ_i| (rank 0 = smallest, ties by
  position) over the whole tensor (rank_axis=None) or independently along `rank_axis`
  (mergekit ranks along the input-features axis of a torch [out, in] weight: axis 0 of a
  Flax [in, out] kernel). Keep entry j with probability q_j = (d − ε) + 2ε r_j / (m − 1),
  i.e. drop probability p_j = 1 − q_j linearly spaced in [p − ε, p + ε] with p = 1 − d, the
  largest magnitudes dropped least; survivors are divided by q_j. Requires d − ε > 0 and
  d + ε <= 1 for every expert with d < 1 (d = 1: no pruning). Then u_i = w_i τ'_i, election
  by `consensus` (None = mergekit's della_linear), disjoint mean if normalize,
  θ = θ_base + λ δ. The ranking sorts each tensor, so XLA gathers a sharded tensor here
  (per expert, one parameter at a time); the other methods never gather.
  """
  _check_consensus(consensus, allow_none=True)
  prepared = _prepare(base, experts, weights, out_dtype)
  stacked = prepared[1]
  n = stacked.shape[0]
  d = per_expert(density, n, "density")
  if epsilon < 0:
    raise ValueError(f"della: epsilon must be >= 0, got {epsilon}")
  if rank_axis is not None:
    if not -(stacked.ndim - 1) <= rank_axis < stacked.ndim - 1:
      raise ValueError(f"della: rank_axis {rank_axis} out of range for a tensor of shape "
                       f"{tuple(stacked.shape[1:])}")
    rank_axis %= stacked.ndim - 1
  if np.all(d >= 1):
    sparsifier, args = None, ()
  else:
    if np.any((d < 1) & ((d - epsilon <= 0) | (d + epsilon > 1))):
      raise ValueError(f"della: density ± epsilon must lie in (0, 1] where density < 1; got "
                       f"density {d.tolist()}, epsilon {epsilon}")
    sparsifier = "della"
    args = (_keys(seed, name, n), jnp.asarray(d, jnp.float32), jnp.float32(epsilon))
  return _run(prepared, lam, sparsifier=sparsifier, args=args,
              consensus=consensus, normalize=normalize, rank_axis=rank_axis)


def slerp(base, experts: Experts, weights=None, *, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8, out_dtype=None):
  """Spherical interpolation from base (t = 0) to the single expert (t = 1), mergekit-style.

  On the flattened tensors: v̂ = v / ||v|| (left as is when ||v|| <= eps), c = v̂_0 · v̂_1,
  Ω = arccos c; θ = sin((1 − t)Ω)/sin Ω · v_0 + sin(tΩ)/sin Ω · v_1 (the unnormalised
  tensors), or (1 − t) v_0 + t v_1 when |c| > dot_threshold (nearly colinear).
  `weights` must be None.
  """
  if weights is not None:
    raise ValueError("slerp takes no weights; it interpolates base and one expert by t")
  base, stacked, _, out_dtype = _prepare(base, experts, None, out_dtype)
  if stacked.shape[0] != 1:
    raise ValueError(f"slerp merges the base with exactly one expert, got {stacked.shape[0]}")
  return _slerp(base, stacked[0], jnp.float32(t), jnp.float32(dot_threshold), jnp.float32(eps),
                out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _slerp(v0, v1, t, dot_threshold, eps, *, out_dtype):
  n0, n1 = jnp.sqrt(jnp.sum(v0 * v0)), jnp.sqrt(jnp.sum(v1 * v1))
  u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
  u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
  dot = jnp.sum(u0 * u1)
  colinear = jnp.abs(dot) > dot_threshold
  omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin_omega = jnp.where(colinear, 1.0, jnp.sin(omega))
  s0 = jnp.where(colinear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin_omega)
  s1 = jnp.where(colinear, t, jnp.sin(t * omega) / sin_omega)
  return (s0 * v0 + s1 * v1).astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """A registry entry: `fn(base, experts, weights=None, *, out_dtype=None, **params)`.

  uses_base: whether fn reads `base` (False only for `linear`).
  random: fn needs `seed=` and `name=` (the parameter's name) for its masks.
  magnitude_ranks: None, or `(entries, n, **params) -> tuple of [n] ranks`; for global
    thresholds pass `thresholds=tuple(kth_largest_magnitude(stream of τ, r, batched=True)
    for r in magnitude_ranks(total_entries, n, **params))`.
  """
  fn: Callable[..., jax.Array]
  uses_base: bool = True
  random: bool = False
  magnitude_ranks: Optional[Callable[..., tuple]] = None


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear, uses_base=False),
    "task_arithmetic": MergeMethod(task_arithmetic),
    "ties": MergeMethod(ties, magnitude_ranks=ties_ranks),
    "dare_linear": MergeMethod(dare_linear, random=True),
    "dare_ties": MergeMethod(dare_ties, random=True),
    "breadcrumbs": MergeMethod(breadcrumbs, magnitude_ranks=breadcrumbs_ranks),
    "breadcrumbs_ties": MergeMethod(functools.partial(breadcrumbs, consensus="mass"),
                                    magnitude_ranks=breadcrumbs_ranks),
    "della": MergeMethod(della, random=True),
    "della_linear": MergeMethod(functools.partial(della, consensus=None, normalize=False),
                                random=True),
    "slerp": MergeMethod(slerp),
}
