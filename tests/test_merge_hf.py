"""flame-merge with Hugging Face safetensors folders as inputs and as output (--output_format=hf).

Tiny Llama models written by `hf.save_hf` (the exporter whose output transformers loads, see
test_hf_checkpoints.py) and the same parameters as our Orbax checkpoints: the two routes must
merge to the same numbers, and HF-in/HF-out must equal a NumPy float64 reference computed from
the safetensors files themselves.
"""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml

pytest.importorskip("safetensors", reason="the hf extra (safetensors) is not installed")
from safetensors.numpy import load_file, save_file  # noqa: E402

from flame.checkpoints import convert, hf, imported  # noqa: E402
from flame.models import decoder  # noqa: E402
from merging import io, merge as merge_lib, staged_hf  # noqa: E402

CONFIG = decoder.DecoderConfig(vocab_size=32, emb_dim=16, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=8, mlp_dim=24, tie_embeddings=False)


def random_params(rng, config=CONFIG, like=None, scale=1.0):
  shapes = imported.flatten(jax.tree_util.tree_map(lambda x: x.shape,
                                                   convert.abstract_params(config)))
  if like is None:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  return {k: (like[k] + scale * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A base and two experts, each as an HF folder and as an Orbax checkpoint."""
  root = tmp_path_factory.mktemp("hf_merge")
  rng = np.random.default_rng(0)
  base = random_params(rng)
  flats = {"base": base, "e0": random_params(rng, like=base, scale=0.05),
           "e1": random_params(rng, like=base, scale=0.05)}
  paths = {}
  for name, flat in flats.items():
    params = imported.unflatten(flat)
    paths[("hf", name)] = hf.save_hf(params, CONFIG, str(root / "hf" / name),
                                     extra_config={"eos_token_id": 2, "bos_token_id": 1})
    paths[("orbax", name)] = imported.write_orbax(
        imported.ImportedModel(CONFIG, params, {"format": "test"}), str(root / "orbax" / name))
  return {"flat": flats, "paths": paths, "root": root}


def yaml_file(tmp_path, paths, method="ties", name="merge.yml", dtype=None, **top):
  config = {"merge_method": method, "base_model": paths[0], **({"dtype": dtype} if dtype else {}),
            "parameters": dict({"density": 0.5} if method == "ties" else {}, **top),
            "models": [{"model": paths[1], "parameters": {"weight": 1.0}},
                       {"model": paths[2], "parameters": {"weight": 0.5}}]}
  path = tmp_path / name
  path.write_text(yaml.safe_dump(config))
  return str(path)


def run(tmp_path, config_path, out, *flags):
  return merge_lib.main(["--config", config_path, "--output_dir", str(out),
                         "--no_progress_bar", *flags])


def orbax_flat(step_dir):
  _, params, _ = convert.read_orbax(step_dir)
  return {k: np.asarray(v) for k, v in imported.flatten(params).items()}


def hf_flat(directory):
  return {k: np.asarray(v) for k, v in imported.flatten(hf.load_hf(directory).params).items()}


def assert_same(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_hf_and_mixed_inputs_merge_like_orbax_inputs(models, tmp_path):
  p = models["paths"]
  want = orbax_flat(run(tmp_path, yaml_file(tmp_path, [p["orbax", n] for n in
                                                       ("base", "e0", "e1")], name="o.yml"),
                        tmp_path / "from_orbax"))
  hf_config = yaml_file(tmp_path, [p["hf", n] for n in ("base", "e0", "e1")], name="h.yml")
  got_hf = run(tmp_path, hf_config, tmp_path / "from_hf")
  assert_same(orbax_flat(got_hf), want)
  # HF in and out merges in transformers' layout (no transposes): the same numbers.
  assert_same(hf_flat(run(tmp_path, hf_config, tmp_path / "hf_to_hf", "--output_format=hf")),
              want)
  got_mixed = run(tmp_path, yaml_file(tmp_path, [p["hf", "base"], p["orbax", "e0"],
                                                 p["hf", "e1"]], name="m.yml"),
                  tmp_path / "mixed")
  assert_same(orbax_flat(got_mixed), want)
  # An HF base gives the merged checkpoint the model config flame-convert would record.
  _, _, meta = convert.read_orbax(got_hf)
  assert convert.config_from_meta(meta) == CONFIG
  assert meta["merge"]["base"] == p["hf", "base"]


def test_hf_in_hf_out_equals_a_float64_reference_from_the_files(models, tmp_path):
  p = models["paths"]
  config = yaml_file(tmp_path, [p["hf", n] for n in ("base", "e0", "e1")],
                     method="task_arithmetic", **{"lambda": 0.8})
  out = run(tmp_path, config, tmp_path / "merged", "--output_format=hf")
  assert out == str(tmp_path / "merged")
  tensors = {n: load_file(os.path.join(p["hf", n], hf.SINGLE_FILE)) for n in ("base", "e0", "e1")}
  merged = load_file(os.path.join(out, hf.SINGLE_FILE))
  assert sorted(merged) == sorted(tensors["base"])
  for name, base in tensors["base"].items():
    base = base.astype(np.float64)
    want = base + 0.8 * (1.0 * (tensors["e0"][name] - base) + 0.5 * (tensors["e1"][name] - base))
    assert merged[name].dtype == np.float32
    np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
  written = json.load(open(os.path.join(out, hf.CONFIG_FILE)))
  source = json.load(open(os.path.join(p["hf", "base"], hf.CONFIG_FILE)))
  assert written == source  # Same model, same token ids.
  assert json.load(open(os.path.join(out, hf.GENERATION_CONFIG_FILE))) == {
      "bos_token_id": 1, "eos_token_id": 2}
  record = json.load(open(os.path.join(out, staged_hf.MERGE_RECORD)))
  assert record["merge"]["method"] == "task_arithmetic"
  assert record["merge"]["experts"] == [p["hf", "e0"], p["hf", "e1"]]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # Staging removed.


def test_orbax_in_hf_out_in_shards_reads_back_as_the_orbax_merge(models, tmp_path):
  p = models["paths"]
  config = yaml_file(tmp_path, [p["orbax", n] for n in ("base", "e0", "e1")])
  want = orbax_flat(run(tmp_path, config, tmp_path / "orbax_out"))
  # 60 KiB: batches of 30 KiB, so the 24 KiB embedding and head get a shard each.
  out = run(tmp_path, config, tmp_path / "hf_out", "--output_format=hf", "--memory_budget=60KiB")
  index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert sorted(index["weight_map"]) == sorted(s.name for s in hf.tensor_specs(CONFIG))
  assert_same(hf_flat(out), want)  # The importer's full name/shape checks pass.


def test_hf_output_in_bfloat16(models, tmp_path):
  p = models["paths"]
  config = yaml_file(tmp_path, [p["hf", n] for n in ("base", "e0", "e1")],
                     method="task_arithmetic", dtype="bfloat16")
  out = run(tmp_path, config, tmp_path / "bf16", "--output_format=hf")
  merged = load_file(os.path.join(out, hf.SINGLE_FILE))
  assert {t.dtype for t in merged.values()} == {np.dtype(ml_dtypes.bfloat16)}
  assert json.load(open(os.path.join(out, hf.CONFIG_FILE)))["torch_dtype"] == "bfloat16"


def test_bfloat16_hf_inputs_are_read_in_their_dtype(models, tmp_path):
  p = models["paths"]
  bf16 = hf.save_hf(imported.unflatten(models["flat"]["e0"]), CONFIG, str(tmp_path / "e0_bf16"),
                    dtype="bfloat16")
  source = io.open_checkpoint(bf16)
  assert {s.dtype for s in source.shapes.values()} == {np.dtype(ml_dtypes.bfloat16)}
  config = yaml_file(tmp_path, [p["hf", "base"], bf16, p["hf", "e1"]], method="task_arithmetic")
  got = orbax_flat(run(tmp_path, config, tmp_path / "out"))
  base, e1 = models["flat"]["base"], models["flat"]["e1"]
  for key in base:
    e0 = models["flat"]["e0"][key].astype(ml_dtypes.bfloat16).astype(np.float64)
    want = base[key] + (e0 - base[key]) + 0.5 * (e1[key] - base[key])
    np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5, err_msg=str(key))


# Bad input: each named before anything is written.


def assert_nothing_written(tmp_path, out):
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(tmp_path) if ".merge" in n]


def test_hf_expert_of_another_shape_is_named(models, tmp_path):
  p = models["paths"]
  wider = decoder.DecoderConfig(**dict(vars(CONFIG), mlp_dim=32))
  other = hf.save_hf(imported.unflatten(random_params(np.random.default_rng(1), wider)), wider,
                     str(tmp_path / "wider"))
  config = yaml_file(tmp_path, [p["hf", "base"], p["hf", "e0"], other])
  with pytest.raises(io.MergeInputError) as e:
    run(tmp_path, config, tmp_path / "out", "--output_format=hf")
  message = str(e.value)
  assert "'layers_0/mlp/wi_0/kernel' (tensor 'model.layers.0.mlp.gate_proj.weight' in expert #1" \
      in message
  assert "has shape (16, 32) in expert #1" in message and "but (16, 24) in base" in message
  assert_nothing_written(tmp_path, tmp_path / "out")


def test_orbax_and_hf_inputs_of_different_depth_are_named(models, tmp_path):
  p = models["paths"]
  deeper = decoder.DecoderConfig(**dict(vars(CONFIG), num_layers=3))
  other = imported.write_orbax(imported.ImportedModel(
      deeper, imported.unflatten(random_params(np.random.default_rng(2), deeper)), {}),
      str(tmp_path / "deeper"))
  config = yaml_file(tmp_path, [p["hf", "base"], other, p["hf", "e1"]])
  with pytest.raises(io.MergeInputError, match=r"expert #0 .*deeper has parameter "
                     r"'layers_2/attention/key' \(shape \(16, 1, 8\)\) that base .* does not "
                     r"have"):
    run(tmp_path, config, tmp_path / "out")
  assert_nothing_written(tmp_path, tmp_path / "out")


def test_hf_folder_whose_tensor_contradicts_its_config_is_named(models, tmp_path):
  p = models["paths"]
  broken = tmp_path / "broken"
  broken.mkdir()
  tensors = load_file(os.path.join(p["hf", "e0"], hf.SINGLE_FILE))
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
  save_file(tensors, str(broken / hf.SINGLE_FILE))
  (broken / hf.CONFIG_FILE).write_text(open(os.path.join(p["hf", "e0"], hf.CONFIG_FILE)).read())
  config = yaml_file(tmp_path, [p["hf", "base"], str(broken), p["hf", "e1"]])
  with pytest.raises(hf.HFCheckpointError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight'"
                     r" \(in model.safetensors\) has shape \(16, 16\), expected \(8, 16\)"):
    run(tmp_path, config, tmp_path / "out")
  assert_nothing_written(tmp_path, tmp_path / "out")


def test_hf_output_needs_one_dtype_and_a_free_folder(models, tmp_path):
  p = models["paths"]
  mixed = dict(models["flat"]["base"])
  mixed[("final_norm", "scale")] = mixed[("final_norm", "scale")].astype(ml_dtypes.bfloat16)
  base = imported.write_orbax(imported.ImportedModel(CONFIG, imported.unflatten(mixed), {}),
                              str(tmp_path / "mixed_base"))
  config = yaml_file(tmp_path, [base, p["orbax", "e0"], p["orbax", "e1"]])
  with pytest.raises(ValueError, match=r"stores one dtype, but the merged parameters would be "
                     r"\['bfloat16', 'float32'\]"):
    run(tmp_path, config, tmp_path / "out", "--output_format=hf")
  assert_nothing_written(tmp_path, tmp_path / "out")
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "notes.txt").write_text("mine")
  config = yaml_file(tmp_path, [p["hf", n] for n in ("base", "e0", "e1")], name="ok.yml")
  for flags in ([], ["--overwrite"]):
    with pytest.raises(FileExistsError, match="occupied"):
      run(tmp_path, config, occupied, "--output_format=hf", *flags)
  assert os.listdir(occupied) == ["notes.txt"]


def test_staged_hf_model_resumes_its_own_plan_and_discards_another(tmp_path):
  rng = np.random.default_rng(3)
  flat = random_params(rng)
  keys = sorted(flat)
  out = str(tmp_path / "model")
  staged = staged_hf.StagedHFModel(out, keys, {"plan": 1}, CONFIG, np.float32)
  staged.write(keys[:3], [flat[k] for k in keys[:3]])
  assert not os.path.exists(out)  # Killed here: nothing visible.
  resumed = staged_hf.StagedHFModel(out, keys, {"plan": 1}, CONFIG, np.float32)
  assert resumed.num_done == 3 and resumed.done(keys[0]) and not resumed.done(keys[3])
  with pytest.raises(RuntimeError, match="parameters not written"):
    resumed.finalize({})
  resumed.write(keys[3:], [flat[k] for k in keys[3:]])
  assert_same(hf_flat(resumed.finalize({})), flat)
  other = staged_hf.StagedHFModel(str(tmp_path / "m2"), keys, {"plan": 1}, CONFIG, np.float32)
  other.write(keys[:1], [flat[keys[0]]])
  assert staged_hf.StagedHFModel(str(tmp_path / "m2"), keys, {"plan": 2}, CONFIG,
                                 np.float32).num_done == 0


@pytest.mark.parametrize("method,top", [("ties", {}), ("task_arithmetic", {}),
                                        ("breadcrumbs", {"density": 0.4, "gamma": 0.1})])
def test_a_budget_below_a_parameter_merges_it_in_row_ranges_to_the_same_tensors(
    models, tmp_path, method, top):
  """HF in and out with --memory_budget below the embedding's need: it is read, merged and
  written a row range at a time (its trim thresholds first, over all its rows) and the folder
  equals the merge of whole tensors, file by file and byte by byte in every tensor."""
  paths = [models["paths"][("hf", n)] for n in ("base", "e0", "e1")]
  config = yaml_file(tmp_path, paths, method, **top)
  whole = run(tmp_path, config, tmp_path / "whole", "--output_format=hf")
  # The embedding is 32 x 16 float32 = 2 KiB per input; 3 inputs and the output need 8 KiB
  # twice over. At 6 KiB it and the MLP kernels go in row ranges, the rest whole.
  pieces = run(tmp_path, config, tmp_path / "pieces", "--output_format=hf",
               "--memory_budget=6KiB")
  whole_tensors, piece_tensors = (hf_flat(path) for path in (whole, pieces))
  assert_same(whole_tensors, piece_tensors)
  for key, value in whole_tensors.items():
    np.testing.assert_array_equal(piece_tensors[key], value, err_msg=str(key))
  index = json.load(open(os.path.join(pieces, hf.INDEX_FILE)))
  files = set(index["weight_map"].values())
  embedding_file = index["weight_map"]["model.embed_tokens.weight"]
  assert list(load_file(os.path.join(pieces, embedding_file))) == ["model.embed_tokens.weight"]
  assert len(files) > 1
  total = sum(t.nbytes for f in files for t in load_file(os.path.join(pieces, f)).values())
  assert index["metadata"]["total_size"] == total


def test_a_budget_below_one_row_is_refused_naming_the_parameter(models, tmp_path):
  paths = [models["paths"][("hf", n)] for n in ("base", "e0", "e1")]
  with pytest.raises(ValueError, match=r"--memory_budget 200 B is below one row range of "
                                       r"parameter '[a-z_0-9/]+': a row needs 256 B \(3 inputs "
                                       r"and the output\) twice over; give at least 512 B"):
    run(tmp_path, yaml_file(tmp_path, paths), tmp_path / "out", "--output_format=hf",
        "--memory_budget=200")
  assert not os.path.exists(tmp_path / "out")
