"""Synthetic judge tasks with known ground truth, for validating mixture optimisation.

Tail-patch mixture search (FLAMe-Opt-RM, Vu et al. 2024, section 5) rates each training task
by how much fine-tuning on it alone moves a target category. On a tiny model and real data
the signal is noisy and the right answer unknown; these generated tasks make it known:

=================================================  ========  =================================
task                                               role      judgment
=================================================  ========  =================================
``synthetic_arithmetic_pairwise``                  target    which worked solution of
                                                             ``a + b × c`` is correct (A/B)
``synthetic_arithmetic_statement``                 helpful   is ``a + b × c = v`` correct
                                                             (Yes/No): the same skill
``synthetic_string_reversal``                      neutral   is the candidate the reverse of
                                                             the word (Yes/No)
``synthetic_string_order``                         neutral   which word comes first
                                                             alphabetically (A/B)
``synthetic_arithmetic_pairwise_flipped``          harmful   the target task's examples with
                                                             the answer flipped
``synthetic_arithmetic_statement_flipped``         harmful   the helpful task's examples with
                                                             the answer flipped
=================================================  ========  =================================

A mixture optimiser given these should rate the helpful task up, the neutral tasks about
zero and the flipped tasks down for the target category. The held-out Reasoning subset of
the evaluation suite (`heldout_examples`, task ``synthetic_math_heldout``) is the target
task on a disjoint problem range.

Problems. ``a + b × c`` with ``b, c`` in [2, 29] and the addend ``a`` in [10, 499] for
training tasks and in [500, 999] for the held-out subset, so no held-out problem (or
statement) can ever appear in a training task, whatever the sizes and seeds. Problems are
drawn without replacement within one generated set. The worked solution reads
"First multiply: b × c = p. Then add: a + p = s. The answer is s." A subtly wrong solution
makes exactly one mistake, chosen uniformly: precedence (adds first: (a + b) × c), a slip in
the product (p off by ±1, ±2 or ±10) or a slip in the sum (s off by the same), every later
step consistent with the mistake.

Determinism. Everything is drawn from ``random.Random(f"flame-synthetic/{family}/{seed}")``
(string seeds hash with SHA-512, stable across Python versions and machines), where the
family is the task name without ``_flipped``: a flipped task is an exact copy of its
original (same size and seed) with the answer inverted. Positions of the correct answer (A/B)
and Yes/No answers come from the same generator, each about half the examples.
"""
from __future__ import annotations

import random
import re
import string
from typing import Callable, Iterator

from flame.data import format

TRAIN_ADDENDS = (10, 499)  # inclusive ranges of `a` in a + b × c
HELDOUT_ADDENDS = (500, 999)
FACTORS = (2, 29)  # inclusive range of b and c
SLIPS = (-10, -2, -1, 1, 2, 10)
ERRORS = ("precedence", "product_slip", "sum_slip")
FLIPPED_SUFFIX = "_flipped"
HELDOUT_SEED = 20240710  # the held-out subset's seed; training defaults use 0
HELDOUT_SIZE = 300

_PAIRWISE_DESCRIPTION = (
    "Given an arithmetic problem and two worked solutions, decide which solution, A or B, is "
    "correct. Multiplication is done before addition; check every step. Reply A or B.")
_STATEMENT_DESCRIPTION = (
    "Given an arithmetic statement, decide whether it is correct. Multiplication is done "
    "before addition. Reply Yes or No.")


def _pairwise_spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE, capability=format.Capability.MATH,
      title=title, description=_PAIRWISE_DESCRIPTION,
      context_fields=("problem", "response_a", "response_b"), output_fields=("answer",),
      labels=("A", "B"))


def _statement_spec(name: str, title: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.CLASSIFICATION, capability=format.Capability.MATH,
      title=title, description=_STATEMENT_DESCRIPTION, context_fields=("statement",),
      output_fields=("answer",), labels=("Yes", "No"))


ARITHMETIC_PAIRWISE = _pairwise_spec("synthetic_arithmetic_pairwise",
                                     "Correct worked solution of an arithmetic problem")
ARITHMETIC_STATEMENT = _statement_spec("synthetic_arithmetic_statement",
                                       "Correctness of an arithmetic statement")
STRING_REVERSAL = format.TaskSpec(
    name="synthetic_string_reversal", kind=format.TaskKind.CLASSIFICATION,
    capability=format.Capability.QUALITY, title="String reversal check",
    description=("Given a word and a candidate, decide whether the candidate is the word "
                 "spelled backwards, letter by letter. Reply Yes or No."),
    context_fields=("word", "candidate"), output_fields=("answer",), labels=("Yes", "No"))
