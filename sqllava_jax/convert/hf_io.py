"""Reading Hugging Face checkpoint directories: config.json plus safetensors shards or
pytorch_model*.bin files (opened with `weights_only=True`, never full unpickling).

Tensors are read lazily, one at a time, so a 7B import never holds two copies in memory.
A source (`TensorSource`) is anything with `keys()`, `get(name) -> np.ndarray` and `where`
(a reader, or one of the views here: prefixed, renamed, overlaid).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable, KeysView, Protocol, Sequence

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read as asked."""


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: no config.json")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _weight_files(directory: str) -> list[str]:
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(directory, index_name)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(directory, name) for name in files]
  for pattern in ("model*.safetensors", "pytorch_model*.bin"):
    files = sorted(glob.glob(os.path.join(directory, pattern)))
    if files:
      return files
  raise CheckpointError(f"{directory}: no weights found (model*.safetensors or "
                        "pytorch_model*.bin, with or without an index)")


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # Only for .bin checkpoints.
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _tensors_only(path: str, loaded) -> dict:
  """`loaded` (a .bin's content) if it maps names to tensors; weights_only still admits
  numbers, strings and nested dicts, which are no weights."""
  import torch  # Only for .bin checkpoints.
  if not isinstance(loaded, dict):
    raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dict of tensors")
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "weight files must hold tensors only")
  return loaded


class TensorSource(Protocol):
  """What the converters read tensors from: a checkpoint (`CheckpointReader`) or a view of
  one or several (`PrefixedSource`, `RenamedSource`, `OverlaySource`)."""
  where: str  # the file or directory, for error messages

  def keys(self) -> KeysView[str]: ...

  def get(self, name: str) -> np.ndarray: ...


class CheckpointReader:
  """Lazy access to the tensors of one HF checkpoint directory (or a list of files)."""

  def __init__(self, directory: str, files: Iterable[str] | None = None):
    self.where = directory
    self._files = list(files) if files is not None else _weight_files(directory)
    self._index: dict[str, str] = {}
    self._bins: dict[str, dict] = {}
    for path in self._files:
      for name in self._names_in(path):
        self._index[name] = path

  def _names_in(self, path: str) -> list[str]:
    if path.endswith(".safetensors"):
      try:
        with safe_open(path, framework="np") as f:
          return list(f.keys())
      except Exception as e:  # safetensors raises its own error types for damaged files.
        raise CheckpointError(f"{path}: cannot read safetensors header ({e}); "
                              "is the file truncated?") from e
    return list(self._load_bin(path).keys())

  def _load_bin(self, path: str) -> dict:
    if path not in self._bins:
      import torch  # Only for .bin checkpoints.
      try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except Exception as e:
        raise CheckpointError(
          f"{path}: cannot load with torch.load(weights_only=True) ({e})") from e
      self._bins[path] = _tensors_only(path, loaded)
    return self._bins[path]

  def keys(self) -> KeysView[str]:
    return self._index.keys()

  def get(self, name: str) -> np.ndarray:
    path = self._index.get(name)
    if path is None:
      raise CheckpointError(f"{self.where}: no tensor named {name}")
    if path.endswith(".safetensors"):
      try:
        # The flax framework reads bf16 without torch (numpy alone cannot).
        with safe_open(path, framework="flax") as f:
          return np.asarray(f.get_tensor(name))
      except Exception as e:
        raise CheckpointError(
          f"{path}: cannot read tensor {name} ({e}); is the file truncated?") from e
    return _torch_to_numpy(self._load_bin(path)[name])


class PrefixedSource:
  """A view of `source` with `prefix` added to every name that lacks it (transformers 5 saves
  `CLIPVisionModel` without the `vision_model.` prefix that older and full-CLIP files carry)."""

  def __init__(self, source: TensorSource, prefix: str):
    self._source = source
    self.where = getattr(source, "where", "checkpoint")
    self._names = {(n if n.startswith(prefix) else prefix + n): n for n in source.keys()}

  def keys(self) -> KeysView[str]:
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._source.get(self._names[name])


class RenamedSource:
  """A view of `source` with every name passed through `rename` (a checkpoint that spells a
  prefix differently, e.g. PEFT wrappers around the same module)."""

  def __init__(self, source: TensorSource, rename: Callable[[str], str]):
    self._source = source
    self.where = getattr(source, "where", "checkpoint")
    self._names: dict[str, str] = {}
    for name in source.keys():
      new = rename(name)
      if new in self._names:
        raise ValueError(f"{self.where}: tensors {self._names[new]} and {name} are the same "
                         f"parameter ({new}); keep only one of them")
      self._names[new] = name

  def keys(self) -> KeysView[str]:
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._source.get(self._names[name])


class OverlaySource:
  """Sources read as one, a later source's tensor replacing an earlier one's of the same name
  (a base checkpoint under the files a fine-tune saved, as `load_state_dict` lays them over)."""

  def __init__(self, sources: Sequence[TensorSource]):
    self.where = " + ".join(getattr(s, "where", "checkpoint") for s in sources)
    self._owner: dict[str, TensorSource] = {}
    for source in sources:
      for name in source.keys():
        self._owner[name] = source

  def keys(self) -> KeysView[str]:
    return self._owner.keys()

  def get(self, name: str) -> np.ndarray:
    return self._owner[name].get(name)

  def where_of(self, name: str) -> str:
    """The file or directory the tensor `name` comes from."""
    owner = self._owner.get(name)
    return getattr(owner, "where", self.where) if owner is not None else self.where
