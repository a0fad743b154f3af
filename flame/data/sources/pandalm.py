"""PandaLM test set: which of two instruction-following responses is better, or a tie
(pairwise with ties, quality).

WeOpenML/PandaLM (Apache-2.0), ``data/testset-v1.json``: a JSON list of 999 records
``{idx, motivation_app, cmp_key, instruction, input, response1, response2, annotator1,
annotator2, annotator3}``; each annotator label is 0 (tie), 1 (response1 better) or 2
(response2 better).

Conversion:

- ``instruction``: the instruction, followed by a blank line and the input when the input is
  not blank (167 inputs are blank; record 466 has a blank instruction, so its input alone);
  ``response_a`` / ``response_b``: response1 / response2, stripped, in upstream order.
- ``answer``: the majority label of the three annotators, 1 -> "A", 2 -> "B", 0 -> "Tie". A
  three-way split (one vote each) has no majority and becomes "Tie", as the annotators
  disagree about which response is better; the file has none (879 unanimous records, 120
  two-to-one).
- Dropped (60 records, 939 examples remain: 394 A, 442 B, 103 Tie): 54 with an empty
  response (a model's blank output; the unified format has no empty fields) and 6 whose
  response is the JSON boolean ``true`` instead of text (records 157, 158, 159, 161, 162 and
  164: what the annotators saw is unknown).
- Split unit (``group``): instruction and input (170 distinct), so the model pairings of one
  instruction stay in one split.
- The counts above are before the base's decontamination (examples whose prompt is in the
  held-out suite are dropped and counted in ``info.metadata["decontaminated"]``): it drops none
  of these at the time of writing.
"""
from __future__ import annotations

import collections

from flame.data import format
from flame.data.sources import base

_LABELS = {1: "A", 2: "B", 0: "Tie"}
_ANNOTATORS = ("annotator1", "annotator2", "annotator3")

PANDALM = format.TaskSpec(
    name="pandalm_preference",
    kind=format.TaskKind.PAIRWISE,
    capability=format.Capability.QUALITY,
    title="Better response to an instruction",
    description=("Given an instruction (possibly with an input) and two responses, decide "
                 "which response follows the instruction better: correct, relevant, complete "
                 "and clear. Reply A or B, or Tie if they are equally good or equally bad."),
    context_fields=("instruction", "response_a", "response_b"),
    output_fields=("answer",),
    labels=("A", "B", "Tie"),
)


def majority_label(votes: tuple[int, ...]) -> str:
  """The label most annotators gave; no majority (a three-way split) is a tie."""
  (vote, count), = collections.Counter(votes).most_common(1)
  return _LABELS[vote] if count * 2 > len(votes) else "Tie"


class FlamePandalm(base.SourceBuilder):
  """Builder ``flame_pandalm``."""

  FILES = ("pandalm/testset-v1.json",)
  TASKS = (PANDALM,)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/WeOpenML/PandaLM"
  CITATION = """@inproceedings{wang2024pandalm,
  title={PandaLM: An Automatic Evaluation Benchmark for LLM Instruction Tuning Optimization},
  author={Wang, Yidong and others}, booktitle={ICLR}, year={2024}}"""

  def rows(self, paths):
    for name in self.FILES:
      yield from base.read_json_records(paths[name], label=name)

  def convert(self, row):
    votes = tuple(row.get(name, int, choices=_LABELS) for name in _ANNOTATORS)
    instruction = row.get("instruction", nonempty=False).strip()
    given = row.get("input", nonempty=False).strip()
    responses = [row.get(name, (str, bool), nonempty=False) for name in ("response1",
                                                                         "response2")]
    if any(not isinstance(r, str) or not r.strip() for r in responses):
      return  # An empty or non-text response (see the module docstring).
    prompt = "\n\n".join(part for part in (instruction, given) if part)
    if not prompt:
      raise row.error("instruction", "instruction and input are both empty")
    example = format.Example(
        task=PANDALM.name, example_id=f"{row.file}:{row.position}",
        context={"instruction": prompt, "response_a": responses[0].strip(),
                 "response_b": responses[1].strip()},
        outputs={"answer": majority_label(votes)})
    yield base.Converted(example, group=prompt)
