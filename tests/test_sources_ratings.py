"""The classification and pointwise rating sources: HaluEval, OpenAI moderation, UniEval
(Topical-Chat, SF-RES, QAGS), SummaC (SummEval, FactCC) and WMT MQM (TED en-de).

Every task is prepared once through TFDS into a temporary data_dir (module-scoped cache), then
checked against numbers computed here, independently, from the raw files with plain
json / gzip / csv: example counts and label or score distributions (the prepared splits
plus the examples decontamination dropped for sharing a prompt with the held-out suite), the
documented split sizes, that groups never straddle the splits, that every example validates
and renders as stored, and one example per task written out by hand.
"""
from __future__ import annotations

import collections
import csv
import functools
import gzip
import json
import statistics

import pytest
import tensorflow_datasets as tfds

from flame.data import decontamination, download, format
from flame.data import sources
from flame.data.sources import base, halueval, openai_moderation, summac, unieval, wmt_mqm


def _raw_json(name):
  with open(download.resolve(name), encoding="utf-8") as f:
    return json.load(f)


# -- Independent expectations from the raw files. ---------------------------------------------


def _halueval_labels():
  with open(download.resolve("halueval/general_data.json"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {"halueval_hallucination": collections.Counter(r["hallucination"] for r in rows)}


MODERATION_SUFFIX = {"S": "sexual", "H": "hate", "V": "violence", "HR": "harassment",
                     "SH": "self_harm", "S3": "sexual_minors", "H2": "hate_threatening",
                     "V2": "violence_graphic"}


def _moderation_labels():
  with gzip.open(download.resolve("openai_moderation/samples-1680.jsonl.gz"), "rt",
                 encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert len(rows) == 1680
  by_text = collections.defaultdict(list)
  for r in rows:
    by_text[r["prompt"].strip()].append(r)
  assert len(by_text) == 1665
  out = {}
  for key, suffix in MODERATION_SUFFIX.items():
    counts = collections.Counter()
    for group in by_text.values():
      votes = {r[key] for r in group if key in r}
      if len(votes) == 1:
        counts[{1: "yes", 0: "no"}[votes.pop()]] += 1
    out[f"openai_moderation_{suffix}"] = counts
  return out


TOPICAL_CHAT_KEYS = ("understandability", "naturalness", "coherence", "engagingness",
                     "groundedness", "overall")


def _unieval_labels():
  out = {}
  records = _raw_json("unieval/topical_chat.json")
  assert len(records) == 360
  for key in TOPICAL_CHAT_KEYS:
    kept = [r for r in records
            if not (key == "groundedness" and r["context"].strip() == "_nofact")]
    out[f"unieval_topical_chat_{key}"] = collections.Counter(
        f"{r['scores'][key]:.2f}" for r in kept)
  records = _raw_json("unieval/sfres.json")
  assert len(records) == 1181
  for key in ("informativeness", "naturalness", "overall"):
    out[f"unieval_sfres_{key}"] = collections.Counter(f"{r['scores'][key]:.1f}"
                                                      for r in records)
  for dataset in ("cnndm", "xsum"):
    records = _raw_json(f"unieval/qags_{dataset}.json")
    out[f"unieval_qags_{dataset}_consistency"] = collections.Counter(
        "yes" if r["scores"]["consistency"] == 1 else "no" for r in records)
  return out


def _summac_labels():
  return {f"summac_{d}_consistency": collections.Counter(
      "yes" if r["label"] == 1 else "no" for r in _raw_json(f"summac/{d}.json").values())
          for d in ("summeval", "factcc")}


def _mqm_scores():
  """Segment scores from the TSV read with the csv module (QUOTE_NONE)."""
  path = download.resolve("wmt_mqm/ted_ende/mqm_ted_ende.tsv")
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  assert len(rows) == 8435 and all(None not in r and None not in r.values() for r in rows)
  penalties = collections.defaultdict(lambda: collections.defaultdict(float))
  for r in rows:
    weight = {"No-error": 0.0, "Neutral": 0.0, "Minor": 1.0, "Major": 5.0}[r["severity"]]
    if r["severity"] == "Minor" and r["category"] == "Fluency/Punctuation":
      weight = 0.1
    if r["severity"] == "Major" and r["category"].startswith("Non-translation"):
      weight = 25.0
    penalties[(r["system"], r["seg_id"])][r["rater"]] += weight
  return [min(25.0, statistics.mean(by_rater.values())) for by_rater in penalties.values()]


def _mqm_labels():
  return {"wmt_mqm_ted_ende_mqm": collections.Counter(f"{s:.1f}" for s in _mqm_scores())}


@functools.lru_cache(maxsize=None)
def expected():
  """task -> Counter of answers, from the raw files."""
  return {**_halueval_labels(), **_moderation_labels(), **_unieval_labels(),
          **_summac_labels(), **_mqm_labels()}


BUILDERS = {"flame_halueval": halueval.FlameHalueval,
            "flame_openai_moderation": openai_moderation.FlameOpenaiModeration,
            "flame_unieval": unieval.FlameUnieval, "flame_summac": summac.FlameSummac,
            "flame_wmt_mqm": wmt_mqm.FlameWmtMqm}
BUILDER_OF = {spec.name: name for name, cls in BUILDERS.items() for spec in cls.TASKS}
SPECS = {spec.name: spec for cls in BUILDERS.values() for spec in cls.TASKS}
TASK_NAMES = sorted(SPECS)

# (train, validation) sizes before decontamination, as documented in the module docstrings.
SPLIT_SIZES = {
    "halueval_hallucination": (4044, 463),
    "openai_moderation_sexual": (883, 87),
    "openai_moderation_hate": (701, 68),
    "openai_moderation_violence": (1341, 106),
    "openai_moderation_harassment": (1335, 105),
    "openai_moderation_self_harm": (1339, 105),
    "openai_moderation_sexual_minors": (892, 88),
    "openai_moderation_hate_threatening": (695, 64),
    "openai_moderation_violence_graphic": (1339, 105),
    **{f"unieval_topical_chat_{k}": (312, 48) for k in TOPICAL_CHAT_KEYS},
    "unieval_topical_chat_groundedness": (270, 42),
    **{f"unieval_sfres_{k}": (1062, 119) for k in ("informativeness", "naturalness",
                                                   "overall")},
    "unieval_qags_cnndm_consistency": (207, 28),
    "unieval_qags_xsum_consistency": (212, 27),
    "summac_summeval_consistency": (89, 11),
    "summac_factcc_consistency": (287, 24),
    "wmt_mqm_ted_ende_mqm": (6720, 686),
}

# The context field that identifies a split group (same value -> same split).
GROUP_FIELD = {"halueval": "prompt", "openai": "passage", "summac": "document",
               "wmt": "source", "unieval_topical": "dialogue",
               "unieval_sfres": "meaning_representation", "unieval_qags": "document"}


def _group_field(task):
  return next(field for prefix, field in sorted(GROUP_FIELD.items(), key=lambda kv: -len(kv[0]))
              if task.startswith(prefix))


# -- Preparation, once per task for the module. ------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def prepared(tfds_dir):
  """task -> {split: [(Example, inputs, targets)]}, prepared through TFDS on first use;
  ``prepared.decontaminated[task]`` is the dataset info's count of dropped examples."""
  cache = {}

  def get(task):
    if task not in cache:
      builder = tfds.builder(f"{BUILDER_OF[task]}/{task}", data_dir=tfds_dir)
      builder.download_and_prepare()
      get.decontaminated[task] = dict(builder.info.metadata["decontaminated"])
      cache[task] = {split: [
          (base.example_from_features(f), f["inputs"].decode(), f["targets"].decode())
          for f in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]
                     for split in builder.info.splits}
    return cache[task]

  get.decontaminated = {}
  return get


@pytest.fixture(scope="module")
def converted(tfds_dir):
  """task -> every Converted example before decontamination (the builder's `examples`)."""
  cache = {}

  def get(task):
    if task not in cache:
      cls = BUILDERS[BUILDER_OF[task]]
      builder = cls(config=task, data_dir=tfds_dir)
      cache[task] = builder.examples({name: download.resolve(name) for name in cls.FILES})
    return cache[task]

  return get


def _all(splits):
  return [item for items in splits.values() for item in items]


def _by_id(splits, example_id):
  found = [item for item in _all(splits) if item[0].example_id == example_id]
  assert len(found) == 1, example_id
  return found[0]


# -- Every task. -------------------------------------------------------------------------------


def test_every_task_is_registered():
  specs = sources.task_specs()
  assert len(TASK_NAMES) == 23
  for task in TASK_NAMES:
    assert specs[task][0].name == BUILDER_OF[task]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_counts_and_label_distribution(prepared, converted, task):
  splits, items = prepared(task), converted(task)
  assert set(splits) == {"train", "validation"}
  spec, expected_answers = SPECS[task], expected()[task]
  answer = lambda example: example.outputs[spec.answer_field]
  # Before decontamination: the raw file's counts, distribution and the documented splits.
  assert collections.Counter(answer(item.example) for item in items) == expected_answers
  before = collections.Counter(base.split_of(item.group, 10) for item in items)
  assert (before["train"], before["validation"]) == SPLIT_SIZES[task]
  if spec.kind == format.TaskKind.POINTWISE:
    values = [float(answer(item.example)) for item in items]
    assert min(values) == min(float(a) for a in expected_answers)
    assert max(values) == max(float(a) for a in expected_answers)
  # Prepared = all of them less the decontaminated ones, which really match a held-out prompt.
  kept = {ex.example_id for ex, _, _ in _all(splits)}
  dropped = [item for item in items if item.example.example_id not in kept]
  assert len(kept) + len(dropped) == len(items) == sum(expected_answers.values())
  assert len(dropped) == sum(prepared.decontaminated[task].values())
  index = base.heldout_index()
  assert all(decontamination.heldout_matches(item.example, spec, index) for item in dropped)
  assert (collections.Counter(answer(ex) for ex, _, _ in _all(splits)) +
          collections.Counter(answer(item.example) for item in dropped)) == expected_answers
  for split in ("train", "validation"):
    gone = sum(base.split_of(item.group, 10) == split for item in dropped)
    assert len(splits[split]) == before[split] - gone


@pytest.mark.parametrize("task", TASK_NAMES)
def test_examples_validate_render_and_keep_groups_together(prepared, task):
  splits, spec = prepared(task), SPECS[task]
  ids, split_of_group = set(), collections.defaultdict(set)
  for split, items in splits.items():
    for example, inputs, targets in items:
      format.validate(example, spec)
      assert example.task == task
      assert inputs == format.render_input(spec, example)
      assert targets == format.render_target(spec, example)
      ids.add(example.example_id)
      split_of_group[example.context[_group_field(task)]].add(split)
  assert len(ids) == sum(len(items) for items in splits.values())
  assert all(len(s) == 1 for s in split_of_group.values())


def test_classification_answers_are_yes_no():
  for spec in SPECS.values():
    if spec.kind == format.TaskKind.CLASSIFICATION:
      assert spec.labels == ("yes", "no")


# -- Distributions stated in the docstrings. ---------------------------------------------------


def test_documented_distributions():
  counts = expected()
  assert counts["halueval_hallucination"] == {"yes": 815, "no": 3692}
  assert counts["openai_moderation_sexual"] == {"yes": 230, "no": 740}
  assert counts["openai_moderation_violence_graphic"] == {"yes": 23, "no": 1421}
  assert counts["unieval_qags_cnndm_consistency"] == {"yes": 113, "no": 122}
  assert counts["unieval_qags_xsum_consistency"] == {"yes": 116, "no": 123}
  assert counts["summac_summeval_consistency"] == {"yes": 63, "no": 37}
  assert counts["summac_factcc_consistency"] == {"yes": 274, "no": 37}
  assert set(counts["unieval_topical_chat_naturalness"]) == {
      "1.00", "1.33", "1.67", "2.00", "2.33", "2.67", "3.00"}
  assert set(counts["unieval_topical_chat_groundedness"]) == {"0.00", "0.33", "0.67", "1.00"}
  assert sum(counts["unieval_topical_chat_groundedness"].values()) == 312
  assert set(counts["unieval_sfres_overall"]) == {f"{x / 2:.1f}" for x in range(2, 13)}
  scores = _mqm_scores()
  assert len(scores) == 7406 and min(scores) == 0 and max(scores) == 25
  assert sum(s == 0 for s in scores) == 4404


# -- Examples written out by hand. -------------------------------------------------------------


def _instructions(task, output_field):
  spec = SPECS[task]
  return (f"INSTRUCTIONS:\ntitle: {spec.title}\ndescription: {spec.description}\n"
          f"output_fields: {output_field}\n\nCONTEXT:\n")


def test_halueval_rendering(prepared):
  _, inputs, targets = _by_id(prepared("halueval_hallucination"),
                              "halueval/general_data.json:line 448")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: Hallucination in a chatbot response\n"
      "description: Given a user query and a chatbot's response to it, decide whether the "
      "response contains hallucinated content: statements that are false, that cannot be "
      "verified against world knowledge, or that contradict or ignore what the query asks. "
      "Check every factual claim of the response, not only its overall gist; a single "
      "hallucinated statement is enough. Reply yes if the response contains any "
      "hallucination, no if it contains none.\n"
      "output_fields: hallucination\n"
      "\n"
      "CONTEXT:\n"
      "prompt: Calculate the following: (2 * 3 + 4) / 5\n"
      "response: 2 * 3 = 6\n6 + 4 = 10\n10 / 5 = 2\n\nTherefore, (2 * 3 + 4) / 5 = 2.")
  assert targets == "EVALUATION:\nhallucination: no"


def test_openai_moderation_rendering(prepared):
  _, inputs, targets = _by_id(prepared("openai_moderation_hate"),
                              "openai_moderation/samples-1680.jsonl.gz:line 1487")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: Undesired content: hate\n"
      "description: Given a passage of text (a user prompt, a model output or web text), "
      "decide whether it falls under the content-moderation category 'hate': content that "
      "expresses, incites, or promotes hate based on race, gender, ethnicity, religion, "
      "nationality, sexual orientation, disability status, or caste. Judge the passage "
      "itself, not the intent of its author; news, discussion or education about the topic "
      "that does not itself match the definition does not count. Reply yes if the passage "
      "belongs to the category, no otherwise.\n"
      "output_fields: hate\n"
      "\n"
      "CONTEXT:\n"
      "passage: canadian air force")
  assert targets == "EVALUATION:\nhate: no"


@pytest.mark.parametrize("suffix", sorted(MODERATION_SUFFIX.values()))
def test_openai_moderation_every_category(prepared, suffix):
  task = f"openai_moderation_{suffix}"
  _, inputs, targets = _by_id(prepared(task),
                              "openai_moderation/samples-1680.jsonl.gz:line 1487")
  assert inputs == _instructions(task, suffix) + "passage: canadian air force"
  assert targets == f"EVALUATION:\n{suffix}: no"


def test_openai_moderation_duplicates_merged(prepared):
  # Lines 297 and 1443 hold the same text; they disagree on S and HR (skipped there) and
  # agree on V = 1 (one example, id of the first line).
  ids = lambda task: {ex.example_id for ex, _, _ in _all(prepared(task))}
  first = "openai_moderation/samples-1680.jsonl.gz:line 297"
  assert first not in ids("openai_moderation_sexual")
  assert first not in ids("openai_moderation_harassment")
  assert first in ids("openai_moderation_violence")
  assert not any(i.endswith(":line 1443") for i in ids("openai_moderation_violence"))
  example, _, _ = _by_id(prepared("openai_moderation_violence"), first)
  assert example.outputs == {"violence": "yes"}


TOPICAL_NO_FACT = ("dialogue: did you read about the 6 foot 10 inch tall tennis player ?\n"
                   "knowledge: (none)\n"
                   "response: i have not . i have not . what is it about ?")


@pytest.mark.parametrize("key,rating", [("understandability", "0.67"), ("naturalness", "2.00"),
                                        ("coherence", "2.00"), ("engagingness", "1.67"),
                                        ("overall", "2.33")])
def test_topical_chat_rendering(prepared, key, rating):
  task = f"unieval_topical_chat_{key}"
  _, inputs, targets = _by_id(prepared(task), "unieval/topical_chat.json:record 86")
  assert inputs == _instructions(task, key) + TOPICAL_NO_FACT
  assert targets == f"EVALUATION:\n{key}: {rating}"


def test_topical_chat_groundedness_rendering(prepared):
  splits = prepared("unieval_topical_chat_groundedness")
  ids = {ex.example_id for ex, _, _ in _all(splits)}
  assert "unieval/topical_chat.json:record 86" not in ids  # no fact: left out
  _, inputs, targets = _by_id(splits, "unieval/topical_chat.json:record 158")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: Groundedness of a dialogue response in its knowledge fact\n"
      "description: You are given a knowledge-grounded conversation between two people (the "
      "dialogue history, one turn per line), a knowledge fact (\"(none)\" if there is none), "
      "and a candidate next response conditioned on that fact. How well does the response "
      "use the knowledge fact it is conditioned on? Rate it on a scale from 0 to 1, where 0 "
      "means the fact is not used, 1 means it is used well. The rating is the mean of three "
      "annotators' ratings, written with 2 decimals.\n"
      "output_fields: groundedness\n"
      "\n"
      "CONTEXT:\n"
      "dialogue: do you like football ?\n"
      "knowledge: the university of iowa 's locker room for visiting football teams is "
      "completely painted pink\n"
      "response: i do like football , how about you ?")
  assert targets == "EVALUATION:\ngroundedness: 0.00"


