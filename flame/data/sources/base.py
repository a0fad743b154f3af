"""The TFDS builder every FLAMe source shares: files → rows → unified examples → splits.

A source is a `SourceBuilder` subclass for one dataset family (e.g. UniEval's ratings). It
declares

  FILES   the registered data files it reads (`flame.data.download.FILES` names: upstream
          repository, commit, path, sha256, license);
  TASKS   the FLAMe tasks it yields (`format.TaskSpec`: dataset x criterion, with task kind
          and capability), one TFDS builder config per task;
  rows()  how to read its files into `Row`s (file, line or record number, parsed data);
  convert()  how one row becomes `format.Example`s (of any of its tasks).

and gets from here: TFDS's download / caching / preparation into sharded record files with
versioned releases; the file lookup (mirror folder first, e.g. ``FLAME_DATA_MIRROR`` =
../shared/data/raw offline, then the cache, then the upstream address through TFDS's download
manager, sha256-checked either way); validation of every example against its spec; bad-row
handling; deterministic splits; position-swap augmentation for pairwise training examples.

Features of every prepared example (all text): ``task``, ``example_id``, ``inputs`` and
``targets`` (the full rendering of `format.render_input` / `render_target`, untruncated; seqio
tasks re-render from the fields within a token budget), ``context`` and ``outputs`` (the
fields, as JSON objects).

Splits. Training sources: ``train`` and ``validation``, by a hash of the example's `group`
(the source row's stable id, shared by all tasks and both positions of that row), so the same
row lands in the same split for every task, run and machine. ``VALIDATION_PERCENT`` of groups
go to validation. Held-out sources (`HELD_OUT = True`, the RewardBench-style suite): ``test``
only, never mixed into training. Decontamination: before splitting, training sources drop every
example whose prompt is in the held-out suite (see `flame.data.decontamination`), counted by
held-out task in ``info.metadata["decontaminated"]``. Sources that generate their examples have
``FILES = ()``.

Bad rows: a malformed line, a missing field or a label outside the spec's set raises
`BadRowError` naming the file, the line (or record) and the field. With
``skip_bad_rows=True`` (builder kwarg, or ``FLAME_DATA_SKIP_BAD_ROWS=1``) such rows are
skipped and counted instead; the counts are logged and stored in the dataset info
(``info.metadata["skipped_rows"]``).
"""
from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence

import tensorflow_datasets as tfds

from flame.data import decontamination, download, format

SKIP_BAD_ROWS_ENV = "FLAME_DATA_SKIP_BAD_ROWS"
TFDS_DIR_ENV = "FLAME_TFDS_DIR"
RELEASE = "1.0.0"


class BadRowError(ValueError):
  """A source row that cannot be converted: names the file, line/record and field."""

  def __init__(self, file: str, position: str, field: Optional[str], message: str):
    self.file, self.position, self.field = file, position, field
    where = f"{file}, {position}" + (f", field {field!r}" if field else "")
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Row:
  """One source record. `position` is "line N" (1-based) or "record N" (0-based index)."""
  file: str
  position: str
  data: Any

  def error(self, field: Optional[str], message: str) -> BadRowError:
    return BadRowError(self.file, self.position, field, message)

  def get(self, name: str, kind: type | tuple[type, ...] = str, *, nonempty: bool = True,
          choices: Optional[Iterable[Any]] = None) -> Any:
    """`data[name]`, checked: present, of type `kind`, non-empty (strings), in `choices`."""
    if not isinstance(self.data, Mapping):
      raise self.error(None, f"expected an object with field {name!r}, got "
                       f"{type(self.data).__name__}")
    if name not in self.data:
      raise self.error(name, f"missing; the row has fields {sorted(self.data)}")
    value = self.data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
      raise self.error(name, f"expected {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    if nonempty and isinstance(value, str) and not value.strip():
      raise self.error(name, "is empty")
    if choices is not None and value not in list(choices):
      raise self.error(name, f"is {value!r}, expected one of {list(choices)}")
    return value


# ---------------------------------------------------------------------------------------------
# Readers: each yields Rows; a line or record that does not parse raises BadRowError.


@dataclasses.dataclass(frozen=True)
class Unparsed:
  """The data of a row whose text did not parse (see `read_jsonl`'s `keep_unparsed`)."""
  message: str


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8", newline="")


def read_jsonl(path: str, label: Optional[str] = None, keep_unparsed: bool = False
               ) -> Iterator[Row]:
  """One JSON value per non-blank line (``.gz`` read transparently).

  keep_unparsed: yield a line that is not valid JSON as a Row whose data is `Unparsed`
    (`SourceBuilder.examples` raises or skips it like any bad row) instead of raising here,
    which would end the generator and so lose the lines after it under ``skip_bad_rows``.
  """
  label = label or os.path.basename(path)
  with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        data = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = (f"not UTF-8 (byte {e.start + 1} of the line)"
                   if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e})")
        if keep_unparsed:
          yield Row(label, f"line {number}", Unparsed(problem))
          continue
        raise BadRowError(label, f"line {number}", None, problem) from e
      yield Row(label, f"line {number}", data)


