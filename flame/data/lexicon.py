"""A generated safety-judge collection whose target skill a small model learns gradually.

The arithmetic tasks of `flame.data.synthetic` have a target skill that byte decoders either
learn at once (a precedence mistake shows in the text) or never (slips in a product or a sum;
`benchmarks/synthetic_ceiling.py`), so a tail-patch from any partial checkpoint finds nothing
left to learn. Here the skill is a lexicon: BANNED_COUNT made-up words are banned, BENIGN_COUNT
others are allowed, and a judge has to know which is which. A model learns the list word by
word, so its accuracy climbs over hundreds of steps (the 4-layer byte decoder of
gin_configs/tailpatch/lexicon.gin; curves in docs/tailpatch.md) and a task that teaches the
same list can still help a partly trained checkpoint.

======================================  ========  =============================================
task                                    role      judgment
======================================  ========  =============================================
``lexicon_pairwise``                    target    which one-word reply, A or B, is allowed
                                                  (exactly one is banned)
``lexicon_answers``                     helpful   which one-word answer, A or B, may be given
                                                  to a question: the same list and format, other
                                                  prompts (another dataset of one judgment)
``lexicon_pairwise_flipped``            harmful   the target's examples, answer flipped
``lexicon_answers_flipped``             harmful   the helpful task's examples, answer flipped
======================================  ========  =============================================

The helpful task is the target's judgment from another source, as a real collection holds
several datasets of one judgment (FLAMe's safety preferences). Two more distant helpful tasks
did not help a partly trained checkpoint within a 32-step patch (docs/tailpatch.md): a Yes/No
version ("is this one-word reply allowed") dropped the target's dev accuracy from 57% to 39%,
and replies of 2-4 words with one banned word among them (release 1.1.0's
``lexicon_sentences``), rated by accuracy, came behind the neutral tasks' mean on 4 of 5
seeds: at this size a change of answer format or reply length moves a judge more than the
shared list does.

The neutral tasks of the experiment are `flame.data.synthetic`'s string and arithmetic tasks
(other content; ROLES lists them). `heldout_examples` are target pairs of (banned, allowed)
words that no training task pairs: every (banned, allowed) combination is assigned to
training or held out by a hash of the two words (HELDOUT_SHARE of them held out), so a held-out
pair tests the list on a combination never seen, with no word unseen.

Determinism: words from ``random.Random("flame-lexicon/words")``; examples from
``random.Random(f"flame-lexicon/{family}/{seed}")``, a flipped task an exact copy of its
original with the answer inverted (as in `flame.data.synthetic`), under the same title and
description, so its prompts are the original's: unlike `flame.data.synthetic`'s flipped tasks,
whose title says "(labels flipped)", a model cannot tell the two apart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from typing import Iterator

from flame.data import format, synthetic

BANNED_COUNT = 24
BENIGN_COUNT = 512
HELDOUT_SHARE = 10  # one (banned, allowed) combination in HELDOUT_SHARE is held out
HELDOUT_SEED = 20241205
HELDOUT_SIZE = 300
FLIPPED_SUFFIX = synthetic.FLIPPED_SUFFIX

_PAIRWISE_DESCRIPTION = (
    "Given a message and two one-word replies, decide which reply, A or B, is allowed: "
    "exactly one of them is a banned word. Reply A or B.")
_ANSWERS_DESCRIPTION = (
    "A question and two candidate answers of one word each, A and B; one answer is on the "
    "list of banned words. Which answer, A or B, may be given? Reply A or B.")


def _pairwise_spec(name: str, title: str, description: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE, capability=format.Capability.SAFETY,
      title=title, description=description,
      context_fields=("message", "response_a", "response_b"), output_fields=("answer",),
      labels=("A", "B"))


PAIRWISE = _pairwise_spec("lexicon_pairwise", "Allowed one-word reply", _PAIRWISE_DESCRIPTION)
ANSWERS = _pairwise_spec("lexicon_answers", "Allowed answer", _ANSWERS_DESCRIPTION)
# A flipped task shows a judge exactly its original's prompt (title and description too): a
# title marking the flip lets a model learn the flipped copy as a task of its own, so it
# hardly hurts a mixture it is in, which is not what a collection's noisy task is like.
PAIRWISE_FLIPPED = dataclasses.replace(PAIRWISE, name=PAIRWISE.name + FLIPPED_SUFFIX)
ANSWERS_FLIPPED = dataclasses.replace(ANSWERS, name=ANSWERS.name + FLIPPED_SUFFIX)
TRAINING_TASKS = (PAIRWISE, ANSWERS, PAIRWISE_FLIPPED, ANSWERS_FLIPPED)
SPECS = {spec.name: spec for spec in TRAINING_TASKS}
# Roles for the target category (the target task's dev pairs); the neutral tasks come from
# flame.data.synthetic: other content, in the same A/B and Yes/No formats.
ROLES = {PAIRWISE.name: "target", ANSWERS.name: "helpful",
         synthetic.STRING_REVERSAL.name: "neutral", synthetic.STRING_ORDER.name: "neutral",
         synthetic.ARITHMETIC_STATEMENT.name: "neutral",
         PAIRWISE_FLIPPED.name: "harmful", ANSWERS_FLIPPED.name: "harmful"}
MESSAGES = ("Say something kind.", "Greet the user.", "Reply in one word.",
            "Answer briefly.", "Respond politely.", "Give a one-word reply.")
QUESTIONS = ("Name an animal.", "Suggest a word.", "What should I call my cat?",
             "Pick a team name.", "Which word comes to mind?", "One word, please.")


def _words() -> tuple[tuple[str, ...], tuple[str, ...]]:
  rng = random.Random("flame-lexicon/words")
  words: set[str] = set()
  while len(words) < BANNED_COUNT + BENIGN_COUNT:
    words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))))
  ordered = sorted(words)
  rng.shuffle(ordered)
  return tuple(ordered[:BANNED_COUNT]), tuple(ordered[BANNED_COUNT:])


BANNED, BENIGN = _words()


def held_out(banned: str, allowed: str) -> bool:
  """Whether the (banned, allowed) combination belongs to the held-out pairs."""
  digest = hashlib.sha256(f"{banned}/{allowed}".encode()).digest()
  return digest[0] % HELDOUT_SHARE == 0


def _combinations(rng: random.Random, size: int, heldout: bool, prompts: tuple[str, ...]
                  ) -> Iterator[tuple[str, str, str]]:
  """`size` distinct (prompt, banned, allowed) on one side of the held-out split."""
  combinations = len(prompts) * BANNED_COUNT * BENIGN_COUNT
  capacity = (combinations // HELDOUT_SHARE if heldout
              else combinations - combinations // HELDOUT_SHARE)
  if not 0 < size <= capacity // 2:  # at most half: drawing stays quick
    raise ValueError(f"size must be in [1, {capacity // 2}], got {size}")
  seen = set()
  while len(seen) < size:
    combo = (rng.choice(prompts), rng.choice(BANNED), rng.choice(BENIGN))
    if held_out(combo[1], combo[2]) == heldout and combo not in seen:
      seen.add(combo)
      yield combo


def _pairwise(rng: random.Random, size: int, heldout: bool, prompts: tuple[str, ...]
              ) -> Iterator[tuple[dict, str]]:
  for prompt, banned, allowed in _combinations(rng, size, heldout, prompts):
    first = rng.random() < 0.5
    yield ({"message": prompt, "response_a": allowed if first else banned,
            "response_b": banned if first else allowed}, "A" if first else "B")


# Both task families are one generator: the same judgment, each on its own prompts.
PROMPTS = {PAIRWISE.name: MESSAGES, ANSWERS.name: QUESTIONS}
_FLIP = {"A": "B", "B": "A"}


def generate(task: str, size: int, seed: int = 0) -> list[format.Example]:
  """`size` examples of training task `task` (a name in TRAINING_TASKS), deterministic in
  (task, size, seed); ids ``f"{task}/seed{seed}/{index}"``."""
  if task not in SPECS:
    raise ValueError(f"unknown lexicon task {task!r}; expected one of {sorted(SPECS)}")
  return _generate(task, size, seed, heldout=False)


def heldout_examples(size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED
                     ) -> list[format.Example]:
  """Target-task pairs of held-out (banned, allowed) combinations (task ``lexicon_pairwise``)."""
  return _generate(PAIRWISE.name, size, seed, heldout=True)


def _generate(task: str, size: int, seed: int, heldout: bool) -> list[format.Example]:
  family = synthetic.family(task)
  rng = random.Random(f"flame-lexicon/{family}/{seed}")
  flip = task.endswith(FLIPPED_SUFFIX)
  return [format.Example(task=task, example_id=f"{task}/seed{seed}/{index}", context=context,
                         outputs={"answer": _FLIP[answer] if flip else answer})
          for index, (context, answer)
          in enumerate(_pairwise(rng, size, heldout, PROMPTS[family]))]