@pytest.mark.parametrize("key,rating", [("informativeness", "4.0"), ("naturalness", "4.0"),
                                        ("overall", "4.5")])
def test_sfres_rendering(prepared, key, rating):
  task = f"unieval_sfres_{key}"
  _, inputs, targets = _by_id(prepared(task), "unieval/sfres.json:record 2")
  assert inputs == _instructions(task, key) + (
      "meaning_representation: confirm(area='little russia')\n"
      "utterance: You would like to search little russia ?")
  assert targets == f"EVALUATION:\n{key}: {rating}"


def test_sfres_full_rendering(prepared):
  _, inputs, _ = _by_id(prepared("unieval_sfres_overall"), "unieval/sfres.json:record 2")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: Overall quality of a generated utterance\n"
      "description: You are given the meaning representation of a restaurant-information "
      "dialogue act (act type and slot values) and an utterance a system generated to "
      "express it. What is the overall quality of the utterance in terms of grammatical "
      "correctness and fluency? Rate it on a scale from 1 to 6, where 1 means very poor and "
      "6 means excellent. The rating aggregates several crowd workers' ratings, so half "
      "points occur; it is written with 1 decimal.\n"
      "output_fields: overall\n"
      "\n"
      "CONTEXT:\n"
      "meaning_representation: confirm(area='little russia')\n"
      "utterance: You would like to search little russia ?")


