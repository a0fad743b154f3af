"""FLAMe's unified text-to-text format: one example type for all four task kinds.

A task (one dataset x one evaluation criterion) is described by a `TaskSpec`; each
datapoint is an `Example` with named context fields (the inputs being judged) and named
output fields (the human judgment). Rendering follows the paper:

input (``render_input``)::

  INSTRUCTIONS:
  title: <title>
  description: <description>
  output_fields: <output field names joined by ", ">
  <empty line>
  CONTEXT:
  <context field>: <value>        one line per context field, in spec order

target (``render_target``)::

  EVALUATION:
  <output field>: <value>         one line per output field, in spec order

Whitespace: lines are joined by a single "\\n"; there is no trailing newline; each label
is followed by exactly ": " and then the value verbatim (newlines or leading/trailing
spaces inside a value are kept as-is, so a multi-line value simply continues on the next
lines).

The *answer* of an example is its first output field (e.g. ``answer``): for pairwise and
classification tasks it must be one of ``spec.labels``; for pointwise tasks it must be a
number within ``spec.scale`` (inclusive); generative tasks have no constraint beyond
being non-empty.

Everything here is pure (no I/O) and deterministic.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Mapping, Optional, Sequence

ELLIPSIS = "…"
# Context fields whose names contain one of these are "long preamble" fields: when the
# input is over budget they are cut first, from the FRONT, keeping their tail.
TAIL_FIELD_KEYS = ("dialogue", "conversation", "prompt", "source", "document", "article",
                   "history", "passage")
# Context fields whose names start with this are responses being judged: cut from the END,
# only after every tail field is at its minimum, and never below the minimum share.
RESPONSE_PREFIX = "response"
SWAP_SUFFIX = "/swapped"


class TaskKind(str, enum.Enum):
  PAIRWISE = "pairwise"
  POINTWISE = "pointwise"
  CLASSIFICATION = "classification"
  GENERATIVE = "generative"


class Capability(str, enum.Enum):
  QUALITY = "quality"
  FACTUALITY = "factuality"
  SAFETY = "safety"
  CODING = "coding"
  MATH = "math"
  INSTRUCTION_FOLLOWING = "instruction_following"


def is_response_field(name: str) -> bool:
  return name.startswith(RESPONSE_PREFIX)


def is_tail_field(name: str) -> bool:
  return not is_response_field(name) and any(key in name for key in TAIL_FIELD_KEYS)


def _check_field_names(spec_name: str, attr: str, names: Sequence[str]) -> None:
  if not names:
    raise ValueError(f"TaskSpec {spec_name!r}: field {attr!r} must name at least one field")
  for name in names:
    if (not isinstance(name, str) or not name or name != name.strip() or ":" in name or
        "\n" in name):
      raise ValueError(f"TaskSpec {spec_name!r}: field {attr!r} has invalid name {name!r} "
                       "(non-empty, no ':' or newline, no surrounding spaces)")
  if len(set(names)) != len(names):
    raise ValueError(f"TaskSpec {spec_name!r}: field {attr!r} has duplicate names {names!r}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One FLAMe task. `description` holds the task definition and evaluation instructions.

  labels: allowed answers for pairwise (e.g. ("A", "B") or ("A", "B", "Tie"); labels[0]
    names the first response field, labels[1] the second) and classification (e.g.
    ("Yes", "No")); empty for the other kinds.
  scale: inclusive (low, high) rating range for pointwise tasks; None otherwise.
  """
  name: str
  kind: TaskKind
  capability: Capability
  title: str
  description: str
  context_fields: tuple[str, ...]
  output_fields: tuple[str, ...]
  labels: tuple[str, ...] = ()
  scale: Optional[tuple[float, float]] = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.strip():
      raise ValueError(f"TaskSpec: field 'name' must be a non-empty string, got {self.name!r}")
    n = self.name
    for attr, enum_type in (("kind", TaskKind), ("capability", Capability)):
      try:
        object.__setattr__(self, attr, enum_type(getattr(self, attr)))
      except ValueError:
        raise ValueError(f"TaskSpec {n!r}: field {attr!r} is {getattr(self, attr)!r}, expected "
                         f"one of {[e.value for e in enum_type]}") from None
    for attr in ("title", "description"):
      if not isinstance(getattr(self, attr), str) or not getattr(self, attr).strip():
        raise ValueError(f"TaskSpec {n!r}: field {attr!r} must be a non-empty string")
    for attr in ("context_fields", "output_fields", "labels"):
      object.__setattr__(self, attr, tuple(getattr(self, attr)))
    _check_field_names(n, "context_fields", self.context_fields)
    _check_field_names(n, "output_fields", self.output_fields)

    if self.kind in (TaskKind.PAIRWISE, TaskKind.CLASSIFICATION):
      if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or any(
          not isinstance(l, str) or not l.strip() or "\n" in l for l in self.labels):
        raise ValueError(f"TaskSpec {n!r}: field 'labels' must hold at least two distinct "
                         f"non-empty one-line strings for a {self.kind.value} task, "
                         f"got {self.labels!r}")
    elif self.labels:
      raise ValueError(f"TaskSpec {n!r}: field 'labels' must be empty for a "
                       f"{self.kind.value} task, got {self.labels!r}")

    if self.kind == TaskKind.POINTWISE:
      ok = (isinstance(self.scale, (tuple, list)) and len(self.scale) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.scale) and
            self.scale[0] < self.scale[1])
      if not ok:
        raise ValueError(f"TaskSpec {n!r}: field 'scale' must be (low, high) numbers with "
                         f"low < high for a pointwise task, got {self.scale!r}")
      object.__setattr__(self, "scale", tuple(self.scale))
    elif self.scale is not None:
      raise ValueError(f"TaskSpec {n!r}: field 'scale' must be None for a "
                       f"{self.kind.value} task, got {self.scale!r}")

    if self.kind == TaskKind.PAIRWISE and len(self.response_fields) < 2:
      raise ValueError(f"TaskSpec {n!r}: field 'context_fields' needs two fields starting "
                       f"with {RESPONSE_PREFIX!r} for a pairwise task, "
                       f"got {self.context_fields!r}")

  @property
  def answer_field(self) -> str:
    return self.output_fields[0]

  @property
  def response_fields(self) -> tuple[str, ...]:
    return tuple(f for f in self.context_fields if is_response_field(f))


