"""Users' JSONL files → judgment requests, one record per input line.

Schemas (`detect_schema` picks one from the first line unless given):

  rewardbench     {prompt, chosen, rejected[, subset, id]}: a pair whose better response is
                  known. The chosen response is put at A or B by a hash of the id (about half
                  each, fixed for a fixed id); ``correct`` = the chosen response wins.
  pairwise        {prompt, response_a, response_b[, id]}
  pointwise       {prompt, response[, id]}, rated on `Fields.scale`
  classification  {prompt, response[, label, id]}, one of `Fields.labels`; with a label field
                  the verdict is checked against it
  unified         FLAMe's unified file (`flame.data.sources.jsonl_unified`): a ``task_spec``
                  header line, then {example_id, context[, outputs]} per line; with outputs,
                  the verdict is checked against the answer field

Field names are `Fields` attributes (flags ``--prompt_field`` …). A bad line (not UTF-8, not
JSON, not an object, a field missing, not a string or empty) becomes a `Record` with an
``error`` naming the line and field, never a silent drop: the caller stops or counts it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional, Sequence

from flame.autorater import autorater, prompts
from flame.data import format

SCHEMAS = ("rewardbench", "pairwise", "pointwise", "classification", "unified")


@dataclasses.dataclass(frozen=True)
class Fields:
  """Input field names and the judgment settings of a file."""
  prompt: str = "prompt"
  chosen: str = "chosen"
  rejected: str = "rejected"
  response_a: str = "response_a"
  response_b: str = "response_b"
  response: str = "response"
  label: str = "label"
  id: str = "id"
  subset: str = "subset"
  instructions: Optional[str] = None
  scale: tuple[int, int] = (1, 5)
  labels: tuple[str, ...] = ("Yes", "No")


@dataclasses.dataclass(frozen=True)
class Record:
  """One input line: its request, or the error that made it unusable."""
  line: int
  record_id: str
  request: Optional[autorater.Request] = None
  error: Optional[str] = None
  subset: Optional[str] = None
  chosen: Optional[str] = None  # rewardbench: the label ("A"/"B") the chosen response is at
  gold: Optional[str] = None  # the known answer (classification label, unified outputs)


class InputError(ValueError):
  """The input file cannot be read at all (no schema, bad header)."""


def chosen_at_a(record_id: str) -> bool:
  """Whether a RewardBench pair puts its chosen response at A: the low bit of sha256(id)."""
  return hashlib.sha256(record_id.encode("utf-8")).digest()[-1] % 2 == 0


def _lines(path: str):
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      yield number, raw


def _parse(path: str, number: int, raw: bytes) -> Any:
  """The JSON object of a line, or raises ValueError naming file:line."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
  return value


def _text(path, number, obj, field) -> str:
  if field not in obj:
    raise ValueError(f"{path}:{number}: field {field!r} is missing (fields: {sorted(obj)})")
  value = obj[field]
  if not isinstance(value, str):
    raise ValueError(f"{path}:{number}: field {field!r} must be a string, got "
                     f"{type(value).__name__}")
  if not value.strip():
    raise ValueError(f"{path}:{number}: field {field!r} is empty")
  return value


def detect_schema(path: str, fields: Fields, kind: Optional[str] = None) -> str:
  """The schema of `path` from its first non-blank line (and `kind`, if given)."""
  for number, raw in _lines(path):
    if not raw.strip():
      continue
    try:
      first = _parse(path, number, raw)
    except ValueError as e:
      raise InputError(f"cannot tell the schema: {e}") from None
    if "task_spec" in first:
      return "unified"
    if kind in ("pointwise", "classification"):
      return kind
    if fields.chosen in first and fields.rejected in first:
      return "rewardbench"
    if fields.response_a in first and fields.response_b in first:
      return "pairwise"
    raise InputError(
        f"{path}:{number}: cannot tell the schema from fields {sorted(first)}: expected "
        f"{fields.chosen!r}/{fields.rejected!r} (RewardBench), {fields.response_a!r}/"
        f"{fields.response_b!r} (pairwise), a 'task_spec' header (unified), or --kind "
        f"pointwise/classification; map other names with --chosen_field, --a_field, …")
  raise InputError(f"{path}: no records (the file is empty)")


