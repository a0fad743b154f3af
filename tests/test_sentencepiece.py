"""T5 SentencePiece vocabularies: same ids as transformers' T5 tokenizer, T5's special ids."""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from flame import tokenizers

RAW = os.environ["FLAME_DATA_MIRROR"]


def real_texts(n=300):
  with open(os.path.join(RAW, "halueval", "general_data.json"), encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(n), f)]
  return [r["user_query"] for r in rows] + [r["chatgpt_response"] for r in rows]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A small unigram model trained on real HaluEval text with T5's special ids."""
  directory = tmp_path_factory.mktemp("spm")
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(t.replace("\n", " ") for t in real_texts()), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / "spiece"), vocab_size=800,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, minloglevel=2)
  return str(directory / "spiece.model")


def test_special_ids_and_sentinels(spm_model):
  vocabulary = tokenizers.t5_vocabulary(spm_model, extra_ids=10)
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
  assert vocabulary.vocab_size == 810
  assert vocabulary.decode([vocabulary.vocab_size - 1]) == "<extra_id_0>"


def test_refuses_a_model_with_other_special_ids(tmp_path, spm_model):
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(real_texts(50)), encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "bad"),
                                 vocab_size=200, minloglevel=2)  # defaults: unk 0, bos 1, eos 2
  with pytest.raises(ValueError, match="bad.model: special ids"):
    tokenizers.t5_vocabulary(str(tmp_path / "bad.model"))
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizers.t5_vocabulary(str(tmp_path / "missing.model"))


def test_same_ids_as_transformers_and_round_trip(spm_model):
  transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
  reference = transformers.T5Tokenizer.from_pretrained(os.path.dirname(spm_model), extra_ids=10)
  vocabulary = tokenizers.t5_vocabulary(spm_model, extra_ids=10)
  texts = real_texts(40) + ["  spaces  and\ttabs ", "Ünïcödé — 東京", ""]
  for text in texts:
    ours = vocabulary.encode(text)
    theirs = reference(text, add_special_tokens=False)["input_ids"]
    assert ours == theirs, text
    if vocabulary.unk_id not in ours:  # SentencePiece renders UNK as " ⁇ ", HF drops it
      assert vocabulary.decode(ours) == reference.decode(theirs, skip_special_tokens=True)
  assert reference.eos_token_id == vocabulary.eos_id and reference.pad_token_id == vocabulary.pad_id
  encoded = vocabulary.encode_tf(tf.constant(texts[0])).numpy()
  np.testing.assert_array_equal(encoded, vocabulary.encode(texts[0]))
