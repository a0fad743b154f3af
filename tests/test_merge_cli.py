"""merging.merge entry point: gin flags, mergekit YAML configs (vs a NumPy mergekit reference)."""
import json
import logging
import os

import gin
import jax
import ml_dtypes
import numpy as np
import pytest
import yaml

from flame import cli, gin_utils, optimizers, partitioning, trainer as trainer_lib
from flame.checkpoints import imported, manager
from flame.models import decoder
from merging import io, lineage, merge as merge_lib, mergekit_config

SHAPES = {("embed", "embedding"): (64, 16), ("layers_0", "mlp", "kernel"): (64, 16),
          ("layers_0", "norm", "scale"): (16,)}


def save(directory, flat, meta=None):
  checkpointer = manager.Checkpointer(directory, async_save=False)
  checkpointer.save(0, {"params": imported.unflatten(flat)}, meta or {}, force=True)
  checkpointer.wait()
  checkpointer.close()
  return str(directory)


def restore(path, like):
  abstract = imported.unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                 for k, v in like.items()})
  return {k: np.asarray(v) for k, v in imported.flatten(
      jax.device_get(manager.restore_params_from(str(path), abstract))).items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_family")
  rng = np.random.default_rng(5)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  experts = [{k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in base.items()} for _ in range(2)]
  return {"root": root, "base": save(root / "base", base, {"config": {"class": "Tiny"}}),
          "experts": [save(root / f"expert{i}", e) for i, e in enumerate(experts)],
          "base_params": base, "expert_params": experts}


# NumPy float64 versions of mergekit's tensor functions (mergekit/sparsify.py,
# generalized_task_arithmetic.py, linear.py, slerp.py), written from their semantics.


def mk_magnitude(delta, density, gamma=None):
  """Keep the int(density·N) largest |δ|; with gamma, first drop the int(gamma·N) largest."""
  if density >= 1:
    return delta
  n = delta.size
  order = np.argsort(np.abs(delta).reshape(-1), kind="stable")  # ascending
  keep = int(density * n)
  top = 0 if gamma is None else int(gamma * n)
  bottom = n - keep - top
  if bottom < 0:
    top, bottom = top + bottom, 0
  mask = np.zeros(n)
  mask[order[bottom:n - top]] = 1
  return delta * mask.reshape(delta.shape)


def mk_gta(base, experts, weights, *, density=1.0, gamma=None, consensus=False,
           normalize=False, lam=1.0):
  deltas = np.stack([mk_magnitude(e - base, density, gamma) for e in experts])
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
  weighted = deltas * w
  if consensus:
    majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == majority
    mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
    divisor[divisor == 0] = 1
  else:
    mixed, divisor = weighted.sum(0), w.sum(0)
    divisor = np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
  if normalize:
    mixed = mixed / divisor
  return base + lam * mixed


def mk_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
  u0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > eps else v0
  u1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > eps else v1
  dot = np.sum(u0 * u1)
  if abs(dot) > dot_threshold:
    return (1 - t) * v0 + t * v1
  theta = np.arccos(dot)
  return (np.sin(theta - theta * t) * v0 + np.sin(theta * t) * v1) / np.sin(theta)


def f64(flat):
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def run_yaml(family, tmp_path, config, name="merge.yml"):
  path = tmp_path / name
  path.write_text(yaml.safe_dump(config))
  out = tmp_path / "out"
  merge_lib.main(["--config", str(path), "--output_dir", str(out), "--no_progress_bar"])
  return out


def test_yaml_ties_with_base_among_models_matches_mergekit(family, tmp_path):
  config = {"merge_method": "ties", "base_model": family["base"],
            "models": [{"model": family["base"]},
                       {"model": family["experts"][0], "parameters": {"weight": 1.0}},
                       {"model": family["experts"][1],
                        "parameters": {"weight": 0.5, "density": 0.25}}],
            "parameters": {"density": 0.25, "lambda": 1.5, "int8_mask": True},
            "dtype": "float32"}
  out = run_yaml(family, tmp_path, config)
  got = restore(out, family["base_params"])
  base, experts = f64(family["base_params"]), [f64(e) for e in family["expert_params"]]
  for key in SHAPES:
    want = mk_gta(base[key], [e[key] for e in experts], [1.0, 0.5], density=0.25,
                  consensus=True, normalize=True, lam=1.5)
    np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=str(key))
  meta = manager.Checkpointer(out, read_only=True).restore_meta()
  assert meta["config"] == {"class": "Tiny"}
  assert meta["merge"]["mergekit_config"]["merge_method"] == "ties"
  assert meta["merge"]["params"] == {"normalize": True, "lam": 1.5, "density": 0.25,
                                    "count": "floor"}


