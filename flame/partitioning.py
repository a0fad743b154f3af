"""Device mesh, logical-axis rules and the shardings derived from them.

Models annotate every weight with logical axis names; a rules table maps each
name to a mesh axis (or a tuple of them, or None = replicated), T5X-style::

  ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'model'), ...

Changing the parallelism is a gin change: `Partitioner.mesh_shape`,
`Partitioner.axis_names`, `Partitioner.rules`. Rules that name an axis absent
from the mesh, or a dimension that does not divide evenly over its mesh axes,
fall back to replication for that dimension (logged once per parameter).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence, Union

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = Union[None, str, tuple[str, ...]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("relpos_buckets", None),
    ("layers", None),  # the stacked axis of scanned layers
)


def _device_count(devices: Sequence[Any]) -> str:
  """"8 devices", or with several processes "8 devices (2 processes × 4)"."""
  processes = len({getattr(d, "process_index", 0) for d in devices})
  if processes == 1:
    return f"{len(devices)} devices"
  return f"{len(devices)} devices ({processes} processes × {len(devices) // processes})"


def make_mesh(mesh_shape: Sequence[int], axis_names: Sequence[str],
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A Mesh over `devices` (default: all); one `-1` entry absorbs the rest."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} and axis_names {tuple(axis_names)} "
                     "must have the same length")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: at most one dimension may be -1")
  known = math.prod(d for d in shape if d != -1)
  named = ", ".join(f"{n}={d}" for n, d in zip(axis_names, mesh_shape))
  if -1 in shape:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh_shape ({named}) cannot cover {_device_count(devices)}: the "
                       f"fixed dimensions multiply to {known}, which must divide it "
                       "(partitioning.Partitioner.mesh_shape)")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh_shape ({named}) needs {math.prod(shape)} devices, "
                     f"{_device_count(devices)} available; use -1 for one dimension to take "
                     "the rest (partitioning.Partitioner.mesh_shape)")
  try:  # Topology-aware order on TPU (ICI neighbours share the inner axes).
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.info("create_device_mesh(%s) failed (%s); using the given device order", shape, e)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, tuple(axis_names))


def _mesh_axes_for(logical: Optional[str], rules: Mapping[str, MeshAxes], mesh: Mesh
                   ) -> tuple[str, ...]:
  if logical is None:
    return ()
  target = rules.get(logical)
  if target is None:
    return ()
  target = (target,) if isinstance(target, str) else tuple(target)
  return tuple(a for a in target if a in mesh.shape and mesh.shape[a] > 1)


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int],
                    rules: Sequence[tuple[str, MeshAxes]], mesh: Mesh,
                    name: str = "") -> PartitionSpec:
  """PartitionSpec for one array; indivisible dimensions are replicated."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, logical in zip(shape, logical_axes):
    axes = tuple(a for a in _mesh_axes_for(logical, table, mesh) if a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      logging.info("%s: dimension %d (%s) does not divide over mesh axes %s of size %d; "
                   "replicating it", name or "array", dim, logical, axes, size)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def path_name(path) -> str:
  """A tree path as 'decoder/layers_3/mlp/wi' (what gin settings and logs name)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@gin.configurable
class Partitioner:
  """Owns the mesh and turns logical annotations into `NamedSharding`s."""

  def __init__(self, mesh_shape: Sequence[int] = (-1, 1, 1),
               axis_names: Sequence[str] = ("data", "fsdp", "model"),
               rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
               devices: Optional[Sequence[Any]] = None):
    self.mesh = make_mesh(mesh_shape, axis_names, devices)
    self.rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def params_shardings(self, boxed_params) -> Any:
    """Shardings for a tree of `nn.Partitioned` (or abstract) parameters."""
    import flax.linen as nn  # here, not at the top: flame-merge makes meshes without Flax
    def one(path, leaf):
      if isinstance(leaf, nn.Partitioned):
        axes, shape = leaf.names, leaf.value.shape
      else:
        axes, shape = (None,) * len(leaf.shape), leaf.shape
      return NamedSharding(self.mesh, logical_to_spec(axes, shape, self.rules, self.mesh,
                                                      path_name(path)))
    return jax.tree_util.tree_map_with_path(
        one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

  def batch_sharding(self, rank: int = 2) -> NamedSharding:
    """Batch dimension over the data-parallel axes, everything else replicated."""
    axes = _mesh_axes_for("batch", dict(self.rules), self.mesh)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(self.mesh, PartitionSpec(first, *([None] * (rank - 1))))

  def data_parallel_size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in _mesh_axes_for("batch", dict(self.rules),
                                                                 self.mesh))

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy batch → global arrays sharded over the batch axes.

    Each process passes its own rows (the global batch is their concatenation).
    """
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), v)
            for k, v in local_batch.items()}

  def optimizer_shardings(self, abstract_opt_state, abstract_params, params_shardings) -> Any:
    """Shardings for optimizer state: each leaf that mirrors a parameter (same
    dict path suffix and shape) takes that parameter's sharding; factored
    statistics (Adafactor's row/column moments: the parameter's shape minus one
    dimension) take its spec minus that dimension; the rest is replicated."""
    params = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree_util.tree_leaves(params_shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
      params[_dict_keys(path)] = (tuple(leaf.shape), sharding)

    def one(path, leaf):
      keys = _dict_keys(path)
      for start in range(len(keys)):
        if keys[start:] in params:
          shape, sharding = params[keys[start:]]
          spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
          if tuple(leaf.shape) == shape:
            return sharding
          for dropped in range(len(shape)):
            if shape[:dropped] + shape[dropped + 1:] == tuple(leaf.shape):
              return NamedSharding(self.mesh, PartitionSpec(*(spec[:dropped] +
                                                              spec[dropped + 1:])))
          break
      return self.replicated()
    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings (for AOT lowering and Orbax restore)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as NumPy on every process (gathered across processes when sharded
  over several)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
