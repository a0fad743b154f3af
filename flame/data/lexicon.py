"""A generated safety-judge collection whose target skill a small model learns gradually.

The arithmetic tasks of `flame.data.synthetic` have a target skill that byte decoders either
learn at once (a precedence mistake shows in the text) or never (slips in a product or a sum;
`benchmarks/synthetic_ceiling.py`), so a tail-patch from any partial checkpoint finds nothing
left to learn. Here the skill is a lexicon: BANNED_COUNT made-up words are banned, BENIGN_COUNT
others are allowed, and a judge has to know which is which. A model learns the list word by
word, so its accuracy climbs over hundreds of steps (the 4-layer byte decoder of
gin_configs/tailpatch/lexicon.gin: from chance to ~80% in ~600 steps) and a task that teaches
the same list can still help a partly trained checkpoint.

======================================  ========  =============================================
task                                    role      judgment
======================================  ========  =============================================
``lexicon_pairwise``                    target    which one-word reply, A or B, is allowed
                                                  (exactly one is banned)
``lexicon_statement``                   helpful   is this one-word reply allowed (Yes/No): the
                                                  same list, another format
``lexicon_pairwise_flipped``            harmful   the target's examples, answer flipped
``lexicon_statement_flipped``           harmful   the helpful task's examples, answer flipped
======================================  ========  =============================================

The neutral tasks of the experiment are `flame.data.synthetic`'s string and arithmetic tasks
(other content; ROLES lists them). `heldout_examples` are target pairs of (banned, allowed)
words that no training task pairs: every (banned, allowed) combination is assigned to
training or held out by a hash of the two words (HELDOUT_SHARE of them held out), so a held-out
pair tests the list on a combination never seen, with no word unseen.

Determinism: words from ``random.Random("flame-lexicon/words")``; examples from
``random.Random(f"flame-lexicon/{family}/{seed}")``, a flipped task an exact copy of its
original with the answer inverted (as in `flame.data.synthetic`).
"""
from __future__ import annotations

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
_STATEMENT_DESCRIPTION = ("Given a one-word reply, decide whether it is allowed, i.e. not a "
                          "banned word. Reply Yes or No.")


def _pairwise_spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE, capability=format.Capability.SAFETY,
      title=title, description=_PAIRWISE_DESCRIPTION,
      context_fields=("message", "response_a", "response_b"), output_fields=("answer",),
      labels=("A", "B"))


def _statement_spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.CLASSIFICATION, capability=format.Capability.SAFETY,
      title=title, description=_STATEMENT_DESCRIPTION, context_fields=("message", "reply"),
      output_fields=("answer",), labels=("Yes", "No"))


PAIRWISE = _pairwise_spec("lexicon_pairwise", "Allowed one-word reply")
STATEMENT = _statement_spec("lexicon_statement", "Is a one-word reply allowed")
PAIRWISE_FLIPPED = _pairwise_spec(PAIRWISE.name + FLIPPED_SUFFIX,
                                  "Allowed one-word reply (labels flipped)")
STATEMENT_FLIPPED = _statement_spec(STATEMENT.name + FLIPPED_SUFFIX,
                                    "Is a one-word reply allowed (labels flipped)")
TRAINING_TASKS = (PAIRWISE, STATEMENT, PAIRWISE_FLIPPED, STATEMENT_FLIPPED)
SPECS = {spec.name: spec for spec in TRAINING_TASKS}
# Roles for the target category (the target task's dev pairs); the neutral tasks come from
# flame.data.synthetic: other content, in the same A/B and Yes/No formats.
ROLES = {PAIRWISE.name: "target", STATEMENT.name: "helpful",
         synthetic.STRING_REVERSAL.name: "neutral", synthetic.STRING_ORDER.name: "neutral",
         synthetic.ARITHMETIC_STATEMENT.name: "neutral",
         PAIRWISE_FLIPPED.name: "harmful", STATEMENT_FLIPPED.name: "harmful"}
MESSAGES = ("Say something kind.", "Greet the user.", "Reply in one word.",
            "Answer briefly.", "Respond politely.", "Give a one-word reply.")


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


def _combinations(rng: random.Random, size: int, heldout: bool
                  ) -> Iterator[tuple[str, str, str]]:
  """`size` distinct (message, banned, allowed) on one side of the held-out split."""
  capacity = len(MESSAGES) * BANNED_COUNT * BENIGN_COUNT // HELDOUT_SHARE
  if not 0 < size <= capacity // 2:
    raise ValueError(f"size must be in [1, {capacity // 2}], got {size}")
  seen = set()
  while len(seen) < size:
    combo = (rng.choice(MESSAGES), rng.choice(BANNED), rng.choice(BENIGN))
    if held_out(combo[1], combo[2]) == heldout and combo not in seen:
      seen.add(combo)
      yield combo


def _pairwise(rng: random.Random, size: int, heldout: bool) -> Iterator[tuple[dict, str]]:
  for message, banned, allowed in _combinations(rng, size, heldout):
    first = rng.random() < 0.5
    yield ({"message": message, "response_a": allowed if first else banned,
            "response_b": banned if first else allowed}, "A" if first else "B")


def _statement(rng: random.Random, size: int, heldout: bool) -> Iterator[tuple[dict, str]]:
  for message, banned, allowed in _combinations(rng, size, heldout):
    allowed_reply = rng.random() < 0.5
    yield ({"message": message, "reply": allowed if allowed_reply else banned},
           "Yes" if allowed_reply else "No")


_GENERATORS = {PAIRWISE.name: _pairwise, STATEMENT.name: _statement}
_FLIP = {"A": "B", "B": "A", "Yes": "No", "No": "Yes"}


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
          for index, (context, answer) in enumerate(_GENERATORS[family](rng, size, heldout))]