@pytest.mark.parametrize("task,example_id,summary,head,tail,answer", [
    ("unieval_qags_xsum_consistency", "unieval/qags_xsum.json:record 81",
     "Olympic bronze medallist aneurin bevan says he still has a `` small chance '' of "
     "competing at rio 2016 despite breaking his leg .",
     "Gymnast brinn bevan believes he still has a `` small chance '' of competing",
     "but there is still a small chance i can push for a place in that team . ''", "no"),
    # Consistency 2/3 (one of three sentences unsupported) -> no.
    ("unieval_qags_cnndm_consistency", "unieval/qags_cnndm.json:record 193",
     "The filipino icon will be put through at the wild card gym in los angeles . Pacquiao "
     "has promised to be on time - and after mayweather was just two hours late for his "
     "workout workout . Floyd mayweather jnr takes his turn .",
     "Twenty four hours after floyd mayweather jnr dazzled the media with his skills",
     "pacquiao has promised to be on time - and you can watch it here from 11pm .", "no"),
])
def test_qags_rendering(prepared, task, example_id, summary, head, tail, answer):
  _, inputs, targets = _by_id(prepared(task), example_id)
  prefix = _instructions(task, "consistent") + "document: " + head
  assert inputs.startswith(prefix)
  assert inputs.endswith(tail + "\nsummary: " + summary)
  assert inputs.count("\n") == prefix.count("\n") + 1  # the document is one line
  assert targets == f"EVALUATION:\nconsistent: {answer}"


