"""Exact k-th largest magnitude over a whole model, without gathering it (radix select).

TIES trims each task vector to its top-`density` fraction of entries by magnitude. The
reference TIES code does that over the whole flattened model; doing it for a 64B-parameter
model by sorting is out of the question, and so is gathering sharded parameters. This module
finds the exact threshold with a few streaming passes instead.

Idea: for non-negative IEEE floats, the order of the values equals the order of their bit
patterns read as unsigned integers (that holds for zeros, subnormals and infinities too). So
the k-th largest |x| is found digit by digit over the uint32 bit pattern of float32(|x|):

  pass p (bits_per_pass = b bits, 32 / b passes):
    for every parameter, among the entries whose top p*b bits equal the prefix found so far,
    count entries per value of the next b bits (a histogram of 2**b buckets);
    sum the histograms over all parameters;
    walk the buckets from the largest down to the one where the running count reaches the
    rank still sought; append that bucket to the prefix; subtract the counts above it.

After the last pass the prefix is the bit pattern of the answer. Each per-parameter histogram
is a jitted function of one (possibly sharded) jax.Array: XLA computes it shard-locally and
all-reduces the 2**b counts, so no parameter is ever gathered. The default b = 16 means two
passes over the model (two reads from disk for a streaming caller).

Counting rule and ties. For `density` d and `total` entries, the number to keep is
k = ceil(d * total) (`keep_count`; d is read at its shortest decimal representation, so 0.2
means exactly 1/5; mergekit's floor, int(d * total), on request). The threshold t is the k-th largest |x|, and the keep rule everywhere in
`merging` is |x| >= t. Hence exactly k entries have |x| >= t when the value t occurs once;
when several entries tie at t, all of them are kept (more than k), as in the reference TIES
code. k = 0 (d = 0, or no entries) gives t = +inf: nothing is kept.

Inputs are read as float32 (bfloat16 and float16 convert exactly; float64 numpy inputs are
rounded to float32 first). NaN or infinite entries are rejected with an error naming the
parameter (the streaming functions; the jittable per-tensor functions cannot raise and treat
NaN as larger than every number). One array (or one row of a batched array) may hold at most
2**32 - 1 entries; totals over the model are summed on the host in int64.
"""
from __future__ import annotations

import decimal
import functools
import math
from typing import Any, Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ArraysFn = Callable[[], Iterable[Any]]
Counts = Union[int, Sequence[int], np.ndarray]

_MAX_PER_ARRAY = 2**32 - 1
_IN_FLIGHT = 4  # Histograms dispatched but not yet read back.


COUNTS = ("ceil", "floor")


def keep_count(density: float, total: int, count: str = "ceil") -> int:
  """How many of `total` entries a `density` fraction keeps.

  "ceil" (the default, at least d of the entries): ceil(d * total), with d read at its shortest
  decimal representation (`repr`), so that 0.2 * 10 is 2, not 3 as binary floating point
  would give. "floor": mergekit's ``int(density * numel)``, computed as mergekit does, in
  binary floating point (so 0.29 * 100 gives 28).
  """
  density = float(density)
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}")
  if count == "floor":
    return min(total, int(density * total))
  if count != "ceil":
    raise ValueError(f"count must be one of {list(COUNTS)}, got {count!r}")
  return min(total, math.ceil(decimal.Decimal(repr(density)) * total))


def _magnitude_bits(x: jax.Array) -> jax.Array:
  """uint32 bit pattern of float32(|x|): ordered like the magnitudes."""
  return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def _histogram_of_bits(u: jax.Array, prefix, shift, bits: int, dtype=jnp.uint32) -> jax.Array:
  """Counts of (u >> shift) & (2**bits - 1) over the entries whose bits above are `prefix`.

  `shift` may be traced; in the first pass (shift + bits == 32) every entry matches.
  """
  shift = jnp.asarray(shift, jnp.uint32)
  above = shift + bits
  bucket = (u >> shift) & jnp.uint32(2**bits - 1)
  matches = ((above >= 32) | ((u >> jnp.minimum(above, 31)) == prefix)).astype(dtype)
  # Scatter-add with the array's own index shape (no reshape): on a sharded input XLA
  # scatters into a per-shard histogram and all-reduces it.
  return jnp.zeros(2**bits, dtype).at[bucket].add(matches)


