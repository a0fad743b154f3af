"""Exact k-th largest magnitude of one task vector on the host, in small chunks.

The per-tensor trimming thresholds of TIES and Breadcrumbs (`merging.methods`) are order
statistics of |τ_i| = |θ_i − θ_base| over one tensor. The jittable radix select
(`merging.topk`) builds its histograms with scatter-adds, slow on a CPU; np.partition is
fast on most inputs but takes ~60 ns per entry on task vectors whose unchanged entries are
exactly zero. For tensors in host memory this module finds the same value with:

1. a sample: |τ| at 2**15 fixed random positions, sorted; the sample values a few standard
   deviations above and below the rank's expected place bracket the answer;
2. one pass over |τ| in chunks of `CHUNK` entries (computed into a reused scratch buffer, so a
   49152 x 576 embedding needs 4 MiB, not 113 MiB): count the entries above the bracket and
   keep those inside it (~1-2% of them);
3. a sort of the kept entries, where the rank falls.

When the bracket misses the rank (rare: a sample far from typical), two counting passes over
16-bit digits of the bit patterns (np.bincount; the order of non-negative floats is the order
of their bit patterns) find it instead. Exact in every case, ~2 ns per entry on one core.
"""
from __future__ import annotations

import math
import threading
from typing import Iterator, Sequence

import numpy as np

SAMPLE = 1 << 15
CHUNK = 1 << 20
_scratch = threading.local()
_sample_positions: dict[int, np.ndarray] = {}


def _buffer(size: int) -> np.ndarray:
  """This thread's float32 scratch of at least `size` entries (kept between calls)."""
  buffer = getattr(_scratch, "buffer", None)
  if buffer is None or buffer.size < size:
    buffer = _scratch.buffer = np.empty(size, np.float32)
  return buffer[:size]


class TaskVectorMagnitudes:
  """|θ_i − θ_base| of n experts' tensors ([n, size] conceptually), as float32 computed like
  the merge kernels do (both operands converted to float32, then subtracted), without
  materialising it whole. A source for `kth_largest`: `size`, `sample()`, `chunks()`."""

  def __init__(self, base, experts: Sequence[np.ndarray]):
    self.base = np.ravel(base)
    self.experts = [np.ravel(e) for e in experts]
    self.size = self.base.size

  def sample(self) -> np.ndarray:
    """[n, <= SAMPLE] |τ| at fixed random positions (all of them for small tensors)."""
    positions = _sample_positions.get(self.size)
    if positions is None:  # fixed per size: only the speed depends on it, never the result
      positions = _sample_positions[self.size] = np.random.default_rng(self.size).integers(
          0, self.size, SAMPLE)
    return np.stack([np.abs(e[positions].astype(np.float32)
                            - self.base[positions].astype(np.float32)) for e in self.experts])

  def chunks(self) -> Iterator[np.ndarray]:
    """[n, chunk] |τ| over consecutive ranges; each is overwritten by the next."""
    n = len(self.experts)
    out = _buffer(n * min(CHUNK, self.size)).reshape(n, -1)
    for start in range(0, self.size, CHUNK):
      stop = min(start + CHUNK, self.size)
      chunk = out[:, :stop - start]
      for i, expert in enumerate(self.experts):
        np.subtract(expert[start:stop], self.base[start:stop], out=chunk[i], dtype=np.float32)
      np.abs(chunk, out=chunk)
      yield chunk


def _bucket(counts: np.ndarray, rank: int) -> tuple[int, int]:
  """The bucket holding the rank-th largest entry, and the rank left within that bucket."""
  from_top = np.cumsum(counts[::-1])[::-1]  # from_top[b]: entries in buckets >= b
  bucket = int(np.count_nonzero(from_top >= rank)) - 1
  return bucket, rank - int(from_top[bucket] - counts[bucket])


def _digit_count(source, row: int, rank: int) -> np.float32:
  """Expert `row`'s rank-th largest by two passes counting 16-bit digits of bit patterns."""
  counts = np.zeros(1 << 16, np.int64)
  for chunk in source.chunks():
    counts += np.bincount(chunk[row].view(np.uint32) >> 16, minlength=1 << 16)
  top, rank = _bucket(counts, rank)
  counts[:] = 0
  for chunk in source.chunks():
    bits = chunk[row].view(np.uint32)
    counts += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
  low, _ = _bucket(counts, rank)
  return np.uint32((top << 16) | low).view(np.float32)


def _brackets(sample: np.ndarray, size: int, rank: int) -> tuple[np.float32, np.float32]:
  """Step 1: (low, high) around the rank-th largest of `size` entries, from one expert's
  sorted sample."""
  taken = sample.size
  expected = rank * taken / size  # the rank's expected place from the top
  margin = 4 * math.sqrt(expected * max(0.0, 1 - expected / taken)) + 8
  low = sample[max(0, taken - math.ceil(expected + margin))]
  high_at = taken - math.floor(expected - margin) - 1
  return low, (sample[high_at] if high_at < taken else np.float32(np.inf))


def kth_largest(source, ranks: np.ndarray) -> np.ndarray:
  """float32 [n]: expert i's ranks[i]-th largest |τ| (+inf for rank 0; clamped to the size).

  Small tensors (<= 4 * SAMPLE entries) are sorted; large ones go through steps 1-3 of the
  module docstring, all experts in the same passes, and the digit count where a bracket
  misses.
  """
  size = source.size
  ranks = np.minimum(np.asarray(ranks, np.int64), size)
  out = np.full(len(ranks), np.inf, np.float32)
  wanted = [i for i in range(len(ranks)) if ranks[i] > 0]
  if not wanted:
    return out
  if size <= 4 * SAMPLE:
    whole = np.sort(np.concatenate([c.copy() for c in source.chunks()], axis=1), axis=1)
    for i in wanted:
      out[i] = whole[i, size - ranks[i]]
    return out
  sample = np.sort(source.sample(), axis=1)
  brackets = {i: _brackets(sample[i], size, int(ranks[i])) for i in wanted}
  above = dict.fromkeys(wanted, 0)
  inside: dict[int, list] = {i: [] for i in wanted}
  equal = dict.fromkeys(wanted, 0)  # a bracket of one value (ties): count, do not keep
  for chunk in source.chunks():
    for i, (low, high) in brackets.items():
      row = chunk[i]
      above[i] += int(np.count_nonzero(row > high))
      if low == high:
        equal[i] += int(np.count_nonzero(row == low))
      else:
        inside[i].append(row[(row >= low) & (row <= high)])
  for i in wanted:
    rank, (low, high) = int(ranks[i]), brackets[i]
    if low == high:
      found = low if above[i] < rank <= above[i] + equal[i] else None
    else:
      kept = np.sort(np.concatenate(inside[i]))
      found = (kept[kept.size - (rank - above[i])] if above[i] < rank <= above[i] + kept.size
               else None)
    out[i] = _digit_count(source, i, rank) if found is None else found
  return out
