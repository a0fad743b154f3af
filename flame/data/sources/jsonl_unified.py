"""A user's examples already in FLAMe's unified format, one JSON object per line (any kind).

File layout (written by `write_unified_jsonl`; ``.gz`` read transparently):

- line 1, the header, once per file: ``{"task_spec": {"name", "kind", "capability", "title",
  "description", "context_fields", "output_fields", "labels", "scale"}}`` (`spec_to_json`;
  ``labels`` may be left out for pointwise/generative tasks, ``scale`` for the others);
- then one example per line: ``{"example_id": str, "context": {field: str}, "outputs":
  {field: str}[, "group": str][, "task": str]}``. ``task``, if present, must be the header's
  task name; ``group`` is the split unit (default: the example id), so examples sharing a
  group land in the same split.

The spec lives once in the file, so the file describes itself: a `JsonlUnifiedConfig` needs
only the path (and optionally the expected sha256 and a license note); the config (and
prepared dataset) is named after the header's task. Writing, building and reading back
round-trips exactly: every written example comes back unchanged in ``train`` or
``validation`` (pairwise training examples are joined by their position-swapped copies, ids
ending in ``/swapped``, as for every source).

Bad rows (raise `base.BadRowError` naming the file, line and field; with
``skip_bad_rows=True`` they are skipped and counted in ``info.metadata["skipped_rows"]``): a
line that is not JSON or not an object, a missing or non-string ``example_id``, a
duplicate id or one ending in the reserved ``/swapped``, a ``context`` / ``outputs`` that is
not an object, a spec field missing, blank or not a string, an unknown field, an answer
outside the spec's labels or scale, and a ``task`` other than the header's. A bad header is
never skipped: without a spec nothing can be read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

from flame import files
from flame.data import format
from flame.data.sources import base, user_files

HEADER_KEY = "task_spec"
_SPEC_FIELDS = ("name", "kind", "capability", "title", "description", "context_fields",
                "output_fields", "labels", "scale")


def spec_to_json(spec: format.TaskSpec) -> dict[str, Any]:
  return {"name": spec.name, "kind": spec.kind.value, "capability": spec.capability.value,
          "title": spec.title, "description": spec.description,
          "context_fields": list(spec.context_fields), "output_fields": list(spec.output_fields),
          "labels": list(spec.labels), "scale": list(spec.scale) if spec.scale else None}


def spec_from_header(row: base.Row) -> format.TaskSpec:
  """The spec in a header row; raises BadRowError naming the field that is wrong."""
  fields = row.get(HEADER_KEY, dict)
  unknown = sorted(set(fields) - set(_SPEC_FIELDS))
  if unknown:
    raise row.error(HEADER_KEY, f"unknown spec field(s) {unknown}; expected {list(_SPEC_FIELDS)}")
  values = {k: v for k, v in fields.items() if v is not None}
  values["labels"] = tuple(values.get("labels", ()))
  try:
    return format.TaskSpec(**values)
  except (TypeError, ValueError) as e:
    raise row.error(HEADER_KEY, str(e)) from e


def _example_line(example: format.Example, spec: format.TaskSpec,
                  group: Optional[str]) -> str:
  line = {"example_id": example.example_id,
          "context": {name: example.context[name] for name in spec.context_fields},
          "outputs": {name: example.outputs[name] for name in spec.output_fields}}
  if group is not None:
    line["group"] = group
  return json.dumps(line, ensure_ascii=False)


def write_unified_jsonl(path: str | os.PathLike, spec: format.TaskSpec,
                        examples: Iterable[format.Example],
                        groups: Optional[Sequence[str]] = None) -> str:
  """Writes `examples` of task `spec` (validated) to `path` atomically; returns the path.

  groups: optional split unit per example (same order); default: each example alone.
  The file appears complete or not at all (written beside it, then renamed).
  """
  path = os.fspath(path)
  examples = list(examples)
  if groups is not None and len(groups) != len(examples):
    raise ValueError(f"write_unified_jsonl: {len(groups)} groups for {len(examples)} examples")
  lines = [json.dumps({HEADER_KEY: spec_to_json(spec)}, ensure_ascii=False)]
  for index, example in enumerate(examples):
    format.validate(example, spec)
    lines.append(_example_line(example, spec, None if groups is None else groups[index]))
  files.write_text_atomically(path, "\n".join(lines) + "\n")
  return path


def read_spec(path: str | os.PathLike) -> format.TaskSpec:
  """The task spec in the header (first non-blank line) of a unified JSONL file."""
  path = os.fspath(path)
  rows = base.read_jsonl(path, label=path)
  try:
    header = next(rows, None)
  finally:
    rows.close()
  if header is None:
    raise base.BadRowError(path, "line 1", HEADER_KEY, "the file is empty; expected a header")
  return spec_from_header(header)


class JsonlUnifiedConfig(user_files.UserFileConfig):
  """The task described by the header of the unified JSONL file at `path`."""

  def __init__(self, *, path: str | os.PathLike, sha256: Optional[str] = None,
               license: str = user_files.UNSPECIFIED_LICENSE):  # pylint: disable=redefined-builtin
    super().__init__(read_spec(path), path, sha256, license)


def _strings(row: base.Row, name: str, expected: Sequence[str]) -> Mapping[str, str]:
  values = row.get(name, dict)
  unknown = sorted(set(values) - set(expected))
  if unknown:
    raise row.error(name, f"unknown field(s) {unknown}; expected {list(expected)}")
  for field in expected:
    value = values.get(field)
    if not isinstance(value, str) or not value.strip():
      what = "missing" if field not in values else f"must be a non-empty string, got {value!r:.80}"
      raise row.error(f"{name}.{field}", what)
  return values


class FlameJsonlUnified(user_files.UserFileBuilder):
  """Builder ``flame_jsonl_unified`` (configs come from users; see the module docstring)."""

  DESCRIPTION = __doc__

  def rows(self, paths):
    path = paths[user_files.USER_FILE]
    rows = base.read_jsonl(path, label=path, keep_unparsed=True)
    header = next(rows, None)
    if header is None or spec_from_header(header) != self.spec:
      raise base.BadRowError(path, "line 1", HEADER_KEY, "the header changed since the "
                             "builder config read it; make a new config")
    self._seen_ids: dict[str, str] = {}
    yield from rows

  def convert(self, row):
    spec = self.spec
    example_id = row.get("example_id")
    if example_id.endswith(format.SWAP_SUFFIX):
      raise row.error("example_id", f"ends with {format.SWAP_SUFFIX!r}, which is reserved "
                      "for position-swapped copies")
    if example_id in self._seen_ids:
      raise row.error("example_id", f"{example_id!r} is also at {self._seen_ids[example_id]}")
    if row.data.get("task", spec.name) != spec.name:
      raise row.error("task", f"is {row.data['task']!r}, but the header's task is {spec.name!r}")
    group = row.get("group") if "group" in row.data else example_id
    example = format.Example(task=spec.name, example_id=example_id,
                             context=_strings(row, "context", spec.context_fields),
                             outputs=_strings(row, "outputs", spec.output_fields))
    try:
      format.validate(example, spec)
    except ValueError as e:  # The answer is outside the labels or the scale.
      raise row.error(f"outputs.{spec.answer_field}", str(e)) from e
    self._seen_ids[example_id] = row.position
    yield base.Converted(example, group=group)
