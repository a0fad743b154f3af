"""flame.data.format: rendering, validation, truncation and position swapping."""
from dataclasses import replace

import pytest

from flame.data import format as fmt
from flame.data.format import Capability, Example, TaskKind, TaskSpec

PAIRWISE = TaskSpec(
    name="hh_helpful",
    kind=TaskKind.PAIRWISE,
    capability=Capability.QUALITY,
    title="Helpfulness",
    description="Which response, A or B, is more helpful?",
    context_fields=("dialogue", "response_a", "response_b"),
    output_fields=("answer",),
    labels=("A", "B", "Tie"),
)
CLASSIFICATION = TaskSpec(
    name="summ_faithful",
    kind="classification",
    capability="factuality",
    title="Summary faithfulness",
    description="Is every claim in the summary supported by the article? Answer Yes or No.",
    context_fields=("article", "summary"),
    output_fields=("answer", "explanation"),
    labels=("Yes", "No"),
)
POINTWISE = TaskSpec(
    name="helpsteer_correctness",
    kind=TaskKind.POINTWISE,
    capability=Capability.QUALITY,
    title="Correctness",
    description="Rate the correctness of the response from 1 (worst) to 5 (best).",
    context_fields=("prompt", "response"),
    output_fields=("rating",),
    scale=(1, 5),
)


def pairwise_example(dialogue="User: hi\nAssistant: hello\nUser: 2+2?", a="4", b="5",
                     answer="A", example_id="hh/17"):
  return Example(task="hh_helpful", example_id=example_id,
                 context={"dialogue": dialogue, "response_a": a, "response_b": b},
                 outputs={"answer": answer})


CLS_EXAMPLE = Example(task="summ_faithful", example_id="x1",
                      context={"article": "Rain fell.", "summary": "It was sunny."},
                      outputs={"answer": "No", "explanation": "The article says it rained."})
POINT_EXAMPLE = Example(task="helpsteer_correctness", example_id="p9",
                        context={"prompt": "Capital of France?", "response": "Paris."},
                        outputs={"rating": "5"})


# Rendering ------------------------------------------------------------------------------


def test_render_pairwise_literal():
  assert fmt.render_input(PAIRWISE, pairwise_example()) == (
      "INSTRUCTIONS:\n"
      "title: Helpfulness\n"
      "description: Which response, A or B, is more helpful?\n"
      "output_fields: answer\n"
      "\n"
      "CONTEXT:\n"
      "dialogue: User: hi\n"
      "Assistant: hello\n"
      "User: 2+2?\n"
      "response_a: 4\n"
      "response_b: 5")
  assert fmt.render_target(PAIRWISE, pairwise_example()) == "EVALUATION:\nanswer: A"


def test_render_classification_literal():
  assert fmt.render_input(CLASSIFICATION, CLS_EXAMPLE) == (
      "INSTRUCTIONS:\n"
      "title: Summary faithfulness\n"
      "description: Is every claim in the summary supported by the article? Answer Yes or No.\n"
      "output_fields: answer, explanation\n"
      "\n"
      "CONTEXT:\n"
      "article: Rain fell.\n"
      "summary: It was sunny.")
  assert fmt.render_target(CLASSIFICATION, CLS_EXAMPLE) == (
      "EVALUATION:\nanswer: No\nexplanation: The article says it rained.")


def test_render_pointwise_literal():
  assert fmt.render_input(POINTWISE, POINT_EXAMPLE) == (
      "INSTRUCTIONS:\n"
      "title: Correctness\n"
      "description: Rate the correctness of the response from 1 (worst) to 5 (best).\n"
      "output_fields: rating\n"
      "\n"
      "CONTEXT:\n"
      "prompt: Capital of France?\n"
      "response: Paris.")
  assert fmt.render_target(POINTWISE, POINT_EXAMPLE) == "EVALUATION:\nrating: 5"


def test_render_input_needs_no_outputs_and_follows_spec_order():
  ex = Example(task="hh_helpful", example_id="i",
               context={"response_b": "b", "response_a": "a", "dialogue": "d"})
  assert fmt.render_input(PAIRWISE, ex).endswith("dialogue: d\nresponse_a: a\nresponse_b: b")


def test_enums_are_strings():
  assert TaskKind("pairwise") is TaskKind.PAIRWISE and TaskKind.PAIRWISE == "pairwise"
  assert {c.value for c in Capability} == {"quality", "factuality", "safety", "coding", "math",
                                           "instruction_following"}
  assert CLASSIFICATION.kind is TaskKind.CLASSIFICATION


# Validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec,example,match", [
    (PAIRWISE, replace(pairwise_example(), context={"dialogue": "d", "response_a": "a"}),
     r"'hh/17'.*'response_b' is missing"),
    (PAIRWISE, pairwise_example(b="  "), r"'hh/17'.*'response_b' must be a non-empty"),
    (PAIRWISE, pairwise_example(answer="C"), r"'hh/17'.*'answer' is 'C'"),
    (PAIRWISE, replace(pairwise_example(), outputs={}), r"'hh/17'.*'answer' is missing"),
    (PAIRWISE, replace(pairwise_example(), task="other"), r"'hh/17'.*'task'"),
    (CLASSIFICATION, replace(CLS_EXAMPLE, outputs={"answer": "yes", "explanation": "e"}),
     r"'x1'.*'answer' is 'yes'"),
    (CLASSIFICATION, replace(CLS_EXAMPLE, outputs={"answer": "No"}),
     r"'x1'.*'explanation' is missing"),
    (CLASSIFICATION, replace(CLS_EXAMPLE, context={"article": "a", "summary": "s",
                                                               "title": "t"}),
     r"'x1'.*unknown field\(s\) \['title'\]"),
    (POINTWISE, replace(POINT_EXAMPLE, outputs={"rating": "6"}), r"'p9'.*'rating' is '6'"),
    (POINTWISE, replace(POINT_EXAMPLE, outputs={"rating": "0.5"}), r"'p9'.*'rating'"),
    (POINTWISE, replace(POINT_EXAMPLE, outputs={"rating": "good"}), r"'p9'.*'rating'"),
    (POINTWISE, replace(POINT_EXAMPLE, outputs={"rating": "nan"}), r"'p9'.*'rating'"),
])
def test_validate_errors_name_example_and_field(spec, example, match):
  with pytest.raises(ValueError, match=match):
    fmt.validate(example, spec)


def test_validate_accepts_good_examples():
  fmt.validate(pairwise_example(answer="Tie"), PAIRWISE)
  fmt.validate(CLS_EXAMPLE, CLASSIFICATION)
  fmt.validate(replace(POINT_EXAMPLE, outputs={"rating": "1"}), POINTWISE)
  fmt.validate(replace(POINT_EXAMPLE, outputs={"rating": "3.5"}), POINTWISE)


def test_render_target_validates():
  with pytest.raises(ValueError, match="'p9'.*'rating'"):
    fmt.render_target(POINTWISE, replace(POINT_EXAMPLE, outputs={"rating": "9"}))


@pytest.mark.parametrize("changes,match", [
    ({"name": " "}, "'name'"),
    ({"kind": "ranking"}, "'kind'"),
    ({"capability": "style"}, "'capability'"),
    ({"title": ""}, "'title'"),
    ({"description": " "}, "'description'"),
    ({"context_fields": ()}, "'context_fields'"),
    ({"context_fields": ("dialogue", "response_a", "response_a")}, "'context_fields'.*duplicate"),
    ({"context_fields": ("dialogue:", "response_a", "response_b")}, "'context_fields'.*invalid"),
    ({"context_fields": ("dialogue", "response_a", "other")}, "'context_fields'.*two fields"),
    ({"output_fields": ()}, "'output_fields'"),
    ({"labels": ("A",)}, "'labels'"),
    ({"labels": ("A", "A")}, "'labels'"),
    ({"labels": ()}, "'labels'"),
    ({"scale": (1, 5)}, "'scale' must be None"),
    ({"kind": "pointwise", "labels": ()}, "'scale'"),
    ({"kind": "pointwise", "labels": (), "scale": (5, 1)}, "'scale'"),
    ({"kind": "generative", "labels": ("A", "B")}, "'labels' must be empty"),
])
def test_bad_spec_raises_naming_field(changes, match):
  with pytest.raises(ValueError, match=match):
    replace(PAIRWISE, **changes)


# Truncation -----------------------------------------------------------------------------

LONG_DIALOGUE = "\n".join(f"User: question number {i}\nAssistant: answer number {i}"
                          for i in range(200)) + "\nUser: FINAL QUESTION?"


def words(text):
  return len(text.split())


def test_no_budget_or_fitting_budget_is_unchanged():
  ex = pairwise_example(dialogue=LONG_DIALOGUE)
  full = fmt.render_input(PAIRWISE, ex)
  assert fmt.render_input(PAIRWISE, ex, budget=len(full)) == full


@pytest.mark.parametrize("count_tokens,budget", [(len, 3000), (len, 1600), (words, 800),
                                                 (words, 300)])
