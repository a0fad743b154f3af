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
from typing import Iterator, Optional, Sequence

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
  """|θ − θ_base| of one expert's tensor, as float32 computed like the merge kernels do
  (both operands converted to float32, then subtracted), without materialising it whole."""

  def __init__(self, base, expert):
    self.base, self.expert = np.ravel(base), np.ravel(expert)
    self.size = self.base.size

  def at(self, positions: np.ndarray) -> np.ndarray:
    return np.abs(self.expert[positions].astype(np.float32)
                  - self.base[positions].astype(np.float32))

  def chunks(self) -> Iterator[np.ndarray]:
    """|τ| in consecutive chunks; each chunk is overwritten by the next."""
    out = _buffer(min(CHUNK, self.size))
    for start in range(0, self.size, CHUNK):
      stop = min(start + CHUNK, self.size)
      chunk = out[:stop - start]
      np.subtract(self.expert[start:stop], self.base[start:stop], out=chunk, dtype=np.float32)
      np.abs(chunk, out=chunk)
      yield chunk


def _bucket(counts: np.ndarray, rank: int) -> tuple[int, int]:
  """The bucket holding the rank-th largest entry, and the rank left within that bucket."""
  from_top = np.cumsum(counts[::-1])[::-1]  # from_top[b]: entries in buckets >= b
  bucket = int(np.count_nonzero(from_top >= rank)) - 1
  return bucket, rank - int(from_top[bucket] - counts[bucket])


def _digit_count(source: TaskVectorMagnitudes, rank: int) -> np.float32:
  """The rank-th largest by two passes counting 16-bit digits of the bit patterns."""
  counts = np.zeros(1 << 16, np.int64)
  for chunk in source.chunks():
    counts += np.bincount(chunk.view(np.uint32) >> 16, minlength=1 << 16)
  top, rank = _bucket(counts, rank)
  counts[:] = 0
  for chunk in source.chunks():
    bits = chunk.view(np.uint32)
    counts += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
  low, _ = _bucket(counts, rank)
  return np.uint32((top << 16) | low).view(np.float32)


def _bracketed(source: TaskVectorMagnitudes, rank: int) -> Optional[np.float32]:
  """Steps 1-3 of the module docstring; None when the bracket misses the rank."""
  positions = _sample_positions.get(source.size)
  if positions is None:  # fixed per size: only the speed depends on it, never the result
    positions = _sample_positions[source.size] = np.random.default_rng(
        source.size).integers(0, source.size, SAMPLE)
  sample = np.sort(source.at(positions))
  expected = rank * SAMPLE / source.size  # the rank's expected place from the top
  margin = 4 * math.sqrt(expected * (1 - expected / SAMPLE)) + 8
  low = sample[max(0, SAMPLE - math.ceil(expected + margin))]
  high_at = SAMPLE - math.floor(expected - margin) - 1
  high = sample[high_at] if high_at < SAMPLE else np.float32(np.inf)
  above, inside, equal = 0, [], 0
  for chunk in source.chunks():
    above += int(np.count_nonzero(chunk > high))
    if low == high:
      equal += int(np.count_nonzero(chunk == low))
    else:
      inside.append(chunk[(chunk >= low) & (chunk <= high)])
  if low == high:
    return np.float32(low) if above < rank <= above + equal else None
  kept = np.concatenate(inside)
  if not above < rank <= above + kept.size:
    return None
  kept.sort()
  return np.float32(kept[kept.size - (rank - above)])


def kth_largest(source: TaskVectorMagnitudes, ranks: Sequence[int]) -> list[np.float32]:
  """The ranks[j]-th largest |τ| (+inf for rank 0; ranks above the size are clamped)."""
  out = []
  for rank in ranks:
    rank = min(int(rank), source.size)
    if rank <= 0:
      out.append(np.float32(np.inf))
    elif source.size <= 4 * SAMPLE:
      out.append(np.float32(np.sort(np.concatenate(list(source.chunks())))[source.size - rank]))
    else:
      found = _bracketed(source, rank)
      out.append(_digit_count(source, rank) if found is None else found)
  return out
