"""The autorater: a model and its parameters, asked for verdicts.

    rater = Autorater.load("/tmp/flame_run")            # a MODEL_DIR, checkpoint dir or dir/<step>
    rater.compare("Name a prime.", "7", "8")             # Verdict(verdict="A", probabilities=…)
    rater.rate("Name a prime.", "7", scale=(1, 5))       # .expected_rating
    rater.classify("Name a prime.", "8", labels=("Yes", "No"))

`judge(requests)` scores many requests in length-bucketed batches (see
`scoring`); the single-request methods call it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import seqio

from flame import partitioning, rank_classification
from flame.autorater import generation, judgments, prompts, scoring
from flame.data import format
from flame.models import base

VOCABULARY_BY_SIZE = {259: "bytes", 49152: "smollm2"}


@dataclasses.dataclass(frozen=True)
class Request:
  """A judgment to make: the context fields of an example of `spec`."""
  spec: format.TaskSpec
  context: dict[str, str]
  request_id: str = "request"

  @classmethod
  def of(cls, spec: format.TaskSpec, prompt: str, responses: Sequence[str],
         request_id: str = "request") -> "Request":
    """The request of `spec` holding `prompt` and `responses` (see `prompts.example`)."""
    return cls(spec, dict(prompts.example(spec, prompt, responses, request_id).context),
               request_id)

  def swapped(self) -> "Request":
    """The pair with its first two responses exchanged."""
    first, second = self.spec.response_fields[:2]
    context = dict(self.context)
    context[first], context[second] = self.context[second], self.context[first]
    return Request(self.spec, context, self.request_id + format.SWAP_SUFFIX)


def vocabulary_for(config, name: Optional[str] = None) -> tuple[str, seqio.Vocabulary]:
  """(name, vocabulary) for a model config: `name` if given, else by the config's vocab size."""
  from flame.data import tasks  # pylint: disable=import-outside-toplevel
  if name is None:
    name = VOCABULARY_BY_SIZE.get(config.vocab_size)
    if name is None:
      raise ValueError(f"cannot tell the vocabulary of a model with {config.vocab_size} ids; "
                       f"pass vocabulary= one of {list(tasks.VOCABULARY_NAMES)}")
  vocabulary = tasks.vocabulary(name)
  if vocabulary.vocab_size > config.vocab_size:
    raise ValueError(f"vocabulary {name!r} has {vocabulary.vocab_size} ids but the checkpoint's "
                     f"model has vocab_size={config.vocab_size}: another model's vocabulary")
  return name, vocabulary


def model_for(config, vocabulary_name: Optional[str] = None) -> base.Model:
  """The flame model a checkpoint's config describes (decoder-only or T5)."""
  from flame.models import decoder, t5  # pylint: disable=import-outside-toplevel
  name, vocabulary = vocabulary_for(config, vocabulary_name)
  if isinstance(config, decoder.DecoderConfig):
    return decoder.DecoderOnlyModel(config, vocabulary,
                                    decode_bos_id=None if name == "smollm2" else 0)
  if isinstance(config, t5.T5Config):
    return t5.EncoderDecoderModel(config, vocabulary)
  raise ValueError(f"no model for a {type(config).__name__}")


def place_params(model: base.Model, params, partitioner: partitioning.Partitioner):
  """Parameters on the mesh with the shardings training gives them."""
  boxed = jax.eval_shape(lambda rng: model.init(rng, 1, {"inputs": 8, "targets": 8}),
                         jax.random.PRNGKey(0))["params"]
  shardings = partitioner.params_shardings(boxed)
  expected = jax.tree_util.tree_structure(nn.meta.unbox(boxed))
  if jax.tree_util.tree_structure(params) != expected:
    raise ValueError("the checkpoint's parameter tree does not match the model its meta "
                     "describes")
  return jax.device_put(params, shardings)


