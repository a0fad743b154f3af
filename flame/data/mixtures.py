"""seqio Mixtures of FLAMe training tasks: examples-proportional, temperature, explicit weights.

Mixing rates (pure functions below; seqio samples task i with probability rate_i / Σ_j rate_j):

  examples-proportional, capped   rate_i = min(n_i, cap)             FLAMe: cap = 2**16
  temperature T                   rate_i = min(n_i, cap) ** (1 / T)  T = 1 is the line above;
                                                                      large T tends to uniform
  explicit weights                rate_i = w_i                       from a weights file

n_i is task i's number of training examples: the ``train`` split of its TFDS dataset info
(position-swapped pairwise copies included, as they are training examples), prepared first if
needed. It is read lazily, when a mixture's rates are first asked for (building its dataset,
or `flame.data.stats`), so registering mixtures at import costs nothing.

Which tasks: every training task (`flame.data.tasks`) of one vocabulary, optionally narrowed
by capability, task kind, an explicit list and/or builders to leave out (all given filters
must hold). Held-out tasks (builders with ``HELD_OUT``) are never mixed in; naming one
explicitly is an error. The named mixtures below hold public human judgments only: the
generated tasks of ``flame_synthetic`` and ``flame_lexicon`` (label-flipped ones too, meant
for controlled tail-patch experiments) have their own mixtures; `register_mixture` selects from
every training builder unless told ``exclude_builders``.

Named mixtures, registered at import for every vocabulary v of `tasks.default_vocabularies()`,
each examples-proportional with the FLAMe cap of 2**16:

  flame_all_<v>             every training task from public data
  flame_synthetic_<v>       the generated controlled tasks (`flame.data.synthetic`)
  flame_lexicon_<v>         the banned-word tasks (`flame.data.lexicon`) with their neutral
                            synthetic tasks (`lexicon.ROLES`)
  flame_<capability>_<v>    e.g. flame_safety_bytes, flame_instruction_following_bytes
  flame_<kind>_<v>          e.g. flame_pairwise_bytes, flame_pointwise_smollm2

(a capability or kind without training tasks has no mixture). `register_mixture` (gin-
configurable, returns the name) adds others, e.g. from a weights file of tail-patch results::

  MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()
  mixtures.register_mixture.name = "flame_opt_bytes"
  mixtures.register_mixture.weights_file = "/path/to/weights.tsv"

Weights files: a JSON object ``{"<task>": <weight>, …}``, or text with one
``<task><TAB><weight>`` per line (blank lines, ``#`` comments and a ``task<TAB>weight`` header
are skipped). Tasks are FLAMe task names (``truthfulqa_truthfulness``, not the seqio name).
Weights are finite numbers ≥ 0; a task with weight 0 is left out. An unknown or held-out task,
a repeated task or a bad weight raises ValueError naming the file (and line) and the task.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import gin
import seqio

from flame.data import format, lexicon, sources
from flame.data import tasks as flame_tasks

DEFAULT_CAP = 2 ** 16
Specs = Mapping[str, tuple[Any, format.TaskSpec]]  # task name -> (builder class, spec)


# ---------------------------------------------------------------------------------------------
# Rates (pure).

SYNTHETIC_BUILDER = "flame_synthetic"
LEXICON_BUILDER = "flame_lexicon"
GENERATED_BUILDERS = (SYNTHETIC_BUILDER, LEXICON_BUILDER)


def capped_rate(n: int, cap: Optional[int] = DEFAULT_CAP, temperature: float = 1.0) -> float:
  """min(n, cap) ** (1 / temperature); `cap=None` means no cap."""
  if n < 0:
    raise ValueError(f"example count must be >= 0, got {n}")
  if cap is not None and cap <= 0:
    raise ValueError(f"cap must be positive or None, got {cap}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  capped = n if cap is None else min(n, cap)
  return float(capped) ** (1.0 / temperature)


def mixing_rates(counts: Mapping[str, int], cap: Optional[int] = DEFAULT_CAP,
                 temperature: float = 1.0) -> dict[str, float]:
  """Task -> `capped_rate` of its example count."""
  return {task: capped_rate(n, cap, temperature) for task, n in counts.items()}


def shares(rates: Mapping[str, float]) -> dict[str, float]:
  """Rates normalised to sum to 1 (each task's expected fraction of the mixture)."""
  total = math.fsum(rates.values())
  if not total > 0:
    raise ValueError(f"mixing rates must have a positive sum, got {dict(rates)}")
  return {task: rate / total for task, rate in rates.items()}


# ---------------------------------------------------------------------------------------------
# Task selection and weights files.


def _held_out(specs: Specs, task: str) -> bool:
  return bool(getattr(specs[task][0], "HELD_OUT", False))


def _enum_values(values: Optional[Iterable[Any]], enum_type) -> Optional[set]:
  if values is None:
    return None
  if isinstance(values, str):
    values = [values]
  out = set()
  for value in values:
    try:
      out.add(enum_type(value))
    except ValueError:
      raise ValueError(f"unknown {enum_type.__name__} {value!r}; expected one of "
                       f"{[e.value for e in enum_type]}") from None
  return out


def select_tasks(specs: Specs, tasks: Optional[Iterable[str]] = None,
                 capabilities: Optional[Iterable[str]] = None,
                 kinds: Optional[Iterable[str]] = None,
                 exclude_builders: Iterable[str] = ()) -> list[str]:
  """Sorted training task names passing every given filter (held-out tasks never).

  `exclude_builders`: builder names (e.g. ``flame_synthetic``) whose tasks are left out.
  """
  excluded = {exclude_builders} if isinstance(exclude_builders, str) else set(exclude_builders)
  wanted = None
  if tasks is not None:
    wanted = [tasks] if isinstance(tasks, str) else list(tasks)
    for task in wanted:
      if task not in specs:
        raise ValueError(f"unknown FLAMe task {task!r}; known: {sorted(specs)}")
      if _held_out(specs, task):
        raise ValueError(f"task {task!r} is held out for evaluation (builder "
                         f"{specs[task][0].name}); it cannot be part of a training mixture")
  capability_set = _enum_values(capabilities, format.Capability)
  kind_set = _enum_values(kinds, format.TaskKind)
  return sorted(task for task, (_, spec) in specs.items()
                if not _held_out(specs, task) and specs[task][0].name not in excluded
                and (wanted is None or task in wanted)
                and (capability_set is None or spec.capability in capability_set)
                and (kind_set is None or spec.kind in kind_set))


def _weight(text: Any, where: str) -> float:
  try:
    weight = float(text)
  except (TypeError, ValueError):
    weight = math.nan
  if isinstance(text, bool) or not math.isfinite(weight) or weight < 0:
    raise ValueError(f"{where}: weight {text!r} is not a finite number >= 0")
  return weight


def _weight_rows(path: str) -> list[tuple[str, str, Any]]:
  """(where, task, weight) per entry of a JSON or TSV weights file."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json") or text.lstrip().startswith(("{", "[")):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"weights file {path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
      raise ValueError(f"weights file {path}: expected a JSON object task -> weight, got "
                       f"{type(data).__name__}")
    return [(f"weights file {path}, task {task!r}", task, w) for task, w in data.items()]
  rows = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    parts = [p.strip() for p in line.split("\t")]
    if len(parts) != 2:
      raise ValueError(f"weights file {path}, line {number}: expected '<task>\\t<weight>', "
                       f"got {line!r}")
    if number == 1 and parts[0].lower() == "task":
      continue  # header
    rows.append((f"weights file {path}, line {number}, task {parts[0]!r}", parts[0], parts[1]))
  return rows


def read_weights(path: str, specs: Specs) -> dict[str, float]:
  """Task -> weight from a weights file (format in the module docstring); zeros dropped."""
  path = os.fspath(path)
  weights: dict[str, float] = {}
  for where, task, value in _weight_rows(path):
    if task not in specs:
      hint = (" (use the FLAMe task name, without 'flame_' and the vocabulary suffix)"
              if task.startswith("flame_") else "")
      raise ValueError(f"{where}: unknown task {task!r}{hint}")
    if _held_out(specs, task):
      raise ValueError(f"{where}: task {task!r} is held out for evaluation and cannot be "
                       "weighted into a training mixture")
    if task in weights:
      raise ValueError(f"{where}: task {task!r} appears twice")
    weights[task] = _weight(value, where)
  kept = {task: w for task, w in weights.items() if w > 0}
  if not kept:
    raise ValueError(f"weights file {path}: no task with a positive weight")
  return kept


# ---------------------------------------------------------------------------------------------
# Registration.


def _examples_rate(task: seqio.Task, cap: Optional[int], temperature: float,
                   scale: float = 1.0) -> float:
  return scale * capped_rate(flame_tasks.num_examples(task.name, "train"), cap, temperature)


def _kind_scales(kind_weights: Optional[Mapping[str, Any]], name: str) -> dict[str, float]:
  """`kind_weights` checked: task kind -> a positive multiplier of its tasks' rates."""
  if not kind_weights:
    return {}
  out = {}
  for kind, weight in dict(kind_weights).items():
    _enum_values([kind], format.TaskKind)
    out[kind] = _weight(weight, f"mixture {name!r}: kind_weights[{kind!r}]")
    if not out[kind] > 0:
      raise ValueError(f"mixture {name!r}: kind_weights[{kind!r}] must be positive, got {weight!r}")
  return out


_custom: dict[str, dict[str, Any]] = {}  # name -> register_mixture kwargs (rebuilt by register)


def _add(name: str, entries: Sequence[tuple[str, Any]]) -> str:
  if name in seqio.TaskRegistry.names():
    raise ValueError(f"mixture name {name!r} is already a seqio task name")
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(entries))
  return name


