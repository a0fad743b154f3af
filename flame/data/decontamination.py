"""Decontamination: no prompt of the held-out suite may appear in a training task.

Fingerprints. ``normalize`` applies Unicode NFKC, lowercases and turns every run of
characters other than letters and digits (whitespace, punctuation, symbols) into one space, so
line breaks, quotes and a trailing " ?" do not matter (MT-Bench's "How many integers are in
the solution of the inequality |x + 5| < 10" is LLMBar Natural's with " ? " appended); a
text's fingerprint is the 16-hex-digit BLAKE2b of its normalised form, and a (prompt,
response) pair's the hash of both normalised texts joined by a NUL.

Held-out side (`build_index`; `flame.data.sources.base.heldout_index` builds it once per
process from every example of every held-out builder config, ``HELD_OUT = True``, read
straight from its files, no TFDS preparation). Its prompts are its non-response context fields (e.g.
``instruction``, ``prompt``, ``problem``), each whole, and their concatenation when there are
several; its pairs are (prompt, response field) for each response field.

Training side (`heldout_matches`): an example is contaminated when

1. a *prompt candidate* has a held-out prompt's fingerprint. Candidates: each non-response
   context field whole, their concatenation, and each line and each dialogue turn of them with
   a leading speaker label ("Human:", "User:", "Assistant:", "Q:", …) removed, so a
   held-out prompt quoted as one turn of an HH-RLHF style dialogue is found; or
2. a held-out prompt of at least MIN_CONTAINED_TOKENS normalised words occurs, as a run of
   whole words, inside a non-response context field or their concatenation (e.g. an
   instruction with extra input text around it). Shorter prompts ("divide 45 by 9") are matched only by 1, since they
   occur by chance inside unrelated text.

Response fields are never searched: a training task judging other responses to a held-out
prompt is contaminated through its prompt, and one reusing a response to another prompt is
not. `base.SourceBuilder` drops contaminated examples of training builders before splitting
and counts them in ``info.metadata["decontaminated"]`` (by the first matched held-out task),
so preparing a training builder reads the held-out files too (mirror, cache or download).

Found at the time of writing (all training sources, all tasks): 12 HaluEval queries (Alpaca
instructions; 3 differ in how the input is joined and 1 of those only contains the held-out
prompt), 2 MT-Bench and 1 FairEval pairs (LLMBar processed), all against LLMBar Natural /
Neighbor / GPTOut; no exact (prompt, response) pair is shared.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from typing import Iterable, Sequence

from flame.data import format

MIN_CONTAINED_TOKENS = 8
_NON_WORD = re.compile(r"[\W_]+")
_TURN = re.compile(r"\n\s*(?=(?:human|user|assistant|system|bot|customer|agent)\s*:)", re.I)
_SPEAKER = re.compile(
    r"\A(?:human|user|assistant|system|bot|customer|agent|question|answer|q|a)\s*:\s*", re.I)


def normalize(text: str) -> str:
  """NFKC, lowercase, every run of non-alphanumeric characters (punctuation, symbols,
  whitespace) made one space, stripped: "Why?  |x + 5| < 10 ?" -> "why x 5 10"."""
  return " ".join(_NON_WORD.split(unicodedata.normalize("NFKC", text).lower())).strip()


def _digest(normalized: str) -> str:
  return hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).hexdigest()


def fingerprint(text: str) -> str:
  """The fingerprint of a text: BLAKE2b (8 bytes, hex) of `normalize(text)`."""
  return _digest(normalize(text))


def pair_fingerprint(prompt: str, response: str) -> str:
  return _digest(normalize(prompt) + "\0" + normalize(response))


def prompt_fields(example: format.Example, spec: format.TaskSpec) -> list[str]:
  """The example's non-response context values, in spec order."""
  return [example.context[f] for f in spec.context_fields if not format.is_response_field(f)]


