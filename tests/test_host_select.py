"""merging.host_select: the exact k-th largest |θ − θ_base| against a sort, on the inputs
that make np.partition slow (zeros, ties), across chunk boundaries and via its fallback."""
import ml_dtypes
import numpy as np
import pytest

from merging import host_select


def reference(base, expert, ranks):
  """float32 |τ| computed as the merge kernels do, sorted in float64."""
  tau = np.abs(np.asarray(expert, np.float32).ravel() - np.asarray(base, np.float32).ravel())
  descending = np.sort(tau.astype(np.float64))[::-1]
  return [np.inf if r <= 0 else descending[min(r, tau.size) - 1] for r in ranks]


def task_vector(kind, size, rng):
  base = rng.standard_normal(size).astype(np.float32)
  if kind == "half_unchanged":  # a full fine-tune: many entries exactly unchanged
    expert = base + (rng.random(size) < 0.5) * rng.standard_normal(size).astype(
        np.float32) * np.float32(1e-3)
  elif kind == "few_values":
    expert = base + rng.integers(-3, 4, size).astype(np.float32) * np.float32(0.125)
  elif kind == "bfloat16":
    base = base.astype(ml_dtypes.bfloat16)
    expert = (base.astype(np.float32) + rng.standard_normal(size).astype(np.float32)
              * np.float32(1e-2)).astype(ml_dtypes.bfloat16)
  else:
    expert = base + rng.standard_normal(size).astype(np.float32)
  return base, expert.astype(base.dtype)


@pytest.mark.parametrize("kind", ["half_unchanged", "few_values", "bfloat16", "distinct"])
@pytest.mark.parametrize("size", [1000, 300_001, host_select.CHUNK * 2 + 7])
def test_kth_largest_is_the_sorted_value(kind, size):
  rng = np.random.default_rng(size)
  base, expert = task_vector(kind, size, rng)
  ranks = [0, 1, 17, size // 100, size // 5, size // 2, size // 2 + 1, size - 1, size,
           size + 5]
  source = host_select.TaskVectorMagnitudes(base, [expert] * len(ranks))
  got = host_select.kth_largest(source, ranks)  # one rank per (identical) expert
  assert got.dtype == np.float32
  assert got.tolist() == reference(base, expert, ranks)


def test_the_digit_count_fallback_is_exact(monkeypatch):
  """A bracket that always misses sends every rank to the digit count."""
  rng = np.random.default_rng(1)
  base, expert = task_vector("half_unchanged", 300_001, rng)
  calls = []
  digit_count = host_select._digit_count  # pylint: disable=protected-access
  monkeypatch.setattr(host_select, "_brackets",
                      lambda sample, size, rank: (np.float32(5.0), np.float32(6.0)))
  monkeypatch.setattr(host_select, "_digit_count",
                      lambda source, row, rank: calls.append(rank) or digit_count(
                          source, row, rank))
  ranks = [1, 3000, 60_000, 150_000, 150_001, 300_001]
  source = host_select.TaskVectorMagnitudes(base, [expert] * len(ranks))
  got = host_select.kth_largest(source, ranks)
  assert calls == ranks
  assert got.tolist() == reference(base, expert, ranks)


def test_inputs_are_not_modified_and_chunks_reuse_one_buffer():
  rng = np.random.default_rng(2)
  base, expert = task_vector("distinct", host_select.CHUNK * 3, rng)
  saved = base.copy(), expert.copy()
  source = host_select.TaskVectorMagnitudes(base, [expert, base])
  addresses = {chunk.__array_interface__["data"][0] for chunk in source.chunks()}
  assert len(addresses) == 1
  assert host_select.kth_largest(source, [12345, 1]).tolist() == [
      reference(base, expert, [12345])[0], 0.0]
  np.testing.assert_array_equal(base, saved[0])
  np.testing.assert_array_equal(expert, saved[1])
