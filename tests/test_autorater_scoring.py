"""One-pass verdict scoring (flame/autorater/scoring.py, features.py) against brute force:
full logits of one row at a time, log-softmax in NumPy float64."""
import collections
import math

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from flame import partitioning
from flame.autorater import features, scoring
from flame.models import decoder, t5

VOCAB = seqio.ByteVocabulary()


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _tiny(family, seed=0):
  if family == "decoder":
    model = decoder.DecoderOnlyModel(decoder.DecoderConfig(
        vocab_size=259, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=64))
  else:
    model = t5.EncoderDecoderModel(t5.T5Config(
        vocab_size=259, emb_dim=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
        head_dim=8, mlp_dim=64))
  return model, model.init_params(jax.random.PRNGKey(seed), 1, {"inputs": 8, "targets": 8})


def _brute_force(model, params, inputs, targets, start_in_targets, tail):
  """Σ over `tail` tokens (at target index start_in_targets…) of log p, one row, full logits.

  Features are built here by hand (the decoder reads [0] + inputs + targets shifted right;
  T5 encodes the inputs and reads [0] + targets shifted right), right-padded to one length
  (one compilation); trailing padding changes no logit before it (causal decoder, masked
  encoder padding: tests/test_decoder.py, test_t5.py)."""
  def pad(ids, length):
    return np.array([list(ids) + [0] * (length - len(ids))], np.int32)
  if isinstance(model, decoder.DecoderOnlyModel):
    sequence = list(inputs) + list(targets)
    batch = {"decoder_input_tokens": pad([0] + sequence[:-1], 256)}
    start = len(inputs) + start_in_targets
  else:
    batch = {"encoder_input_tokens": pad(inputs, 256),
             "decoder_input_tokens": pad([0] + list(targets)[:-1], 32)}
    start = start_in_targets
  log_probs = _log_softmax64(model.logits(params, batch)[0])
  return sum(log_probs[start + j, tok] for j, tok in enumerate(tail))


TEXTS = ["Is the sky blue? Answer honestly.", "2+2=", "A much longer prompt " * 6, "x"]


@pytest.mark.parametrize("family", ["decoder", "t5"])
@pytest.mark.parametrize("labels", [("A", "B"), ("A", "B", "Tie"), ("Yes", "No"),
                                    ("1", "2", "10", "12")])
def test_log_probs_match_brute_force(family, labels):
  model, params = _tiny(family)
  verdicts = scoring.verdict_tokens(VOCAB, labels)
  assert verdicts.one_pass == (labels != ("1", "2", "10", "12"))
  queries = [scoring.Query(tuple(VOCAB.encode(t)) + (1,), verdicts) for t in TEXTS]
  scorer = scoring.VerdictScorer(model, partitioning.Partitioner(), batch_size=8,
                                 max_length=256, smallest_bucket=16)
  batches = []
  got = scorer.log_probs(params, queries, on_batch=batches.append)
  assert sum(batches) == (len(TEXTS) if verdicts.one_pass else len(TEXTS) * len(labels))
  for query, values in zip(queries, got):
    assert values.shape == (len(labels),)
    for j, tail in enumerate(verdicts.tails):
      target = verdicts.prefix + tail
      if verdicts.one_pass:
        expected = _brute_force(model, params, list(query.inputs), target,
                                len(verdicts.prefix), tail[:1])
      else:
        expected = _brute_force(model, params, list(query.inputs), target,
                                len(verdicts.prefix), tail)
      np.testing.assert_allclose(values[j], expected, rtol=1e-5, atol=1e-5)


def test_verdict_tokens_bytes():
  v = scoring.verdict_tokens(VOCAB, ("A", "B", "Tie"))
  prefix = VOCAB.encode("EVALUATION:\nanswer: ")
  assert v.prefix == tuple(prefix)
  assert v.tails == ((ord("A") + 3, 1), (ord("B") + 3, 1), tuple(b + 3 for b in b"Tie") + (1,))
  assert v.first_tokens == (ord("A") + 3, ord("B") + 3, ord("T") + 3)
  with pytest.raises(ValueError, match="two distinct"):
    scoring.verdict_tokens(VOCAB, ("A", "A"))


@pytest.mark.parametrize("converter", [seqio.PrefixLMFeatureConverter,
                                       seqio.EncDecFeatureConverter])
