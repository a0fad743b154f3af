"""Hyper-parameter sweep of merge methods, selected on held-in validation tasks.

As in Yadav et al. (2024) and the TIES reference code: for each method,
every point of its grid (e.g. λ ∈ {0.5, …, 1.5} × density ∈ {0.1, 0.2, …}) is
merged and scored on the held-in *validation* tasks; the point with the
highest mean held-in normalised validation score (`evaluate.normalized_scores`)
is kept, ties going to the first point in grid order; only that point is then
scored on the held-in *test* tasks and the held-out tasks.

The sweep knows nothing about how merging or evaluation is done: it calls

  merge_fn(method, **point) -> params       e.g. functools.partial over
                                            merging.merge.merge_params(base, experts, ...)
  evaluate_fn(params) -> {task: raw score}  on the held-in validation tasks
  test_fn(params) -> {task: raw score}      on the held-in test and held-out tasks

Every evaluated point is appended to `SweepResult.records` and, with
`out_dir`, rewritten atomically to ``results.jsonl`` after each point (so a
crash loses at most one point; `resume=True` reuses the records found there)
together with ``results.md`` (the test rows, then the validation grid).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from flame.files import read_jsonl, write_text_atomically  # noqa: F401 (re-exported)
from merging import evaluate

Grid = Mapping[str, Sequence[Any]]
RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"


def grid_points(grid: Grid) -> list[dict[str, Any]]:
  """The Cartesian product of `grid` as dicts, in grid order: the last parameter varies
  fastest (`itertools.product`). An empty grid has one point, {}."""
  for name, values in grid.items():
    if isinstance(values, (str, bytes)) or not len(values):
      raise ValueError(f"grid parameter {name!r} needs a non-empty list of values, got "
                       f"{values!r}")
  names = list(grid)
  return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def describe(method: str, point: Mapping[str, Any]) -> str:
  """'ties (lam=1.0, density=0.2)': a method and its settings, for tables."""
  settings = ", ".join(f"{k}={v}" for k, v in point.items())
  return f"{method} ({settings})" if settings else method


def _selection_key(record: Mapping[str, Any]) -> float:
  value = record["scores"]["held_in"]
  return -math.inf if value is None or math.isnan(value) else value


def select_best(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
  """The record with the highest held-in normalised score; the first one among equals
  (NaN counts as the lowest)."""
  if not records:
    raise ValueError("no validation records to select from")
  best = records[0]
  for record in records[1:]:
    if _selection_key(record) > _selection_key(best):
      best = record
  return best


@dataclasses.dataclass
class SweepResult:
  """`records`: one dict per evaluated point, JSON-ready: {phase: "validation" | "test",
  method, params, raw: {task: score}, scores: NormalizedScores.to_json()}.
  `best`: method → its selected validation record; `test`: method → its test record."""
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  best: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  test: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def markdown(self) -> str:
    parts = []
    if self.test:
      parts += ["## Test (best validation setting per method)\n",
                _table(list(self.test.values()))]
    validation = [r for r in self.records if r["phase"] == "validation"]
    if validation:
      parts += ["\n## Validation grid\n", _table(validation)]
    return "\n".join(parts)


def _table(records: Sequence[Mapping[str, Any]]) -> str:
  return evaluate.markdown_table(
      [(describe(r["method"], r["params"]), evaluate.NormalizedScores.from_json(r["scores"]))
       for r in records])


def _json_default(value):
  if hasattr(value, "item"):  # numpy scalars
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  write_text_atomically(path, "".join(json.dumps(r, sort_keys=True, default=_json_default) +
                                      "\n" for r in records))


def _key(phase: str, method: str, params: Mapping[str, Any]) -> str:
  return json.dumps([phase, method, params], sort_keys=True, default=_json_default)


def sweep(grids: Mapping[str, Grid], merge_fn: Callable[..., Any],
          evaluate_fn: Callable[[Any], Mapping[str, float]], validation: evaluate.Benchmark,
          test_fn: Optional[Callable[[Any], Mapping[str, float]]] = None,
          test: Optional[evaluate.Benchmark] = None, out_dir: Optional[str] = None,
          resume: bool = False) -> SweepResult:
  """Grid search per method on validation, then a test evaluation of each method's best point.

  `grids`: method → {parameter: values} (see `grid_points`). `validation`:
  the held-in validation tasks with each expert's validation scores (its
  held_out may be empty). `test_fn` and `test` (held-in test tasks with the
  experts' test scores, held-out tasks with the base model's scores) are
  given together or not at all. Merged parameters are dropped after each
  evaluation; the best point is merged again for the test.
  """
  if (test_fn is None) != (test is None):
    raise ValueError("give test_fn and test together (or neither)")
  if not validation.held_in:
    raise ValueError("the validation benchmark has no held-in categories to select on")
  done: dict[str, dict[str, Any]] = {}
  jsonl = os.path.join(out_dir, RESULTS_JSONL) if out_dir else None
  if resume and jsonl and os.path.exists(jsonl):
    done = {_key(r["phase"], r["method"], r["params"]): r for r in read_jsonl(jsonl)}
  result = SweepResult()

  def run(phase, method, point, score_fn, benchmark):
    key = _key(phase, method, point)
    if key in done:
      record = done[key]
    else:
      raw = dict(score_fn(merge_fn(method, **point)))
      scores = evaluate.normalized_scores(raw, benchmark)
      record = {"phase": phase, "method": method, "params": dict(point),
                "raw": {t: float(s) for t, s in raw.items()}, "scores": scores.to_json()}
      logging.info("%s %s: held-in %s held-out %s", phase, describe(method, point),
                   scores.held_in, scores.held_out)
    result.records.append(record)
    if out_dir:
      write_jsonl(jsonl, result.records)
      write_text_atomically(os.path.join(out_dir, RESULTS_MD), result.markdown())
    return record

  for method, grid in grids.items():
    records = [run("validation", method, point, evaluate_fn, validation)
               for point in grid_points(grid)]
    result.best[method] = select_best(records)
    if test_fn is not None:
      result.test[method] = run("test", method, result.best[method]["params"], test_fn, test)
  if out_dir:  # The final Markdown lists the test rows, now complete.
    write_text_atomically(os.path.join(out_dir, RESULTS_MD), result.markdown())
  return result
