"""safetensors files on any path: ``safe_open`` locally, header + byte ranges remotely.

``safetensors.safe_open`` memory-maps a local file; it cannot read ``gs://``. A
safetensors file is simple enough to read lazily through ``mtx.paths`` instead::

    u64 little-endian n | n bytes of JSON header | tensor bytes
    header = {"name": {"dtype": "BF16", "shape": [V, E], "data_offsets": [b, e]}, ...}

(offsets relative to the byte after the header; tensors are C-ordered). A slice
``[r0:r1, c0:c1]`` of a remote tensor reads the whole rows ``r0:r1`` with one ranged
read (one seek and read on a gfile/fsspec handle: an HTTP range request on GCS) and
cuts the columns in memory, so a host reads about its share of the rows it needs,
never a whole shard file (a layout sharded by columns reads whole rows: up to a
column-shard factor more than it keeps).

Both readers give the same interface, the part of ``safe_open`` mtx uses: ``keys()``,
``get_slice(name)`` with ``get_shape()``, ``get_dtype()`` and ``[index]``.

>>> f = open_safetensors("gs://bucket/flan-t5-small/model.safetensors")  # doctest: +SKIP
>>> f.get_slice("shared.weight")[0:2, :].shape  # doctest: +SKIP
(2, 512)
"""

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

from mtx import paths

# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, as safetensors does).
_NUMPY = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
# A header is JSON of a few hundred bytes per tensor; more than this is a damaged file.
_MAX_HEADER = 100 << 20


def open_safetensors(path: str) -> Any:
  """A lazy reader of the safetensors file ``path`` (local or any ``mtx.paths`` URL).

  Raises:
    ValueError: the file is not safetensors (a bad or truncated header).
  """
  if not paths.is_remote(path):
    return safetensors.safe_open(path, framework="numpy")
  return RemoteSafetensors(path)


class RemoteSafetensors:
  """``safe_open``'s reading interface over ``mtx.paths`` (header read once)."""

  def __init__(self, path: str):
    self.path = path
    with paths.open_file(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path} is shorter than a safetensors header")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER:
        raise ValueError(f"{path} has a header of {n} bytes: not safetensors")
      raw = f.read(n)
    if len(raw) != n:
      raise ValueError(f"{path} is truncated inside its header")
    header = json.loads(raw)
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if paths.size(path) < 8 + n + end:
      raise ValueError(f"{path} is truncated: its tensors need {8 + n + end} bytes")
    self._header = header
    self._data_start = 8 + n

  def keys(self) -> list[str]:
    return sorted(self._header)

  def get_slice(self, name: str) -> "RemoteSlice":
    return RemoteSlice(self, name, self._header[name])

  def read_range(self, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of the tensor data (after the header)."""
    with paths.open_file(self.path, "rb") as f:
      f.seek(self._data_start + start)
      data = f.read(stop - start)
    if len(data) != stop - start:
      raise ValueError(f"{self.path} is truncated (a tensor ends past the file's end)")
    return data


class RemoteSlice:
  """One tensor of a ``RemoteSafetensors``: shape and dtype now, values when indexed."""

  def __init__(self, file: RemoteSafetensors, name: str, entry: dict):
    self._file, self._name = file, name
    self._dtype = entry["dtype"]
    self._shape = tuple(int(n) for n in entry["shape"])
    self._begin, self._end = (int(x) for x in entry["data_offsets"])

  def get_shape(self) -> list[int]:
    return list(self._shape)

  def get_dtype(self) -> str:
    return self._dtype

  def __getitem__(self, index) -> np.ndarray:
    """``index``: slices (step 1) per leading axis, as ``safe_open``'s slices take.

    Reads rows ``index[0]`` whole (one ranged read), then cuts the other axes.
    """
    if self._dtype not in _NUMPY:
      raise ValueError(f"{self._name} is {self._dtype}, which mtx does not read")
    dtype = np.dtype(_NUMPY[self._dtype])
    index = index if isinstance(index, tuple) else (index,)
    if not self._shape:  # a scalar
      return np.frombuffer(self._file.read_range(self._begin, self._end), dtype).reshape(
        ()
      )
    rows = index[0] if index else slice(None)
    r0, r1, step = rows.indices(self._shape[0])
    if step != 1:
      raise ValueError(f"{self._name}: only contiguous slices are read")
    r1 = max(r0, r1)
    row_bytes = dtype.itemsize * int(np.prod(self._shape[1:], dtype=np.int64))
    data = self._file.read_range(
      self._begin + r0 * row_bytes, self._begin + r1 * row_bytes
    )
    block = np.frombuffer(data, dtype).reshape((r1 - r0,) + self._shape[1:])
    return block[(slice(None),) + tuple(index[1:])]
