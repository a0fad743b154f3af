"""Human pairwise preferences re-released by LLMBar: MT-Bench, FairEval, LLMEval² (pairwise,
quality).

princeton-nlp/LLMBar (MIT), ``Dataset/Processed/{MT-Bench,FairEval,LLMEval^2}/dataset.json``:
JSON lists of ``{input, output_1, output_2, label: 1 | 2}``, ``label`` naming the output human
judges preferred (the files hold no ties). One task per dataset:

- ``mt_bench_human_preference``: 200 records (MT-Bench expert judgments), 101 / 99 labelled
  1 / 2, over 75 distinct questions; 5 pairs appear twice, in swapped order with consistent
  labels (both kept: they are separate judgments).
- ``faireval_preference``: 66 records (FairEval), 41 / 25.
- ``llmeval2_preference``: 200 records (LLMEval²), 92 / 108.

Conversion: ``instruction`` = input, ``response_a`` / ``response_b`` = output_1 / output_2
(stripped, upstream order), ``answer`` = "A" for label 1, "B" for label 2. Dropped: 2
LLMEval² records, record 57 (the two outputs are identical, so there is nothing to prefer;
labelled 1) and record 169 (output_2 is empty; labelled 1), leaving 198 (90 A, 108 B).
Split unit (``group``): the input, so every pair about one question stays in one split.
The counts above are before the base's decontamination (examples whose prompt is in the
held-out suite are dropped and counted in ``info.metadata["decontaminated"]``): at the time of
writing it drops one FairEval example, record 12, whose question is also in LLMBar-Natural.
"""
from __future__ import annotations

from flame.data import format
from flame.data.sources import base

_LABELS = {1: "A", 2: "B"}
_DESCRIPTION = ("Given an instruction and two responses, decide which response is better: it "
                "follows the instruction and is helpful, accurate, relevant and detailed. "
                "Reply A or B.")


def _spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE, capability=format.Capability.QUALITY,
      title=title, description=_DESCRIPTION,
      context_fields=("instruction", "response_a", "response_b"),
      output_fields=("answer",), labels=("A", "B"))


MT_BENCH = _spec("mt_bench_human_preference", "Better response (MT-Bench human judgments)")
FAIREVAL = _spec("faireval_preference", "Better response (FairEval)")
LLMEVAL2 = _spec("llmeval2_preference", "Better response (LLMEval²)")

# Task name -> registered data file.
TASK_FILES = {
    MT_BENCH.name: "llmbar_processed/mt_bench_human/dataset.json",
    FAIREVAL.name: "llmbar_processed/faireval/dataset.json",
    LLMEVAL2.name: "llmbar_processed/llmeval2/dataset.json",
}


class FlameLlmbarProcessed(base.SourceBuilder):
  """Builder ``flame_llmbar_processed`` (one config per dataset)."""

  FILES = tuple(TASK_FILES.values())
  TASKS = (MT_BENCH, FAIREVAL, LLMEVAL2)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/princeton-nlp/LLMBar"
  CITATION = """@inproceedings{zeng2024llmbar,
  title={Evaluating Large Language Models at Evaluating Instruction Following},
  author={Zeng, Zhiyuan and Yu, Jiatong and Gao, Tianyu and Meng, Yu and Goyal, Tanya and
  Chen, Danqi}, booktitle={ICLR}, year={2024}}"""

  def rows(self, paths):
    name = TASK_FILES[self.spec.name]  # Only this config's dataset.
    yield from base.read_json_records(paths[name], label=name)

  def convert(self, row):
    label = row.get("label", int, choices=_LABELS)
    instruction = row.get("input").strip()
    first = row.get("output_1", nonempty=False).strip()
    second = row.get("output_2", nonempty=False).strip()
    if not first or not second or first == second:
      return  # An empty output, or nothing to prefer (see the module docstring).
    example = format.Example(
        task=self.spec.name, example_id=f"{row.file}:{row.position}",
        context={"instruction": instruction, "response_a": first, "response_b": second},
        outputs={"answer": _LABELS[label]})
    yield base.Converted(example, group=instruction)