def read_json_records(path: str, label: Optional[str] = None) -> Iterator[Row]:
  """A JSON list (records numbered from 0) or object (records named by key)."""
  label = label or os.path.basename(path)
  with _open_text(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise BadRowError(label, f"line {e.lineno}", None, f"not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
      raise BadRowError(label, "the file", None, f"not UTF-8 ({e.reason})") from e
  if isinstance(data, list):
    for index, item in enumerate(data):
      yield Row(label, f"record {index}", item)
  elif isinstance(data, dict):
    for key, item in data.items():
      yield Row(label, f"record {key!r}", item)
  else:
    raise BadRowError(label, "line 1", None, f"expected a JSON list or object, got "
                      f"{type(data).__name__}")


def read_delimited(path: str, delimiter: str = ",", label: Optional[str] = None
                   ) -> Iterator[Row]:
  """CSV/TSV with a header row; rows as dicts; position is the row's first line number."""
  label = label or os.path.basename(path)
  with _open_text(path) as f:
    reader = csv.DictReader(f, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = reader.fieldnames or []
    line = reader.line_num + 1
    for data in reader:
      if None in data or any(value is None for value in data.values()):
        raise BadRowError(label, f"line {line}", None,
                          f"expected {len(header)} columns {header}")
      yield Row(label, f"line {line}", data)
      line = reader.line_num + 1


# ---------------------------------------------------------------------------------------------
# Splits.


def bucket(group: str) -> int:
  """A stable number in [0, 100) from a row id (first 8 bytes of its sha256)."""
  return int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") % 100


def split_of(group: str, validation_percent: int) -> str:
  return "validation" if bucket(group) < validation_percent else "train"


def chosen_first(row_id: str) -> bool:
  """Whether a chosen/rejected pair shows the chosen response in the first position (A).

  A stable hash of the row id (salted, so independent of the split bucket): about half of a
  source's pairs get each answer label, identically on every run and machine.
  """
  return hashlib.sha256(f"order:{row_id}".encode("utf-8")).digest()[0] % 2 == 0


@dataclasses.dataclass(frozen=True)
class Converted:
  """An example and the id of the source row it came from (the split unit)."""
  example: format.Example
  group: str


def features_of(spec: format.TaskSpec, example: format.Example) -> dict[str, str]:
  return {"task": example.task, "example_id": example.example_id,
          "inputs": format.render_input(spec, example),
          "targets": format.render_target(spec, example),
          "context": json.dumps(dict(example.context), ensure_ascii=False),
          "outputs": json.dumps(dict(example.outputs), ensure_ascii=False)}


def example_from_features(features: Mapping[str, Any]) -> format.Example:
  """Inverse of `features_of` (strings or bytes, e.g. from `tfds.as_numpy`)."""
  text = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in features.items()}
  return format.Example(task=text["task"], example_id=text["example_id"],
                        context=json.loads(text["context"]),
                        outputs=json.loads(text["outputs"]))


# ---------------------------------------------------------------------------------------------
# The builder.


class TaskConfig(tfds.core.BuilderConfig):
  """One builder config per FLAMe task; `spec` describes it."""

  def __init__(self, spec: format.TaskSpec):
    # No version of its own: the builder's VERSION names the release of every config.
    super().__init__(name=spec.name,
                     description=f"{spec.kind.value}, {spec.capability.value}: {spec.title}")
    self.spec = spec


def default_data_dir() -> str:
  """Where prepared datasets live: ``FLAME_TFDS_DIR``, else ``~/.cache/flame/tfds`` (next to
  the downloaded files, not in TFDS's ``~/tensorflow_datasets``)."""
  return os.environ.get(TFDS_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                      "flame", "tfds")


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS's progress bars, its "Downloading and preparing dataset Unknown size" and
  "downloaded and prepared" prints and its absl notices kept off the console."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.enable_progress_bar()
    absl.setLevel(level)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """`builder.download_and_prepare()` with one log line instead of TFDS's console output;
  nothing when the dataset is already prepared. Returns the builder to read it with: a fresh
  one when another process (a second seed started beside this one) prepared the same
  dataset first and TFDS could not move this one's copy into place."""
  if builder.is_prepared():
    return builder
  logging.info("preparing %s in %s", builder.info.full_name, builder.data_dir)
  try:
    with _quiet_tfds():
      builder.download_and_prepare()
  except FileExistsError:
    theirs = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
    if not theirs.is_prepared():
      raise
    logging.info("%s was prepared by another process meanwhile", builder.info.full_name)
    return theirs
  return builder


class SourceBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Base of every FLAMe source (see the module docstring); subclasses are registered TFDS
  builders named after the class (e.g. ``FlameUnieval`` -> ``flame_unieval``)."""

  VERSION = tfds.core.Version(RELEASE)
  RELEASE_NOTES = {RELEASE: "First release: unified FLAMe format, hash splits."}
  FILES: ClassVar[tuple[str, ...]] = ()
  TASKS: ClassVar[tuple[format.TaskSpec, ...]] = ()
  HELD_OUT: ClassVar[bool] = False
  VALIDATION_PERCENT: ClassVar[int] = 10
  SWAP_AUGMENT: ClassVar[bool] = True  # Pairwise train examples in both response orders.
  DESCRIPTION: ClassVar[str] = ""
  CITATION: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str] = ""

  def __init_subclass__(cls, **kwargs):
    if cls.TASKS:
      cls.BUILDER_CONFIGS = [TaskConfig(spec) for spec in cls.TASKS]
    super().__init_subclass__(**kwargs)

  def __init__(self, *, skip_bad_rows: Optional[bool] = None, **kwargs):
    if skip_bad_rows is None:
      skip_bad_rows = os.environ.get(SKIP_BAD_ROWS_ENV, "") not in ("", "0", "false")
    self.skip_bad_rows = bool(skip_bad_rows)
    self.skipped_rows: dict[str, int] = {}
    self.decontaminated: dict[str, int] = {}
    kwargs.setdefault("data_dir", default_data_dir())
    super().__init__(**kwargs)

  # -- What a subclass provides. ---------------------------------------------------------------

  @abc.abstractmethod
  def rows(self, paths: Mapping[str, str]) -> Iterator[Row]:
    """The source's records; `paths` maps each name in FILES to a verified local path."""

  @abc.abstractmethod
  def convert(self, row: Row) -> Iterable[Converted]:
    """The examples (of any of TASKS) in one row; raise `row.error(field, message)`."""

  # -- TFDS. -----------------------------------------------------------------------------------

  @classmethod
  def remote_files(cls) -> list[download.RemoteFile]:
    return [download.FILES[name] for name in cls.FILES]

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    """Checksums of our upstream files, so TFDS verifies what it downloads."""
    return {f.url: tfds.core.download.checksums.UrlInfo(
        size=f.size, checksum=f.sha256, filename=os.path.basename(f.path))
            for f in cls.remote_files()}

  @property
  def spec(self) -> format.TaskSpec:
    return self.builder_config.spec

  def upstream(self) -> list[dict[str, Any]]:
    """Where the data comes from (dataset info metadata; each entry has a ``license``)."""
    return [{"url": f.url, "repo": f.repo, "commit": f.commit, "path": f.path,
             "sha256": f.sha256, "license": f.license} for f in self.remote_files()]

  def _info(self) -> tfds.core.DatasetInfo:
    upstream = self.upstream()
    spec = self.spec
    metadata = tfds.core.MetadataDict(
        upstream=upstream, held_out=self.HELD_OUT, skipped_rows=self.skipped_rows,
        decontaminated=self.decontaminated,
        task={"name": spec.name, "kind": spec.kind.value, "capability": spec.capability.value,
              "title": spec.title, "labels": list(spec.labels),
              "scale": list(spec.scale) if spec.scale else None})
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({k: text for k in (
        "task", "example_id", "inputs", "targets", "context", "outputs")})
    licenses = sorted({entry["license"] for entry in upstream})
    description = (f"{self.DESCRIPTION.strip()}\n\nTask {spec.name}: {spec.title}. "
                   f"{spec.description}\n\nLicense: {', '.join(licenses)}.")
    info = self.dataset_info_from_configs(
        description=description, features=features, homepage=self.HOMEPAGE,
        citation=self.CITATION, metadata=metadata, license=", ".join(licenses))
    # TFDS looks for an unprepared dataset's info in its GCS bucket through a fresh
    # mkdtemp("tfds") folder that it never removes (one empty /tmp/tmp…tfds per builder).
    # These datasets are never in that bucket.
    info.initialize_from_bucket = lambda: None
    return info

  def _local_files(self, dl_manager) -> dict[str, str]:
    def fetch(remote: download.RemoteFile, _cache_path: str) -> str:
      return os.fspath(dl_manager.download(remote.url))
    return {name: download.resolve(name, fetch=fetch) for name in self.FILES}

  def examples(self, paths: Mapping[str, str]) -> list[Converted]:
    """Every valid example of this config's task, bad rows raised or skipped and counted."""
    spec, out = self.spec, []
    self.skipped_rows.clear()
    rows = self.rows(paths)
    while True:
      try:
        row = next(rows)
        if isinstance(row.data, Unparsed):
          raise row.error(None, row.data.message)
        for item in self.convert(row):
          if item.example.task != spec.name:
            continue
          try:
            format.validate(item.example, spec)
          except ValueError as e:
            raise row.error(None, str(e)) from e
          out.append(item)
      except StopIteration:
        break
      except BadRowError as e:
        if not self.skip_bad_rows:
          raise
        key = f"{e.file}: {e.field or 'row'}"
        self.skipped_rows[key] = self.skipped_rows.get(key, 0) + 1
        logging.warning("skipping bad row: %s", e)
    if self.skipped_rows:
      logging.warning("%s: skipped %d bad rows: %s", spec.name,
                      sum(self.skipped_rows.values()), self.skipped_rows)
    return out

  def decontaminate(self, items: Sequence[Converted]) -> list[Converted]:
    """`items` less those whose prompt is in the held-out suite (`flame.data.decontamination`),
    counted by held-out task in `self.decontaminated` (``info.metadata["decontaminated"]``)."""
    kept, dropped = decontamination.drop_heldout(items, self.spec, heldout_index())
    self.decontaminated.clear()
    self.decontaminated.update(dropped)
    if dropped:
      logging.warning("%s: dropped %d examples whose prompt is held out: %s", self.spec.name,
                      sum(dropped.values()), dropped)
    return kept

  def split_examples(self, items: Sequence[Converted]) -> dict[str, list[format.Example]]:
    if self.HELD_OUT:
      return {"test": [item.example for item in items]}
    splits = {"train": [], "validation": []}
    for item in items:
      split = split_of(item.group, self.VALIDATION_PERCENT)
      splits[split].append(item.example)
      if (split == "train" and self.SWAP_AUGMENT and self.spec.kind == format.TaskKind.PAIRWISE
          and len(self.spec.output_fields) == 1):
        splits[split].append(format.swap_positions(self.spec, item.example))
    return splits

  def _split_generators(self, dl_manager):
    items = self.examples(self._local_files(dl_manager))
    if not self.HELD_OUT:
      items = self.decontaminate(items)
    if not items:
      raise ValueError(f"{self.name}/{self.spec.name}: no examples in {list(self.FILES)}")
    return {split: self._generate_examples(examples)
            for split, examples in self.split_examples(items).items()
            if examples}  # TFDS cannot write an empty split (a tiny user file).

  def _generate_examples(self, examples: Sequence[format.Example]):
    seen = set()
    for example in examples:
      if example.example_id in seen:
        raise ValueError(f"{self.name}/{self.spec.name}: duplicate example id "
                         f"{example.example_id!r}")
      seen.add(example.example_id)
      yield example.example_id, features_of(self.spec, example)


def registered_builders() -> list[type[SourceBuilder]]:
  """Every concrete source builder defined so far (importing `flame.data.sources` defines them
  all), sorted by name."""
  found, stack = [], list(SourceBuilder.__subclasses__())
  while stack:
    cls = stack.pop()
    stack.extend(cls.__subclasses__())
    if cls.TASKS and not getattr(cls, "__abstractmethods__", None):
      found.append(cls)
  return sorted(set(found), key=lambda cls: cls.name)


def heldout_examples() -> list[tuple[format.TaskSpec, format.Example]]:
  """Every example of every held-out builder config, converted from its files."""
  out = []
  with tempfile.TemporaryDirectory() as data_dir:
    for cls in registered_builders():
      if not cls.HELD_OUT:
        continue
      paths = {name: download.resolve(name) for name in cls.FILES}
      for spec in cls.TASKS:
        builder = cls(config=spec.name, data_dir=data_dir)
        out += [(spec, item.example) for item in builder.examples(paths)]
  return out


@functools.lru_cache(maxsize=None)
def heldout_index() -> decontamination.HeldoutIndex:
  """The held-out suite's fingerprints (`flame.data.decontamination`), built once per process."""
  return decontamination.build_index(heldout_examples())
