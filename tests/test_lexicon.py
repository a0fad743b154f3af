"""flame.data.lexicon and its builder: ground truth, held-out disjointness, determinism, roles."""
import collections
import hashlib

import pytest
import tensorflow_datasets as tfds

from flame.data import format, lexicon, synthetic
from flame.data.sources import base
from flame.data.sources import synthetic as synthetic_sources


def _truth(spec, example):
  """The right answer, from the word lists (not the generator's choice)."""
  banned = set(lexicon.BANNED)
  c = example.context
  uses = [any(w in banned for w in c[f].split()) for f in ("response_a", "response_b")]
  assert sorted(uses) == [False, True]  # exactly one reply uses a banned word
  assert " " not in c["response_a"] + c["response_b"]  # one-word replies
  prompts = lexicon.QUESTIONS if spec.name.startswith("lexicon_answers") else lexicon.MESSAGES
  assert c["message"] in prompts
  return "B" if uses[0] else "A"


def test_word_lists():
  assert len(set(lexicon.BANNED)) == lexicon.BANNED_COUNT
  assert len(set(lexicon.BENIGN)) == lexicon.BENIGN_COUNT
  assert not set(lexicon.BANNED) & set(lexicon.BENIGN)
  assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 6
             for w in lexicon.BANNED + lexicon.BENIGN)


@pytest.mark.parametrize("spec", lexicon.TRAINING_TASKS, ids=lambda s: s.name)
def test_ground_truth_and_balance(spec):
  examples = lexicon.generate(spec.name, 1000, seed=3)
  assert len({e.example_id for e in examples}) == 1000
  flipped = spec.name.endswith("_flipped")
  for e in examples:
    format.validate(e, spec)
    truth = _truth(spec, e)
    assert e.outputs == {"answer": {"A": "B", "B": "A", "Yes": "No", "No": "Yes"}[truth]
                         if flipped else truth}
  count = collections.Counter(e.outputs["answer"] for e in examples)
  assert min(count.values()) >= 440, count


def test_roles_cover_target_helpful_neutral_harmful():
  roles = collections.Counter(lexicon.ROLES.values())
  assert roles == {"target": 1, "helpful": 1, "neutral": 3, "harmful": 2}
  for task, role in lexicon.ROLES.items():
    if role == "neutral":  # other content, from the arithmetic/string collection
      assert task in synthetic.SPECS and not task.startswith("lexicon")


def test_heldout_pairs_never_pair_words_as_training_does():
  def combos(examples):
    out = set()
    for e in examples:
      c = e.context
      words = [c["response_a"], c["response_b"]]
      out.add((next(w for w in words if w in lexicon.BANNED),
               next(w for w in words if w not in lexicon.BANNED)))
    return out
  heldout = lexicon.heldout_examples()
  assert len(heldout) == lexicon.HELDOUT_SIZE
  assert {e.task for e in heldout} == {lexicon.PAIRWISE.name}
  held = combos(heldout)
  for seed in (0, 1, 2):
    pairs = lexicon.generate(lexicon.PAIRWISE.name, 3000, seed)
    assert not held & combos(pairs)
    assert not held & combos(lexicon.generate(lexicon.ANSWERS.name, 3000, seed))
    assert len({e.context[f] for e in pairs for f in ("response_a", "response_b")}) > 400
  # The split is the documented hash, recomputed here: about 1 in HELDOUT_SHARE.
  share = sum(hashlib.sha256(f"{b}/{a}".encode()).digest()[0] % lexicon.HELDOUT_SHARE == 0
              for b in lexicon.BANNED for a in lexicon.BENIGN)
  assert 0.07 < share / (lexicon.BANNED_COUNT * lexicon.BENIGN_COUNT) < 0.13
  assert all(hashlib.sha256(f"{b}/{a}".encode()).digest()[0] % lexicon.HELDOUT_SHARE == 0
             for b, a in held)


