"""flame.data.synthetic and its TFDS builders: ground truth, determinism, roles, no overlap."""
import collections
import random
import re

import pytest
import tensorflow_datasets as tfds

from flame.data import format, synthetic
from flame.data.sources import base
from flame.data.sources import synthetic as synthetic_sources

PROBLEM = re.compile(r"What is (\d+) \+ (\d+) × (\d+)\?")
STATEMENT = re.compile(r"(\d+) \+ (\d+) × (\d+) = (-?\d+)")
FINAL = re.compile(r"The answer is (-?\d+)\.\Z")


def _truth(spec, example):
  """The right answer, recomputed from the example's text."""
  c = example.context
  if spec.name.startswith("synthetic_arithmetic_pairwise") or spec.name.endswith("heldout"):
    a, b, m = map(int, PROBLEM.fullmatch(c["problem"]).groups())
    finals = [int(FINAL.search(c[f]).group(1)) for f in ("response_a", "response_b")]
    assert sorted(v == a + b * m for v in finals) == [False, True]  # exactly one is right
    return "A" if finals[0] == a + b * m else "B"
  if spec.name.startswith("synthetic_arithmetic_statement"):
    a, b, m, value = map(int, STATEMENT.fullmatch(c["statement"]).groups())
    return "Yes" if value == a + b * m else "No"
  if spec.name == "synthetic_string_reversal":
    return "Yes" if c["candidate"] == c["word"][::-1] else "No"
  if spec.name == "synthetic_string_order":
    return "A" if c["response_a"] < c["response_b"] else "B"
  raise AssertionError(spec.name)


@pytest.mark.parametrize("spec", synthetic.TRAINING_TASKS, ids=lambda s: s.name)
def test_ground_truth_roles_and_balance(spec):
  examples = synthetic.generate(spec.name, 1000, seed=3)
  assert len(examples) == 1000 and len({e.example_id for e in examples}) == 1000
  flipped = spec.name.endswith("_flipped")
  for e in examples:
    format.validate(e, spec)
    truth = _truth(spec, e)
    expected = {"A": "B", "B": "A", "Yes": "No", "No": "Yes"}[truth] if flipped else truth
    assert e.outputs == {"answer": expected}
  count = collections.Counter(e.outputs["answer"] for e in examples)
  assert min(count.values()) >= 440, count  # about half each (seeded draws)
  assert synthetic.ROLES[spec.name] == {
      "synthetic_arithmetic_pairwise": "target", "synthetic_arithmetic_statement": "helpful",
      "synthetic_string_reversal": "neutral", "synthetic_string_order": "neutral"}.get(
          spec.name, "harmful")


def test_wrong_solutions_make_one_subtle_mistake():
  assert synthetic.wrong_solution(12, 3, 4, "precedence", 0) == (
      "First add: 12 + 3 = 15. Then multiply: 15 × 4 = 60. The answer is 60.", 60)
  assert synthetic.wrong_solution(12, 3, 4, "product_slip", -2) == (
      "First multiply: 3 × 4 = 10. Then add: 12 + 10 = 22. The answer is 22.", 22)
  assert synthetic.wrong_solution(12, 3, 4, "sum_slip", 10) == (
      "First multiply: 3 × 4 = 12. Then add: 12 + 12 = 34. The answer is 34.", 34)
  assert synthetic.correct_solution(12, 3, 4) == (
      "First multiply: 3 × 4 = 12. Then add: 12 + 12 = 24. The answer is 24.")


def test_deterministic_and_flipped_tasks_are_copies():
  first = synthetic.generate("synthetic_arithmetic_pairwise", 50, seed=5)
  assert first == synthetic.generate("synthetic_arithmetic_pairwise", 50, seed=5)
  assert first != synthetic.generate("synthetic_arithmetic_pairwise", 50, seed=6)
  flipped = synthetic.generate("synthetic_arithmetic_pairwise_flipped", 50, seed=5)
  assert [e.context for e in flipped] == [e.context for e in first]
  assert all(f.outputs["answer"] != e.outputs["answer"] for f, e in zip(flipped, first))
  assert first[0].example_id == "synthetic_arithmetic_pairwise/seed5/0"


