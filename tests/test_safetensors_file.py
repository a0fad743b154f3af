"""flame.checkpoints.safetensors_file against the safetensors library (the reference)."""
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flame.checkpoints import safetensors_file


def tensors(rng):
  return {"embed": rng.standard_normal((37, 5)).astype(np.float32),
          "norm": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
          "scalar": np.asarray(1.5, np.float64),
          "w": rng.standard_normal((4, 3, 2)).astype(np.float16)}


def test_rows_written_in_any_order_load_in_the_reference_library(tmp_path):
  values = tensors(np.random.default_rng(0))
  path = str(tmp_path / "a.safetensors")
  writer = safetensors_file.SafetensorsWriter(
      path, {n: (v.dtype, v.shape) for n, v in values.items()}, {"format": "pt"})
  writer.write("embed", values["embed"][20:], start_row=20)
  writer.write("w", values["w"])
  writer.write("embed", values["embed"][:7])
  writer.write("norm", values["norm"])
  writer.write("embed", values["embed"][7:20], start_row=7)
  writer.write("scalar", values["scalar"])
  writer.close()
  loaded = load_file(path)
  assert sorted(loaded) == sorted(values)
  for name, value in values.items():
    assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
    np.testing.assert_array_equal(loaded[name], value)


def test_reader_reads_whole_tensors_and_row_ranges_of_reference_files(tmp_path):
  values = tensors(np.random.default_rng(1))
  path = str(tmp_path / "b.safetensors")
  save_file(values, path)
  reader = safetensors_file.SafetensorsReader(path)
  for name, value in values.items():
    np.testing.assert_array_equal(reader.read(name), value)
  for rows in [(0, 37), (5, 6), (36, 37), (10, 10), (3, 30)]:
    np.testing.assert_array_equal(reader.read("embed", rows), values["embed"][slice(*rows)])
  with pytest.raises(ValueError, match=r"rows \(30, 40\) outside a tensor of shape \(37, 5\)"):
    reader.read("embed", (30, 40))
  reader.close()


def test_a_truncated_file_names_the_file_and_tensor(tmp_path):
  values = tensors(np.random.default_rng(2))
  path = tmp_path / "c.safetensors"
  save_file(values, str(path))
  path.write_bytes(path.read_bytes()[:-20])
  reader = safetensors_file.SafetensorsReader(str(path))
  last = max(values, key=lambda n: reader._header[n]["data_offsets"][1])  # pylint: disable=protected-access
  with pytest.raises(safetensors_file.SafetensorsError, match=f"{path} ends inside tensor '{last}'"):
    reader.read(last)


def test_writer_refuses_rows_of_the_wrong_shape(tmp_path):
  writer = safetensors_file.SafetensorsWriter(str(tmp_path / "d.safetensors"),
                                              {"embed": (np.float32, (8, 4))})
  with pytest.raises(ValueError, match=r"'embed' is \(8, 4\); got rows of shape \(2, 3\)"):
    writer.write("embed", np.zeros((2, 3), np.float32), start_row=2)
  writer.close()


def test_reads_are_aligned_so_that_jax_takes_them_without_a_copy(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "e.safetensors")
  save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, path)
  reader = safetensors_file.SafetensorsReader(path)
  for rows in (None, (3, 40)):
    value = reader.read("w", rows)
    assert value.ctypes.data % safetensors_file.ALIGNMENT == 0
    on_device = jax.device_put(value, jax.devices("cpu")[0])
    assert on_device.unsafe_buffer_pointer() == value.ctypes.data
  reader.close()