@pytest.mark.parametrize("case", ["task_arithmetic", "linear_bf16", "breadcrumbs_ties",
                                  "slerp_base_second", "ties_floor_count",
                                  "breadcrumbs_floor_count"])
def test_yaml_methods_match_mergekit(family, tmp_path, case):
  base, experts = f64(family["base_params"]), [f64(e) for e in family["expert_params"]]
  e0, e1 = family["experts"]
  dtype = np.float32
  if case == "task_arithmetic":
    config = {"merge_method": "task_arithmetic", "base_model": family["base"],
              "models": [{"model": e0, "parameters": {"weight": 0.3}},
                         {"model": e1, "parameters": {"weight": 0.7}}],
              "parameters": {"lambda": 0.8}}
    want = {k: mk_gta(base[k], [e[k] for e in experts], [0.3, 0.7], lam=0.8) for k in SHAPES}
  elif case == "linear_bf16":
    config = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": family["base"], "parameters": {"weight": 1.0}},
                         {"model": e0, "parameters": {"weight": 2.0}}]}
    want = {k: (base[k] + 2 * experts[0][k]) / 3 for k in SHAPES}
    dtype = ml_dtypes.bfloat16
  elif case == "breadcrumbs_ties":
    config = {"merge_method": "breadcrumbs_ties", "base_model": family["base"],
              "models": [{"model": e0, "parameters": {"weight": 1.0}},
                         {"model": e1, "parameters": {"weight": 2.0}}],
              "parameters": {"density": 0.5, "gamma": 0.125}}
    want = {k: mk_gta(base[k], [e[k] for e in experts], [1.0, 2.0], density=0.5, gamma=0.125,
                      consensus=True) for k in SHAPES}
  elif case.endswith("_floor_count"):
    # d·N is not whole here (0.3 · 1024 = 307.2, 0.3 · 16 = 4.8, 0.05 · 16 = 0.8): mergekit
    # keeps int(d·N) entries, where the gin methods' ceil would keep one more.
    method = case[:-len("_floor_count")]
    gamma = 0.05 if method == "breadcrumbs" else None
    config = {"merge_method": method, "base_model": family["base"],
              "models": [{"model": e0, "parameters": {"weight": 1.0}},
                         {"model": e1, "parameters": {"weight": 0.5}}],
              "parameters": {"density": 0.3, **({"gamma": gamma} if gamma else {})}}
    want = {k: mk_gta(base[k], [e[k] for e in experts], [1.0, 0.5], density=0.3, gamma=gamma,
                      consensus=method == "ties", normalize=method == "ties") for k in SHAPES}
  else:
    config = {"merge_method": "slerp", "base_model": family["base"],
              "models": [{"model": e1}, {"model": family["base"]}], "parameters": {"t": 0.3}}
    want = {k: mk_slerp(0.3, base[k], experts[1][k]) for k in SHAPES}
  out = run_yaml(family, tmp_path, config)
  got = restore(out, {k: v.astype(dtype) for k, v in family["base_params"].items()})
  for key in SHAPES:
    assert got[key].dtype == dtype
    np.testing.assert_allclose(np.asarray(got[key], np.float64),
                               np.asarray(want[key].astype(dtype), np.float64),
                               rtol=1e-5, atol=1e-6, err_msg=f"{case} {key}")


# Against mergekit itself (installed with the "hf" extra): the same tensors, written once as
# tiny Llama safetensors models for mergekit and once as our Orbax checkpoints (keys = the
# tensor names split at '.'), merged with the same YAML config.

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
         "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
         "num_hidden_layers": 1, "vocab_size": 16, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 64, "tie_word_embeddings": False, "torch_dtype": "float32"}


