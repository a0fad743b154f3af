"""FLAMe-format inputs for judgments asked of an autorater.

A request names its kind (pairwise, pointwise, classification), a prompt and
one or two responses, and optionally instructions: either the name of a FLAMe
task (its title, description, field names and labels are used, as in
training) or free text that replaces the default description. Without them
the default task of the kind below is used.

Fields: a task's response fields (names starting ``response``) take the
responses in order; its first other context field takes the prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from flame.data import format

PAIRWISE = format.TaskSpec(
    name="flame_rate_pairwise", kind="pairwise", capability="quality",
    title="Which response is better",
    description=("Given a prompt and two responses, decide which response, A or B, is better: "
                 "it follows the prompt's instructions and is more helpful, accurate, relevant "
                 "and harmless. Reply A or B."),
    context_fields=("prompt", "response_a", "response_b"), output_fields=("answer",),
    labels=("A", "B"))
POINTWISE = format.TaskSpec(
    name="flame_rate_pointwise", kind="pointwise", capability="quality",
    title="Quality of a response",
    description=("Given a prompt and a response, rate the overall quality of the response: how "
                 "well it follows the prompt and how helpful, accurate and harmless it is. "
                 "Reply with one integer from the scale, higher is better."),
    context_fields=("prompt", "response"), output_fields=("answer",), scale=(1, 5))
CLASSIFICATION = format.TaskSpec(
    name="flame_rate_classification", kind="classification", capability="quality",
    title="Is the response acceptable",
    description=("Given a prompt and a response, decide whether the response is acceptable: it "
                 "follows the prompt and is helpful, accurate and harmless. Reply Yes or No."),
    context_fields=("prompt", "response"), output_fields=("answer",), labels=("Yes", "No"))
DEFAULTS = {format.TaskKind.PAIRWISE: PAIRWISE, format.TaskKind.POINTWISE: POINTWISE,
            format.TaskKind.CLASSIFICATION: CLASSIFICATION}


def task_spec(kind: str, instructions: Optional[str] = None,
              labels: Optional[Sequence[str]] = None,
              scale: Optional[Sequence[float]] = None) -> format.TaskSpec:
  """The spec a request of `kind` is rendered with.

  `instructions`: a FLAMe task name (`flame.data.sources.task_specs()`), or free text
  replacing the default description. `labels` / `scale` replace the spec's.
  """
  kind = format.TaskKind(kind)
  if kind not in DEFAULTS:
    raise ValueError(f"kind {kind.value!r} cannot be scored in one pass; use one of "
                     f"{[k.value for k in DEFAULTS]}")
  spec = DEFAULTS[kind]
  if instructions:
    from flame.data import sources  # pylint: disable=import-outside-toplevel
    known = sources.task_specs()
    if instructions in known:
      spec = known[instructions][1]
      if spec.kind != kind:
        raise ValueError(f"task {instructions!r} is {spec.kind.value}, not {kind.value}")
      if len(spec.output_fields) != 1:
        raise ValueError(f"task {instructions!r} has output fields {list(spec.output_fields)}; "
                         "only single-answer tasks are scored in one pass")
    else:
      spec = dataclasses.replace(spec, description=instructions)
  if labels is not None:
    spec = dataclasses.replace(spec, labels=tuple(labels))
  if scale is not None:
    spec = dataclasses.replace(spec, scale=tuple(scale))
  return spec


def prompt_field(spec: format.TaskSpec) -> Optional[str]:
  others = [f for f in spec.context_fields if not format.is_response_field(f)]
  return others[0] if others else None


def example(spec: format.TaskSpec, prompt: str, responses: Sequence[str],
            example_id: str = "request") -> format.Example:
  """The example of `spec` holding `prompt` and `responses` (validated: no empty field)."""
  fields = spec.response_fields
  if len(responses) != len(fields):
    raise ValueError(f"{example_id}: task {spec.name!r} takes {len(fields)} response(s) "
                     f"{list(fields)}, got {len(responses)}")
  context = dict(zip(fields, responses))
  field = prompt_field(spec)
  if field is not None:
    context[field] = prompt
  extra = [f for f in spec.context_fields if f not in context]
  if extra:
    raise ValueError(f"task {spec.name!r} needs context fields {extra} that a request of a "
                     "prompt and responses cannot fill")
  result = format.Example(task=spec.name, example_id=example_id, context=context)
  format.check_context(result, spec)
  return result