@gin.configurable
def register_mixture(name: str = gin.REQUIRED, vocabulary: str = "bytes",
                     tasks: Optional[Sequence[str]] = None,
                     capabilities: Optional[Sequence[str]] = None,
                     kinds: Optional[Sequence[str]] = None,
                     exclude_builders: Sequence[str] = (), cap: Optional[int] = DEFAULT_CAP,
                     temperature: float = 1.0, weights_file: Optional[str] = None,
                     data_dir: Optional[str] = None,
                     kind_weights: Optional[Mapping[str, float]] = None) -> str:
  """Registers (or replaces) mixture `name` over ``flame_<task>_<vocabulary>`` tasks.

  Either `weights_file` (rates = its weights) or the filters `tasks` / `capabilities` / `kinds`
  / `exclude_builders` (rates = min(n_i, cap) ** (1 / temperature)). Returns `name`, so gin
  can bind ``MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()``.
  `kind_weights`: task kind -> multiplier of its tasks' rates (e.g. ``{"pairwise": 7}`` puts
  half of the FLAMe collection's mixture on its pairwise tasks); not with `weights_file`.
  """
  kwargs = dict(name=name, vocabulary=vocabulary, tasks=tasks, capabilities=capabilities,
                kinds=kinds, exclude_builders=exclude_builders, cap=cap,
                temperature=temperature, weights_file=weights_file, data_dir=data_dir,
                kind_weights=kind_weights)
  scales = _kind_scales(kind_weights, name)
  flame_tasks.register(vocabularies=(vocabulary,), data_dir=data_dir)
  specs = sources.task_specs()
  if weights_file is not None:
    if (tasks is not None or capabilities is not None or kinds is not None or exclude_builders
        or scales):
      raise ValueError(f"mixture {name!r}: give either weights_file or task filters and "
                       f"kind_weights, not both")
    entries = [(flame_tasks.seqio_task_name(task, vocabulary), weight)
               for task, weight in read_weights(weights_file, specs).items()]
  else:
    chosen = select_tasks(specs, tasks, capabilities, kinds, exclude_builders)
    if not chosen:
      raise ValueError(f"mixture {name!r}: no training task has tasks={tasks}, "
                       f"capabilities={capabilities}, kinds={kinds}, "
                       f"exclude_builders={exclude_builders}")
    entries = [(flame_tasks.seqio_task_name(task, vocabulary),
                functools.partial(_examples_rate, cap=cap, temperature=temperature,
                                  scale=scales.get(specs[task][1].kind.value, 1.0)))
               for task in chosen]
  _add(name, entries)
  _custom[name] = kwargs
  return name