def llama_tensors(rng):
  """A one-layer Llama with every matrix 16 × 16 (two shapes: few kernel compilations)."""
  names = ["model.embed_tokens.weight", "lm_head.weight"] + [
      f"model.layers.0.{m}.weight" for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                             "self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj", "self_attn.o_proj")]
  vectors = ["model.norm.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.post_attention_layernorm.weight"]
  return {**{k: rng.standard_normal((16, 16)).astype(np.float32) for k in names},
          **{k: rng.standard_normal(16).astype(np.float32) for k in vectors}}


MERGEKIT_CASES = {
    "linear": {"models": [{"model": "base", "parameters": {"weight": 1.0}},
                          {"model": "e0", "parameters": {"weight": 3.0}}]},
    "task_arithmetic": {"base_model": "base", "parameters": {"lambda": 0.8},
                        "models": [{"model": "e0", "parameters": {"weight": 0.3}},
                                   {"model": "e1", "parameters": {"weight": 0.7}}]},
    "ties": {"base_model": "base", "parameters": {"lambda": 1.5, "density": 0.25},
             "models": [{"model": "base"}, {"model": "e0", "parameters": {"weight": 1.0}},
                        {"model": "e1", "parameters": {"weight": 0.5, "density": 0.5}}]},
    "breadcrumbs": {"base_model": "base", "parameters": {"density": 0.5, "gamma": 0.125},
                    "models": [{"model": "e0", "parameters": {"weight": 1.0}},
                               {"model": "e1", "parameters": {"weight": 2.0}}]},
    "breadcrumbs_ties": {"base_model": "base", "parameters": {"density": 0.5, "gamma": 0.125},
                         "models": [{"model": "e0", "parameters": {"weight": 1.0}},
                                    {"model": "e1", "parameters": {"weight": 2.0}}]},
    "slerp": {"base_model": "base", "parameters": {"t": 0.3},
              "models": [{"model": "e1"}, {"model": "base"}]},
    # d·N not whole (0.3 · 256 = 76.8, 0.3 · 16 = 4.8; γ: 0.05 · 16 = 0.8): int(d·N) counts.
    "ties_floor_count": {"merge_method": "ties", "base_model": "base",
                         "parameters": {"density": 0.3},
                         "models": [{"model": "e0", "parameters": {"weight": 1.0}},
                                    {"model": "e1", "parameters": {"weight": 0.5}}]},
    "breadcrumbs_floor_count": {"merge_method": "breadcrumbs", "base_model": "base",
                                "parameters": {"density": 0.3, "gamma": 0.05},
                                "models": [{"model": "e0", "parameters": {"weight": 1.0}},
                                           {"model": "e1", "parameters": {"weight": 2.0}}]},
}


def with_paths(config, paths):
  resolved = dict(config)
  if "base_model" in config:
    resolved["base_model"] = paths[config["base_model"]]
  resolved["models"] = [dict(m, model=paths[m["model"]]) for m in config["models"]]
  return resolved


