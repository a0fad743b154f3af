"""mergekit-style YAML merge configs, mapped onto `merging.merge.merge` arguments.

Accepted (a subset of mergekit's `MergeConfiguration`)::

  merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear,
                                # breadcrumbs, breadcrumbs_ties, della, della_linear, slerp
  base_model: /ckpt/base        # Orbax checkpoints (DIR or DIR/<step>) or HF safetensors folders
  models:
    - model: /ckpt/base         # the base may be listed; task-vector methods skip it
    - model: /ckpt/expert_a
      parameters: {weight: 1.0, density: 0.2}
  parameters: {normalize: true, lambda: 1.0}   # method-wide; also the per-model fallback
  dtype: bfloat16               # output dtype (`out_dtype` wins if both are given)
  random_seed: 0                # extension (mergekit's --random-seed): DARE/DELLA masks

Model paths are our Orbax checkpoints or Hugging Face safetensors folders (the ones mergekit
reads), mixed freely; relative ones are taken from the working directory (as mergekit does). Semantics follow mergekit: a per-model parameter is looked up in the
model's `parameters`, then in the top-level `parameters`, then takes mergekit's default
(density 1.0, gamma 0.01, epsilon 0.15); `weight` is required for every non-base model.
Method-wide defaults: normalize true for linear, ties and della, false otherwise; lambda 1.0;
rescale true for dare_* and della*, false otherwise. slerp needs exactly two models, one of
them base_model; t = 0 gives the base. linear averages the listed models (list the base with
a weight to include it). Differences (see `merging.methods` for the arithmetic): values must
be scalars (no gradients or filters); breadcrumbs' gamma and della's epsilon must be equal for
all models; rescale is fixed per method except for dare_linear; `int8_mask` is ignored with a
warning; magnitude cuts (ties, breadcrumbs*) count entries as mergekit does, int(density·N)
and for ties at least one (`count: floor`; gin configs keep the TIES paper's ceil), but keep
every entry tied at the threshold where mergekit's argsort keeps exactly that many (exact float
ties at the cut are rare in fine-tuned weights); DELLA ranks over the whole tensor (mergekit: per output row);
computation is always float32 (mergekit computes in `dtype`); random masks come from JAX, not
torch, so DARE/DELLA masks differ from mergekit's (same distribution).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import yaml

_REQUIRED = object()
_TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
              "random_seed", "tokenizer_source", "chat_template")
_UNSUPPORTED = {
    "slices": "layer slicing (frankenmerges) is not supported; list whole models under models",
    "modules": "per-module merges are not supported",
    "tokenizer": "tokenizer surgery is not supported; our checkpoints must share one vocabulary",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class _Method:
  model_params: dict[str, Any]  # per-model parameter -> mergekit default (or _REQUIRED)
  global_params: dict[str, Any]  # method-wide parameter -> mergekit default
  task_vectors: bool = True  # base_model required and skipped among the models


def _gta(normalize: bool, rescale: bool, **model_params) -> _Method:
  return _Method(dict(weight=_REQUIRED, density=1.0, **model_params),
                 {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False})


METHODS = {
    "linear": _Method({"weight": _REQUIRED}, {"normalize": True}, task_vectors=False),
    "slerp": _Method({}, {"t": _REQUIRED}, task_vectors=False),
    "task_arithmetic": _gta(normalize=False, rescale=False),
    "ties": _gta(normalize=True, rescale=False),
    "dare_ties": _gta(normalize=False, rescale=True),
    "dare_linear": _gta(normalize=False, rescale=True),
    "breadcrumbs": _gta(normalize=False, rescale=False, gamma=0.01),
    "breadcrumbs_ties": _gta(normalize=False, rescale=False, gamma=0.01),
    "della": _gta(normalize=True, rescale=True, epsilon=0.15),
    "della_linear": _gta(normalize=False, rescale=True, epsilon=0.15),
}
# rescale is fixed by merging.methods for these (dare_linear alone takes it as a setting).
_FIXED_RESCALE = {"dare_ties": True, "della": True, "della_linear": True, "ties": False,
                  "breadcrumbs": False, "breadcrumbs_ties": False}


# Magnitude-trimming methods, whose kept count follows mergekit's int(density·N) here.
_FLOOR_COUNT = ("ties", "breadcrumbs", "breadcrumbs_ties")


class ConfigError(ValueError):
  """A mergekit YAML config that this tool cannot read; the message names the file and key."""


def _scalar(value: Any, where: str, path: str) -> Any:
  if isinstance(value, bool) or isinstance(value, (int, float)):
    return value
  raise ConfigError(f"{path}: {where} = {value!r}: give a number or boolean; mergekit "
                    "gradients and filters are not supported")


def _same_path(a: str, b: str) -> bool:
  return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def load(path: str) -> dict[str, Any]:
  """Reads a mergekit YAML file; returns keyword arguments of `merging.merge.merge`
  (base, experts, method, weights, method_params, seed, out_dtype, extra_meta)."""
  if not os.path.isfile(path):
    raise ConfigError(f"--config={path}: no such file" + (" (a folder)" if os.path.isdir(path)
                                                          else ""))
  with open(path, encoding="utf-8") as f:
    try:
      raw = yaml.safe_load(f)
    except yaml.YAMLError as e:  # its message names the line and column
      raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
  return from_dict(raw, path)


def from_dict(raw: Any, path: str = "<config>") -> dict[str, Any]:
  """As `load`, for an already parsed YAML mapping (`path` is used in messages)."""
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a YAML mapping at the top level")
  for key in raw:
    if key in _UNSUPPORTED:
      raise ConfigError(f"{path}: {key}: {_UNSUPPORTED[key]}")
    if key not in _TOP_LEVEL:
      raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(_TOP_LEVEL)}")
  name = raw.get("merge_method")
  if name not in METHODS:
    raise ConfigError(f"{path}: merge_method {name!r} is not supported; use one of "
                      f"{', '.join(METHODS)}")
  method = METHODS[name]
  source = raw.get("tokenizer_source")
  if source not in (None, "base"):
    raise ConfigError(f"{path}: tokenizer_source {source!r} is not supported (only 'base': "
                      "all checkpoints must share the base's vocabulary)")
  if raw.get("chat_template") is not None:
    logging.warning("%s: chat_template does not affect the merged tensors; ignored", path)

  top = raw.get("parameters") or {}
  if not isinstance(top, dict):
    raise ConfigError(f"{path}: parameters must be a mapping")
  known = set(method.model_params) | set(method.global_params)
  for key in top:
    if key not in known:
      raise ConfigError(f"{path}: unknown key {key!r} in parameters; {name} takes "
                        f"{', '.join(sorted(known))}")
  models = _models(raw, path, name, method)
  base = raw.get("base_model")
  if base is not None and not isinstance(base, str):
    raise ConfigError(f"{path}: base_model must be a checkpoint path, got {base!r}")

  def global_param(key: str) -> Any:
    if key in top:
      return _scalar(top[key], f"parameters.{key}", path)
    default = method.global_params[key]
    if default is _REQUIRED:
      raise ConfigError(f"{path}: {name} needs parameters.{key}")
    return default

  if name == "slerp":
    if len(models) != 2 or base is None or not any(_same_path(m, base) for m, _ in models):
      raise ConfigError(f"{path}: slerp needs exactly two models, one of them base_model")
    experts = [m for m, _ in models if not _same_path(m, base)]
    if len(experts) != 1:
      raise ConfigError(f"{path}: slerp's two models must differ")
    return _result(raw, path, base, experts, name, None, {"t": float(global_param("t"))})

  if method.task_vectors:
    if base is None:
      raise ConfigError(f"{path}: {name} needs base_model (task vectors are θ_i − θ_base)")
    entries = [(m, p) for m, p in models if not _same_path(m, base)]
  else:
    if base is not None and not any(_same_path(m, base) for m, _ in models):
      raise ConfigError(f"{path}: linear averages the listed models only; list base_model "
                        "under models with a weight, or drop base_model")
    entries = models
  if not entries:
    raise ConfigError(f"{path}: no models to merge besides base_model")

  def model_param(key: str, index: int, params: dict) -> Any:
    if key in params:
      return _scalar(params[key], f"models[{index}].parameters.{key}", path)
    if key in top:
      return _scalar(top[key], f"parameters.{key}", path)
    default = method.model_params[key]
    if default is _REQUIRED:
      raise ConfigError(f"{path}: models[{index}] ({entries[index][0]}) needs parameters.{key}")
    return default

  per_model = {key: [model_param(key, i, p) for i, (_, p) in enumerate(entries)]
               for key in method.model_params}
  weights = [float(w) for w in per_model["weight"]]
  params = {"normalize": bool(global_param("normalize"))}
  if name == "linear":
    return _result(raw, path, base, [m for m, _ in entries], name, weights, params)

  params["lam"] = float(global_param("lambda"))
  if global_param("int8_mask"):
    logging.warning("%s: int8_mask only changes mergekit's mask dtype; ignored", path)
  rescale = bool(global_param("rescale"))
  if name == "dare_linear":
    params["rescale"] = rescale
  elif name in _FIXED_RESCALE and rescale != _FIXED_RESCALE[name]:
    raise ConfigError(f"{path}: parameters.rescale: {rescale} is not supported for {name} "
                      f"(merging.methods.{name} {'always' if not rescale else 'never'} rescales)")
  densities = [float(d) for d in per_model["density"]]
  if name == "task_arithmetic":
    if any(d != 1.0 for d in densities):
      logging.warning("%s: density has no effect on task_arithmetic (as in mergekit)", path)
  else:
    params["density"] = densities[0] if len(set(densities)) == 1 else densities
  if name in _FLOOR_COUNT:
    params["count"] = "floor"  # mergekit keeps int(density·N) entries, not ceil
  for key, ours in (("gamma", "gamma"), ("epsilon", "epsilon")):
    if key in per_model:
      values = {float(v) for v in per_model[key]}
      if len(values) != 1:
        raise ConfigError(f"{path}: {key} must be the same for every model, got "
                          f"{per_model[key]}")
      params[ours] = values.pop()
  return _result(raw, path, base, [m for m, _ in entries], name, weights, params)


def _models(raw: dict, path: str, name: str, method: _Method) -> list[tuple[str, dict]]:
  models = raw.get("models")
  if not isinstance(models, list) or not models:
    raise ConfigError(f"{path}: models must be a non-empty list of {{model: PATH}} entries")
  result = []
  for i, entry in enumerate(models):
    if isinstance(entry, str):
      entry = {"model": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
      raise ConfigError(f"{path}: models[{i}] must be a mapping with a model path")
    for key in entry:
      if key not in ("model", "parameters"):
        raise ConfigError(f"{path}: unknown key {key!r} in models[{i}]")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
      raise ConfigError(f"{path}: models[{i}].parameters must be a mapping")
    for key in params:
      if key not in method.model_params:
        where = ("is method-wide; move it to the top-level parameters"
                 if key in method.global_params else "is unknown")
        raise ConfigError(f"{path}: models[{i}].parameters.{key} {where} ({name} takes "
                          f"per model: {', '.join(method.model_params) or 'nothing'})")
    result.append((entry["model"], params))
  return result


def _dtype(raw: dict, path: str) -> Optional[str]:
  for key in ("out_dtype", "dtype"):
    value = raw.get(key)
    if value is not None:
      if value not in DTYPES:
        raise ConfigError(f"{path}: {key} {value!r} is not supported; use one of "
                          f"{', '.join(DTYPES)}")
      return value
  return None


def _result(raw, path, base, experts, name, weights, params) -> dict[str, Any]:
  seed = raw.get("random_seed", 0)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ConfigError(f"{path}: random_seed must be an integer, got {seed!r}")
  return {"base": base, "experts": list(experts), "method": name, "weights": weights,
          "method_params": params, "seed": seed, "out_dtype": _dtype(raw, path),
          "extra_meta": {"mergekit_config": raw, "config_file": os.path.abspath(path)
                         if os.path.exists(path) else path}}