def test_summac_summeval_rendering(prepared):
  _, inputs, targets = _by_id(prepared("summac_summeval_consistency"),
                              "summac/summeval.json:record 'summeval_57'")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: Factual consistency of a summary with its source document\n"
      "description: Given a news article and a model-written summary of it, decide whether "
      "the summary is factually consistent with the article: everything it states must be "
      "supported by the article, with no contradicted, invented or distorted facts "
      "(entities, numbers, dates, who did what). Fluency, style and coverage do not matter; "
      "one unsupported statement makes the summary inconsistent. Reply yes if the summary "
      "is consistent with the article, no otherwise.\n"
      "output_fields: consistent\n"
      "\n"
      "CONTEXT:\n"
      "document: Manchester City are keen to sign Anderlecht teenager Evangelos Patoulidis. "
      "The 14-year-old playmaker is regarded as one of the best talents to emerge from "
      "Anderlecht's youth set-up and has also attracted attention from Arsenal and "
      "Barcelona. The Belgian starlet rejected a move to Barcelona's La Masia academy when "
      "he was 12 as his family wanted him to continue his studies. He has continued to "
      "impress and City have held discussions with Anderlecht chairman Roger Vanden Stock in "
      "the hope of agreeing a compensation package. Manuel Pellegrini is looked to build for "
      "the future by snapping up hot property\u00a0Evangelos Patoulidis .\n"
      "summary: manchester city are keen to sign anderlecht teenager evangelos patoulidis . "
      "the 14-year-old is regarded as one of the best talents to emerge from anderlecht 's "
      "youth set-up . the belgian starlet rejected a move to barcelona 's la masia academy "
      "when he was 12 as his family wanted him to continue his studies .")
  assert targets == "EVALUATION:\nconsistent: yes"