@pytest.mark.slow  # Imports torch and mergekit (the "hf" extra); the NumPy checks above are fast.
def test_yaml_configs_give_mergekit_tensors(tmp_path):
  pytest.importorskip("mergekit")
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(3)
  tensors = {"base": llama_tensors(rng)}
  for name in ("e0", "e1"):
    tensors[name] = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
                     for k, v in tensors["base"].items()}
  hf, orbax = {}, {}
  for name, values in tensors.items():
    hf[name] = str(tmp_path / "hf" / name)
    os.makedirs(hf[name])
    save_file(values, os.path.join(hf[name], "model.safetensors"))
    with open(os.path.join(hf[name], "config.json"), "w") as f:
      json.dump(LLAMA, f)
    orbax[name] = save(tmp_path / "orbax" / name,
                       {tuple(k.split(".")): v for k, v in values.items()})
  like = {tuple(k.split(".")): v for k, v in tensors["base"].items()}
  for method, config in MERGEKIT_CASES.items():
    config = dict({"merge_method": method}, **config)  # the case's name, unless it says
    theirs = tmp_path / "mergekit" / method
    run_merge(MergeConfiguration.model_validate(with_paths(config, hf)), str(theirs),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    want = load_file(str(theirs / "model.safetensors"))
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(with_paths(config, orbax)))
    ours = merge_lib.main(["--config", str(path), "--output_dir", str(tmp_path / method),
                           "--no_progress_bar"])
    got = restore(os.path.dirname(ours), like)
    assert sorted(".".join(k) for k in got) == sorted(want)
    for key, value in got.items():
      np.testing.assert_allclose(value, want[".".join(key)], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{method} {key}")
    # A mergekit user's route: the same HF folders in, a safetensors folder out.
    path = tmp_path / f"{method}_hf.yml"
    path.write_text(yaml.safe_dump(with_paths(config, hf)))
    ours_hf = merge_lib.main(["--config", str(path), "--output_dir", str(tmp_path / f"{method}_hf"),
                              "--output_format=hf", "--no_progress_bar"])
    got_hf = load_file(os.path.join(ours_hf, "model.safetensors"))
    assert sorted(got_hf) == sorted(want)
    for name, value in got_hf.items():
      np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{method} {name} (HF in and out)")


# Parsing.


def parse(config):
  return mergekit_config.from_dict(config, "merge.yml")


def gta_config(method, **top):
  return {"merge_method": method, "base_model": "/b",
          "models": [{"model": "/b"}, {"model": "/e0", "parameters": {"weight": 1.0}},
                     {"model": "/e1", "parameters": {"weight": 0.5, "density": 0.3}}],
          "parameters": dict({"density": 0.6}, **top)}


@pytest.mark.parametrize("method,expected", [
    ("task_arithmetic", {"lam": 1.0, "normalize": False}),
    ("ties", {"lam": 1.0, "normalize": True, "density": [0.6, 0.3], "count": "floor"}),
    ("dare_ties", {"lam": 1.0, "normalize": False, "density": [0.6, 0.3]}),
    ("dare_linear", {"lam": 1.0, "normalize": False, "rescale": True, "density": [0.6, 0.3]}),
    ("breadcrumbs", {"lam": 1.0, "normalize": False, "density": [0.6, 0.3], "gamma": 0.01,
                     "count": "floor"}),
    ("breadcrumbs_ties", {"lam": 1.0, "normalize": False, "density": [0.6, 0.3],
                          "gamma": 0.01, "count": "floor"}),
    ("della", {"lam": 1.0, "normalize": True, "density": [0.6, 0.3], "epsilon": 0.15}),
    ("della_linear", {"lam": 1.0, "normalize": False, "density": [0.6, 0.3],
                      "epsilon": 0.15}),
])
def test_yaml_task_vector_methods_defaults(method, expected):
  parsed = parse(gta_config(method))
  assert parsed["method"] == method
  assert parsed["base"] == "/b"
  assert parsed["experts"] == ["/e0", "/e1"]  # The base listed among models is skipped.
  assert parsed["weights"] == [1.0, 0.5]
  assert parsed["method_params"] == expected
  assert parsed["seed"] == 0 and parsed["out_dtype"] is None


def test_yaml_linear_slerp_dtype_seed():
  linear = parse({"merge_method": "linear", "models": [
      {"model": "/a", "parameters": {"weight": 1}}, {"model": "/b"}],
                  "parameters": {"weight": 3.0, "normalize": False}, "dtype": "bfloat16",
                  "out_dtype": "float16", "random_seed": 9})
  assert linear["experts"] == ["/a", "/b"] and linear["weights"] == [1.0, 3.0]
  assert linear["method_params"] == {"normalize": False}
  assert linear["out_dtype"] == "float16" and linear["seed"] == 9
  slerp = parse({"merge_method": "slerp", "base_model": "/b", "dtype": "bfloat16",
                 "models": [{"model": "/x"}, {"model": "/b"}], "parameters": {"t": 0.25}})
  assert (slerp["base"], slerp["experts"], slerp["weights"]) == ("/b", ["/x"], None)
  assert slerp["method_params"] == {"t": 0.25} and slerp["out_dtype"] == "bfloat16"


@pytest.mark.parametrize("change,message", [
    ({"foo": 1}, "unknown key 'foo'"),
    ({"slices": []}, "slices: layer slicing"),
    ({"parameters": {"t": 0.5}}, "unknown key 't' in parameters"),
    ({"models": [{"model": "/e0", "parameters": {"weight": 1, "lambda": 2}}]},
     "models[0].parameters.lambda is method-wide"),
    ({"models": [{"model": "/e0", "parameters": {"weight": 1, "alpha": 2}}]},
     "models[0].parameters.alpha is unknown"),
    ({"models": [{"model": "/e0", "extra": 1}]}, "unknown key 'extra' in models[0]"),
    ({"models": [{"model": "/e0"}]}, "models[0] (/e0) needs parameters.weight"),
    ({"models": [{"model": "/e0", "parameters": {"weight": [0.1, 0.9]}}]},
     "gradients and filters are not supported"),
    ({"merge_method": "model_stock"}, "merge_method 'model_stock' is not supported"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"parameters": {"rescale": True}}, "rescale: True is not supported for ties"),
    ({"base_model": None}, "ties needs base_model"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
])
def test_yaml_errors_name_the_key_and_file(change, message):
  config = {"merge_method": "ties", "base_model": "/b",
            "models": [{"model": "/e0", "parameters": {"weight": 1.0}}]}
  config.update(change)
  with pytest.raises(mergekit_config.ConfigError) as error:
    parse(config)
  assert "merge.yml" in str(error.value)
  assert message in str(error.value)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
  path = tmp_path / "merge.yml"
  path.write_text("merge_method: ties\nmodels:\n  - model: [a\n")
  with pytest.raises(mergekit_config.ConfigError,
                     match=f"{path}: not valid YAML: while parsing a flow sequence .* line 3"):
    mergekit_config.load(str(path))


def test_yaml_method_specific_rules(caplog):
  with pytest.raises(mergekit_config.ConfigError, match="dare_ties always rescales"):
    parse(gta_config("dare_ties", rescale=False))
  assert parse(gta_config("dare_linear", rescale=False))["method_params"]["rescale"] is False
  config = gta_config("della")
  config["models"][1]["parameters"]["epsilon"] = 0.1
  with pytest.raises(mergekit_config.ConfigError, match="epsilon must be the same"):
    parse(config)
  with pytest.raises(mergekit_config.ConfigError, match="exactly two models"):
    parse({"merge_method": "slerp", "base_model": "/b", "models": [{"model": "/x"}],
           "parameters": {"t": 0.5}})
  with pytest.raises(mergekit_config.ConfigError, match="needs parameters.t"):
    parse({"merge_method": "slerp", "base_model": "/b",
           "models": [{"model": "/x"}, {"model": "/b"}]})
  with pytest.raises(mergekit_config.ConfigError, match="list base_model under models"):
    parse({"merge_method": "linear", "base_model": "/b",
           "models": [{"model": "/x", "parameters": {"weight": 1}}]})
  caplog.set_level(logging.WARNING)
  parse(gta_config("ties", int8_mask=True))
  assert "int8_mask" in caplog.text


# gin flags, end to end, on a tiny decoder: the result is what train.init_params_from reads.

CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=1, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def test_gin_cli_merges_a_decoder_restorable_as_init_params(tmp_path):
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(CONFIG), optimizers.adamw(1e-3),
                                partitioning.Partitioner((8, 1, 1)))
  abstract, _ = trainer.abstract_state(8, {"inputs": 16, "targets": 4})
  rng = np.random.default_rng(2)
  flat_abstract = imported.flatten(abstract["params"])
  base = {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in flat_abstract.items()}
  experts = [{k: v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype)
              for k, v in base.items()} for _ in range(2)]
  meta = {"config": imported.config_dict(CONFIG)}
  base_path = save(tmp_path / "base", base, meta)
  expert_paths = [save(tmp_path / f"expert{i}", e) for i, e in enumerate(experts)]
  out = tmp_path / "merged"
  path = merge_lib.main(["--gin_file=merging/ties.gin", f"--gin.BASE={base_path}",
                         f"--gin.EXPERTS={expert_paths!r}", f"--gin.OUTPUT_DIR={out}",
                         "--gin.DENSITY=0.3", "--gin.LAMBDA=1.2", "--gin.WEIGHTS=[1.0, 0.5]",
                         "--no_progress_bar"])
  assert path == str(out / "0")
  restored = manager.restore_params_from(str(out), abstract["params"])  # = init_params_from
  for leaf, target in zip(jax.tree_util.tree_leaves(restored),
                          jax.tree_util.tree_leaves(abstract["params"])):
    assert leaf.sharding == target.sharding
  want = imported.flatten(merge_lib.merge_params(
      imported.unflatten(base), [imported.unflatten(e) for e in experts], "ties", [1.0, 0.5],
      global_trim=True, density=0.3, lam=1.2))
  for key, value in imported.flatten(jax.device_get(restored)).items():
    np.testing.assert_array_equal(value, np.asarray(want[key]), err_msg=str(key))
  merged_meta = manager.Checkpointer(out, read_only=True).restore_meta()
  assert merged_meta["config"] == meta["config"]
  assert merged_meta["merge"]["method"] == "ties" and merged_meta["merge"]["global_trim"]
  assert merged_meta["merge"]["weights"] == [1.0, 0.5]
  assert "merge.method = 'ties'" in (out / "config.gin").read_text()