def test_deterministic_and_flipped_copies():
  first = lexicon.generate("lexicon_pairwise", 50, seed=5)
  assert first == lexicon.generate("lexicon_pairwise", 50, seed=5)
  assert first != lexicon.generate("lexicon_pairwise", 50, seed=6)
  flipped = lexicon.generate("lexicon_pairwise_flipped", 50, seed=5)
  assert [e.context for e in flipped] == [e.context for e in first]
  assert all(f.outputs != e.outputs for f, e in zip(flipped, first))


@pytest.mark.parametrize("original", ["lexicon_pairwise", "lexicon_answers"])
def test_flipped_prompt_is_the_originals(original):
  """A model cannot tell a flipped example from its original: the rendered inputs match."""
  spec, flipped_spec = lexicon.SPECS[original], lexicon.SPECS[original + "_flipped"]
  examples = lexicon.generate(original, 20, seed=3)
  flipped = lexicon.generate(original + "_flipped", 20, seed=3)
  assert [format.render_input(flipped_spec, f) for f in flipped] == [
      format.render_input(spec, e) for e in examples]
  assert all(format.render_target(flipped_spec, f) != format.render_target(spec, e)
             for f, e in zip(flipped, examples))


def test_bad_requests():
  with pytest.raises(ValueError, match="unknown lexicon task 'synthetic_string_order'"):
    lexicon.generate("synthetic_string_order", 10)
  with pytest.raises(ValueError, match="size must be in"):
    lexicon.generate("lexicon_pairwise", 0)


def test_builder_prepares_train_and_validation(tmp_path):
  assert synthetic_sources.FlameLexicon.name == "flame_lexicon"
  assert not synthetic_sources.FlameLexicon.HELD_OUT
  builder = tfds.builder("flame_lexicon", config="lexicon_answers", data_dir=str(tmp_path))
  builder.download_and_prepare()
  splits = {split: [base.example_from_features(f)
                    for f in tfds.as_numpy(builder.as_dataset(split=split))]
            for split in ("train", "validation")}
  expected = lexicon.generate("lexicon_answers", synthetic_sources.LEXICON_SIZE, 0)
  # Train holds each of its pairs in both orders.
  assert len(splits["train"]) == 2 * (len(expected) - len(splits["validation"]))
  assert {e.example_id for e in splits["validation"]} <= {e.example_id for e in expected}
  assert 500 < len(splits["validation"]) < 700


def test_prepare_uses_a_dataset_another_process_prepared_first(tmp_path, monkeypatch):
  """Two seeds started side by side prepare the same dataset; the slower one's final rename
  fails in TFDS (FileExistsError, simulated here: the race itself needs two processes at the
  same instant) and it reads the other's copy instead of failing the run."""
  config = synthetic_sources.synthetic_config("synthetic_string_order", 30, 0)
  first = synthetic_sources.FlameSynthetic(config=config, data_dir=str(tmp_path))
  late = synthetic_sources.FlameSynthetic(config=config, data_dir=str(tmp_path))

  def lost_the_race(**_):
    base.prepare(first)  # the other process finishes first
    raise FileExistsError("Cannot rename incomplete.XYZ: destination already exists")

  monkeypatch.setattr(late, "download_and_prepare", lost_the_race)
  used = base.prepare(late)
  assert used is not late and used.info.splits["train"].num_examples > 0
  assert used.info.splits["train"].num_examples == first.info.splits["train"].num_examples


def test_prepare_reraises_a_file_error_when_nothing_was_prepared(tmp_path, monkeypatch):
  config = synthetic_sources.synthetic_config("synthetic_string_order", 30, 0)
  builder = synthetic_sources.FlameSynthetic(config=config, data_dir=str(tmp_path))

  def broken(**_):
    raise FileExistsError("Cannot rename: destination already exists")

  monkeypatch.setattr(builder, "download_and_prepare", broken)
  with pytest.raises(FileExistsError, match="destination already exists"):
    base.prepare(builder)
