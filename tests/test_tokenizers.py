"""HfTokenizerVocabulary: SmolLM2's GGUF tokenizer against transformers', seqio pipelines."""
import csv
import gzip
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flame import files, tokenizers as flame_tokenizers
from flame.checkpoints import gguf

DATA = os.environ["FLAME_DATA_MIRROR"]


@pytest.fixture(scope="module")
def ours():
  try:
    return flame_tokenizers.smollm2_vocabulary()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def theirs(ours):
  transformers = pytest.importorskip("transformers")
  path = files.smollm2_gguf_path()
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


def jsonl_gz(path, n):
  with gzip.open(os.path.join(DATA, path), "rt", encoding="utf-8") as f:
    return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def real_texts():
  """Texts from the data mirror: German MT output, dialogues, moderation samples, answers."""
  texts = []
  with open(os.path.join(DATA, "wmt_mqm", "ted_ende", "mqm_ted_ende.tsv"), encoding="utf-8") as f:
    rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    texts += [row["target"] for row, _ in zip(rows, range(40))]
  texts += [r["chosen"] for r in jsonl_gz("hh_rlhf/harmless-base/test.jsonl.gz", 40)]
  texts += [r["prompt"] for r in jsonl_gz("openai_moderation/samples-1680.jsonl.gz", 20)]
  with open(os.path.join(DATA, "halueval", "general_data.json"), encoding="utf-8") as f:
    texts += [json.loads(line)["chatgpt_response"] for line, _ in zip(f, range(20))]
  edge = ["", " ", "   leading and trailing   ", "tabs\t\tand\r\nCRLF\n\n\n  runs      of spaces",
          "Ünïcödé — “quotes” 日本語 한국어 العربية 🤖👩‍👩‍👧 ﬁ ligature", "x" * 500,
          "numbers 1234567 3.14159 0x1F", "it's we're they'll I'd",
          "<|im_start|>user\nhi<|im_end|>",
          "\n\nHuman: " + "\n\n".join(texts[40:60])]  # one long input (~2,600 tokens)
  return texts + edge


def test_ids_match_transformers_on_real_texts(ours, theirs, real_texts):
  mismatched = [t[:60] for t in real_texts
                if ours.encode(t) != theirs(t, add_special_tokens=False).input_ids]
  assert not mismatched
  assert max(len(ours.encode(t)) for t in real_texts) > 2000  # the long input


def test_decode_round_trips_and_matches_transformers(ours, theirs, real_texts):
  for text in real_texts:
    ids = ours.encode(text)
    if ours.eos_id in ids:
      continue  # decoding stops at EOS by design
    assert ours.decode(ids) == text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)


def test_special_ids_agree_with_the_model(ours, theirs):
  transformers = pytest.importorskip("transformers")
  path = files.smollm2_gguf_path()
  config = transformers.AutoConfig.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  assert ours.vocab_size == len(theirs) == config.vocab_size == 49152
  assert ours.eos_id == theirs.eos_token_id == config.eos_token_id == 2
  assert ours.pad_id == theirs.pad_token_id == config.pad_token_id
  assert ours.bos_id == theirs.bos_token_id and ours.unk_id == theirs.unk_token_id
  assert ours.encode("<|im_end|>") == [ours.eos_id]
  assert ours.decode([19556, 905, ours.eos_id, 28, 29]) == "Hello world"  # stops at EOS