def test_gin_cli_requires_the_macros(family, tmp_path):
  with pytest.raises(ValueError, match="OUTPUT_DIR"):
    merge_lib.main(["--gin_file=merging/ties.gin", f"--gin.BASE={family['base']}",
                    f"--gin.EXPERTS={family['experts']!r}"])
  gin.clear_config()
  with pytest.raises(cli.UsageError, match="cannot be combined"):
    merge_lib.main(["--gin_file=merging/ties.gin", "--config=x.yml", "--output_dir=y"])


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties",
                                  "dare_linear", "breadcrumbs", "della", "slerp"])
def test_every_method_gin_file_binds_a_valid_merge(name, monkeypatch):
  calls = []
  monkeypatch.setattr(io, "stream_merge", lambda spec, base, experts, output_dir, **kwargs:
                      calls.append((spec, base, experts, output_dir, kwargs)))
  monkeypatch.setattr(lineage, "check_same_base", lambda base, experts: None)  # no files here
  experts = ["/e"] if name == "slerp" else ["/e0", "/e1"]
  gin_utils.parse([f"merging/{name}.gin"], ["BASE = '/b'", f"EXPERTS = {experts!r}",
                                            "OUTPUT_DIR = '/o'"])
  merge_lib.merge()
  (spec, base, bound_experts, output_dir, kwargs), = calls
  assert (spec.method, base, bound_experts, output_dir) == (name, "/b", experts, "/o")
  spec.validate(len(experts))
  assert kwargs["step"] == 0 and kwargs["out_dtype"] is None