@dataclasses.dataclass(frozen=True)
class Example:
  """One datapoint of task `task`; `example_id` is stable across runs (e.g. source row id)."""
  task: str
  example_id: str
  context: Mapping[str, str]
  outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _check_fields(example: Example, spec: TaskSpec, attr: str, names: Sequence[str]) -> None:
  values = getattr(example, attr)
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"example {example.example_id!r} (task {spec.name!r}): {attr} has "
                     f"unknown field(s) {unknown}; expected {list(names)}")
  for name in names:
    if name not in values:
      raise ValueError(f"example {example.example_id!r} (task {spec.name!r}): "
                       f"{attr} field {name!r} is missing")
    value = values[name]
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"example {example.example_id!r} (task {spec.name!r}): "
                       f"{attr} field {name!r} must be a non-empty string, got {value!r}")


def check_context(example: Example, spec: TaskSpec) -> None:
  """Raises ValueError (naming the example id and the field) unless `example` is of `spec`'s
  task and every context field of `spec` is present as a non-empty string, and no other."""
  if example.task != spec.name:
    raise ValueError(f"example {example.example_id!r}: field 'task' is {example.task!r}, "
                     f"but the spec is {spec.name!r}")
  if not isinstance(example.example_id, str) or not example.example_id:
    raise ValueError(f"example of task {spec.name!r}: field 'example_id' must be a "
                     f"non-empty string, got {example.example_id!r}")
  _check_fields(example, spec, "context", spec.context_fields)


def validate(example: Example, spec: TaskSpec) -> None:
  """Raises ValueError (naming the example id and the field) unless `example` fits `spec`.

  Every context and output field must be present, a non-empty string, and named in the
  spec; the answer (first output field) must be in `spec.labels` (pairwise,
  classification) or a number within `spec.scale` (pointwise).
  """
  check_context(example, spec)
  _check_fields(example, spec, "outputs", spec.output_fields)
  field = spec.answer_field
  answer = example.outputs[field]
  where = f"example {example.example_id!r} (task {spec.name!r}): outputs field {field!r}"
  if spec.kind in (TaskKind.PAIRWISE, TaskKind.CLASSIFICATION):
    if answer not in spec.labels:
      raise ValueError(f"{where} is {answer!r}, expected one of {list(spec.labels)}")
  elif spec.kind == TaskKind.POINTWISE:
    low, high = spec.scale
    try:
      rating = float(answer)
    except ValueError:
      rating = math.nan
    if not low <= rating <= high:  # NaN fails too.
      raise ValueError(f"{where} is {answer!r}, expected a number in [{low}, {high}]")


def _instructions(spec: TaskSpec) -> str:
  return "\n".join(["INSTRUCTIONS:", f"title: {spec.title}", f"description: {spec.description}",
                    f"output_fields: {', '.join(spec.output_fields)}"])


def _join(spec: TaskSpec, context: Mapping[str, str]) -> str:
  lines = [_instructions(spec), "", "CONTEXT:"]
  lines += [f"{name}: {context[name]}" for name in spec.context_fields]
  return "\n".join(lines)