def whole_prompts(example: format.Example, spec: format.TaskSpec) -> list[str]:
  """Each non-response field and, when there are several, their concatenation."""
  fields = prompt_fields(example, spec)
  return fields + (["\n".join(fields)] if len(fields) > 1 else [])


def prompt_candidates(example: format.Example, spec: format.TaskSpec) -> set[str]:
  """Normalised texts of an example that could be a held-out prompt (rule 1 above)."""
  out = set()
  for text in whole_prompts(example, spec):
    out.add(normalize(text))
    for piece in text.split("\n") + _TURN.split(text):
      out.add(normalize(piece))
      out.add(normalize(_SPEAKER.sub("", piece.strip())))
  out.discard("")
  return out


@dataclasses.dataclass(frozen=True)
class HeldoutIndex:
  """Fingerprints of the held-out suite, each mapped to the held-out tasks holding it."""
  prompts: dict[str, frozenset[str]]
  pairs: dict[str, frozenset[str]]
  # first MIN_CONTAINED_TOKENS words of each long prompt -> [(its words, tasks)]
  anchors: dict[tuple[str, ...], list[tuple[tuple[str, ...], frozenset[str]]]]


def build_index(examples: Iterable[tuple[format.TaskSpec, format.Example]]) -> HeldoutIndex:
  prompts, pairs, long_prompts = {}, {}, {}
  for spec, example in examples:
    responses = [example.context[f] for f in spec.response_fields]
    for text in whole_prompts(example, spec):
      normalized = normalize(text)
      prompts.setdefault(_digest(normalized), set()).add(spec.name)
      if len(normalized.split()) >= MIN_CONTAINED_TOKENS:
        long_prompts.setdefault(tuple(normalized.split()), set()).add(spec.name)
      for response in responses:
        pairs.setdefault(pair_fingerprint(text, response), set()).add(spec.name)
  anchors = {}
  for words, tasks in long_prompts.items():
    anchors.setdefault(words[:MIN_CONTAINED_TOKENS], []).append((words, frozenset(tasks)))
  return HeldoutIndex({k: frozenset(v) for k, v in prompts.items()},
                      {k: frozenset(v) for k, v in pairs.items()}, anchors)


def _contained(words: Sequence[str], index: HeldoutIndex) -> set[str]:
  found = set()
  for i in range(len(words) - MIN_CONTAINED_TOKENS + 1):
    for prompt, tasks in index.anchors.get(tuple(words[i:i + MIN_CONTAINED_TOKENS]), ()):
      if tuple(words[i:i + len(prompt)]) == prompt:
        found |= tasks
  return found


def heldout_matches(example: format.Example, spec: format.TaskSpec,
                    index: HeldoutIndex) -> tuple[str, ...]:
  """The held-out tasks (sorted) whose prompts occur in `example`; empty when it is clean."""
  found = set()
  for candidate in prompt_candidates(example, spec):
    found |= index.prompts.get(_digest(candidate), frozenset())
  if index.anchors:
    for text in whole_prompts(example, spec):
      found |= _contained(normalize(text).split(), index)
  return tuple(sorted(found))


def shared_pairs(example: format.Example, spec: format.TaskSpec,
                 index: HeldoutIndex) -> tuple[str, ...]:
  """The held-out tasks holding one of `example`'s exact (prompt, response) pairs."""
  found = set()
  for text in whole_prompts(example, spec):
    for field in spec.response_fields:
      found |= index.pairs.get(pair_fingerprint(text, example.context[field]), frozenset())
  return tuple(sorted(found))


def drop_heldout(items: Sequence, spec: format.TaskSpec, index: HeldoutIndex
                 ) -> tuple[list, dict[str, int]]:
  """(items whose `.example` is clean, {first matched held-out task: number dropped})."""
  kept, dropped = [], {}
  for item in items:
    matches = heldout_matches(item.example, spec, index)
    if matches:
      dropped[matches[0]] = dropped.get(matches[0], 0) + 1
    else:
      kept.append(item)
  return kept, dropped
