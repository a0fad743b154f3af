"""What a merge does to one named parameter, shared by the in-memory and the streaming merge.

A `MergeSpec` names a `merging.methods.METHODS` entry and its settings. `merge_tensor` applies
it to one parameter: random methods (DARE, DELLA) get `seed` and the parameter's '/'-joined
name, so their masks do not depend on the order parameters are processed in; with global
trimming the thresholds computed over the whole model (`global_thresholds`) replace the
per-tensor `density`/`gamma` cut. Output dtype: `out_dtype`, else the base's, else the
first expert's (see `merging.methods`); all arithmetic is float32.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merging import host_select, methods, topk

# Arguments the merge supplies itself; a user setting them in `params` is an error.
_RESERVED = ("seed", "name", "out_dtype", "thresholds", "weights", "base", "experts")
# Per-tensor trimming settings that global thresholds replace.
_TRIM_PARAMS = ("density", "gamma", "count")


def parameter_name(key: Sequence[str]) -> str:
  """'/'-joined parameter key, e.g. 'layers_0/attention/query/kernel'."""
  return "/".join(key)


def _accepted(fn: Callable) -> set[str]:
  return set(inspect.signature(fn).parameters)


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """A merge method and its settings.

  method: a key of `merging.methods.METHODS`.
  weights: one weight w_i per expert (None: all 1.0); see the method's docstring.
  params: the method's keyword settings (density, lam, normalize, gamma, epsilon, t, ...).
  global_trim: cut task vectors at thresholds over the whole model (TIES reference code)
    instead of per tensor; only for methods with `magnitude_ranks` (ties, breadcrumbs*).
  seed: seed of the random masks (dare_*, della*).
  """
  method: str
  weights: Optional[tuple[float, ...]] = None
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  global_trim: bool = False
  seed: int = 0

  @property
  def entry(self) -> methods.MergeMethod:
    return methods.METHODS[self.method]

  def validate(self, num_experts: int) -> None:
    """Raises ValueError naming the setting that cannot work with `num_experts` experts."""
    if self.method not in methods.METHODS:
      raise ValueError(f"unknown merge method {self.method!r}; known: "
                       f"{', '.join(sorted(methods.METHODS))}")
    if num_experts < 1:
      raise ValueError("need at least one expert checkpoint")
    if self.weights is not None and len(self.weights) != num_experts:
      raise ValueError(f"{self.method}: {len(self.weights)} weights for {num_experts} experts; "
                       "give one weight per expert")
    signature = inspect.signature(self.entry.fn).parameters
    accepted = set(signature) - set(_RESERVED)
    for name in self.params:
      if name in _RESERVED:
        raise ValueError(f"{self.method}: {name!r} is set by the merge itself, not in params")
      if name not in accepted:
        raise ValueError(f"{self.method}: unknown parameter {name!r}; it accepts "
                         f"{', '.join(sorted(accepted))}")
    required = [name for name, p in signature.items() if name not in _RESERVED and
                p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if self.entry.magnitude_ranks is not None:
      required.append("density")  # Per-tensor and global trimming both need it.
    missing = [name for name in required if name not in self.params]
    if missing:
      raise ValueError(f"{self.method}: missing parameter(s) {', '.join(missing)}")
    if self.params.get("density") is not None:
      methods.per_expert(self.params["density"], num_experts, f"{self.method}: density")
    if self.params.get("count", "ceil") not in topk.COUNTS:
      raise ValueError(f"{self.method}: count must be one of {list(topk.COUNTS)} (ceil: at "
                       f"least density·N entries; floor: mergekit's int(density·N)), got "
                       f"{self.params['count']!r}")
    if self.method == "slerp" and (num_experts != 1 or self.weights is not None):
      raise ValueError("slerp interpolates the base and exactly one expert, without weights; "
                       f"got {num_experts} experts")
    if self.global_trim:
      if self.entry.magnitude_ranks is None:
        cut = [name for name, entry in methods.METHODS.items() if entry.magnitude_ranks]
        raise ValueError(f"{self.method}: global_trim applies only to magnitude-cut methods "
                         f"({', '.join(cut)})")
    if self.entry.random and not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"{self.method}: seed must be an int, got {self.seed!r}")

  def describe(self) -> dict[str, Any]:
    """JSON-ready record of the spec (for checkpoint meta and the resume fingerprint)."""
    return {"method": self.method, "weights": None if self.weights is None else
            [float(w) for w in self.weights], "params": _plain(dict(self.params)),
            "global_trim": bool(self.global_trim), "seed": int(self.seed)}


def _plain(value: Any) -> Any:
  """JSON-ready copy: numpy values to Python numbers, tuples to lists."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def make_spec(method: str, weights=None, method_params: Optional[Mapping[str, Any]] = None,
              global_trim: bool = False, seed: int = 0) -> MergeSpec:
  return MergeSpec(method=method, weights=None if weights is None else tuple(
      float(w) for w in weights), params=dict(method_params or {}), global_trim=global_trim,
                   seed=int(seed))


# Tensors above this many entries (per expert) are merged in row chunks by the methods whose
# result is elementwise once the trimming thresholds are known, bounding the kernels'
# temporaries (several float32 copies of the stacked experts) for e.g. a 49152 x 576 embedding.
CHUNK_ENTRIES = 1 << 21
ROW_SPLITTABLE = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")


