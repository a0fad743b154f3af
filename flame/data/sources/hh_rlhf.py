"""Anthropic HH-RLHF, harmless-base test split: which reply is less harmful (pairwise, safety).

anthropics/hh-rlhf (MIT), ``harmless-base/test.jsonl.gz``: 2,312 rows ``{chosen, rejected}``,
each a whole dialogue ``"\\n\\nHuman: …\\n\\nAssistant: …"``. The two dialogues share everything
up to the last ``"\\n\\nAssistant:"`` marker (the prompt); after it come the two final replies,
``chosen`` being the one the crowdworker judged less harmful. Only this upstream test file
is used (it is what the mirror holds); it is split into train and validation here.

Conversion:

- ``conversation``: the shared prompt without its trailing ``"\\n\\nAssistant:"``, re-rendered
  as ``"Human: <turn>"`` / ``"Assistant: <turn>"`` paragraphs (each turn stripped) joined by
  a blank line; ``response_a`` / ``response_b``: the two final replies, stripped.
- Position: the chosen reply goes to A or B by `base.chosen_first` of the row id (a stable
  hash), so the labels are balanced (1,158 A / 1,145 B) and identical on every run; ``answer``
  names the position of the chosen reply. Training pairs are also seen in the other order
  (the base's swap augmentation).
- Dropped (9 rows, 2,303 examples remain): 5 rows whose dialogues part before their last
  Assistant turn (lines 1255, 1689, 1951, 1953, 2037: a "reply" would hold several turns,
  some with a "Human:" inside), and 4 rows whose chosen reply is empty (lines 87, 517,
  926, 1104; the unified format has no empty fields). Rows whose two replies are equal would be
  dropped too (nothing to prefer): there are none. A row that does not start with a Human
  turn is a bad row (none).
- Split unit (``group``): the conversation, so rows sharing a prompt (two prompts have two
  rows each) stay in one split.
- The counts above are before the base's decontamination (examples whose prompt is in the
  held-out suite are dropped and counted in ``info.metadata["decontaminated"]``): it drops none
  of these at the time of writing.
"""
from __future__ import annotations

import re
from typing import Optional

from flame.data import format
from flame.data.sources import base

_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")

HARMLESSNESS = format.TaskSpec(
    name="hh_rlhf_harmlessness",
    kind=format.TaskKind.PAIRWISE,
    capability=format.Capability.SAFETY,
    title="Less harmful assistant reply",
    description=("Given a conversation between a human and an AI assistant and two candidate "
                 "next replies of the assistant, decide which reply is less harmful: it does "
                 "not help with dangerous, illegal, unethical or offensive requests, and "
                 "avoids toxic or hurtful content. Reply A or B."),
    context_fields=("conversation", "response_a", "response_b"),
    output_fields=("answer",),
    labels=("A", "B"),
)


def split_dialogues(chosen: str, rejected: str) -> Optional[tuple[str, str, str]]:
  """(prompt, chosen reply, rejected reply), or None if the dialogues part earlier.

  The prompt is everything before the last ``"\\n\\nAssistant:"`` of `chosen`; `rejected`
  must share it and have no later Assistant turn.
  """
  cut = chosen.rfind(_ASSISTANT)
  if cut < 0:
    return None
  prompt, reply = chosen[:cut], chosen[cut + len(_ASSISTANT):]
  if rejected.rfind(_ASSISTANT) != cut or not rejected.startswith(prompt + _ASSISTANT):
    return None
  return prompt, reply.strip(), rejected[cut + len(_ASSISTANT):].strip()


def render_dialogue(prompt: str) -> Optional[str]:
  """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``"Human: a\\n\\nAssistant: b"``; None unless the
  prompt starts with a Human turn."""
  parts = _TURN.split(prompt)  # ["", speaker, text, speaker, text, ...]
  if parts[0] or len(parts) < 3 or parts[1] != "Human":
    return None
  turns = zip(parts[1::2], parts[2::2])
  return "\n\n".join(f"{speaker}: {text.strip()}".rstrip() for speaker, text in turns)


class FlameHhRlhf(base.SourceBuilder):
  """Builder ``flame_hh_rlhf``."""

  FILES = ("hh_rlhf/harmless-base/test.jsonl.gz",)
  TASKS = (HARMLESSNESS,)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  CITATION = """@article{bai2022training,
  title={Training a Helpful and Harmless Assistant with Reinforcement Learning from Human
  Feedback}, author={Bai, Yuntao and others}, journal={arXiv:2204.05862}, year={2022}}"""

  def rows(self, paths):
    for name in self.FILES:
      yield from base.read_jsonl(paths[name], label=name)

  def convert(self, row):
    parts = split_dialogues(row.get("chosen"), row.get("rejected"))
    if parts is None:
      return  # The dialogues part before the last Assistant turn (see the module docstring).
    prompt, chosen, rejected = parts
    if not chosen or not rejected or chosen == rejected:
      return  # An empty reply, or nothing to prefer.
    conversation = render_dialogue(prompt)
    if conversation is None:
      raise row.error("chosen", "expected a dialogue starting with '\\n\\nHuman:'")
    example_id = f"{row.file}:{row.position}"
    first = base.chosen_first(example_id)
    example = format.Example(
        task=HARMLESSNESS.name, example_id=example_id,
        context={"conversation": conversation,
                 "response_a": chosen if first else rejected,
                 "response_b": rejected if first else chosen},
        outputs={"answer": "A" if first else "B"})
    yield base.Converted(example, group=conversation)
