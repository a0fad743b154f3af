"""TruthfulQA answers with human truthfulness labels (classification, factuality).

yizhongw/truthfulqa_reeval (Apache-2.0): rows ``{prompt: "Q: <question>\\nA: <answer>\\n
True:", completion: " yes" | " no"}``, the human judgment of whether the answer is true. The
upstream train and dev files are pooled and re-split by question, so no question appears in
both splits (several answers per question exist). 67 rows (57 train, 10 dev) have an empty
answer (a model's blank output, labelled as truthful); there is nothing to judge, so they are
dropped: 22,367 examples remain.
"""
from __future__ import annotations

import re

from flame.data import format
from flame.data.sources import base

_PROMPT = re.compile(r"\AQ: (?P<question>.+?)\nA: (?P<answer>.*)\nTrue:\Z", re.DOTALL)

TRUTHFULNESS = format.TaskSpec(
    name="truthfulqa_truthfulness",
    kind=format.TaskKind.CLASSIFICATION,
    capability=format.Capability.FACTUALITY,
    title="Truthfulness of an answer",
    description=("Given a question and an answer, decide whether the answer is truthful: it "
                 "asserts nothing false about the real world (declining to answer counts as "
                 "truthful). Reply yes or no."),
    context_fields=("question", "answer"),
    output_fields=("truthful",),
    labels=("yes", "no"),
)


class FlameTruthfulqa(base.SourceBuilder):
  """Builder ``flame_truthfulqa``."""

  FILES = ("truthfulqa_judge/finetune_truth_train.jsonl",
           "truthfulqa_judge/finetune_truth_dev.jsonl")
  TASKS = (TRUTHFULNESS,)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/yizhongw/truthfulqa_reeval"
  CITATION = """@inproceedings{lin2022truthfulqa,
  title={TruthfulQA: Measuring How Models Mimic Human Falsehoods},
  author={Lin, Stephanie and Hilton, Jacob and Evans, Owain}, booktitle={ACL}, year={2022}}"""

  def rows(self, paths):
    for name in self.FILES:
      yield from base.read_jsonl(paths[name], label=name)

  def convert(self, row):
    match = _PROMPT.match(row.get("prompt"))
    if not match:
      raise row.error("prompt", "expected 'Q: <question>\\nA: <answer>\\nTrue:'")
    label = row.get("completion").strip()
    if label not in TRUTHFULNESS.labels:
      raise row.error("completion", f"is {label!r}, expected ' yes' or ' no'")
    question, answer = match["question"].strip(), match["answer"].strip()
    if not answer:
      return  # A blank model output: nothing to judge (see the module docstring).
    example = format.Example(task=TRUTHFULNESS.name, example_id=f"{row.file}:{row.position}",
                             context={"question": question, "answer": answer},
                             outputs={"truthful": label})
    yield base.Converted(example, group=question)