@functools.partial(jax.jit, static_argnames=("bits", "batched"))
def _array_histogram(x, prefix, shift, *, bits, batched):
  """Histogram of one streamed array for one pass, plus its NaN and infinity counts.

  Unbatched: x any shape, prefix uint32 scalar -> [2**bits]. Batched: x [n, ...],
  prefix [n] -> [n, 2**bits]. `shift` is traced: one compilation per shape, not per pass.
  """
  def one(row, row_prefix):
    return _histogram_of_bits(_magnitude_bits(row), row_prefix, shift, bits)

  hist = jax.vmap(one)(x, prefix) if batched else one(x, prefix)
  return hist, jnp.sum(jnp.isnan(x), dtype=jnp.int32), jnp.sum(jnp.isinf(x), dtype=jnp.int32)


def _narrow(hist: np.ndarray, prefix: np.ndarray, remaining: np.ndarray, bits: int):
  """One radix step on the host, per row: pick the bucket holding the `remaining`-th largest.

  hist [rows, 2**bits] int64, prefix [rows] uint64, remaining [rows] int64 (each >= 1 and
  <= the row's total count). Returns the extended prefix and the rank left within the bucket.
  """
  from_top = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # from_top[:, b] = count in buckets >= b
  bucket = np.sum(from_top >= remaining[:, None], axis=1) - 1
  rows = np.arange(hist.shape[0])
  above = from_top[rows, bucket] - hist[rows, bucket]
  return (prefix << np.uint64(bits)) | bucket.astype(np.uint64), remaining - above


def _named(item: Any, position: int):
  if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
    return item
  return f"array #{position}", item


def _check_bits(bits_per_pass: int):
  if bits_per_pass not in (4, 8, 16):
    raise ValueError(f"bits_per_pass must be 4, 8 or 16, got {bits_per_pass}")


def _accumulate(total_hist, name, result, bits_per_pass):
  hist, nans, infs = result
  if int(nans) or int(infs):
    raise ValueError(f"{name}: contains {int(nans)} NaN and {int(infs)} infinite entries; "
                     "magnitudes must be finite")
  hist = np.asarray(hist, np.int64).reshape(-1, 2**bits_per_pass)
  return hist if total_hist is None else total_hist + hist


def _select(arrays_fn: ArraysFn, ks: Callable[[int], Counts], batched: bool,
            bits_per_pass: int) -> np.ndarray:
  """Radix select over the streamed arrays; `ks(entries_per_row)` gives the rank per row.

  Returns float32 [rows] (rows = 1 unbatched); rows whose rank is 0 get +inf.
  """
  _check_bits(bits_per_pass)
  prefix = remaining = wanted = None
  for p in range(32 // bits_per_pass):
    shift = 32 - bits_per_pass * (p + 1)
    total_hist, rows, pending = None, None, []
    for position, item in enumerate(arrays_fn()):
      name, x = _named(item, position)
      x = x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x, np.float32))
      if batched:
        if x.ndim == 0:
          raise ValueError(f"{name}: batched arrays need a leading row axis, got a scalar")
        if rows is not None and x.shape[0] != rows:
          raise ValueError(f"{name}: leading axis {x.shape[0]} differs from the earlier "
                           f"arrays' {rows}")
        rows = x.shape[0]
        per_row = math.prod(x.shape[1:])
        row_prefix = (np.zeros(rows, np.uint32) if prefix is None else
                      prefix.astype(np.uint32))
      else:
        per_row = x.size
        row_prefix = np.uint32(0 if prefix is None else prefix[0])
      if per_row > _MAX_PER_ARRAY:
        raise ValueError(f"{name}: {per_row} entries per row exceed the 2**32 - 1 limit of "
                         "the per-array histogram; split it")
      # Dispatch now, read back a few arrays later: the device works while the next array
      # is produced (e.g. read from disk).
      pending.append((name, _array_histogram(x, row_prefix, np.uint32(shift),
                                             bits=bits_per_pass, batched=batched)))
      while len(pending) > _IN_FLIGHT:
        total_hist = _accumulate(total_hist, *pending.pop(0), bits_per_pass)
    while pending:
      total_hist = _accumulate(total_hist, *pending.pop(0), bits_per_pass)
    if total_hist is None:
      if batched:
        raise ValueError("arrays_fn() yielded no arrays; batched mode needs at least one")
      total_hist = np.zeros((1, 2**bits_per_pass), np.int64)
    if prefix is None:
      totals = total_hist.sum(axis=1)
      wanted = np.broadcast_to(np.asarray(ks(int(totals[0])), np.int64), totals.shape)
      if np.any(wanted < 0) or np.any(wanted > totals):
        raise ValueError(f"rank k={wanted.tolist()} is outside [0, {int(totals[0])}] (the "
                         "number of entries per row)")
      remaining = np.maximum(wanted, 1)
      prefix = np.zeros(totals.shape, np.uint64)
      if np.all(wanted == 0):
        break
    prefix, remaining = _narrow(total_hist, prefix, remaining, bits_per_pass)
  result = prefix.astype(np.uint32).view(np.float32)
  return np.where(wanted == 0, np.float32(np.inf), result)