STRING_ORDER = format.TaskSpec(
    name="synthetic_string_order", kind=format.TaskKind.PAIRWISE,
    capability=format.Capability.QUALITY, title="Alphabetical order of two words",
    description=("Given two words, decide which word, A or B, comes first in alphabetical "
                 "(dictionary) order. Reply A or B."),
    context_fields=("response_a", "response_b"), output_fields=("answer",), labels=("A", "B"))
ARITHMETIC_PAIRWISE_FLIPPED = _pairwise_spec(
    ARITHMETIC_PAIRWISE.name + FLIPPED_SUFFIX,
    "Correct worked solution of an arithmetic problem (labels flipped)")
ARITHMETIC_STATEMENT_FLIPPED = _statement_spec(
    ARITHMETIC_STATEMENT.name + FLIPPED_SUFFIX,
    "Correctness of an arithmetic statement (labels flipped)")
HELDOUT_MATH = _pairwise_spec("synthetic_math_heldout",
                              "Correct worked solution of an arithmetic problem")

TRAINING_TASKS = (ARITHMETIC_PAIRWISE, ARITHMETIC_STATEMENT, STRING_REVERSAL, STRING_ORDER,
                  ARITHMETIC_PAIRWISE_FLIPPED, ARITHMETIC_STATEMENT_FLIPPED)
ROLES = {ARITHMETIC_PAIRWISE.name: "target", ARITHMETIC_STATEMENT.name: "helpful",
         STRING_REVERSAL.name: "neutral", STRING_ORDER.name: "neutral",
         ARITHMETIC_PAIRWISE_FLIPPED.name: "harmful",
         ARITHMETIC_STATEMENT_FLIPPED.name: "harmful"}
SPECS = {spec.name: spec for spec in TRAINING_TASKS + (HELDOUT_MATH,)}


# Arithmetic ---------------------------------------------------------------------------------


def problem_text(a: int, b: int, c: int) -> str:
  return f"What is {a} + {b} × {c}?"


def correct_solution(a: int, b: int, c: int) -> str:
  product = b * c
  return (f"First multiply: {b} × {c} = {product}. Then add: {a} + {product} = "
          f"{a + product}. The answer is {a + product}.")


def wrong_solution(a: int, b: int, c: int, error: str, slip: int) -> tuple[str, int]:
  """A worked solution with exactly one mistake, and its (wrong) final answer."""
  product = b * c
  if error == "precedence":
    total = a + b
    return (f"First add: {a} + {b} = {total}. Then multiply: {total} × {c} = {total * c}. "
            f"The answer is {total * c}.", total * c)
  if error == "product_slip":
    product += slip
    return (f"First multiply: {b} × {c} = {product}. Then add: {a} + {product} = "
            f"{a + product}. The answer is {a + product}.", a + product)
  if error == "sum_slip":
    return (f"First multiply: {b} × {c} = {product}. Then add: {a} + {product} = "
            f"{a + product + slip}. The answer is {a + product + slip}.", a + product + slip)
  raise ValueError(f"error is {error!r}, expected one of {ERRORS}")


_SOLUTION = re.compile(r"First (multiply|add): (\d+) [×+] (\d+) = (\d+)\. Then (?:add|multiply): "
                       r"(\d+) [+×] (\d+) = (\d+)\. The answer is (\d+)\.")


def solution_error(problem: str, solution: str) -> str:
  """The mistake in a worked solution of `problem`: "none" when it is correct, else one of
  ERRORS (the inverse of `wrong_solution`, read from the text)."""
  numbers = re.fullmatch(r"What is (\d+) \+ (\d+) × (\d+)\?", problem)
  steps = _SOLUTION.fullmatch(solution)
  if not numbers or not steps:
    raise ValueError(f"not a synthetic arithmetic problem and solution: {problem!r} / "
                     f"{solution!r}")
  a, b, c = map(int, numbers.groups())
  if steps.group(1) == "add":
    return "precedence"
  if int(steps.group(4)) != b * c:
    return "product_slip"
  return "none" if int(steps.group(8)) == a + b * c else "sum_slip"


def _problems(rng: random.Random, size: int, addends: tuple[int, int]
              ) -> Iterator[tuple[int, int, int]]:
  """`size` distinct (a, b, c), a in `addends`, b and c in FACTORS."""
  low, high = addends
  capacity = (high - low + 1) * (FACTORS[1] - FACTORS[0] + 1) ** 2
  if not 0 < size <= capacity // 2:
    raise ValueError(f"size must be in [1, {capacity // 2}] for addends {addends}, got {size}")
  seen = set()
  while len(seen) < size:
    triple = (rng.randint(low, high), rng.randint(*FACTORS), rng.randint(*FACTORS))
    if triple not in seen:
      seen.add(triple)
      yield triple