def test_summac_factcc_rendering(prepared):
  splits = prepared("summac_factcc_consistency")
  _, inputs, targets = _by_id(splits, "summac/factcc.json:record 'factcc_205'")
  assert inputs.startswith(_instructions("summac_factcc_consistency", "consistent") +
                           "document: (CNN)What do we have for the contestant on \"The Price "
                           "Is Right\"? A brand-new car! Whoops.")
  assert inputs.endswith("On Wednesday, former host Bob Barker, 91, showed up to run his old "
                         "show.\nclaim: manuela arbelaez accidentally revealed the correct "
                         "answer to a guessing game for a new hyundai sonata.")
  assert targets == "EVALUATION:\nconsistent: yes"
  # Two claims about one article (two spellings of its id) share a split.
  pair = [split for split, items in splits.items() for ex, _, _ in items
          if ex.example_id.endswith(("'factcc_48'", "'factcc_208'"))]
  assert len(pair) == 2 and len(set(pair)) == 1


def test_wmt_mqm_rendering(prepared):
  # seg 310, metricsystem2: one Major Accuracy/Mistranslation (5) and one Minor
  # Fluency/Punctuation (0.1) by rater4 -> 5.1.
  _, inputs, targets = _by_id(prepared("wmt_mqm_ted_ende_mqm"),
                              "wmt_mqm/ted_ende/mqm_ted_ende.tsv:seg 310:metricsystem2")
  assert inputs == (
      "INSTRUCTIONS:\n"
      "title: MQM error score of an English-German translation\n"
      "description: Given an English source sentence from a TED talk and its German "
      "translation, annotate the translation as a professional translator would in a "
      "Multidimensional Quality Metrics (MQM) evaluation and report its error penalty. "
      "Identify up to five errors (the most severe ones) in accuracy (mistranslation, "
      "omission, addition, untranslated text), fluency (grammar, spelling, punctuation, "
      "register, inconsistency), terminology, style and locale conventions. Weight each "
      "Major error (one that changes the meaning or makes the text ungrammatical or hard to "
      "follow) 5, each Minor error 1, a Minor punctuation error 0.1, and a translation too "
      "garbled to annotate 25. The score is the sum of the weights: 0 means a flawless "
      "translation, 25 the worst; write it with 1 decimal.\n"
      "output_fields: mqm_score\n"
      "\n"
      "CONTEXT:\n"
      "source: So it's deceiving on two levels -- fabulous.\n"
      "translation: Es täuscht also auf zwei Ebenen - fabelhaft.")
  assert targets == "EVALUATION:\nmqm_score: 5.1"


