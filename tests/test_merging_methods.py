"""merging.methods against slow NumPy float64 references written out here, entry by entry."""
import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from merging import methods, topk

SHAPE = (8, 16)


def make_models(seed, n=4, shape=SHAPE):
  """float32 base and experts whose task vectors are exact in float32 (grid values).

  base on a 2**-10 grid in (-4, 4), τ on a 2**-20 grid in (-7, 7): θ_i − θ_base is then
  computed exactly in float32, so the float64 references see the same task vectors.
  """
  rng = np.random.default_rng(seed)
  base = (rng.integers(-4096, 4096, shape) / 1024).astype(np.float32)
  tau = np.clip(np.round(rng.standard_normal((n,) + shape) * 2**20) / 2**20, -6.9, 6.9)
  experts = (base + tau).astype(np.float32)
  assert np.array_equal(experts.astype(np.float64) - base, tau)
  return base, experts


def ceil_count(density, total):
  return math.ceil(fractions.Fraction(str(density)) * total)


# ---------------------------------------------------------------------------------------------
# References (float64, loops).


def ref_combine(base, taus, weights, lam, consensus, normalize):
  """Steps 3-6 of the mergekit recipe, one coordinate at a time."""
  base = np.asarray(base, np.float64).ravel()
  taus = np.asarray(taus, np.float64).reshape(len(taus), -1)
  out = np.empty_like(base)
  for j in range(base.size):
    u = [weights[i] * taus[i, j] for i in range(len(taus))]
    if consensus is None:
      delta, divisor = sum(u), sum(weights)
      divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    else:
      if consensus == "mass":
        elected = 1.0 if sum(u) >= 0 else -1.0
      else:
        elected = 1.0 if sum(np.sign(v) for v in u) >= 0 else -1.0
      agree = [i for i in range(len(u)) if np.sign(u[i]) == elected]
      delta = sum(u[i] for i in agree)
      divisor = sum(weights[i] for i in agree) or 1.0
    out[j] = base[j] + lam * (delta / divisor if normalize else delta)
  return out


def ref_trim(tau, keep):
  """Keep the entries whose |τ| is >= the keep-th largest |τ| (nothing if keep == 0)."""
  flat = np.abs(tau).ravel()
  if keep == 0:
    return np.zeros_like(tau)
  threshold = sorted(flat, reverse=True)[keep - 1]
  return np.where(np.abs(tau) >= threshold, tau, 0.0)


def ref_band(tau, density, gamma):
  """Breadcrumbs by index: drop the n_top largest |τ|, keep the next n_keep."""
  n = tau.size
  n_keep = ceil_count(density, n)
  n_top = min(ceil_count(gamma, n), n - n_keep)
  order = sorted(range(n), key=lambda j: -abs(tau.ravel()[j]))
  out = np.zeros(n)
  for j in order[n_top:n_top + n_keep]:
    out[j] = tau.ravel()[j]
  return out.reshape(tau.shape)


def ref_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
  v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
  n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
  u0 = v0 / n0 if n0 > eps else v0
  u1 = v1 / n1 if n1 > eps else v1
  dot = float(np.sum(u0 * u1))
  if abs(dot) > dot_threshold:
    return (1 - t) * v0 + t * v1
  omega = math.acos(dot)
  return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def close(actual, expected, tol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64).ravel(),
                             np.asarray(expected, np.float64).ravel(), rtol=tol, atol=tol)


WEIGHTS = [0.7, 1.3, 0.4, 1.0]


# ---------------------------------------------------------------------------------------------
# Linear and task arithmetic.


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize):
  base, experts = make_models(0)
  expected = sum(w * e.astype(np.float64) for w, e in zip(WEIGHTS, experts))
  expected = expected / sum(WEIGHTS) if normalize else expected
  close(methods.linear(base, experts, WEIGHTS, normalize=normalize), expected)
  close(methods.linear(None, list(experts), WEIGHTS, normalize=normalize), expected)


