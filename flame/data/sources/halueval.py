"""HaluEval general queries: human labels of hallucination in ChatGPT responses
(classification, factuality).

RUCAIBox/HaluEval (MIT), ``data/general_data.json``: one JSON object per line, ``{ID,
user_query, chatgpt_response, hallucination: "yes" | "no", hallucination_spans}``: 4,507
user queries (from Alpaca) with one ChatGPT response each, annotated by humans for whether the
response contains hallucinated content (information that conflicts with the query or with
world knowledge, or cannot be verified). Labels: 815 ``yes``, 3,692 ``no``.

Conversion:

* One task, ``halueval_hallucination``: context ``prompt`` (the user query) and ``response``
  (ChatGPT's answer), answer field ``hallucination`` = the upstream label, kept as is.
* ``hallucination_spans`` (the annotated spans; empty for every ``no`` row and for 13 ``yes``
  rows) are not used.
* Example id: file and line (``halueval/general_data.json:line N``), not the upstream ``ID``,
  which is not unique: line 1975 has an empty ID and lines 2059 and 2159 both have ``"ID"``.
* Split group: the user query (each of the 4,507 queries occurs once), so the split is by
  query. Query and response are stripped of surrounding whitespace (13 responses have some);
  no row is dropped.

Splits (10% of groups to validation): train 4,044 (yes 739, no 3,305), validation 463 (yes 76,
no 387). Decontamination (`flame.data.decontamination`) then drops the 9 queries that are
prompts of the held-out suite (at the time of writing: 5 llmbar_adver_neighbor, 2
llmbar_natural, 2 llmbar_adver_gptout; 8 train, 1 validation): 4,036 / 462 are prepared.
"""
from __future__ import annotations

from flame.data import format
from flame.data.sources import base

HALLUCINATION = format.TaskSpec(
    name="halueval_hallucination",
    kind=format.TaskKind.CLASSIFICATION,
    capability=format.Capability.FACTUALITY,
    title="Hallucination in a chatbot response",
    description=("Given a user query and a chatbot's response to it, decide whether the "
                 "response contains hallucinated content: statements that are false, that "
                 "cannot be verified against world knowledge, or that contradict or ignore "
                 "what the query asks. Check every factual claim of the response, not only "
                 "its overall gist; a single hallucinated statement is enough. Reply yes if the "
                 "response contains any hallucination, no if it contains none."),
    context_fields=("prompt", "response"),
    output_fields=("hallucination",),
    labels=("yes", "no"),
)


class FlameHalueval(base.SourceBuilder):
  """Builder ``flame_halueval``."""

  FILES = ("halueval/general_data.json",)
  TASKS = (HALLUCINATION,)
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/RUCAIBox/HaluEval"
  CITATION = """@inproceedings{li2023halueval,
  title={HaluEval: A Large-Scale Hallucination Evaluation Benchmark for Large Language Models},
  author={Li, Junyi and Cheng, Xiaoxue and Zhao, Wayne Xin and Nie, Jian-Yun and Wen, Ji-Rong},
  booktitle={EMNLP}, year={2023}}"""

  def rows(self, paths):
    name = self.FILES[0]
    yield from base.read_jsonl(paths[name], label=name, keep_unparsed=True)

  def convert(self, row):
    query = row.get("user_query").strip()
    response = row.get("chatgpt_response").strip()
    label = row.get("hallucination", choices=HALLUCINATION.labels)
    example = format.Example(task=HALLUCINATION.name, example_id=f"{row.file}:{row.position}",
                             context={"prompt": query, "response": response},
                             outputs={"hallucination": label})
    yield base.Converted(example, group=query)
