"""WMT21 TED talks English->German, expert MQM annotations turned into segment scores
(pointwise, quality).

google/wmt-mqm-human-evaluation (Apache-2.0), ``ted/ende/mqm_ted_ende.tsv`` (Freitag et al.,
2021, "Experts, Errors, and Context: A Large-Scale Study of Human Evaluation for Machine
Translation"): a TSV with header ``system, doc, doc_id, seg_id, rater, source, target,
category, severity, comment`` and one row per error a professional translator marked in one
system's translation of one segment, or a single ``No-error`` row (category and severity
``No-error``) when they marked none. The error span is wrapped in ``<v>…</v>`` in the target
(or in the source, for e.g. omissions). 8,435 rows: 14 systems (13 MT systems and the human
reference ``ref``) x 529 segments of 5 talks = 7,406 rated translations, each rated by exactly
one of 4 raters; 4,404 ``No-error`` rows, 2,164 Minor and 1,867 Major errors; at most 5 errors
per translation (raters were told to mark the 5 most severe).

Reading (`read_tsv`): each line split on tabs, no quoting (as ``csv.QUOTE_NONE``: a field never
spans lines, and the ``"`` in 135 rows' texts is literal). Every line of this file has the 10
columns, so no line is bad; a line with another number of columns would be a bad row naming
its line, raised, or under ``skip_bad_rows`` skipped together with the rest of its
(system, seg_id), whose score it would change. The ``<v>`` and ``</v>`` marks are removed;
one row (line 6444, ``metricsystem1``, seg 475) opens a ``<v>`` it never closes, before a
trailing "?" that is kept. After that, the rows of one (system, seg_id) agree on source and
target text (checked; a disagreement is a bad row).

Segment score: the MQM weighting of Freitag et al. (2021, Table 2 and the dataset README):
Major = 5 (Major Non-translation = 25, a whole garbled segment), Minor = 1 (Minor
Fluency/Punctuation = 0.1), Neutral = 0, ``No-error`` = 0; a rater's score for a translation is
the sum over the errors they marked, and the segment score is the mean over its raters (here
always one). It is an error penalty on the scale 0-25, lower is better (5 errors x Major 5 =
25; capped at 25), written with 1 decimal (exact for one rater, whose scores are multiples of
0.1). No Non-translation or Neutral row occurs in this file. Observed: 0 for 4,404
translations, max 25 (2 translations), mean 1.53.

Conversion: one pointwise task ``wmt_mqm_ted_ende_mqm``: context ``source`` (English segment)
and ``translation`` (German), answer field ``mqm_score``. Example id
``wmt_mqm/ted_ende/mqm_ted_ende.tsv:seg <seg_id>:<system>``. Split group: the English source
text, so all 14 translations of a segment (and repeated segments such as "(Applause)", 5
seg_ids) share a split. The document context the raters saw is not included.

Splits (10% of groups to validation): train 6,720, validation 686. Decontamination
(`flame.data.decontamination`) drops none of them at the time of writing.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Mapping, Sequence

from flame.data import format
from flame.data.sources import base

_FILE = "wmt_mqm/ted_ende/mqm_ted_ende.tsv"
SEVERITIES = ("No-error", "Neutral", "Minor", "Major")
MAX_SCORE = 25.0
DECIMALS = 1

MQM = format.TaskSpec(
    name="wmt_mqm_ted_ende_mqm",
    kind=format.TaskKind.POINTWISE,
    capability=format.Capability.QUALITY,
    title="MQM error score of an English-German translation",
    description=(
        "Given an English source sentence from a TED talk and its German translation, "
        "annotate the translation as a professional translator would in a Multidimensional "
        "Quality Metrics (MQM) evaluation and report its error penalty. Identify up to five "
        "errors (the most severe ones) in accuracy (mistranslation, omission, addition, "
        "untranslated text), fluency (grammar, spelling, punctuation, register, "
        "inconsistency), terminology, style and locale conventions. Weight each Major error "
        "(one that changes the meaning or makes the text ungrammatical or hard to follow) 5, "
        "each Minor error 1, a Minor punctuation error 0.1, and a translation too garbled to "
        "annotate 25. The score is the sum of the weights: 0 means a flawless translation, "
        "25 the worst; write it with 1 decimal."),
    context_fields=("source", "translation"),
    output_fields=("mqm_score",),
    scale=(0.0, MAX_SCORE),
)


@dataclasses.dataclass(frozen=True)
class BadLine(base.Unparsed):
  """A TSV line with the wrong number of columns; `fields` pairs the header with the values
  it does have (in order), e.g. to find the segment it belongs to."""
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)


def read_tsv(path: str, label: str) -> Iterator[base.Row]:
  """Rows of a TSV with a header, no quoting (a field never spans lines; ``"`` is literal).

  A line with the wrong number of columns becomes a Row whose data is a `BadLine`, so that it
  is raised or skipped like any bad row instead of ending the reading.
  """
  with open(path, encoding="utf-8", newline="") as f:
    header = f.readline().rstrip("\r\n").split("\t")
    for number, line in enumerate(f, 2):
      values = line.rstrip("\r\n").split("\t")
      if values == [""]:
        continue
      if len(values) != len(header):
        yield base.Row(label, f"line {number}", BadLine(
            f"expected {len(header)} tab-separated columns {header}, got {len(values)}",
            dict(zip(header, values))))
      else:
        yield base.Row(label, f"line {number}", dict(zip(header, values)))


@dataclasses.dataclass(frozen=True)
class Segment:
  """The data of a grouped Row: the TSV lines of one system's translation of one segment."""
  system: str
  seg_id: str
  lines: tuple[base.Row, ...]


def strip_marks(text: str) -> str:
  """The text without the ``<v>``/``</v>`` error-span marks."""
  return text.replace("<v>", "").replace("</v>", "")


def error_weight(category: str, severity: str) -> float:
  """MQM weight of one marked error (Freitag et al., 2021, Table 2)."""
  if severity in ("No-error", "Neutral"):
    return 0.0
  if severity == "Major":
    return 25.0 if category.rstrip("!") == "Non-translation" else 5.0
  if severity == "Minor":
    return 0.1 if category == "Fluency/Punctuation" else 1.0
  raise ValueError(f"severity {severity!r}, expected one of {list(SEVERITIES)}")


def segment_score(errors: Sequence[tuple[str, str, str]]) -> float:
  """Mean over raters of the sum of their error weights; `errors` = (rater, category,
  severity) rows of one translation. Capped at MAX_SCORE."""
  per_rater: dict[str, float] = collections.defaultdict(float)
  for rater, category, severity in errors:
    per_rater[rater] += error_weight(category, severity)
  return min(MAX_SCORE, sum(per_rater.values()) / len(per_rater))


class FlameWmtMqm(base.SourceBuilder):
  """Builder ``flame_wmt_mqm``."""

  FILES = (_FILE,)
  TASKS = (MQM,)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/google/wmt-mqm-human-evaluation"
  CITATION = """@article{freitag2021experts,
  title={Experts, Errors, and Context: A Large-Scale Study of Human Evaluation for Machine
  Translation}, author={Freitag, Markus and Foster, George and Grangier, David and Ratnakar,
  Viresh and Tan, Qijun and Macherey, Wolfgang}, journal={TACL}, volume={9},
  pages={1460--1474}, year={2021}}"""

  def rows(self, paths: Mapping[str, str]) -> Iterator[base.Row]:
    """One Row per (system, seg_id), its data a `Segment`. A line with the wrong number of
    columns joins its segment when its system and seg_id columns can still be read (so the
    whole segment is raised or skipped), else it is yielded alone."""
    segments: dict[tuple[str, str], list[base.Row]] = collections.defaultdict(list)
    for line in read_tsv(paths[_FILE], label=_FILE):
      fields = line.data.fields if isinstance(line.data, BadLine) else line.data
      if "system" not in fields or "seg_id" not in fields:
        yield line  # Too few columns to tell its segment.
        continue
      segments[(fields["system"], fields["seg_id"])].append(line)
    for (system, seg_id), lines in segments.items():
      yield base.Row(lines[0].file, lines[0].position, Segment(system, seg_id, tuple(lines)))

  def convert(self, row):
    lines = row.data.lines
    for line in lines:
      if isinstance(line.data, BadLine):
        raise line.error(None, line.data.message)
    first = lines[0]
    source = strip_marks(first.get("source")).strip()
    target = strip_marks(first.get("target")).strip()
    errors = []
    for line in lines:
      for field, text in (("source", source), ("target", target)):
        if strip_marks(line.get(field)).strip() != text:
          raise line.error(field, f"differs from the {field} text on {first.position} of the "
                           f"same system and seg_id")
      severity = line.get("severity", choices=SEVERITIES)
      errors.append((line.get("rater"), line.get("category"), severity))
    example = format.Example(
        task=MQM.name, example_id=f"{row.file}:seg {row.data.seg_id}:{row.data.system}",
        context={"source": source, "translation": target},
        outputs={"mqm_score": f"{segment_score(errors):.{DECIMALS}f}"})
    yield base.Converted(example, group=source)