def kth_largest_magnitude(arrays_fn: ArraysFn, k: Counts, *, batched: bool = False,
                          bits_per_pass: int = 16) -> Union[np.float32, np.ndarray]:
  """The exact k-th largest |x| over all streamed arrays (k = 0 gives +inf).

  Args:
    arrays_fn: called once per pass (32 / bits_per_pass times); returns an iterable of arrays
      (jax.Array, possibly sharded, or numpy) or of (name, array) pairs; names appear in
      errors. Each call must yield the same arrays.
    k: the rank counted from the largest, 0 <= k <= total entries. With `batched`, an int or
      one int per row.
    batched: every array has a leading axis of the same size n (e.g. n stacked task
      vectors); row i of every array forms stream i, and the result has shape [n].
    bits_per_pass: radix digit width (4, 8 or 16).

  Returns:
    np.float32, or [n] float32 with `batched`.
  """
  if not batched and np.ndim(k) != 0:
    raise ValueError(f"k must be an int without batched=True, got {k!r}")
  result = _select(arrays_fn, lambda total: k, batched, bits_per_pass)
  return result if batched else np.float32(result[0])


def topk_threshold(arrays_fn: ArraysFn, density: float, *, batched: bool = False,
                   bits_per_pass: int = 16) -> Union[np.float32, np.ndarray]:
  """Threshold t with |x| >= t selecting the top-`density` fraction of all streamed entries.

  t is the k-th largest |x| for k = keep_count(density, total) = ceil(density * total); ties
  at t are all kept (see the module docstring). density 0 or an empty stream gives +inf,
  density 1 the smallest |x|. With `batched`, one threshold per row ([n] float32), each over
  that row's entries across all arrays. Arguments as in `kth_largest_magnitude`.
  """
  keep_count(density, 0)  # Validates the range.
  result = _select(arrays_fn, lambda total: keep_count(density, total), batched, bits_per_pass)
  return result if batched else np.float32(result[0])


def tensor_kth_largest_magnitude(x: jax.Array, k, *, bits_per_pass: int = 16) -> jax.Array:
  """Jittable k-th largest |x| within one tensor (float32 scalar; +inf when k <= 0).

  `k` may be traced (no recompilation per rank); k above x.size is clamped to x.size. Same
  radix select as `kth_largest_magnitude`, with the histograms in int32 (so x.size < 2**31).
  Under jit on a sharded `x` the histograms are computed per shard and all-reduced.
  """
  _check_bits(bits_per_pass)
  u = _magnitude_bits(x)
  k = jnp.asarray(k, jnp.int32)
  remaining = jnp.clip(k, 1, max(x.size, 1))
  prefix = jnp.uint32(0)
  for p in range(32 // bits_per_pass):
    shift = 32 - bits_per_pass * (p + 1)
    hist = _histogram_of_bits(u, prefix, shift, bits_per_pass, jnp.int32)
    from_top = jnp.cumsum(hist[::-1])[::-1]
    bucket = jnp.sum(from_top >= remaining) - 1
    remaining = remaining - (from_top[bucket] - hist[bucket])
    prefix = (prefix << bits_per_pass) | bucket.astype(jnp.uint32)
  value = jax.lax.bitcast_convert_type(prefix, jnp.float32)
  return jnp.where((k <= 0) | (x.size == 0), jnp.float32(jnp.inf), value)


def tensor_topk_threshold(x: jax.Array, density: float, *, batched: bool = False) -> jax.Array:
  """Jittable per-tensor threshold: |x| >= t keeps ceil(density * size) entries (ties kept).

  With `batched`, x is [n, ...] and the result [n] holds one threshold per row.
  """
  if batched:
    k = keep_count(density, math.prod(x.shape[1:]))
    return jax.vmap(lambda row: tensor_kth_largest_magnitude(row, k))(x)
  return tensor_kth_largest_magnitude(x, keep_count(density, x.size))
