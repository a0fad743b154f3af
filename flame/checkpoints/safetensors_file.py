"""The safetensors file format, read and written with positioned I/O (no memory maps, no copies).

Layout: an 8-byte little-endian header length N, N bytes of JSON ({tensor name: {"dtype",
"shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}}, padded with
spaces to a multiple of 8), then the tensors' bytes, C order, at data_offsets from the end of
the header. Both classes move rows of the first axis, so a large tensor (a 49152 x 576
embedding) can be read and written a row range at a time.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_CODES = {name: code for code, name in DTYPE_NAMES.items()}


class SafetensorsError(ValueError):
  """A safetensors file that is not what its header says (names the file and tensor)."""


def _numpy_dtype(code: str) -> np.dtype:
  import ml_dtypes  # pylint: disable=import-outside-toplevel  # registers bfloat16
  del ml_dtypes
  return np.dtype(DTYPE_NAMES[code])


def _row_range(shape: Sequence[int], rows: Optional[tuple[int, int]]) -> tuple[int, int, int]:
  """(first row, row count, entries per row) of `rows` ((start, stop) of axis 0; None: all)."""
  per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
  if rows is None:
    return 0, (shape[0] if shape else 1), (per_row if shape else 1)
  start, stop = rows
  if not shape or not 0 <= start <= stop <= shape[0]:
    raise ValueError(f"rows {rows} outside a tensor of shape {tuple(shape)}")
  return start, stop - start, per_row


ALIGNMENT = 64  # bytes; XLA:CPU takes a 64-byte aligned NumPy array without copying it


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
  """np.empty with the data 64-byte aligned (NumPy guarantees 16): `jax.device_put` on a
  CPU then uses the array's memory instead of copying it into a new buffer."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class SafetensorsReader:
  """Positioned reads of one file's tensors, whole or by rows."""

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_RDONLY)
    header_size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
    self._header = json.loads(os.pread(self._fd, header_size, 8))
    self._data_start = 8 + header_size

  def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Tensor `name` (or rows [start, stop) of its first axis) in a fresh, 64-byte aligned
    array."""
    entry = self._header[name]
    dtype, shape = _numpy_dtype(entry["dtype"]), list(entry["shape"])
    begin, end = entry["data_offsets"]
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != end - begin:
      raise SafetensorsError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, but "
                             f"{shape} of {dtype} needs "
                             f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}")
    start, count, per_row = _row_range(shape, rows)
    out = aligned_empty(([count] + shape[1:]) if shape else [], dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    offset = self._data_start + begin + start * per_row * dtype.itemsize
    done = 0
    while done < out.nbytes:  # pread may return less than asked (large reads, signals).
      got = os.preadv(self._fd, [view[done:]], offset + done)
      if got == 0:
        raise SafetensorsError(f"{self.path} ends inside tensor {name!r} (truncated?)")
      done += got
    return out

  def close(self):
    os.close(self._fd)


class SafetensorsWriter:
  """Writes a file whose tensors (names, dtypes, shapes) are declared up front; their bytes
  may then come in any order, whole or a row range at a time (`write`)."""

  def __init__(self, path: str, tensors: Mapping[str, tuple[np.dtype, Sequence[int]]],
               metadata: Optional[Mapping[str, str]] = None):
    header, offset, self._layout = {}, 0, {}
    for name, (dtype, shape) in tensors.items():
      dtype = np.dtype(dtype)
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _CODES[dtype.name], "shape": [int(d) for d in shape],
                      "data_offsets": [offset, offset + nbytes]}
      self._layout[name] = (dtype, tuple(int(d) for d in shape), offset)
      offset += nbytes
    if metadata:
      header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    self.path, self._data_start = path, 8 + len(text)
    self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.pwrite(self._fd, len(text).to_bytes(8, "little") + text, 0)
    os.ftruncate(self._fd, self._data_start + offset)

  def write(self, name: str, value: np.ndarray, start_row: int = 0) -> None:
    """`value` (the whole tensor, or rows from `start_row` on) at its place in the file."""
    dtype, shape, offset = self._layout[name]
    value = np.require(np.asarray(value).astype(dtype, copy=False), requirements="C")
    start, count, per_row = _row_range(shape, None if value.shape == shape else
                                       (start_row, start_row + (value.shape[0] if
                                                                value.ndim else 1)))
    if tuple(value.shape[1:]) != shape[1:] or count * per_row != value.size:
      raise ValueError(f"{self.path}: {name!r} is {shape}; got rows of shape {value.shape}")
    view = memoryview(value.reshape(-1).view(np.uint8))
    position = self._data_start + offset + start * per_row * dtype.itemsize
    done = 0
    while done < len(view):
      done += os.pwritev(self._fd, [view[done:]], position + done)

  def close(self) -> None:
    os.fsync(self._fd)
    os.close(self._fd)