def remove_mixture(name: str) -> None:
  """Unregisters a `register_mixture` mixture (so `register` does not rebuild it)."""
  _custom.pop(name, None)
  seqio.MixtureRegistry.remove(name)


def named_mixtures(vocabulary: str, specs: Optional[Specs] = None) -> dict[str, list[str]]:
  """Name -> training tasks of the standard mixtures of one vocabulary (see module docstring)."""
  specs = sources.task_specs() if specs is None else specs
  public = functools.partial(select_tasks, specs, exclude_builders=GENERATED_BUILDERS)
  out = {f"flame_all_{vocabulary}": public()}
  for capability in format.Capability:
    out[f"flame_{capability.value}_{vocabulary}"] = public(capabilities=[capability])
  for kind in format.TaskKind:
    out[f"flame_{kind.value}_{vocabulary}"] = public(kinds=[kind])
  out[f"flame_synthetic_{vocabulary}"] = [
      task for task in select_tasks(specs) if specs[task][0].name == SYNTHETIC_BUILDER]
  out[f"flame_lexicon_{vocabulary}"] = [
      task for task in select_tasks(specs) if task in lexicon.ROLES]
  return {name: chosen for name, chosen in out.items() if chosen}


def register(vocabularies: Optional[Sequence[str]] = None,
             data_dir: Optional[str] = None) -> list[str]:
  """Registers the tasks, the named mixtures and again every `register_mixture` mixture.

  Call it after changing ``FLAME_TFDS_DIR`` (or with `data_dir`): mixtures hold Task objects,
  which `tasks.register` replaces when their data directory changes.
  """
  vocabularies = tuple(vocabularies or flame_tasks.default_vocabularies())
  flame_tasks.register(vocabularies, data_dir)
  rate = functools.partial(_examples_rate, cap=DEFAULT_CAP, temperature=1.0)
  names = []
  for vocabulary in vocabularies:
    for name, chosen in named_mixtures(vocabulary).items():
      names.append(_add(name, [(flame_tasks.seqio_task_name(t, vocabulary), rate)
                               for t in chosen]))
  for kwargs in list(_custom.values()):
    names.append(register_mixture(**dict(kwargs, data_dir=data_dir)))
  return names


def rates(mixture_or_task_name: str) -> dict[str, float]:
  """seqio task name -> the rate seqio uses for it (1.0 for a single task)."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Task):
    return {provider.name: 1.0}
  return {task.name: float(provider.get_rate(task)) for task in provider.tasks}


register()