def spec_for(schema: str, fields: Fields) -> format.TaskSpec:
  kind = {"rewardbench": "pairwise", "pairwise": "pairwise"}.get(schema, schema)
  if kind == "pointwise":
    return prompts.task_spec(kind, fields.instructions, scale=fields.scale)
  if kind == "classification":
    return prompts.task_spec(kind, fields.instructions, labels=fields.labels)
  return prompts.task_spec(kind, fields.instructions)


def _record(path, number, obj, schema, spec, fields) -> Record:
  record_id = obj.get(fields.id, obj.get("example_id", f"line {number}"))
  record_id = str(record_id)
  subset = obj.get(fields.subset)
  prompt = _text(path, number, obj, fields.prompt)
  if schema == "rewardbench":
    chosen = _text(path, number, obj, fields.chosen)
    rejected = _text(path, number, obj, fields.rejected)
    at_a = chosen_at_a(record_id)
    pair = (chosen, rejected) if at_a else (rejected, chosen)
    return Record(number, record_id, autorater.Request.of(spec, prompt, pair, record_id),
                  subset=None if subset is None else str(subset),
                  chosen=spec.labels[0] if at_a else spec.labels[1])
  if schema == "pairwise":
    pair = (_text(path, number, obj, fields.response_a), _text(path, number, obj,
                                                               fields.response_b))
    return Record(number, record_id, autorater.Request.of(spec, prompt, pair, record_id))
  response = _text(path, number, obj, fields.response)
  gold = None
  if schema == "classification" and fields.label in obj:
    gold = str(obj[fields.label])
    if gold not in spec.labels:
      raise ValueError(f"{path}:{number}: field {fields.label!r} is {gold!r}, expected one of "
                       f"{list(spec.labels)}")
  return Record(number, record_id, autorater.Request.of(spec, prompt, (response,), record_id),
                gold=gold)


def _unified_record(path, number, obj, spec) -> Record:
  record_id = obj.get("example_id")
  if not isinstance(record_id, str) or not record_id:
    raise ValueError(f"{path}:{number}: field 'example_id' must be a non-empty string")
  context = obj.get("context")
  if not isinstance(context, dict):
    raise ValueError(f"{path}:{number}: field 'context' must be an object")
  try:
    format.check_context(format.Example(spec.name, record_id, context), spec)
  except ValueError as e:
    raise ValueError(f"{path}:{number}: {e}") from None
  outputs = obj.get("outputs") or {}
  gold = outputs.get(spec.answer_field) if isinstance(outputs, dict) else None
  return Record(number, record_id, autorater.Request(spec, dict(context), record_id),
                gold=None if gold is None else str(gold))


def _unified_spec(path: str, number: int, header: dict) -> format.TaskSpec:
  from flame.data.sources import base, jsonl_unified  # pylint: disable=import-outside-toplevel
  try:
    spec = jsonl_unified.spec_from_header(base.Row(path, f"line {number}", header))
  except ValueError as e:
    raise InputError(str(e)) from None
  if spec.kind not in prompts.DEFAULTS or len(spec.output_fields) != 1:
    raise InputError(f"{path}:{number}: task {spec.name!r} ({spec.kind.value}, outputs "
                     f"{list(spec.output_fields)}) cannot be scored in one pass")
  return spec


def read_records(path: str, fields: Fields, schema: Optional[str] = None,
                 kind: Optional[str] = None) -> tuple[str, Optional[format.TaskSpec],
                                                      list[Record]]:
  """(schema, spec, one Record per non-blank line) of a JSONL file."""
  schema = schema or detect_schema(path, fields, kind)
  if schema not in SCHEMAS:
    raise InputError(f"unknown schema {schema!r}; expected one of {list(SCHEMAS)}")
  spec = None if schema == "unified" else spec_for(schema, fields)
  records = []
  for number, raw in _lines(path):
    if not raw.strip():
      continue
    try:
      obj = _parse(path, number, raw)
      if schema == "unified" and spec is None:
        if "task_spec" not in obj:
          raise InputError(f"{path}:{number}: a unified file starts with a 'task_spec' header")
        spec = _unified_spec(path, number, obj)
        continue
      if schema == "unified":
        records.append(_unified_record(path, number, obj, spec))
      else:
        records.append(_record(path, number, obj, schema, spec, fields))
    except InputError:
      raise
    except ValueError as e:
      message = str(e) if str(e).startswith(f"{path}:") else f"{path}:{number}: {e}"
      records.append(Record(number, f"line {number}", error=message))
  return schema, spec, records


def first_errors(records: Sequence[Record], limit: int = 5) -> list[str]:
  return [r.error for r in records if r.error][:limit]
