"""Streaming safetensors output: single files and sharded checkpoints with an index.

`ShardedWriter` takes tensors one at a time and holds at most one shard in memory, so a 7B
export needs the model once plus one shard, never two copies of the model. Shards are named
`model-00001-of-00003.safetensors` (the count is known only at the end, so they are renamed
when the writer closes) and listed in `model.safetensors.index.json`, transformers' layout.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

_CODES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


def dtype_code(dtype: np.dtype) -> str:
  try:
    return _CODES[np.dtype(dtype)]
  except KeyError:
    raise ValueError(f"safetensors cannot store dtype {dtype}; choose one of "
                     f"{', '.join(str(d) for d in _CODES)}") from None


def write_file(path: str, tensors: Sequence[tuple[str, np.ndarray]],
               metadata: Optional[dict[str, str]] = None) -> int:
  """Writes `tensors` ([(name, array)], in order) as one safetensors file; returns the
  bytes of tensor data. The header is JSON padded to 8 bytes, then the raw little-endian
  data back to back (the format's spec)."""
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, array in tensors:
    if name in header:
      raise ValueError(f"{path}: tensor {name} written twice")
    header[name] = {"dtype": dtype_code(array.dtype), "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
              .tobytes())
  return offset


class ShardedWriter:
  """`add(name, array)` tensors in order; `close()` writes the last shard and the index.

  A shard is written as soon as the next tensor would push it past `max_shard_bytes` (a
  single larger tensor gets a shard of its own)."""

  def __init__(self, directory: str, *, max_shard_bytes: int, prefix: str = "model"):
    if max_shard_bytes <= 0:
      raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
    self.directory, self.prefix, self.max_shard_bytes = directory, prefix, max_shard_bytes
    self._pending: list[tuple[str, np.ndarray]] = []
    self._pending_bytes = 0
    self._shards: list[list[str]] = []  # tensor names per written shard
    self._names: set[str] = set()
    self.total_bytes = 0

  def _part_path(self, i: int) -> str:
    return os.path.join(self.directory, f"{self.prefix}-{i + 1:05d}.safetensors.part")

  def add(self, name: str, array: np.ndarray) -> None:
    if name in self._names:
      raise ValueError(f"tensor {name} written twice")
    self._names.add(name)
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending.append((name, np.asarray(array)))
    self._pending_bytes += array.nbytes

  def _flush(self) -> None:
    path = self._part_path(len(self._shards))
    self.total_bytes += write_file(path, self._pending, metadata={"format": "pt"})
    self._shards.append([name for name, _ in self._pending])
    self._pending, self._pending_bytes = [], 0

  def close(self) -> list[str]:
    """Finishes the shards and writes the index; returns the shard file names."""
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    files, weight_map = [], {}
    for i, names in enumerate(self._shards):
      final = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(self._part_path(i), os.path.join(self.directory, final))
      files.append(final)
      weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
    with open(os.path.join(self.directory, f"{self.prefix}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
    return files


def parse_size(text: str) -> int:
  """'2GB', '500MB', '4096' (bytes) -> bytes; decimal units as transformers' `max_shard_size`."""
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
  raw = text.strip().upper()
  for unit, factor in units.items():
    if raw.endswith(unit):
      number = raw[: -len(unit)].strip()
      break
  else:
    number, factor = raw, 1
  try:
    value = int(float(number) * factor)
  except ValueError:
    raise ValueError(f"shard size {text!r} is not a size such as 2GB, 500MB or 4096") from None
  if value <= 0:
    raise ValueError(f"shard size {text!r} must be > 0")
  return value