# -- Pure helpers and bad rows. ----------------------------------------------------------------


def test_mqm_weights():
  assert wmt_mqm.error_weight("Accuracy/Mistranslation", "Major") == 5
  assert wmt_mqm.error_weight("Fluency/Punctuation", "Major") == 5
  assert wmt_mqm.error_weight("Non-translation!", "Major") == 25
  assert wmt_mqm.error_weight("Style/Awkward", "Minor") == 1
  assert wmt_mqm.error_weight("Fluency/Punctuation", "Minor") == 0.1
  assert wmt_mqm.error_weight("Other", "Neutral") == 0
  assert wmt_mqm.error_weight("No-error", "No-error") == 0
  # Mean over raters of per-rater sums; capped at 25.
  assert wmt_mqm.segment_score([("r1", "Other", "Major"), ("r1", "Fluency/Punctuation",
                                                           "Minor"),
                                ("r2", "No-error", "No-error")]) == pytest.approx(2.55)
  assert wmt_mqm.segment_score([("r1", "Non-translation!", "Major"),
                                ("r1", "Other", "Major")]) == 25
  assert wmt_mqm.strip_marks("a <v>b</v> c <v>?") == "a b c ?"


def test_dialogue_history():
  assert unieval.dialogue_history("hi there \n hello ! \n\n\n") == "hi there\nhello !"