@pytest.mark.parametrize("lam,normalize", [(1.0, False), (0.6, False), (1.7, True)])
def test_task_arithmetic_matches_reference(lam, normalize):
  base, experts = make_models(1)
  expected = ref_combine(base, experts - base, WEIGHTS, lam, None, normalize)
  close(methods.task_arithmetic(base, experts, WEIGHTS, lam=lam, normalize=normalize), expected)


def test_task_arithmetic_with_unit_lambda_and_weights_summing_to_one_is_linear():
  base, experts = make_models(2)
  weights = np.array([0.1, 0.2, 0.3, 0.4])
  close(methods.task_arithmetic(base, experts, weights, lam=1.0),
        methods.linear(base, experts, weights), tol=1e-5)
  close(methods.task_arithmetic(base, experts, [3.0, 1.0, 2.0, 2.0], normalize=True),
        methods.linear(base, experts, [3.0, 1.0, 2.0, 2.0]), tol=1e-5)


def test_output_dtype_defaults_to_base_and_can_be_requested():
  base, experts = make_models(3)
  out = methods.task_arithmetic(base.astype(jnp.bfloat16), experts.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert methods.task_arithmetic(base, experts, out_dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert methods.linear(None, experts.astype(np.float16)).dtype == np.float16


# ---------------------------------------------------------------------------------------------
# TIES.


@pytest.mark.parametrize("density", [0.2, 0.55, 1.0, (0.1, 0.3, 1.0, 0.0)])
@pytest.mark.parametrize("consensus", ["mass", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, consensus, normalize):
  base, experts = make_models(4)
  taus = experts.astype(np.float64) - base
  densities = np.broadcast_to(density, (len(taus),))
  trimmed = [ref_trim(t, ceil_count(d, t.size)) for t, d in zip(taus, densities)]
  expected = ref_combine(base, trimmed, WEIGHTS, 1.3, consensus, normalize)
  out = methods.ties(base, experts, WEIGHTS, density=density, lam=1.3, consensus=consensus,
                     normalize=normalize)
  close(out, expected)


def test_ties_density_one_is_a_sign_elected_disjoint_mean():
  base = np.zeros(4, np.float32)
  taus = np.array([[1.0, -1.0, 2.0, 0.0],
                   [3.0, -2.0, -5.0, 0.0],
                   [-1.0, 4.0, 1.0, 0.0]], np.float32)
  # Elected signs (mass): +, +, -, + (0 sum -> +). Agreeing means: (1+3)/2, 4, -5, 0.
  close(methods.ties(base, taus, density=1.0), [2.0, 4.0, -5.0, 0.0])
  # Count: +,-,+ -> +; -,-,+ -> -; +,-,+ -> +.
  close(methods.ties(base, taus, density=1.0, consensus="count"), [2.0, -1.5, 1.5, 0.0])


def test_ties_when_all_experts_disagree_in_sign():
  base = np.ones(3, np.float32)
  taus = np.array([[2.0, -1.0, 1.0], [-1.0, 3.0, -1.0]], np.float32)
  # Mass: +1 -> only expert 0 agrees; +2 -> expert 1; 0 -> elected + -> expert 0.
  close(methods.ties(base, base + taus, density=1.0), 1.0 + np.array([2.0, 3.0, 1.0]))
  # Disjoint sum (no normalize) with weights: u = [[4, -2, 2], [-1, 3, -1]].
  close(methods.ties(base, base + taus, [2.0, 1.0], density=1.0, normalize=False),
        1.0 + np.array([4.0, 3.0, 2.0]))


def test_ties_applies_weights_before_the_sign_vote():
  base = np.zeros(1, np.float32)
  taus = np.array([[1.0], [-2.0]], np.float32)
  close(methods.ties(base, taus, density=1.0), [-2.0])  # Unweighted: mass -1 wins.
  # Weighted: u = [3, -2] -> +; normalize divides by the agreeing weight 3.
  close(methods.ties(base, taus, [3.0, 1.0], density=1.0), [1.0])


def test_ties_with_global_thresholds_matches_reference_and_topk():
  params = {name: make_models(seed, n=3, shape=shape)
            for name, seed, shape in [("a", 10, (5, 7)), ("b", 11, (13,)), ("c", 12, (2, 3, 4))]}
  taus = {name: e.astype(np.float64) - b for name, (b, e) in params.items()}
  total = sum(t[0].size for t in taus.values())
  keep = ceil_count(0.25, total)
  all_mags = np.concatenate([np.abs(t).reshape(3, -1) for t in taus.values()], axis=1)
  expected_t = np.sort(all_mags, axis=1)[:, ::-1][:, keep - 1]

  (ranks,) = methods.METHODS["ties"].magnitude_ranks(total, 3, density=0.25)
  stream = lambda: [(name, jnp.asarray(e) - b) for name, (b, e) in params.items()]
  thresholds = topk.kth_largest_magnitude(stream, ranks, batched=True)
  np.testing.assert_array_equal(thresholds, expected_t.astype(np.float32))
  for name, (b, e) in params.items():
    trimmed = [np.where(np.abs(t) >= th, t, 0.0) for t, th in zip(taus[name], expected_t)]
    close(methods.ties(b, e, [1.0, 0.5, 2.0], thresholds=(thresholds,), lam=0.9),
          ref_combine(b, trimmed, [1.0, 0.5, 2.0], 0.9, "mass", True))


# ---------------------------------------------------------------------------------------------
# DARE and DELLA.


def test_dare_is_reproducible_and_independent_of_processing_order():
  base, experts = make_models(5)
  kwargs = dict(density=0.5, seed=7)
  first = methods.dare_ties(base, experts, name="layer_0/mlp", **kwargs)
  methods.dare_ties(base, experts, name="layer_1/mlp", **kwargs)  # Another parameter first.
  np.testing.assert_array_equal(first, methods.dare_ties(base, experts, name="layer_0/mlp",
                                                         **kwargs))
  assert not np.array_equal(first, methods.dare_ties(base, experts, name="layer_1/mlp",
                                                     **kwargs))
  assert not np.array_equal(first, methods.dare_ties(base, experts, name="layer_0/mlp",
                                                     density=0.5, seed=8))
  masks = [np.asarray(methods.dare(jnp.ones(500), 0.5, methods.parameter_key(7, "p", i)) != 0)
           for i in range(2)]
  assert not np.array_equal(*masks)  # Experts get different masks.


def test_dare_keeps_density_fraction_and_preserves_the_mean():
  n, density = 200_000, 0.3
  tau = jnp.full((n,), 2.0)
  out = np.asarray(methods.dare(tau, density, methods.parameter_key(0, "w", 0)))
  kept = np.count_nonzero(out)
  sigma = math.sqrt(n * density * (1 - density))
  assert abs(kept - n * density) < 5 * sigma
  assert set(np.unique(out)) == {0.0, np.float32(2.0 / density)}
  assert abs(out.mean() - 2.0) < 5 * sigma * (2.0 / density) / n
  np.testing.assert_array_equal(methods.dare(tau, 1.0, methods.parameter_key(0, "w", 0)), tau)
  np.testing.assert_array_equal(methods.dare(tau, 0.0, methods.parameter_key(0, "w", 0)), 0.0)


@pytest.mark.parametrize("consensus", [None, "mass", "count"])
def test_dare_methods_match_reference_on_their_masks(consensus):
  base, experts = make_models(6)
  taus = experts.astype(np.float64) - base
  densities = [0.3, 0.6, 0.9, 1.0]
  sparse = []
  for i, (tau, d) in enumerate(zip(taus, densities)):
    s = np.asarray(methods.dare(jnp.asarray(tau, jnp.float32), d,
                                methods.parameter_key(3, "enc/w", i)), np.float64)
    kept = s != 0
    close(s[kept], tau[kept] / d, tol=1e-6)  # Survivors rescaled by 1 / (1 - p).
    sparse.append(s)
  if consensus is None:
    out = methods.dare_linear(base, experts, WEIGHTS, density=densities, seed=3, name="enc/w",
                              lam=1.2)
    expected = ref_combine(base, sparse, WEIGHTS, 1.2, None, False)
  else:
    out = methods.dare_ties(base, experts, WEIGHTS, density=densities, seed=3, name="enc/w",
                            lam=1.2, consensus=consensus, normalize=True)
    expected = ref_combine(base, sparse, WEIGHTS, 1.2, consensus, True)
  close(out, expected)


def ref_della_probabilities(tau, density, epsilon):
  mags = np.abs(tau).ravel()
  order = sorted(range(mags.size), key=lambda j: (mags[j], j))  # Smallest first.
  q = np.empty(mags.size)
  for rank, j in enumerate(order):
    q[j] = density - epsilon + 2 * epsilon * rank / (mags.size - 1)
  return q.reshape(tau.shape)


def test_della_magprune_probabilities_rescaling_and_statistics():
  rng = np.random.default_rng(0)
  tau = rng.standard_normal(40_000).astype(np.float32)
  q_ref = ref_della_probabilities(tau, 0.4, 0.2)
  close(methods.della_keep_probabilities(jnp.asarray(tau), 0.4, 0.2), q_ref, tol=1e-6)
  out = np.asarray(methods.della_magprune(jnp.asarray(tau), 0.4, 0.2,
                                          methods.parameter_key(0, "x", 0)), np.float64)
  kept = out != 0
  close(out[kept], tau[kept] / q_ref[kept], tol=1e-5)
  order = np.argsort(np.abs(tau))
  for part in np.array_split(order, 4):  # Larger magnitudes are kept more often.
    p = q_ref[part].mean()
    assert abs(kept[part].mean() - p) < 5 * math.sqrt(p * (1 - p) / part.size)
  assert abs(out.mean() - tau.mean()) < 0.02  # Unbiased: E[τ'] = τ.
  # Ranking along an axis ranks every slice on its own.
  mat = jnp.asarray(tau[:60].reshape(6, 10))
  q_rows = methods.della_keep_probabilities(mat, 0.4, 0.2, rank_axis=1)
  close(q_rows, np.stack([ref_della_probabilities(np.asarray(r), 0.4, 0.2) for r in mat]),
        tol=1e-6)


@pytest.mark.parametrize("consensus,normalize", [("mass", True), (None, False)])
def test_della_matches_reference_on_its_masks(consensus, normalize):
  base, experts = make_models(7)
  taus = experts.astype(np.float64) - base
  sparse = [np.asarray(methods.della_magprune(jnp.asarray(t, jnp.float32), 0.5, 0.1,
                                              methods.parameter_key(1, "w", i)), np.float64)
            for i, t in enumerate(taus)]
  for s, t in zip(sparse, taus):
    q = ref_della_probabilities(t, 0.5, 0.1)
    close(s[s != 0], (t / q)[s != 0], tol=1e-5)
  out = methods.della(base, experts, WEIGHTS, density=0.5, epsilon=0.1, seed=1, name="w",
                      lam=0.8, consensus=consensus, normalize=normalize)
  close(out, ref_combine(base, sparse, WEIGHTS, 0.8, consensus, normalize))


# ---------------------------------------------------------------------------------------------
# Breadcrumbs and SLERP.


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.2, 0.0), (0.9, 0.3), (1.0, 0.05)])
@pytest.mark.parametrize("consensus", [None, "mass"])
def test_breadcrumbs_matches_reference(density, gamma, consensus):
  base, experts = make_models(8)
  taus = experts.astype(np.float64) - base
  assert len(np.unique(np.abs(taus[0]))) == taus[0].size  # Distinct: index order is exact.
  sparse = [ref_band(t, density, gamma) for t in taus]
  out = methods.breadcrumbs(base, experts, WEIGHTS, density=density, gamma=gamma, lam=1.1,
                            consensus=consensus)
  close(out, ref_combine(base, sparse, WEIGHTS, 1.1, consensus, False))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_reference(t):
  base, experts = make_models(9, n=1)
  close(methods.slerp(base, experts, t=t), ref_slerp(t, base, experts[0]))
  colinear = (2.0 * base).astype(np.float32)
  close(methods.slerp(base, [colinear], t=t), (1 - t) * base + t * colinear.astype(np.float64))
  zeros = np.zeros_like(base)
  close(methods.slerp(zeros, [base], t=t), ref_slerp(t, zeros, base))


