"""FLAMe's public data sources, one TFDS builder per dataset family (see `base`).

Importing this package imports every module in it, which registers each builder with TFDS
(``tfds.builder("flame_truthfulqa/truthfulqa_truthfulness")``). `builders()` lists them and
`task_specs()` maps every task name to its builder and spec.
"""
from __future__ import annotations

import importlib
import pkgutil

from flame.data import format
from flame.data.sources import base

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def builders() -> list[type[base.SourceBuilder]]:
  """Every registered source builder, sorted by name."""
  return base.registered_builders()


def task_specs() -> dict[str, tuple[type[base.SourceBuilder], format.TaskSpec]]:
  """Task name -> (builder class, spec), over all builders; task names are unique."""
  out = {}
  for cls in builders():
    for spec in cls.TASKS:
      if spec.name in out:
        raise ValueError(f"task {spec.name!r} is defined by both {out[spec.name][0].name} "
                         f"and {cls.name}")
      out[spec.name] = (cls, spec)
  return out