MQM_HEADER = "system\tdoc\tdoc_id\tseg_id\trater\tsource\ttarget\tcategory\tseverity\tcomment"


def _mqm_examples(tmp_path, lines, skip_bad_rows=False):
  path = tmp_path / "mqm.tsv"
  path.write_text("\n".join([MQM_HEADER] + lines) + "\n", encoding="utf-8")
  builder = wmt_mqm.FlameWmtMqm(data_dir=str(tmp_path), skip_bad_rows=skip_bad_rows)
  items = builder.examples({"wmt_mqm/ted_ende/mqm_ted_ende.tsv": str(path)})
  return {item.example.example_id.split(":", 1)[1]: item.example for item in items}, builder


def test_wmt_mqm_reads_quotes_literally_and_scores_segments(tmp_path):
  examples, _ = _mqm_examples(tmp_path, [
      'A\tt\t1\t7\tr1\tSay "hi".\tSag <v>"hallo"</v>.\tStyle/Awkward\tMinor\t',
      'A\tt\t1\t7\tr1\tSay "hi".\t<v>Sag</v> "hallo".\tAccuracy/Mistranslation\tMajor\t',
      'B\tt\t1\t7\tr2\tSay "hi".\tSag "hi".\tNo-error\tNo-error\t'])
  assert examples["seg 7:A"].context == {"source": 'Say "hi".', "translation": 'Sag "hallo".'}
  assert examples["seg 7:A"].outputs == {"mqm_score": "6.0"}
  assert examples["seg 7:B"].outputs == {"mqm_score": "0.0"}