# ---------------------------------------------------------------------------------------------
# Registry, errors, sharding.


def registry_params(name):
  return {
      "linear": {}, "task_arithmetic": {"lam": 0.8}, "ties": {"density": 0.3},
      "dare_linear": {"density": 0.5, "seed": 1, "name": "p"},
      "dare_ties": {"density": 0.5, "seed": 1, "name": "p"},
      "breadcrumbs": {"density": 0.5, "gamma": 0.1},
      "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
      "della": {"density": 0.5, "epsilon": 0.1, "seed": 1, "name": "p"},
      "della_linear": {"density": 0.5, "epsilon": 0.1, "seed": 1, "name": "p"},
      "slerp": {"t": 0.4},
  }[name]


def test_registry_uniform_calling_convention():
  base, experts = make_models(13)
  for name, method in methods.METHODS.items():
    chosen = experts[:1] if name == "slerp" else list(experts)
    weights = None if name == "slerp" else WEIGHTS
    out = method.fn(base, chosen, weights, **registry_params(name))
    assert out.shape == SHAPE and out.dtype == np.float32, name
    assert method.random == ("seed" in registry_params(name)), name
  assert methods.METHODS["linear"].uses_base is False


def test_errors_name_the_bad_input():
  base, experts = make_models(14)
  with pytest.raises(ValueError, match="exactly one of density"):
    methods.ties(base, experts)
  with pytest.raises(ValueError, match=r"experts have shape \(8, 16\) per expert, base has"):
    methods.task_arithmetic(base[:3], experts)
  with pytest.raises(ValueError, match="one entry per expert"):
    methods.task_arithmetic(base, experts, [1.0, 2.0])
  with pytest.raises(ValueError, match="parameter name"):
    methods.dare_ties(base, experts, density=0.5, seed=0, name=None)
  with pytest.raises(ValueError, match="density ± epsilon"):
    methods.della(base, experts, density=0.1, epsilon=0.2, seed=0, name="p")
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
    methods.ties(base, experts, density=1.5)
  with pytest.raises(ValueError, match="consensus"):
    methods.ties(base, experts, density=0.5, consensus="sum")
  with pytest.raises(ValueError, match="exactly one expert"):
    methods.slerp(base, experts, t=0.5)


def test_sharded_inputs_give_the_unsharded_result():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  base, experts = make_models(15)
  sharded_base = jax.device_put(base, NamedSharding(mesh, P("data", "model")))
  sharded_experts = jax.device_put(experts, NamedSharding(mesh, P(None, "data", "model")))
  for name, method in methods.METHODS.items():
    weights = None if name == "slerp" else WEIGHTS
    e, se = (experts[:1], sharded_experts[:1]) if name == "slerp" else (experts, sharded_experts)
    params = registry_params(name)
    expected = method.fn(base, e, weights, **params)
    actual = method.fn(sharded_base, se, weights, **params)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-6,
                               err_msg=name)
    assert not actual.sharding.is_fully_replicated, name
