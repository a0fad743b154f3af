"""Rank classification (flame/rank_classification.py) against a one-row-at-a-time reference."""
import dataclasses

import jax
import numpy as np
import pytest

from flame import partitioning
from flame import rank_classification as rc
from flame.models import decoder, t5

LENGTHS = {"inputs": 16, "targets": 8}
EOS = 1  # seqio.ByteVocabulary: ids are UTF-8 bytes + 3; 0 pad, 1 EOS, 2 UNK.
ITEMS = [
    ("Is the sky blue?", ["yes", "no"], 0),
    ("A prompt far longer than the sixteen-token input budget: pick C", ["A", "B", "C"], 2),
    ({"inputs": "2+2=", "options": ["4", "five", "22"], "gold": 1}),
    ("", ["x"]),
    rc.RankItem([10, 20, 30], [[40, 41], [50]], 1),
]
NUM_ROWS = 11


def _as_dict(item):
  if isinstance(item, dict):
    return item
  if isinstance(item, rc.RankItem):
    return {"inputs": item.inputs, "options": item.options, "gold": item.gold}
  return {"inputs": item[0], "options": item[1], "gold": item[2] if len(item) > 2 else None}


def _bytes(text):
  return [b + 3 for b in text.encode("utf-8")] if isinstance(text, str) else list(text)


def reference_rows():
  """(inputs, targets) ids per option, built by hand: the input's last 15 tokens + EOS."""
  rows = []
  for item in map(_as_dict, ITEMS):
    inputs = _bytes(item["inputs"])[-(LENGTHS["inputs"] - 1):] + [EOS]
    rows.append([(inputs, _bytes(o) + [EOS]) for o in item["options"]])
  return rows


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_decoder(logits_fn, params, inputs, targets):
  sequence = inputs + targets
  shifted = _right_pad([0] + sequence[:-1], sum(LENGTHS.values()))
  log_probs = _log_softmax64(logits_fn(params, {"decoder_input_tokens": shifted})[0])
  return sum(log_probs[t, sequence[t]] for t in range(len(inputs), len(sequence)))


def reference_t5(logits_fn, params, inputs, targets):
  batch = {"encoder_input_tokens": _right_pad(inputs, LENGTHS["inputs"]),
           "decoder_input_tokens": _right_pad([0] + targets[:-1], LENGTHS["targets"])}
  log_probs = _log_softmax64(logits_fn(params, batch)[0])
  return sum(log_probs[t, targets[t]] for t in range(len(targets)))


def _right_pad(ids, length):
  """[1, length]: one compilation for every reference row. Trailing zeros change no logit
  before them (causal decoders; encoder padding is masked: tests/test_decoder.py, test_t5.py)."""
  return np.array([ids + [0] * (length - len(ids))], np.int32)


def _key(seed):
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module", params=["decoder", "t5"])
def setup(request):
  """(model, params, reference log-likelihoods per item)."""
  if request.param == "decoder":
    model = decoder.DecoderOnlyModel(decoder.DecoderConfig(
        vocab_size=259, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=64))
    reference = reference_decoder
  else:
    model = t5.EncoderDecoderModel(t5.t5_1_1_config("tiny", dropout_rate=0.0))
    reference = reference_t5
  params = jax.jit(lambda rng: model.init_params(rng, 2, LENGTHS))(_key(0))
  logits_fn = jax.jit(model.logits)
  expected = [np.array([reference(logits_fn, params, i, t) for i, t in options])
              for options in reference_rows()]
  return model, params, expected


_CLASSIFIERS = {}


def _run(setup, batch_size, devices=None, length_normalize=False):
  """Scores ITEMS on a data-parallel mesh over `devices` (default all 8), params replicated."""
  model, params, _ = setup
  devices = devices or jax.devices()
  key = (id(model), batch_size, len(devices))
  if key not in _CLASSIFIERS:  # One compilation per model, batch size and mesh.
    partitioner = partitioning.Partitioner((len(devices), 1, 1), devices=devices)
    _CLASSIFIERS[key] = rc.RankClassifier(model, partitioner, LENGTHS, batch_size)
  classifier = _CLASSIFIERS[key]
  placed = jax.device_put(params, classifier.partitioner.replicated())
  return classifier(placed, ITEMS, length_normalize=length_normalize, progress=False)