def test_model_features_equal_seqio(converter):
  rows = [([5, 6, 7, 1], [8, 9, 1]), ([10, 1], [11, 1]), ([4] * 9 + [1], [12, 13, 14, 1])]
  lengths = {"inputs": 12, "targets": 6}

  def gen():
    for x, y in rows:
      yield {"inputs": np.array(x, np.int32), "targets": np.array(y, np.int32)}
  spec = tf.TensorSpec([None], tf.int32)
  ds = tf.data.Dataset.from_generator(gen, output_signature={"inputs": spec, "targets": spec})
  expected = list(converter(pack=False)(ds, lengths).batch(len(rows)).as_numpy_iterator())[0]
  decoder_only = converter is seqio.PrefixLMFeatureConverter
  got, starts = features.model_features(
      converter, [r[0] for r in rows], [r[1] for r in rows],
      18 if decoder_only else 12, 6)
  assert sorted(got) == sorted(expected)
  for k in got:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  assert starts.tolist() == ([4, 2, 10] if decoder_only else [0, 0, 0])


def test_buckets():
  assert features.bucket_lengths(300) == (32, 64, 128, 256, 300)
  assert features.bucket_of(33, (32, 64)) == 64
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    features.bucket_of(65, (32, 64))


def test_too_long_query_and_bad_batch_size():
  model, params = _tiny("decoder")
  with pytest.raises(ValueError, match="multiple of the data-parallel size"):
    scoring.VerdictScorer(model, partitioning.Partitioner(), batch_size=3)
  scorer = scoring.VerdictScorer(model, partitioning.Partitioner(), batch_size=8, max_length=40)
  query = scoring.Query(tuple(range(3, 40)), scoring.verdict_tokens(VOCAB, ("A", "B")))
  with pytest.raises(ValueError, match="query 0: .* exceed max_length=40"):
    scorer.log_probs(params, [query])


def test_sharded_equals_single_device():
  model, params = _tiny("decoder", seed=3)
  verdicts = scoring.verdict_tokens(VOCAB, ("A", "B"))
  queries = [scoring.Query(tuple(VOCAB.encode(t * (i % 3 + 1))) + (1,), verdicts)
             for i, t in enumerate(TEXTS * 3)]
  sharded = scoring.VerdictScorer(model, partitioning.Partitioner((-1, 1, 1)), batch_size=8,
                                  max_length=512).log_probs(params, queries)
  one = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
  single = scoring.VerdictScorer(model, one, batch_size=2, max_length=512).log_probs(
      params, queries)
  for a, b in zip(sharded, single):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_buckets_per_octave_pad_a_row_by_at_most_a_fifth():
  buckets = features.bucket_lengths(2048, 32, per_octave=4)
  assert buckets[0] == 32 and buckets[-1] == 2048 and list(buckets) == sorted(set(buckets))
  assert all(b % 8 == 0 for b in buckets)
  for length in range(33, 2049):
    assert features.bucket_of(length, buckets) <= max(1.19 * length + 8, 40)
  with pytest.raises(ValueError, match="per_octave must be positive"):
    features.bucket_lengths(300, per_octave=0)


def test_rows_sorted_by_length_keep_their_results_and_waste_less_padding():
  """37 queries of random lengths in batches of 8: each result equals the query scored alone,
  and the real tokens counted are the rows' own; padding is below what power-of-two buckets
  over unsorted groups cost (the previous batching, computed here independently)."""
  model, params = _tiny("decoder")
  verdicts = scoring.verdict_tokens(VOCAB, ("A", "B"))
  rng = np.random.default_rng(0)
  queries = [scoring.Query(tuple(int(t) for t in rng.integers(4, 200, n)) + (1,), verdicts)
             for n in rng.integers(10, 200, 37)]
  scorer = scoring.VerdictScorer(model, partitioning.Partitioner(), batch_size=8,
                                 max_length=256, smallest_bucket=16)
  got = scorer.log_probs(params, queries)
  target = verdicts.prefix + verdicts.tails[0][:1]
  for query, values in zip(queries, got):
    for j, tail in enumerate(verdicts.tails):
      expected = _brute_force(model, params, list(query.inputs), target, len(verdicts.prefix),
                              tail[:1])
      np.testing.assert_allclose(values[j], expected, rtol=1e-5, atol=1e-5)
  lengths = [len(q.inputs) + len(target) for q in queries]
  assert scorer.tokens["real"] == sum(lengths)
  powers = collections.Counter(features.bucket_of(n, features.bucket_lengths(256, 16))
                               for n in lengths)
  before = sum(math.ceil(count / 8) * 8 * bucket for bucket, count in powers.items())
  assert sum(lengths) < scorer.tokens["padded"] < before
