"""Generative judgments (flame/autorater/generation.py): bucketed, padded batches decode
exactly what the model decodes one prompt at a time; EVALUATION blocks parse back."""
import jax
import numpy as np
import pytest
import seqio

from flame import partitioning
from flame.autorater import autorater, generation, prompts
from flame.models import decoder, t5

VOCAB = seqio.ByteVocabulary()
PROMPTS = ["Rate this.", "A somewhat longer prompt to judge, with more bytes in it.", "x" * 45,
           "Which is better?", "ok"]


def _model(family):
  if family == "decoder":
    return decoder.DecoderOnlyModel(decoder.DecoderConfig(
        vocab_size=259, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=64))
  return t5.EncoderDecoderModel(t5.T5Config(
      vocab_size=259, emb_dim=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
      head_dim=8, mlp_dim=64))


@pytest.mark.parametrize("family", [
    "decoder", pytest.param("t5", marks=pytest.mark.slow)])  # t5: 45 s; the same batching code
def test_batched_generation_equals_one_at_a_time(family):
  model = _model(family)
  params = model.init_params(jax.random.PRNGKey(2), 1, {"inputs": 8, "targets": 8})
  inputs = [VOCAB.encode(p) + [1] for p in PROMPTS]
  got = generation.Generator(model, partitioning.Partitioner(), batch_size=8, max_length=64,
                             smallest_bucket=16).generate(params, inputs, 10)
  for ids, out in zip(inputs, got):
    one = np.asarray(model.decode(params, {"inputs": np.array([ids], np.int32)}, 10))[0]
    expected = [int(t) for t in one]
    expected = expected[:expected.index(1) + 1] if 1 in expected else expected
    assert out == expected


def test_parse_evaluation():
  e = generation.parse_evaluation("EVALUATION:\nanswer: B\nexplanation: A is wrong:\nit adds.",
                                  labels=("A", "B"))
  assert e.verdict == "B"
  assert e.fields == {"answer": "B", "explanation": "A is wrong:\nit adds."}
  assert generation.parse_evaluation("EVALUATION:\nanswer: maybe", labels=("A", "B")).verdict \
      is None
  assert generation.parse_evaluation("no idea").verdict is None


def test_autorater_explain():
  model = _model("decoder")
  params = model.init_params(jax.random.PRNGKey(0), 1, {"inputs": 8, "targets": 8})
  rater = autorater.Autorater(model, params, batch_size=8, max_input_length=512)
  spec = prompts.task_spec("pairwise")
  requests = [autorater.Request.of(spec, "2+2?", ("4", "5")),
              autorater.Request.of(spec, "Capital of France?", ("Paris", "Rome"))]
  evaluations = rater.explain(requests, max_decode_len=12)
  ids = [rater._input_ids(r)[0] for r in requests]  # pylint: disable=protected-access
  decoded = rater.generator.generate(params, ids, 12)
  for evaluation, tokens in zip(evaluations, decoded):
    assert evaluation.text == VOCAB.decode([t for t in tokens if t != 1])