def _row_chunks(shape: Sequence[int], chunk_entries: int) -> Optional[list[slice]]:
  """Slices of axis 0 holding at most ~chunk_entries entries each; None when not worth it."""
  entries = math.prod(shape)
  if len(shape) == 0 or entries <= chunk_entries or shape[0] < 2:
    return None
  rows = max(1, chunk_entries // max(1, entries // shape[0]))
  return [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def _tensor_thresholds(spec: MergeSpec, base, experts, chunks: list[slice]):
  """Per-tensor trimming thresholds of `spec` from the task vectors streamed chunk by chunk:
  the same order statistics the method computes on the whole tensor (`merging.topk`)."""
  def vectors():
    for rows in chunks:
      yield task_vectors(base[rows], [e[rows] for e in experts])
  entries = math.prod(np.shape(base))
  return tuple(np.asarray(topk.kth_largest_magnitude(vectors, ranks, batched=True), np.float32)
               for ranks in trim_ranks(spec, entries, len(experts)))


def _on_host(x) -> bool:
  """Whether `x` is a NumPy array or a jax.Array whole on one CPU device (so NumPy can read
  it without a copy)."""
  if isinstance(x, np.ndarray):
    return True
  if not isinstance(x, jax.Array) or not x.is_fully_addressable:
    return False
  devices = x.sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


_HOST_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="merge-trim")


def _host_thresholds(spec: MergeSpec, base, experts) -> tuple[np.ndarray, ...]:
  """Per-tensor trimming thresholds of host-resident tensors (`merging.host_select`), the
  experts in parallel threads."""
  ranks = trim_ranks(spec, math.prod(np.shape(base)), len(experts))
  base = np.asarray(base)

  def expert_thresholds(i: int) -> list[np.float32]:
    source = host_select.TaskVectorMagnitudes(base, [np.asarray(experts[i])])
    return [host_select.kth_largest(source, r[i:i + 1])[0] for r in ranks]

  per_expert = list(_HOST_POOL.map(expert_thresholds, range(len(experts))))
  return tuple(np.array([values[j] for values in per_expert], np.float32)
               for j in range(len(ranks)))


def merge_tensor(spec: MergeSpec, name: str, base, experts, *, thresholds=None,
                 out_dtype=None, chunk_entries: int = CHUNK_ENTRIES) -> jax.Array:
  """Merges one parameter: `spec.method` applied to base [*shape] and experts (n × [*shape]).

  `name` is the '/'-joined key (random methods derive their masks from it); `thresholds` are
  the global trimming thresholds (a tuple of [n] arrays, from `global_thresholds`). Large
  tensors of the elementwise methods are merged in row chunks of about `chunk_entries`
  entries, after computing their per-tensor thresholds exactly: the result is identical.
  """
  entry = spec.entry
  kwargs = dict(spec.params)
  if entry.random:
    kwargs.update(seed=spec.seed, name=name)
  chunks = (_row_chunks(np.shape(experts[0]), chunk_entries)
            if spec.method in ROW_SPLITTABLE else None)
  if thresholds is None and entry.magnitude_ranks is not None:
    if all(_on_host(x) for x in [base, *experts]):
      thresholds = _host_thresholds(spec, base, experts)
    elif chunks:
      thresholds = _tensor_thresholds(spec, base, experts, chunks)
  if thresholds is not None:
    for trim_param in _TRIM_PARAMS:
      kwargs.pop(trim_param, None)
    kwargs["thresholds"] = tuple(thresholds)
  if not chunks:
    return entry.fn(base, experts, spec.weights, out_dtype=out_dtype, **kwargs)
  if out_dtype is None:
    out_dtype = (base if base is not None else experts[0]).dtype
  parts = [entry.fn(None if base is None else base[rows], [e[rows] for e in experts],
                    spec.weights, out_dtype=out_dtype, **kwargs) for rows in chunks]
  return jnp.concatenate(parts, axis=0)


@jax.jit
def task_vectors(base, experts) -> jax.Array:
  """float32 [n, *shape] τ_i = θ_i − θ_base, computed exactly as the merge kernels do."""
  stacked = jnp.stack([e.astype(jnp.float32) for e in experts])
  return stacked - base.astype(jnp.float32)[None]


def trim_ranks(spec: MergeSpec, total_entries: int, num_experts: int) -> tuple[np.ndarray, ...]:
  """The order statistics (one [n] rank array per threshold) a global trim cuts at."""
  ranks_fn = spec.entry.magnitude_ranks
  accepted = _accepted(ranks_fn)
  return tuple(ranks_fn(total_entries, num_experts,
                        **{k: v for k, v in spec.params.items() if k in accepted}))


def global_thresholds(spec: MergeSpec, task_vectors_fn: Callable[[], Iterable[Any]],
                      total_entries: int, num_experts: int) -> tuple[np.ndarray, ...]:
  """Thresholds over the whole model: for each rank array r of `trim_ranks`, the r_i-th largest
  |τ_i| over every parameter (exact; `merging.topk`, two passes over the stream per array).

  `task_vectors_fn()` yields (name, [n, *shape] task vectors) for every parameter, the same
  ones on every call. Returns a tuple of float32 [n] arrays to pass as `thresholds=`.
  """
  return tuple(np.asarray(topk.kth_largest_magnitude(task_vectors_fn, ranks, batched=True),
                          np.float32)
               for ranks in trim_ranks(spec, total_entries, num_experts))