def _merge_in_subprocess(family, output, *flags):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("FLAME_COMPILE_CACHE", None)
  return subprocess.run(
      [sys.executable, "-m", "merging.merge", "--gin_file=merging/ties.gin",
       f"--gin.BASE='{family['base']}'", f"--gin.EXPERTS={family['experts']!r}",
       f"--gin.OUTPUT_DIR='{output}'", "--no_progress_bar", *flags],
      capture_output=True, text=True, env=env, check=False)


def test_a_second_merge_loads_its_kernels_from_the_compile_cache(family, tmp_path):
  cache = tmp_path / "cache"
  first = _merge_in_subprocess(family, tmp_path / "one", f"--compile_cache={cache}")
  assert first.returncode == 0, first.stderr
  entries = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
  assert entries, "the first merge left no compiled kernel in the cache"
  second = _merge_in_subprocess(family, tmp_path / "two", f"--compile_cache={cache}")
  assert second.returncode == 0, second.stderr
  # Every kernel came from the cache: nothing was written or rewritten.
  assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == entries
  one, two = (restore(tmp_path / name / "0", family["base_params"]) for name in ("one", "two"))
  for key, value in one.items():
    np.testing.assert_array_equal(value, two[key])


def test_an_unwritable_compile_cache_warns_once_and_the_merge_goes_on(family, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  result = _merge_in_subprocess(family, tmp_path / "out", f"--compile_cache={blocker}/cache")
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if "compile cache" in line]
  assert len(warnings) == 1 and f"{blocker}/cache is not writable" in warnings[0], result.stderr
  assert (tmp_path / "out" / "0").is_dir()
  off = _merge_in_subprocess(family, tmp_path / "off", "--compile_cache=off")
  assert off.returncode == 0 and "compile cache" not in off.stderr


def test_a_missing_yaml_names_the_flag(tmp_path):
  with pytest.raises(mergekit_config.ConfigError,
                     match=f"--config={tmp_path / 'none.yml'}: no such file$"):
    mergekit_config.load(str(tmp_path / "none.yml"))
  with pytest.raises(mergekit_config.ConfigError, match=r"no such file \(a folder\)"):
    mergekit_config.load(str(tmp_path))
