"""LLMBar: instruction-following pairs, RewardBench's "Chat Hard" (held out, pairwise).

princeton-nlp/LLMBar (Zeng et al., 2024, "Evaluating Large Language Models at Evaluating
Instruction Following"; MIT), ``Dataset/LLMBar/{Natural, Adversarial/{Neighbor, GPTInst,
GPTOut, Manual}}/dataset.json``: JSON lists of ``{input, output_1, output_2, label: 1 | 2}``,
where ``label`` names the output that follows the instruction (expert-checked; no ties).
Natural pairs were drawn from existing preference sets (AlpacaFarm, LLMEval², …) and
filtered; the Adversarial pairs put a response to a nearby instruction (Neighbor, GPTInst), a
superficially better GPT-4 response (GPTOut) or a hand-written distractor (Manual) against the
faithful one.

One task per RewardBench subset, all kept: llmbar_natural 100, llmbar_adver_neighbor 134,
llmbar_adver_gptinst 92, llmbar_adver_gptout 47, llmbar_adver_manual 46 (419 examples;
RewardBench's llmbar-* subsets have the same counts). ``instruction`` is ``input`` verbatim;
the chosen output (``output_{label}``) goes to response A or B by `heldout.balance_positions`
(by the rank of a hash of the example id, ``llmbar/<subset>:record <i>``), so each subset's
answers are half A and half B (the odd one A); the original position is not kept. Held out
(split ``test``), no swap augmentation. One input occurs in both Neighbor and GPTInst (with
different outputs); it is kept in both.

Overlap with training sources (removed from them by `flame.data.decontamination`; at the time
of writing): 1 FairEval and 2 MT-Bench human-judgment pairs ask a Natural question, and 12
HaluEval queries are Alpaca instructions also in Natural (5), Neighbor (5) or GPTOut (2).
"""
from __future__ import annotations

from flame.data import format, heldout
from flame.data.sources import base, llmbar_processed

_DESCRIPTION = (
    "Given an instruction and two outputs, decide which output, A or B, follows the "
    "instruction better. The better output executes the instruction precisely: it does what "
    "is asked, no more and no less, and is honest and harmless. Judge instruction following "
    "first; style, length or fluency matter only when both outputs follow it equally well. "
    "Reply A or B.")

# task name -> (data file, title)
SUBSETS = {
    "llmbar_natural": ("llmbar/Natural/dataset.json", "LLMBar Natural"),
    "llmbar_adver_neighbor": ("llmbar/Adversarial/Neighbor/dataset.json",
                              "LLMBar Adversarial (Neighbor)"),
    "llmbar_adver_gptinst": ("llmbar/Adversarial/GPTInst/dataset.json",
                             "LLMBar Adversarial (GPTInst)"),
    "llmbar_adver_gptout": ("llmbar/Adversarial/GPTOut/dataset.json",
                            "LLMBar Adversarial (GPTOut)"),
    "llmbar_adver_manual": ("llmbar/Adversarial/Manual/dataset.json",
                            "LLMBar Adversarial (Manual)"),
}


def _spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE,
      capability=format.Capability.INSTRUCTION_FOLLOWING,
      title=f"{title}: which output follows the instruction", description=_DESCRIPTION,
      context_fields=("instruction", "response_a", "response_b"), output_fields=("answer",),
      labels=("A", "B"))


SPECS = {name: _spec(name, title) for name, (_, title) in SUBSETS.items()}


class FlameLlmbar(base.SourceBuilder):
  """Builder ``flame_llmbar`` (held out): one config per LLMBar subset."""

  FILES = tuple(path for path, _ in SUBSETS.values())
  TASKS = tuple(SPECS.values())
  HELD_OUT = True
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/princeton-nlp/LLMBar"
  CITATION = llmbar_processed.FlameLlmbarProcessed.CITATION

  def examples(self, paths):
    return heldout.balance_positions(self.spec, super().examples(paths))

  def rows(self, paths):
    name = SUBSETS[self.spec.name][0]
    yield from base.read_json_records(paths[name], label=name)

  def convert(self, row):
    spec = self.spec
    instruction = row.get("input")
    outputs = {1: row.get("output_1"), 2: row.get("output_2")}
    label = row.get("label", int, choices=(1, 2))
    example_id = f"{row.file.removesuffix('/dataset.json')}:{row.position}"
    responses, answer = heldout.chosen_pair(spec, outputs[label], outputs[3 - label])
    example = format.Example(task=spec.name, example_id=example_id,
                             context={"instruction": instruction, **responses},
                             outputs={"answer": answer})
    yield base.Converted(example, group=example_id)