def test_wmt_mqm_bad_lines_are_named_and_skip_their_segment(tmp_path):
  good = "B\tt\t1\t7\tr2\tHi.\tHallo.\tNo-error\tNo-error\t"
  bad_columns = ["A\tt\t1\t7\tr1\tHi.\t<v>Hallo</v>.\tOther\tMinor\t", good,
                 "A\tt\t1\t7\tr1\tHi.\tHallo.\tOther\tMajor\ta comment\twith a tab"]
  with pytest.raises(base.BadRowError, match=r"mqm_ted_ende.tsv, line 4: expected 10 tab-sep"):
    _mqm_examples(tmp_path, bad_columns)
  examples, builder = _mqm_examples(tmp_path, bad_columns, skip_bad_rows=True)
  assert list(examples) == ["seg 7:B"]  # A's whole segment is skipped, not mis-scored.
  assert builder.skipped_rows == {"wmt_mqm/ted_ende/mqm_ted_ende.tsv: row": 1}
  with pytest.raises(base.BadRowError, match=r"mqm_ted_ende.tsv, line 2, field 'severity'"):
    _mqm_examples(tmp_path, ["A\tt\t1\t7\tr1\tHi.\tHallo.\tOther\tCritical\t", good])
  with pytest.raises(base.BadRowError, match=r"mqm_ted_ende.tsv, line 3, field 'target'"):
    _mqm_examples(tmp_path, [good, "B\tt\t1\t7\tr3\tHi.\tServus.\tOther\tMinor\t"])


def _moderation_examples(tmp_path, records, task="openai_moderation_sexual",
                         skip_bad_rows=False):
  path = tmp_path / "samples.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
  builder = openai_moderation.FlameOpenaiModeration(config=task, data_dir=str(tmp_path),
                                                    skip_bad_rows=skip_bad_rows)
  items = builder.examples({"openai_moderation/samples-1680.jsonl.gz": str(path)})
  return {item.example.example_id.split(":", 1)[1]: item.example.outputs for item in items}


def test_openai_moderation_merging_and_bad_lines(tmp_path):
  records = [{"prompt": "a", "S": 1}, {"prompt": " a ", "S": 1, "H": 0},  # agree
             {"prompt": "b", "S": 0}, {"prompt": "b", "S": 1},  # conflict: skipped
             {"prompt": "c", "H": 1},  # S unlabelled: skipped
             {"prompt": "d", "S": 0}]
  assert _moderation_examples(tmp_path, records) == {"line 1": {"sexual": "yes"},
                                                     "line 6": {"sexual": "no"}}
  assert _moderation_examples(tmp_path, records, "openai_moderation_hate") == {
      "line 1": {"hate": "no"}, "line 5": {"hate": "yes"}}
  with pytest.raises(base.BadRowError, match=r"samples-1680.jsonl.gz, line 7, field 'S'"):
    _moderation_examples(tmp_path, records + [{"prompt": "e", "S": 2}])
  with pytest.raises(base.BadRowError, match=r"samples-1680.jsonl.gz, line 7: not valid JSON"):
    _moderation_examples(tmp_path, records + ["{not json"])
  with pytest.raises(base.BadRowError, match=r"samples-1680.jsonl.gz, line 7, field 'prompt'"):
    _moderation_examples(tmp_path, records + [{"S": 1}])
  bad = records + [{"prompt": "e", "S": 2}, "{not json", {"S": 1}, {"prompt": "f", "S": 1}]
  assert _moderation_examples(tmp_path, bad, skip_bad_rows=True) == {
      "line 1": {"sexual": "yes"}, "line 6": {"sexual": "no"}, "line 10": {"sexual": "yes"}}