def test_training_and_heldout_problem_ranges_are_disjoint():
  heldout = synthetic.heldout_examples()
  held_problems = {e.context["problem"] for e in heldout}
  assert len(held_problems) == len(heldout) == 300
  assert all(500 <= int(PROBLEM.fullmatch(p).group(1)) <= 999 for p in held_problems)
  for seed in (0, 1, 2, synthetic.HELDOUT_SEED):
    train = synthetic.generate("synthetic_arithmetic_pairwise", 5000, seed)
    addends = [int(PROBLEM.fullmatch(e.context["problem"]).group(1)) for e in train]
    assert 10 <= min(addends) and max(addends) <= 499
    assert not held_problems & {e.context["problem"] for e in train}
  statements = synthetic.generate("synthetic_arithmetic_statement", 5000, 0)
  assert all(int(STATEMENT.fullmatch(e.context["statement"]).group(1)) <= 499
             for e in statements)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown synthetic training task"):
    synthetic.generate("synthetic_math_heldout", 10)
  with pytest.raises(ValueError, match="size must be in"):
    synthetic.generate("synthetic_arithmetic_pairwise", 0)
  with pytest.raises(ValueError, match="unknown synthetic training task"):
    synthetic_sources.synthetic_config("nope", 10)


def test_builder_custom_config_prepares_the_generated_set(tmp_path):
  config = synthetic_sources.synthetic_config("synthetic_string_order", size=40, seed=2)
  assert (config.name, config.size, config.seed) == ("synthetic_string_order-n40-seed2", 40, 2)
  builder = tfds.builder("flame_synthetic", config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  splits = {split: [base.example_from_features(f) for f in
                    tfds.as_numpy(builder.as_dataset(split=split))]
            for split in builder.info.splits}
  assert sorted(splits) == ["train", "validation"]
  originals = [e for e in splits["train"] + splits["validation"]
               if not e.example_id.endswith(format.SWAP_SUFFIX)]
  expected = synthetic.generate("synthetic_string_order", 40, seed=2)
  assert sorted(originals, key=lambda e: e.example_id) == sorted(
      expected, key=lambda e: e.example_id)
  assert len(splits["train"]) == 2 * (40 - len(splits["validation"]))  # swap-augmented
  assert builder.info.metadata["held_out"] is False
  assert builder.info.metadata["decontaminated"] == {}
  assert builder.info.metadata["upstream"] == [{
      "generator": "flame.data.synthetic", "task": "synthetic_string_order", "size": 40,
      "seed": 2, "license": "generated (no third-party data)"}]


def test_default_configs():
  configs = synthetic_sources.FlameSynthetic.builder_configs
  assert sorted(configs) == sorted(spec.name for spec in synthetic.TRAINING_TASKS)
  assert {(c.size, c.seed) for c in configs.values()} == {(synthetic_sources.DEFAULT_SIZE, 0)}
  assert not synthetic_sources.FlameSynthetic.HELD_OUT
  assert synthetic_sources.FlameSyntheticHeldout.HELD_OUT
  assert synthetic_sources.FlameSyntheticHeldout.FILES == synthetic_sources.FlameSynthetic.FILES
  assert synthetic_sources.FlameSynthetic.FILES == ()


def test_solution_error_names_the_mistake_the_generator_made():
  rng = random.Random(7)
  for _ in range(3000):
    a, b, c = rng.randint(10, 999), rng.randint(*synthetic.FACTORS), rng.randint(*synthetic.FACTORS)
    error, slip = rng.choice(synthetic.ERRORS), rng.choice(synthetic.SLIPS)
    if error == "product_slip" and b * c + slip <= 0:
      slip = -slip
    problem = synthetic.problem_text(a, b, c)
    assert synthetic.solution_error(problem, synthetic.wrong_solution(a, b, c, error, slip)[0]) \
        == error
    assert synthetic.solution_error(problem, synthetic.correct_solution(a, b, c)) == "none"
  # Every held-out pair has one right and one wrong solution, each kind of mistake ~ a third.
  kinds = collections.Counter()
  for example in synthetic.heldout_examples():
    c = example.context
    found = [synthetic.solution_error(c["problem"], c[f]) for f in ("response_a", "response_b")]
    assert found.count("none") == 1, found
    kinds[found[0] if found[1] == "none" else found[1]] += 1
  assert set(kinds) == set(synthetic.ERRORS) and min(kinds.values()) > 70, kinds


@pytest.mark.parametrize("problem,solution", [
    ("What is 1 + 2?", "First multiply: 2 × 3 = 6. Then add: 1 + 6 = 7. The answer is 7."),
    ("What is 1 + 2 × 3?", "The answer is 7."),
])
def test_solution_error_refuses_other_text(problem, solution):
  with pytest.raises(ValueError, match="not a synthetic arithmetic problem"):
    synthetic.solution_error(problem, solution)
