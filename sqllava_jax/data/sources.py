"""Random-access record sources, and the registry that `data.source` names them in.

`source[i]` gives `(raw_record, read_image)`: the record as parsed JSON and a function that
returns the record's encoded image bytes or raises `BadRecord` (missing, zero-byte, outside
the folder). Sources pickle cheaply, so Grain can ship them to worker processes.

The library registers `json` (a LLaVA JSON file with an image folder) and `tfds` (a build of
`sqllava-jax build-dataset`); other code adds its own with `register_source`, and names the
registering module in an entry point (`sqllava_jax.plugins`) so that a config naming it
resolves without the core importing it (the demo's generated shapes set, `synthetic`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional

import numpy as np

from sqllava_jax import plugins
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.images import read_image_file, resolve_image_path

ReadImage = Callable[[], bytes]


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """How one `data.source` value becomes records.

  build(data, split, image_size): the source of a `DataConfig` for one split; image_size is
    the vision tower's.
  tokenizer(data): the tokenizer path when `data.tokenizer` is unset (None: it must be set).
  check(data): this source's checks of a `DataConfig` (raising `ConfigError`), run when
    the config is made (`check_data_config`).
  """
  build: Callable[[Any, str, int], Any]
  tokenizer: Optional[Callable[[Any], str]] = None
  check: Optional[Callable[[Any], None]] = None


# data.source -> its kind; see `register_source`.
SOURCES: dict[str, SourceKind] = {}


def register_source(name: str, build: Callable[[Any, str, int], Any], *,
                    tokenizer: Optional[Callable[[Any], str]] = None,
                    check: Optional[Callable[[Any], None]] = None) -> None:
  """Makes `data.source: name` build its records with `build` (see `SourceKind`)."""
  if name in SOURCES:
    raise ValueError(f"data source {name!r} is already registered "
                     f"(by {SOURCES[name].build.__qualname__})")
  SOURCES[name] = SourceKind(build, tokenizer, check)


def source_kind(name: str) -> SourceKind:
  kind = plugins.lookup(SOURCES, plugins.SOURCES, name)
  if kind is None:
    raise ValueError(f"unknown data.source {name!r}; choose one of {', '.join(SOURCES)}")
  return kind


def check_data_config(data) -> None:
  """The checks the named source adds to a `DataConfig` (none for an unregistered name)."""
  kind = plugins.lookup(SOURCES, plugins.SOURCES, data.source)
  if kind is not None and kind.check is not None:
    kind.check(data)


class JsonSource:
  """The records of a LLaVA JSON list (or JSON-lines file), with images under `image_folder`.

  Records are kept re-encoded in one bytes buffer with offsets, not as Python objects: that
  is about the file's size in memory, and one buffer to copy to each worker.
  """

  def __init__(self, json_path: str, image_folder: str = ""):
    self.path = os.fspath(json_path)
    self.image_folder = os.fspath(image_folder)
    encoded = record_texts(self.path)
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    self._blob = b"".join(encoded)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> tuple[Any, ReadImage]:
    text = self._blob[self._offsets[index]:self._offsets[index + 1]]
    try:
      raw = json.loads(text)
    except ValueError as e:  # a broken line of a JSON-lines file
      raise BadRecord("malformed_record", f"line {index + 1} is not valid JSON ({e})") from None
    return raw, functools.partial(self._read_image, raw)

  def image_location(self, raw) -> str:
    """Where the record's image lives, for messages."""
    return os.path.join(self.image_folder, str(raw.get("image")))

  def _read_image(self, raw) -> bytes:
    relative = raw["image"]
    if not self.image_folder:
      raise BadRecord("missing_image", f"image {relative!r} but data.image_folder is not set")
    return read_image_file(resolve_image_path(self.image_folder, relative), name=relative)

  def __repr__(self) -> str:
    return f"JsonSource({self.path!r}, {len(self)} records)"


def _is_json_lines(path: str) -> bool:
  return path.endswith((".jsonl", ".jsonlines"))


def record_texts(path: str) -> list[bytes]:
  """Each record as compact JSON bytes; lines of a JSON-lines file are kept as they are, so
  one broken line is one bad record, not an unreadable file."""
  if _is_json_lines(path):
    if not os.path.isfile(path):
      raise ValueError(f"data file {path!r} does not exist; set data.json_path")
    with open(path, "rb") as f:
      return [line.strip() for line in f if line.strip()]
  return [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()
          for r in read_records(path)]


def read_records(path: str) -> list:
  """The records of a LLaVA JSON list (or JSON-lines file) as Python objects."""
  if not os.path.isfile(path):
    raise ValueError(f"data file {path!r} does not exist; set data.json_path")
  with open(path, "rb") as f:
    try:
      if _is_json_lines(path):
        return [json.loads(line) for line in f if line.strip()]
      records = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return records


class TfdsSource:
  """A split written by `sqllava-jax build-dataset`, read through `tfds` without TensorFlow."""

  def __init__(self, tfds_dir: str, split: str = "train"):
    self.path = find_tfds_version_dir(tfds_dir)
    self.split = split
    self._open()

  def _open(self):
    # tfds takes most of a second to import: only a tfds source pays for it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(self.path)
    if self.split not in builder.info.splits:
      raise ValueError(f"{self.path} has no split {self.split!r}; it has "
                       f"{', '.join(builder.info.splits)} (set data.split)")
    self._data = builder.as_data_source(self.split)

  def __getstate__(self):
    return {"path": self.path, "split": self.split}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> tuple[Any, ReadImage]:
    example = self._data[index]
    try:
      raw = json.loads(example["record"])
    except ValueError as e:
      raise BadRecord("malformed_record", f"record {index} is not valid JSON ({e})") from None
    return raw, functools.partial(_stored_image, example, raw)

  def image_location(self, raw) -> str:
    return f"{self.path} ({self.split}): {raw.get('image')}"

  def __repr__(self) -> str:
    return f"TfdsSource({self.path!r}, split={self.split!r}, {len(self)} records)"


def _stored_image(example, raw) -> bytes:
  reason = _text(example["image_error"])
  if reason:
    raise BadRecord(reason, _text(example["image_error_detail"]))
  data = example["image_bytes"]
  if not data:
    raise BadRecord("empty_image_file", f"image {raw.get('image')!r} has zero bytes")
  return bytes(data)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def find_tfds_version_dir(path: str) -> str:
  """The directory holding `dataset_info.json`: `path` itself or its single dataset/version."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = []
  for root, _, files in os.walk(path):
    if "dataset_info.json" in files and "incomplete" not in root:
      found.append(root)
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(f"{what} TFDS datasets under {path!r}; set data.tfds_dir to the directory "
                     "that holds dataset_info.json (written by `sqllava-jax build-dataset`)")
  return found[0]


def _json_source(data, split: str, image_size: int) -> JsonSource:
  del split, image_size  # one file, one split
  if not data.json_path:
    raise ValueError("data.source=json needs data.json_path (a LLaVA JSON list)")
  return JsonSource(data.json_path, data.image_folder)


def _tfds_source(data, split: str, image_size: int) -> TfdsSource:
  del image_size  # images are stored encoded; the example builder resizes them
  if not data.tfds_dir:
    raise ValueError("data.source=tfds needs data.tfds_dir (from `sqllava-jax build-dataset`)")
  return TfdsSource(data.tfds_dir, split)


register_source("json", _json_source)
register_source("tfds", _tfds_source)