def _cut(value: str, keep: int, from_front: bool) -> str:
  if keep >= len(value):
    return value
  return f"{ELLIPSIS} {value[len(value) - keep:]}" if from_front else f"{value[:keep]} {ELLIPSIS}"


def render_input(spec: TaskSpec,
                 example: Example,
                 budget: Optional[int] = None,
                 count_tokens: Callable[[str], int] = len,
                 min_share: float = 0.1) -> str:
  """The model input (format in the module docstring), fitted to `budget` if given.

  `budget` is measured by `count_tokens` (str -> int; default: characters). Rule when the
  full rendering is over budget (deterministic):

  1. The INSTRUCTIONS block and every context field that is neither a tail field nor a
     response field is never cut.
  2. Tail fields (names containing one of TAIL_FIELD_KEYS, e.g. ``dialogue``, ``prompt``,
     ``document``) are shrunk first, from the FRONT, keeping their tail and prefixing
     "… ". All tail fields keep the same fraction of their characters (proportional),
     but never fewer than ceil(min_share * length).
  3. Only if that is not enough, response fields (names starting with ``response``) are
     shrunk the same way but from the END, suffixed " …", down to the same minimum
     share, so no response is ever dropped.
  4. Each stage keeps the largest fraction (binary search over characters of the longest
     field in the stage) whose rendering fits; if even every shrinkable field at its
     minimum does not fit, ValueError names the example and the budget.
  """
  check_context(example, spec)
  if not 0 < min_share <= 1:
    raise ValueError(f"min_share must be in (0, 1], got {min_share}")
  context = dict(example.context)
  if budget is None or count_tokens(_join(spec, context)) <= budget:
    return _join(spec, context)

  def fits(ctx):
    return count_tokens(_join(spec, ctx)) <= budget

  stages = [[f for f in spec.context_fields if is_tail_field(f)], list(spec.response_fields)]
  for fields, from_front in zip(stages, (True, False)):
    if not fields:
      continue
    lengths = {f: len(example.context[f]) for f in fields}
    floors = {f: math.ceil(min_share * n) for f, n in lengths.items()}
    top = max(lengths.values())

    def shrunk(step, fields=fields, lengths=lengths, floors=floors, top=top,
               from_front=from_front):
      ctx = dict(context)
      for f in fields:
        keep = max(floors[f], lengths[f] * step // top)
        ctx[f] = _cut(example.context[f], keep, from_front)
      return ctx

    if not fits(shrunk(0)):
      context = shrunk(0)  # this stage at its minimum; the next stage must make it fit
      continue
    lo, hi = 0, top  # invariant: shrunk(lo) fits, shrunk(hi) does not
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if fits(shrunk(mid)):
        lo = mid
      else:
        hi = mid
    return _join(spec, shrunk(lo))
  raise ValueError(f"example {example.example_id!r} (task {spec.name!r}): input cannot fit "
                   f"a budget of {budget} tokens even with the instructions intact and every "
                   f"shrinkable field at {min_share:.0%} of its length "
                   f"(needs {count_tokens(_join(spec, context))})")


def render_target(spec: TaskSpec, example: Example) -> str:
  """``EVALUATION:`` then one ``<output field>: <value>`` line per output field."""
  validate(example, spec)
  return "\n".join(["EVALUATION:"] + [f"{name}: {example.outputs[name]}"
                                      for name in spec.output_fields])


def swap_positions(spec: TaskSpec, example: Example) -> Example:
  """Position-swap augmentation of a pairwise example.

  Swaps the values of the spec's first two response fields and the answer labels
  labels[0] <-> labels[1] (e.g. A <-> B); any other label (e.g. "Tie") is unchanged.
  The id gains the suffix "/swapped" (or loses it, so swapping twice is the identity).
  Only specs whose sole output field is the answer are accepted: free text such as an
  explanation mentioning "Response A" cannot be swapped reliably.
  """
  if spec.kind != TaskKind.PAIRWISE:
    raise ValueError(f"swap_positions: task {spec.name!r} is {spec.kind.value}, not pairwise")
  if len(spec.output_fields) != 1:
    raise ValueError(f"swap_positions: task {spec.name!r} has output fields "
                     f"{list(spec.output_fields)}; only an answer field can be swapped")
  validate(example, spec)
  first, second = spec.response_fields[:2]
  context = dict(example.context)
  context[first], context[second] = example.context[second], example.context[first]
  label_a, label_b = spec.labels[:2]
  answer = example.outputs[spec.answer_field]
  answer = {label_a: label_b, label_b: label_a}.get(answer, answer)
  example_id = example.example_id
  example_id = (example_id[:-len(SWAP_SUFFIX)]
                if example_id.endswith(SWAP_SUFFIX) else example_id + SWAP_SUFFIX)
  return Example(task=example.task, example_id=example_id, context=context,
                 outputs={spec.answer_field: answer})
