"""SummaC benchmark: human labels of summary consistency on SummEval and FactCC
(classification, factuality).

tingofurro/summac (Apache-2.0 code; the underlying datasets carry their own terms),
``data/summeval.json`` and ``data/factcc.json`` at a commit in its history: JSON objects of id
-> record with ``document``, ``claim`` and ``label`` (1 = consistent, 0 = not), plus
provenance fields.

* SummEval (Fabbri et al., 2021; the SummaC validation cut): 100 CNN/DailyMail articles, one
  model summary each (M11 or M13, 50 each) as ``claim``; ``annotations`` are three experts'
  1-5 consistency scores and ``label`` is 1 exactly when at least two of them are 5: 63
  consistent, 37 not.
* FactCC (Kryscinski et al., 2020; the manually annotated test set): 311 claims (single,
  possibly transformed summary sentences) about 310 CNN/DailyMail articles (one article,
  ``cnn/stories/ffff11a2…``, has two claims under two spellings of its ``id``): 274 consistent,
  37 not.

Conversion: one classification task per dataset (``summac_summeval_consistency``, context
``document`` and ``summary``; ``summac_factcc_consistency``, context ``document`` and
``claim``); answer field ``consistent``: label 1 -> ``yes``, 0 -> ``no``. Texts are stripped of
surrounding whitespace; no record is dropped. Example id: file and record key
(``summac/factcc.json:record 'factcc_0'``). Split group: the article text, so claims about
the same article (the FactCC pair above) share a split.

Splits (train / validation, 10% of groups to validation): SummEval 89 / 11 (yes 58 / 5, no
31 / 6); FactCC 287 / 24 (yes 254 / 20, no 33 / 4). Decontamination
(`flame.data.decontamination`) drops none of them at the time of writing.
"""
from __future__ import annotations

from flame.data import format
from flame.data.sources import base

SUMMEVAL = "summac/summeval.json"
FACTCC = "summac/factcc.json"


def _consistency(dataset: str, judged: str, field: str, extra: str) -> format.TaskSpec:
  return format.TaskSpec(
      name=f"summac_{dataset}_consistency",
      kind=format.TaskKind.CLASSIFICATION,
      capability=format.Capability.FACTUALITY,
      title=f"Factual consistency of a {field} with its source document",
      description=(f"Given a news article and {judged}, decide whether the {field} is "
                   f"factually consistent with the article: everything it states must be "
                   f"supported by the article, with no contradicted, invented or distorted "
                   f"facts (entities, numbers, dates, who did what). {extra}Reply yes if the "
                   f"{field} is consistent with the article, no otherwise."),
      context_fields=("document", field),
      output_fields=("consistent",),
      labels=("yes", "no"),
  )


TASKS_BY_FILE = {
    SUMMEVAL: _consistency("summeval", "a model-written summary of it", "summary",
                           "Fluency, style and coverage do not matter; one unsupported "
                           "statement makes the summary inconsistent. "),
    FACTCC: _consistency("factcc", "a claim (one sentence derived from a summary of it)",
                         "claim", "Judge only the claim's content, not its grammar or "
                         "truncation. "),
}


class FlameSummac(base.SourceBuilder):
  """Builder ``flame_summac``."""

  FILES = (SUMMEVAL, FACTCC)
  TASKS = tuple(TASKS_BY_FILE.values())
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/tingofurro/summac"
  CITATION = """@article{laban2022summac,
  title={SummaC: Re-Visiting NLI-based Models for Inconsistency Detection in Summarization},
  author={Laban, Philippe and Schnabel, Tobias and Bennett, Paul N. and Hearst, Marti A.},
  journal={TACL}, volume={10}, pages={163--177}, year={2022}}"""

  def rows(self, paths):
    for name in self.FILES:
      yield from base.read_json_records(paths[name], label=name)

  def convert(self, row):
    spec = TASKS_BY_FILE[row.file]
    judged_field = spec.context_fields[1]
    document = row.get("document").strip()
    label = row.get("label", int, choices=(0, 1))
    example = format.Example(task=spec.name, example_id=f"{row.file}:{row.position}",
                             context={"document": document,
                                      judged_field: row.get("claim").strip()},
                             outputs={"consistent": "yes" if label == 1 else "no"})
    yield base.Converted(example, group=document)