class Autorater:
  """Scores judgments with `model` and `params` (see module docstring).

  `max_input_length`: tokens of a rendered input, EOS included; longer inputs
  are re-rendered within it by `format.render_input`'s rule (long prompts lose
  their front, then responses their end) or, where even that cannot fit (e.g.
  a long field that rule never cuts), keep their last tokens; both are flagged
  (`judge(truncated=)`).
  `batch_size`: rows per forward pass (global).
  """

  def __init__(self, model: base.Model, params, partitioner=None, batch_size: int = 8,
               max_input_length: int = 1024):
    self.model = model
    self.partitioner = partitioner or partitioning.Partitioner()
    self.params = params
    self.max_input_length = max_input_length
    self.scorer = scoring.VerdictScorer(model, self.partitioner, batch_size,
                                        max_length=max_input_length + 64)
    self.generator = generation.Generator(model, self.partitioner, batch_size,
                                          max_length=max_input_length)
    self._count = _token_counter(model.vocabulary)
    self._verdicts: dict[tuple[str, ...], scoring.VerdictTokens] = {}

  @classmethod
  def load(cls, checkpoint: str, step: Optional[int] = None,
           vocabulary: Optional[str] = None, dtype: Optional[str] = None,
           **kwargs) -> "Autorater":
    """From a flame checkpoint: a MODEL_DIR, a checkpoints dir or ``dir/<step>``.

    `dtype` ("float32" or "bfloat16"): what the forward pass computes in (default: the
    checkpoint's own `dtype`, i.e. its training run's); the parameters are read as stored."""
    from flame.checkpoints import convert  # pylint: disable=import-outside-toplevel
    config, params, _ = convert.read_orbax(checkpoint, step)
    model = model_for(base.with_compute_dtype(config, dtype), vocabulary)
    partitioner = kwargs.pop("partitioner", None) or partitioning.Partitioner()
    return cls(model, place_params(model, params, partitioner), partitioner, **kwargs)

  # ---- one request ------------------------------------------------------------------------
  def compare(self, prompt: str, response_a: str, response_b: str, swap: bool = True,
              instructions: Optional[str] = None) -> judgments.Verdict:
    spec = prompts.task_spec("pairwise", instructions)
    return self.judge([Request.of(spec, prompt, (response_a, response_b))], swap=swap)[0]

  def rate(self, prompt: str, response: str, scale: Sequence[int] = (1, 5),
           instructions: Optional[str] = None) -> judgments.Verdict:
    spec = prompts.task_spec("pointwise", instructions, scale=scale)
    return self.judge([Request.of(spec, prompt, (response,))])[0]

  def classify(self, prompt: str, response: str, labels: Sequence[str] = ("Yes", "No"),
               instructions: Optional[str] = None) -> judgments.Verdict:
    spec = prompts.task_spec("classification", instructions, labels=labels)
    return self.judge([Request.of(spec, prompt, (response,))])[0]

  def explain(self, requests: Sequence[Request], max_decode_len: int = 128
              ) -> list[generation.Evaluation]:
    """Decoded EVALUATION blocks (verdict + explanation for tasks trained with one), in order;
    a verdict is None when the answer field is missing or not one of the task's labels."""
    ids = [self._input_ids(request)[0] for request in requests]
    decoded = self.generator.generate(self.params, ids, max_decode_len)
    vocabulary = self.model.vocabulary
    eos = vocabulary.eos_id
    return [generation.parse_evaluation(
        vocabulary.decode([t for t in tokens if t != eos]), request.spec.answer_field,
        self.labels_of(request.spec) if request.spec.kind != format.TaskKind.GENERATIVE else ())
            for request, tokens in zip(requests, decoded)]

  # ---- many requests ----------------------------------------------------------------------
  def labels_of(self, spec: format.TaskSpec) -> tuple[str, ...]:
    if spec.kind == format.TaskKind.GENERATIVE:
      return ()
    if spec.kind == format.TaskKind.POINTWISE:
      return judgments.scale_labels(spec.scale)
    return spec.labels

  def verdict_tokens(self, spec: format.TaskSpec) -> scoring.VerdictTokens:
    key = (spec.answer_field,) + self.labels_of(spec)
    if key not in self._verdicts:
      self._verdicts[key] = scoring.verdict_tokens(self.model.vocabulary, self.labels_of(spec),
                                                   spec.answer_field)
    return self._verdicts[key]

  def _input_ids(self, request: Request) -> tuple[tuple[int, ...], bool]:
    """(the rendered input's ids with EOS, whether it had to be truncated to the budget)."""
    spec, vocabulary = request.spec, self.model.vocabulary
    eos = vocabulary.eos_id
    budget = self.max_input_length - (eos is not None)
    example = format.Example(spec.name, request.request_id, request.context)
    full = format.render_input(spec, example)  # Validates the context fields.
    ids = tuple(vocabulary.encode(full))
    truncated = len(ids) > budget
    if truncated:
      try:
        ids = tuple(vocabulary.encode(format.render_input(spec, example, budget, self._count)))
      except ValueError:  # Even the format's rule cannot fit it: keep the last tokens.
        ids = rank_classification.truncate_tail(ids, self.max_input_length, eos)
        return ids, True
    return ids + ((eos,) if eos is not None else ()), truncated

  def _query(self, request: Request) -> tuple[scoring.Query, bool]:
    ids, truncated = self._input_ids(request)
    return scoring.Query(ids, self.verdict_tokens(request.spec)), truncated

  def judge(self, requests: Sequence[Request], swap: bool = True,
            on_batch: Optional[Callable[[int], None]] = None,
            truncated: Optional[list] = None) -> list[judgments.Verdict]:
    """Verdicts of `requests`, in order; pairwise ones in both orders when `swap`.

    `truncated`, if given, gets one flag per request: whether its input had to be
    truncated to the budget (the first order's; a swapped pair truncates the same way).
    """
    queries, slots = [], []
    for request in requests:
      first = len(queries)
      query, cut = self._query(request)
      queries.append(query)
      if truncated is not None:
        truncated.append(cut)
      if swap and request.spec.kind == format.TaskKind.PAIRWISE:
        queries.append(self._query(request.swapped())[0])
      slots.append((first, len(queries) - first))
    log_probs = self.scorer.log_probs(self.params, queries, on_batch)
    out = []
    for request, (first, count) in zip(requests, slots):
      labels = self.labels_of(request.spec)
      kind = request.spec.kind
      if kind == format.TaskKind.PAIRWISE:
        out.append(judgments.pairwise(labels, log_probs[first],
                                      log_probs[first + 1] if count == 2 else None))
      elif kind == format.TaskKind.POINTWISE:
        out.append(judgments.pointwise(labels, log_probs[first]))
      else:
        out.append(judgments.classification(labels, log_probs[first]))
    return out


def _token_counter(vocabulary: seqio.Vocabulary) -> Callable[[str], int]:
  from flame.data import tasks  # pylint: disable=import-outside-toplevel
  return tasks.token_counter(vocabulary)

