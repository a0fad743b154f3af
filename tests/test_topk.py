"""merging.topk: exact radix select over many (sharded) arrays against np.partition."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from merging import topk

SHAPES = [(17, 5), (0,), (64,), (3, 4, 6), (), (1, 33), (128,)]


def make_arrays(seed):
  """Arrays of many shapes, float32 and bfloat16, with zeros, repeats and both signs."""
  rng = np.random.default_rng(seed)
  arrays = []
  for i, shape in enumerate(SHAPES):
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3)
    if x.size > 4:
      x.ravel()[:3] = 0.0
      x.ravel()[3:6] = rng.choice([-1.0, 1.0], 3) * 0.125  # Exact ties across arrays.
    dtype = jnp.bfloat16 if i % 2 else np.float32
    arrays.append(jnp.asarray(x.astype(dtype)))
  arrays.append(np.asarray([1e-40, -1e-40, 3.0], np.float32))  # Subnormals, as numpy.
  return arrays


def magnitudes(arrays):
  return np.concatenate([np.abs(np.asarray(a, np.float32)).ravel() for a in arrays])


def kth_largest(values, k):
  return -np.partition(-values, k - 1)[k - 1]


@pytest.mark.parametrize("bits_per_pass", [16, 8, 4])
def test_kth_largest_matches_partition(bits_per_pass):
  arrays = make_arrays(0)
  mags = magnitudes(arrays)
  calls = []

  def arrays_fn():
    calls.append(1)
    return arrays

  ks = [1, 2, 7, 100, len(mags) - 3, len(mags)] if bits_per_pass == 16 else [3, len(mags) - 1]
  for k in ks:
    calls.clear()
    got = topk.kth_largest_magnitude(arrays_fn, k, bits_per_pass=bits_per_pass)
    assert got == kth_largest(mags, k), k
    assert len(calls) == 32 // bits_per_pass  # One streaming pass per radix digit.


def test_threshold_counts_and_tie_rule():
  arrays = make_arrays(1)
  mags = magnitudes(arrays)
  for density in [0.01, 0.2, 0.5, 0.93]:
    k = int(np.ceil(density * len(mags)))
    t = topk.topk_threshold(lambda: arrays, density)
    assert np.sum(mags >= t) >= k > np.sum(mags > t)
    if np.sum(mags == t) == 1:
      assert np.sum(mags >= t) == k
  ties = [np.full(10, 0.5, np.float32), np.arange(10, dtype=np.float32)]
  # 20 entries, density 0.5 -> k = 10: |x| >= 0.5 holds for 9 + 10 entries (ties all kept).
  assert topk.topk_threshold(lambda: ties, 0.5) == np.float32(0.5)


def test_density_edges_and_empty_params():
  arrays = make_arrays(2)
  mags = magnitudes(arrays)
  assert topk.topk_threshold(lambda: arrays, 0.0) == np.inf
  assert topk.topk_threshold(lambda: arrays, 1.0) == mags.min() == 0.0
  assert topk.topk_threshold(lambda: [], 0.3) == np.inf
  assert topk.topk_threshold(lambda: [np.zeros((0, 4))], 1.0) == np.inf
  assert topk.keep_count(0.2, 10) == 2  # Not 3, as float 0.2 * 10 would round up.
  assert topk.keep_count(0.25, 10) == 3
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
    topk.topk_threshold(lambda: arrays, 1.2)
  with pytest.raises(ValueError, match="outside"):
    topk.kth_largest_magnitude(lambda: arrays, len(mags) + 1)


def test_nan_and_inf_are_errors_naming_the_parameter():
  good = np.ones(4, np.float32)
  with pytest.raises(ValueError, match=r"decoder/mlp/wi: contains 1 NaN and 0 infinite"):
    topk.topk_threshold(lambda: [("emb", good), ("decoder/mlp/wi", np.array([1.0, np.nan]))],
                        0.5)
  with pytest.raises(ValueError, match=r"array #1: contains 0 NaN and 2 infinite"):
    topk.topk_threshold(lambda: [good, jnp.array([np.inf, -np.inf], jnp.bfloat16)], 0.5)


def test_batched_rows_are_independent_streams():
  rng = np.random.default_rng(3)
  arrays = [rng.standard_normal((3,) + s).astype(np.float32) for s in [(10, 4), (7,), (2, 2)]]
  rows = [np.concatenate([np.abs(a[i]).ravel() for a in arrays]) for i in range(3)]
  got = topk.kth_largest_magnitude(lambda: arrays, [1, 5, 51], batched=True)
  np.testing.assert_array_equal(got, [kth_largest(r, k) for r, k in zip(rows, [1, 5, 51])])
  got = topk.topk_threshold(lambda: arrays, 0.3, batched=True)
  np.testing.assert_array_equal(got, [kth_largest(r, 16) for r in rows])  # ceil(0.3 * 51).
  np.testing.assert_array_equal(
      topk.kth_largest_magnitude(lambda: arrays, [0, 2, 0], batched=True),
      [np.inf, kth_largest(rows[1], 2), np.inf])


def test_per_tensor_version_is_jittable_with_traced_rank():
  x = jnp.asarray(make_arrays(4)[0])
  mags = np.abs(np.asarray(x, np.float32)).ravel()
  select = jax.jit(topk.tensor_kth_largest_magnitude)
  for k in [1, 13, mags.size]:
    assert select(x, k) == kth_largest(mags, k)
  assert select(x, 0) == np.inf
  assert topk.tensor_topk_threshold(x, 0.2) == kth_largest(mags, 17)  # ceil(0.2 * 85).
  batched = jnp.stack([x, 2 * x])
  np.testing.assert_array_equal(topk.tensor_topk_threshold(batched, 0.2, batched=True),
                                [kth_largest(mags, 17), 2 * kth_largest(mags, 17)])


def test_sharded_arrays_give_the_unsharded_threshold_without_gathering():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  rng = np.random.default_rng(5)
  host = [rng.standard_normal(s).astype(np.float32) for s in [(8, 16), (4, 12), (16, 4)]]
  host[1][:2] = 0.25  # Ties.
  specs = [P("data", "model"), P(None, "model"), P(("data", "model"), None)]
  sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(host, specs)]
  for density in [0.05, 0.5, 1.0]:
    assert topk.topk_threshold(lambda: sharded, density) == topk.topk_threshold(lambda: host,
                                                                                density)
  assert topk.kth_largest_magnitude(lambda: sharded, 40) == kth_largest(magnitudes(host), 40)
  hlo = topk._array_histogram.lower(sharded[0], np.uint32(0), np.uint32(16), bits=16,
                                    batched=False).compile().as_text()
  assert "all-reduce" in hlo and not re.search("all-gather|all-to-all", hlo)
  stacked = jax.device_put(np.stack([host[0], -host[0]]), NamedSharding(mesh, P(None, "data",
                                                                              "model")))
  np.testing.assert_array_equal(topk.topk_threshold(lambda: [stacked], 0.1, batched=True),
                                [kth_largest(np.abs(host[0]).ravel(), 13)] * 2)