def test_truncation_keeps_instruction_dialogue_tail_and_responses(count_tokens, budget):
  ex = pairwise_example(dialogue=LONG_DIALOGUE, a="Four. " * 20, b="Five. " * 20)
  out = fmt.render_input(PAIRWISE, ex, budget=budget, count_tokens=count_tokens)
  assert count_tokens(out) <= budget
  assert count_tokens(out) >= budget - 12  # uses (nearly) the whole budget
  assert out.startswith(fmt._instructions(PAIRWISE) + "\n\nCONTEXT:\ndialogue: … ")
  assert out.endswith("User: FINAL QUESTION?\nresponse_a: " + "Four. " * 20 +
                      "\nresponse_b: " + "Five. " * 20)
  # Deterministic.
  assert out == fmt.render_input(PAIRWISE, ex, budget=budget, count_tokens=count_tokens)


def test_responses_cut_from_end_as_last_resort_never_dropped():
  a, b = "alpha " * 200, "beta " * 480
  ex = pairwise_example(dialogue=LONG_DIALOGUE, a=a, b=b)
  instructions_only = len(fmt._instructions(PAIRWISE) + "\n\nCONTEXT:\n")
  budget = instructions_only + 2000
  out = fmt.render_input(PAIRWISE, ex, budget=budget)
  assert len(out) <= budget and len(out) >= budget - 6
  context = out.split("\n\nCONTEXT:\n", 1)[1]
  dialogue, rest = context.split("\nresponse_a: ")
  response_a, response_b = rest.split("\nresponse_b: ")
  # The dialogue is at its minimum share (10%), keeping its tail.
  assert dialogue == "dialogue: … " + LONG_DIALOGUE[-(len(LONG_DIALOGUE) + 9) // 10:]
  # Both responses kept their beginning, proportionally (b is twice as long as a).
  assert response_a.endswith(" …") and a.startswith(response_a[:-2])
  assert response_b.endswith(" …") and b.startswith(response_b[:-2])
  kept_a, kept_b = len(response_a) - 2, len(response_b) - 2
  assert abs(kept_b - 2 * kept_a) <= 2
  assert kept_a >= len(a) // 10


def test_fields_other_than_tail_and_responses_never_cut():
  ex = Example(task="summ_faithful", example_id="x1",
               context={"article": "word " * 500, "summary": "S" * 50})
  out = fmt.render_input(CLASSIFICATION, ex, budget=600)
  assert len(out) <= 600
  assert out.endswith("\nsummary: " + "S" * 50)
  assert "article: … word" in out


def test_impossible_budget_raises_naming_example_and_budget():
  ex = pairwise_example(dialogue=LONG_DIALOGUE, a="x" * 300, b="y" * 300)
  with pytest.raises(ValueError, match=r"'hh/17'.*budget of 1000"):
    fmt.render_input(PAIRWISE, ex, budget=1000)
  with pytest.raises(ValueError, match=r"'hh/17'.*budget of 100 "):
    fmt.render_input(PAIRWISE, ex, budget=100, count_tokens=words)
  # No shrinkable field at all.
  spec = replace(CLASSIFICATION, context_fields=("claim",))
  ex = Example(task="summ_faithful", example_id="c", context={"claim": "c" * 1000})
  with pytest.raises(ValueError, match=r"'c'.*budget of 500"):
    fmt.render_input(spec, ex, budget=500)


# Position swap --------------------------------------------------------------------------


def test_swap_swaps_responses_and_label():
  ex = pairwise_example(a="good", b="bad", answer="A")
  swapped = fmt.swap_positions(PAIRWISE, ex)
  assert swapped == Example(task="hh_helpful", example_id="hh/17/swapped",
                            context={"dialogue": ex.context["dialogue"], "response_a": "bad",
                                     "response_b": "good"},
                            outputs={"answer": "B"})
  assert fmt.swap_positions(PAIRWISE, pairwise_example(answer="B")).outputs == {"answer": "A"}


@pytest.mark.parametrize("answer", ["A", "B", "Tie"])
def test_double_swap_is_identity(answer):
  ex = pairwise_example(answer=answer)
  assert fmt.swap_positions(PAIRWISE, fmt.swap_positions(PAIRWISE, ex)) == ex


def test_ties_stay_ties():
  assert fmt.swap_positions(PAIRWISE, pairwise_example(answer="Tie")).outputs == {"answer": "Tie"}


def test_swap_rejects_non_pairwise_and_free_text_outputs():
  with pytest.raises(ValueError, match="'summ_faithful' is classification"):
    fmt.swap_positions(CLASSIFICATION, CLS_EXAMPLE)
  spec = replace(PAIRWISE, output_fields=("answer", "explanation"))
  ex = replace(pairwise_example(), outputs={"answer": "A", "explanation": "A is right"})
  with pytest.raises(ValueError, match="only an answer field"):
    fmt.swap_positions(spec, ex)
  with pytest.raises(ValueError, match="'hh/17'.*'answer'"):
    fmt.swap_positions(PAIRWISE, pairwise_example(answer="C"))