def _wrong(rng: random.Random, a: int, b: int, c: int) -> tuple[str, int]:
  error, slip = rng.choice(ERRORS), rng.choice(SLIPS)
  if error == "product_slip" and b * c + slip <= 0:
    slip = -slip
  return wrong_solution(a, b, c, error, slip)


def _arithmetic_pairwise(task: str, rng: random.Random, size: int,
                         addends: tuple[int, int]) -> Iterator[tuple[dict, str]]:
  del task
  for a, b, c in _problems(rng, size, addends):
    right, (wrong, _) = correct_solution(a, b, c), _wrong(rng, a, b, c)
    first = rng.random() < 0.5
    yield ({"problem": problem_text(a, b, c), "response_a": right if first else wrong,
            "response_b": wrong if first else right}, "A" if first else "B")


def _arithmetic_statement(task: str, rng: random.Random, size: int,
                          addends: tuple[int, int]) -> Iterator[tuple[dict, str]]:
  del task
  for a, b, c in _problems(rng, size, addends):
    correct = rng.random() < 0.5
    value = a + b * c if correct else _wrong(rng, a, b, c)[1]
    yield {"statement": f"{a} + {b} × {c} = {value}"}, "Yes" if correct else "No"


# Strings ------------------------------------------------------------------------------------


def _word(rng: random.Random) -> str:
  return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9)))


def _string_reversal(task: str, rng: random.Random, size: int,
                     addends: tuple[int, int]) -> Iterator[tuple[dict, str]]:
  del task, addends
  for _ in range(size):
    word = _word(rng)
    while word == word[::-1]:
      word = _word(rng)
    reverse, correct = word[::-1], rng.random() < 0.5
    if correct:
      candidate = reverse
    else:  # Swap two adjacent, different letters of the reverse: a near miss.
      spots = [i for i in range(len(reverse) - 1) if reverse[i] != reverse[i + 1]]
      i = rng.choice(spots)
      candidate = reverse[:i] + reverse[i + 1] + reverse[i] + reverse[i + 2:]
    yield {"word": word, "candidate": candidate}, "Yes" if correct else "No"


def _string_order(task: str, rng: random.Random, size: int,
                  addends: tuple[int, int]) -> Iterator[tuple[dict, str]]:
  del task, addends
  for _ in range(size):
    first, second = _word(rng), _word(rng)
    while first == second:
      second = _word(rng)
    a_first = first < second
    yield {"response_a": first, "response_b": second}, "A" if a_first else "B"


Generator = Callable[[str, random.Random, int, tuple[int, int]], Iterator[tuple[dict, str]]]
_GENERATORS: dict[str, Generator] = {
    ARITHMETIC_PAIRWISE.name: _arithmetic_pairwise,
    ARITHMETIC_STATEMENT.name: _arithmetic_statement,
    STRING_REVERSAL.name: _string_reversal,
    STRING_ORDER.name: _string_order,
    HELDOUT_MATH.name: _arithmetic_pairwise,
}
_FLIP = {"A": "B", "B": "A", "Yes": "No", "No": "Yes"}


def family(task: str) -> str:
  """The task whose examples `task` uses (itself, or the original of a flipped task)."""
  return task.removesuffix(FLIPPED_SUFFIX)


def generate(task: str, size: int, seed: int = 0) -> list[format.Example]:
  """`size` examples of training task `task` (a name in TRAINING_TASKS), valid for its spec.

  Ids are ``f"{task}/seed{seed}/{index}"``. The same (task, size, seed) always gives the same
  examples; a flipped task gives its original's examples with the answer inverted.
  """
  if task not in SPECS or task == HELDOUT_MATH.name:
    raise ValueError(f"unknown synthetic training task {task!r}; expected one of "
                     f"{[spec.name for spec in TRAINING_TASKS]}")
  return _generate(task, size, seed, TRAIN_ADDENDS)


def heldout_examples(size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[format.Example]:
  """The held-out Reasoning subset: target-task problems with addends in HELDOUT_ADDENDS."""
  return _generate(HELDOUT_MATH.name, size, seed, HELDOUT_ADDENDS)


def _generate(task: str, size: int, seed: int, addends: tuple[int, int]
              ) -> list[format.Example]:
  rng = random.Random(f"flame-synthetic/{family(task)}/{seed}")
  flip = task.endswith(FLIPPED_SUFFIX)
  out = []
  for index, (context, answer) in enumerate(_GENERATORS[family(task)](task, rng, size, addends)):
    out.append(format.Example(task=task, example_id=f"{task}/seed{seed}/{index}",
                              context=context, outputs={"answer": _FLIP[answer] if flip
                                                        else answer}))
  return out