def test_chat_template_matches_transformers(ours, theirs):
  conversations = [
      [{"role": "user", "content": "What is 2+2?"}],
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"},
       {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
  for messages in conversations:
    for prompt in (True, False):
      expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
      got = ours.apply_chat_template(messages, add_generation_prompt=prompt)
      assert got == expected
      assert ours.encode(got) == theirs(expected, add_special_tokens=False).input_ids
  text = ours.apply_chat_template(conversations[0])
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_tf_encode_and_decode(ours, real_texts):
  sample = [t for t in real_texts[:60] if t]
  for text in sample[:5]:
    np.testing.assert_array_equal(ours.encode_tf(tf.constant(text)).numpy(), ours.encode(text))
  ragged = ours.encode_tf(tf.constant(sample[:4]))
  assert ragged.to_list() == [ours.encode(t) for t in sample[:4]]
  ids = [ours.encode(t) + [ours.eos_id, 7, 8] for t in sample[:3]]
  width = max(map(len, ids))
  batch = tf.constant([row + [0] * (width - len(row)) for row in ids])
  decoded = [t.decode("utf-8") for t in ours.decode_tf(batch).numpy()]
  assert decoded == sample[:3]
  assert ours.decode_tf(tf.constant(ids[0])).numpy().decode("utf-8") == sample[0]


def test_in_a_seqio_pipeline(ours, real_texts):
  texts = [t for t in real_texts[:40] if t][:8]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts[::-1]})

  task = seqio.Task(
      "hf_tokenizer_test_task", source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      output_features={"inputs": seqio.Feature(ours, add_eos=True),
                       "targets": seqio.Feature(ours, add_eos=True)},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
  lengths = {"inputs": 4096, "targets": 4096}
  rows = list(task.get_dataset(lengths, split="train", shuffle=False).as_numpy_iterator())
  assert [r["inputs"].tolist() for r in rows] == [ours.encode(t) + [ours.eos_id] for t in texts]
  assert [r["targets_pretokenized"].decode() for r in rows] == texts[::-1]
  converted = seqio.PrefixLMFeatureConverter(pack=False)(
      task.get_dataset(lengths, split="train", shuffle=False),
      {"inputs": 1024, "targets": 1024})
  first = next(converted.as_numpy_iterator())
  n = len(ours.encode(texts[0])) + 1
  assert first["decoder_target_tokens"][:n].tolist() == ours.encode(texts[0]) + [ours.eos_id]


def test_vocabulary_from_tokenizer_json(ours, tmp_path, real_texts):
  path = tmp_path / "tokenizer.json"
  ours.tokenizer.save(str(path))
  other = flame_tokenizers.HfTokenizerVocabulary(str(path), eos_id=2, pad_id=2, unk_id=0,
                                                 bos_id=1)
  assert [other.encode(t) for t in real_texts[:20]] == [ours.encode(t) for t in real_texts[:20]]
  assert other == ours and hash(other) == hash(ours)
  assert flame_tokenizers.HfTokenizerVocabulary(str(path), eos_id=0) != ours
  with pytest.raises(ValueError, match="exactly one"):
    flame_tokenizers.HfTokenizerVocabulary()
  with pytest.raises(ValueError, match="eos_id=99999 is outside"):
    flame_tokenizers.HfTokenizerVocabulary(str(path), eos_id=99999)
  with pytest.raises(ValueError, match="no chat template"):
    other.apply_chat_template([{"role": "user", "content": "hi"}])


def test_non_bpe_gguf_tokenizer_is_refused(tmp_path):
  gguf_lib = pytest.importorskip("gguf")
  path = tmp_path / "spm.gguf"
  writer = gguf_lib.GGUFWriter(str(path), arch="llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(gguf.GGUFError, match=f"{path}.*tokenizer.ggml.model='llama'"):
    flame_tokenizers.HfTokenizerVocabulary.from_gguf(str(path))


def test_byte_level_builder_respells_and_adds_tokens():
  """Tokens outside the byte alphabet are re-spelled; CONTROL / USER_DEFINED match whole."""
  spell = flame_tokenizers.bytes_to_unicode()
  assert len(set(spell.values())) == 256 and spell[ord(" ")] == "Ġ" and spell[ord("\n")] == "Ċ"
  base = [spell[b] for b in range(256)]
  tokens = base + ["Ġh", "Ġhi", "<ctl>", "<think>", "a b"]
  types = [1] * 256 + [1, 1, 3, 4, 1]
  tok = flame_tokenizers.byte_level_bpe_tokenizer(tokens, ["Ġ h", "Ġh i"], types, "smollm")
  vocab = flame_tokenizers.HfTokenizerVocabulary(tokenizer=tok, eos_id=258)
  assert vocab.encode(" hi<ctl><think> hi") == [257, 258, 259, 257]
  assert vocab.decode([257, 259, 257, 258, 257]) == " hi<think> hi"  # stops at EOS <ctl>
  assert tok.token_to_id("aĠb") == 260  # "a b" re-spelled from its bytes