def test_scores_match_one_at_a_time_reference(setup):
  _, _, expected = setup
  assert len(jax.devices()) == 8
  result = _run(setup, batch_size=8)  # 11 rows: a full batch and a partial one, over 8 devices.
  assert len(result.log_likelihoods) == len(ITEMS)
  for got, want in zip(result.log_likelihoods, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for lengths, rows in zip(result.target_lengths, reference_rows()):
    np.testing.assert_array_equal(lengths, [len(t) for _, t in rows])
  np.testing.assert_array_equal(result.predictions, [np.argmax(w) for w in expected])
  golds = [_as_dict(item)["gold"] for item in ITEMS]
  hits = [np.argmax(w) == g for w, g in zip(expected, golds) if g is not None]
  assert result.accuracy == pytest.approx(sum(hits) / 4)


def test_length_normalisation(setup):
  _, _, expected = setup
  result = _run(setup, batch_size=8, length_normalize=True)
  for got, want, rows in zip(result.scores, expected, reference_rows()):
    np.testing.assert_allclose(got, want / np.array([len(t) for _, t in rows]), rtol=1e-5,
                               atol=1e-5)
  means = [w / np.array([len(t) for _, t in rows]) for w, rows in zip(expected, reference_rows())]
  np.testing.assert_array_equal(result.predictions, [np.argmax(m) for m in means])


def test_sharding_and_padding_do_not_change_scores(setup):
  sharded = _run(setup, batch_size=8)  # A full batch and one with 5 padding rows, 8 devices.
  one_device = jax.devices()[:1]
  single_rows = _run(setup, batch_size=1, devices=one_device)  # No padding at all.
  partial = _run(setup, batch_size=3, devices=one_device)  # Last batch: 2 rows + 1 padding.
  for other in (single_rows, partial):
    for a, b in zip(sharded.log_likelihoods, other.log_likelihoods):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_too_long_option_names_the_item():
  vocabulary = decoder.DecoderOnlyModel(decoder.DecoderConfig()).vocabulary
  items = [("q", ["ok"]), ("q", ["fine"]), ("q", ["short", "seven b"])]  # 7 bytes + EOS = 8: ok
  rows, _ = rc.tokenize_items(items, vocabulary, LENGTHS)
  assert [len(r.targets) for r in rows] == [3, 5, 6, 8]
  items.append(("q", ["fine", "eight by"]))  # 8 bytes + EOS = 9 > 8
  with pytest.raises(ValueError, match=r"item 3: option 1 .* 9 target tokens"):
    rc.tokenize_items(items, vocabulary, LENGTHS)
  with pytest.raises(ValueError, match="item 0: gold index 2"):
    rc.tokenize_items([("q", ["a", "b"], 2)], vocabulary, LENGTHS)


def test_inputs_keep_their_tail():
  assert rc.truncate_tail([5, 6, 7, 8, 9], 4, EOS) == (7, 8, 9, EOS)
  assert rc.truncate_tail([5, 6, 7, 8, 9], 4, None) == (6, 7, 8, 9)
  assert rc.truncate_tail([5, 6], 4, EOS) == (5, 6, EOS)
  vocabulary = decoder.DecoderOnlyModel(decoder.DecoderConfig()).vocabulary
  rows, _ = rc.tokenize_items([("abcdefghijklmnopqrstuvwxyz", ["a"])], vocabulary, LENGTHS)
  assert rows[0].inputs == tuple(ord(c) + 3 for c in "lmnopqrstuvwxyz") + (EOS,)


def test_host_row_indices_split_each_global_batch():
  # 5 rows, global batches of 4, 2 processes: batch 0 = rows 0-3, batch 1 = row 4 + padding.
  np.testing.assert_array_equal(rc.host_row_indices(5, 4, 0, 2), [0, 1, 4, -1])
  np.testing.assert_array_equal(rc.host_row_indices(5, 4, 1, 2), [2, 3, -1, -1])
  np.testing.assert_array_equal(rc.host_row_indices(3, 4), [0, 1, 2, -1])


def test_result_accounting_by_hand():
  result = rc.RankClassificationResult(
      log_likelihoods=(np.array([-2.0, -3.0]), np.array([-6.0, -4.0, -4.0]), np.array([-1.0])),
      target_lengths=(np.array([1, 3]), np.array([3, 1, 2]), np.array([1])),
      gold=(1, 1, None))
  np.testing.assert_array_equal(result.predictions, [0, 1, 0])  # Tie (-4, -4): first option.
  assert result.accuracy == 0.5  # Item 0 wrong, item 1 right, item 2 has no gold.
  normalised = dataclasses.replace(result, length_normalized=True)
  np.testing.assert_array_equal(normalised.predictions, [1, 0, 0])  # [-2, -1]; [-2, -4, -2]
  assert normalised.accuracy == 0.5
  p = result.option_probabilities()
  assert p[0][0] == pytest.approx(1 / (1 + np.exp(-1.0)))  # sigmoid(-2 - -3)
  assert p[2][0] == pytest.approx(1.0)
  assert rc.RankClassificationResult((np.zeros(2),), (np.ones(2),), (None,)).accuracy is None



def test_batch_size_must_divide_over_the_data_axes():
  model = decoder.DecoderOnlyModel(decoder.DecoderConfig())
  with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple of the "
                                       "data-parallel size 8"):
    rc.RankClassifier(model, partitioning.Partitioner(), LENGTHS, batch_size=4)
