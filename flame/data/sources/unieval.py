"""UniEval's human-rated benchmarks: dialogue responses, data-to-text and summary consistency
(pointwise and classification; quality and factuality).

maszhongming/UniEval (MIT), ``reproduce/data``, four JSON lists:

* ``dialogue/topical_chat.json``: 360 records (60 Topical-Chat dialogues x 6 response
  generators), ``{source: dialogue history, context: the knowledge fact the response is
  conditioned on, system_id, system_output, scores}``, rated in USR (Mehri & Eskenazi, 2020)
  by three annotators; each score is their mean. Observed values: understandability and
  groundedness (USR "understandable" / "uses knowledge") in {0, 1/3, 2/3, 1}; naturalness,
  coherence ("maintains context") and engagingness ("interesting") in {1, 4/3, ..., 3};
  overall in {1, 4/3, ..., 5}.
* ``data2text/sfres.json``: 1,181 records ``{doc_id, source: dialogue-act meaning
  representation, reference, system_output, scores}`` of SF restaurant utterances rated by
  crowd workers on a 6-point scale (Novikova et al., 2017), aggregated upstream over raters;
  informativeness, naturalness and overall (their "quality") take every multiple of 0.5 in
  [1, 6].
* ``fact/qags_cnndm.json`` (235) and ``fact/qags_xsum.json`` (239): ``{doc_id, system_id,
  source: article, reference (identical to source), system_output: summary, scores:
  {consistency}}`` from QAGS (Wang et al., 2020): the fraction of the summary's sentences that
  annotators (majority of three) judged consistent with the article. CNN/DM values: 0 (14),
  1/3 (30), 1/2 (3), 2/3 (72), 3/4 (3), 1 (113); XSum summaries are single sentences: 0 (123),
  1 (116).

Conversion:

* Topical-Chat: one pointwise task per criterion (6), context ``dialogue`` (the history, one
  turn per line, turns stripped, blank lines dropped), ``knowledge`` (the fact) and
  ``response``; scale = the USR scale of that criterion, rating = the three-annotator mean
  written with 2 decimals (e.g. 2.6666666667 -> ``2.67``). 48 records (8 dialogues) have the
  placeholder fact ``_nofact`` (the response is not conditioned on knowledge): it is rendered
  as ``(none)``, and these records are left out of the groundedness task only, since "how well
  does the response use the fact" is undefined without one (upstream rates them 1 (38) or
  2/3 (10)): 312 groundedness examples, 360 for the other criteria.
* SF-RES: one pointwise task per criterion (3), context ``meaning_representation`` and
  ``utterance``, scale 1-6, rating written with 1 decimal (``4.5``, ``6.0``). The reference
  utterance is not shown: the human raters judged the utterance against the meaning
  representation only. 38 (meaning representation, utterance) pairs occur twice (different
  systems producing the same text, rated separately); both ratings are kept.
* QAGS: classification ``consistent`` (context ``document``, ``summary``): ``yes`` when every
  sentence of the summary was judged consistent (score 1), else ``no`` (one unsupported
  sentence makes a summary inconsistent, as in SummaC's binary labels): CNN/DM 113 yes / 122
  no, XSum 116 / 123.
* All texts are stripped of surrounding whitespace; no record is dropped. Example id: file and
  record index (``unieval/sfres.json:record N``), shared by the criteria of one record. Split
  group: the dialogue history (Topical-Chat: all 6 responses and criteria of a dialogue stay
  together), the meaning representation (SF-RES) or the article text (QAGS).

Splits (train / validation, 10% of groups to validation): Topical-Chat 312 / 48 per criterion
(52 / 8 dialogues), groundedness 270 / 42; SF-RES 1,062 / 119 per criterion; QAGS CNN/DM
207 / 28 (yes 99 / 14, no 108 / 14); QAGS XSum 212 / 27 (yes 101 / 15, no 111 / 12).
Decontamination (`flame.data.decontamination`) drops none of them at the time of writing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from flame.data import format
from flame.data.sources import base

TOPICAL_CHAT = "unieval/topical_chat.json"
SFRES = "unieval/sfres.json"
QAGS_CNNDM = "unieval/qags_cnndm.json"
QAGS_XSUM = "unieval/qags_xsum.json"


@dataclasses.dataclass(frozen=True)
class Criterion:
  key: str  # in the record's ``scores``
  title: str
  question: str
  scale: tuple[float, float]
  anchors: str  # what the ends of the scale mean


_TOPICAL_CHAT_CRITERIA = (
    Criterion("understandability", "Understandability of a dialogue response",
              "Is the response understandable given the dialogue history?", (0, 1),
              "0 means it cannot be understood in this context, 1 means it is fully "
              "understandable"),
    Criterion("naturalness", "Naturalness of a dialogue response",
              "Does the response read like something a person would naturally say?", (1, 3),
              "1 means unnatural, 2 somewhat natural, 3 natural"),
    Criterion("coherence", "Coherence of a dialogue response",
              "Does the response maintain the context: is it a valid continuation of the "
              "conversation so far?", (1, 3),
              "1 means it ignores or contradicts the conversation, 2 partly continues it, 3 "
              "is a fully valid continuation"),
    Criterion("engagingness", "Engagingness of a dialogue response",
              "Is the response interesting rather than dull or generic?", (1, 3),
              "1 means dull, 2 somewhat interesting, 3 interesting"),
    Criterion("groundedness", "Groundedness of a dialogue response in its knowledge fact",
              "How well does the response use the knowledge fact it is conditioned on?",
              (0, 1), "0 means the fact is not used, 1 means it is used well"),
    Criterion("overall", "Overall quality of a dialogue response",
              "What is the overall quality of the response as the next turn of the "
              "conversation, considering understandability, naturalness, coherence, "
              "interestingness and use of the knowledge fact?", (1, 5),
              "1 means very poor and 5 means excellent"),
)

_SFRES_CRITERIA = (
    Criterion("informativeness", "Informativeness of a generated utterance",
              "Does the utterance provide all the useful information in the meaning "
              "representation?", (1, 6),
              "1 means it conveys almost none of it and 6 means it conveys all of it"),
    Criterion("naturalness", "Naturalness of a generated utterance",
              "Could the utterance have been produced by a native speaker?", (1, 6),
              "1 means clearly not and 6 means certainly yes"),
    Criterion("overall", "Overall quality of a generated utterance",
              "What is the overall quality of the utterance in terms of grammatical "
              "correctness and fluency?", (1, 6), "1 means very poor and 6 means excellent"),
)


def _pointwise(name: str, criterion: Criterion, setting: str, aggregate: str,
               context_fields: tuple[str, ...]) -> format.TaskSpec:
  low, high = criterion.scale
  return format.TaskSpec(
      name=name,
      kind=format.TaskKind.POINTWISE,
      capability=format.Capability.QUALITY,
      title=criterion.title,
      description=(f"{setting} {criterion.question} Rate it on a scale from {low} to {high}, "
                   f"where {criterion.anchors}. {aggregate}"),
      context_fields=context_fields,
      output_fields=(criterion.key,),
      scale=(low, high),
  )


_TOPICAL_CHAT_SETTING = ("You are given a knowledge-grounded conversation between two people "
                         "(the dialogue history, one turn per line), a knowledge fact "
                         "(\"(none)\" if there is none), and a candidate next response "
                         "conditioned on that fact.")
_SFRES_SETTING = ("You are given the meaning representation of a restaurant-information "
                  "dialogue act (act type and slot values) and an utterance a system generated "
                  "to express it.")

TOPICAL_CHAT_TASKS = tuple(
    _pointwise(f"unieval_topical_chat_{c.key}", c, _TOPICAL_CHAT_SETTING,
               "The rating is the mean of three annotators' ratings, written with 2 decimals.",
               ("dialogue", "knowledge", "response"))
    for c in _TOPICAL_CHAT_CRITERIA)
SFRES_TASKS = tuple(
    _pointwise(f"unieval_sfres_{c.key}", c, _SFRES_SETTING,
               "The rating aggregates several crowd workers' ratings, so half points occur; it "
               "is written with 1 decimal.", ("meaning_representation", "utterance"))
    for c in _SFRES_CRITERIA)
DECIMALS = {TOPICAL_CHAT: 2, SFRES: 1}  # Per file: decimals of the written rating.


def _consistency(dataset: str, summaries: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=f"unieval_qags_{dataset}_consistency",
      kind=format.TaskKind.CLASSIFICATION,
      capability=format.Capability.FACTUALITY,
      title="Factual consistency of a summary",
      description=(f"Given a news article and {summaries}, decide whether the summary is "
                   "factually consistent with the article: every statement in it must be "
                   "supported by the article, with no contradicting or unsupported facts "
                   "(names, numbers, places, who did what). Judge each sentence against the "
                   "article; fluency and coverage do not matter. Reply yes if the whole "
                   "summary is consistent, no if any sentence is not."),
      context_fields=("document", "summary"),
      output_fields=("consistent",),
      labels=("yes", "no"),
  )


QAGS_TASKS = {QAGS_CNNDM: _consistency("cnndm", "a multi-sentence summary of it (CNN/DailyMail)"),
              QAGS_XSUM: _consistency("xsum", "a one-sentence summary of it (XSum)")}


NO_FACT = "_nofact"  # Upstream placeholder for "no knowledge fact".
NO_FACT_TEXT = "(none)"


def dialogue_history(text: str) -> str:
  """One stripped turn per line, blank lines dropped (upstream: turns joined by " \\n ")."""
  return "\n".join(turn.strip() for turn in text.split("\n") if turn.strip())


def rating_text(value: float, decimals: int) -> str:
  return f"{value:.{decimals}f}"


def _score(row: base.Row, key: str, low: float, high: float) -> float:
  scores = row.get("scores", dict)
  if key not in scores:
    raise row.error("scores", f"has no {key!r}; it has {sorted(scores)}")
  value = scores[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise row.error("scores", f"{key} is {value!r}, expected a number in [{low}, {high}]")
  return float(value)


class FlameUnieval(base.SourceBuilder):
  """Builder ``flame_unieval``."""

  FILES = (TOPICAL_CHAT, SFRES, QAGS_CNNDM, QAGS_XSUM)
  TASKS = TOPICAL_CHAT_TASKS + SFRES_TASKS + tuple(QAGS_TASKS.values())
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/maszhongming/UniEval"
  CITATION = """@inproceedings{zhong2022unieval,
  title={Towards a Unified Multi-Dimensional Evaluator for Text Generation},
  author={Zhong, Ming and Liu, Yang and Yin, Da and Mao, Yuning and Jiao, Yizhu and Liu,
  Pengfei and Zhu, Chenguang and Ji, Heng and Han, Jiawei}, booktitle={EMNLP}, year={2022}}"""

  def rows(self, paths):
    for name in self.FILES:
      yield from base.read_json_records(paths[name], label=name)

  def convert(self, row):
    converter: Callable = {TOPICAL_CHAT: self._topical_chat, SFRES: self._sfres,
                           QAGS_CNNDM: self._qags, QAGS_XSUM: self._qags}[row.file]
    yield from converter(row)

  def _pointwise_examples(self, row, specs, context, group):
    for spec in specs:
      low, high = spec.scale
      value = _score(row, spec.answer_field, low, high)
      example = format.Example(task=spec.name, example_id=f"{row.file}:{row.position}",
                               context=context,
                               outputs={spec.answer_field: rating_text(value,
                                                                       DECIMALS[row.file])})
      yield base.Converted(example, group=group)

  def _topical_chat(self, row):
    history = dialogue_history(row.get("source"))
    if not history:
      raise row.error("source", "has no dialogue turn")
    fact = row.get("context").strip()
    specs = TOPICAL_CHAT_TASKS
    if fact == NO_FACT:
      fact = NO_FACT_TEXT
      specs = tuple(spec for spec in specs if spec.answer_field != "groundedness")
    context = {"dialogue": history, "knowledge": fact,
               "response": row.get("system_output").strip()}
    yield from self._pointwise_examples(row, specs, context, group=history)

  def _sfres(self, row):
    meaning = row.get("source").strip()
    context = {"meaning_representation": meaning,
               "utterance": row.get("system_output").strip()}
    yield from self._pointwise_examples(row, SFRES_TASKS, context, group=meaning)

  def _qags(self, row):
    spec = QAGS_TASKS[row.file]
    document = row.get("source").strip()
    consistent = _score(row, "consistency", 0, 1) == 1
    example = format.Example(task=spec.name, example_id=f"{row.file}:{row.position}",
                             context={"document": document,
                                      "summary": row.get("system_output").strip()},
                             outputs={"consistent": "yes" if consistent else "no"})
    yield base.Converted(example, group=document)
