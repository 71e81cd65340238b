"""A LLaVA JSON file and its image folder as a TFDS dataset of ArrayRecord shards.

Each record keeps its JSON text and its encoded image bytes, so training reads one file
per shard with random access and no image folder. Written and read without TensorFlow
(`tfds` ArrayRecord writer, `tfds.builder_from_directory(...).as_data_source`). Records are
stored in file order, so `example_index` means the same record in both sources; an image
that cannot be read at build time is stored as its failure reason, and the pipeline skips
and counts that record as it would from the JSON source.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from typing import Mapping, Optional

import numpy as np

from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.images import read_image_file, resolve_image_path
from sqllava_jax.data.sources import record_texts

DATASET_NAME = "llava_conversations"
VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class BuildResult:
  path: str  # the directory holding dataset_info.json: use it as data.tfds_dir
  records: Mapping[str, int]  # split -> records written
  image_problems: Mapping[str, int]  # reason -> records whose image could not be read
  image_bytes: int


def _examples(json_path: str, image_folder: str, problems: collections.Counter, sizes: list):
  for index, text in enumerate(record_texts(json_path)):
    data, reason, detail = b"", "", ""
    try:
      raw = json.loads(text)
    except ValueError:
      raw = None  # stored as it is; the pipeline refuses it as a malformed record
    image = raw.get("image") if isinstance(raw, dict) else None
    if isinstance(image, str) and image:
      try:
        data = read_image_file(resolve_image_path(image_folder, image), name=image)
      except BadRecord as e:
        reason, detail = e.reason, e.detail
        problems[reason] += 1
    sizes.append(len(data))
    yield index, {"record": text.decode("utf-8", errors="replace"), "image_bytes": data,
                  "image_error": reason, "image_error_detail": detail}


def _builder_class():
  # tfds takes most of a second to import: only building a data set pays for it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class LlavaConversations(tfds.core.GeneratorBasedBuilder):
    """LLaVA-format conversations with their encoded images."""
    VERSION = tfds.core.Version(VERSION)
    # No checksums file to find next to the code; looking for one trips over a missing
    # `importlib_resources` backport on Python >= 3.9 (tfds 4.9).
    code_path = None

    def __init__(self, *, splits: Mapping[str, str], image_folder: str, **kwargs):
      self._splits = dict(splits)
      self._image_folder = image_folder
      self.problems: collections.Counter = collections.Counter()
      self.sizes: list = []
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              "record": tfds.features.Text(),
              "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
              "image_error": tfds.features.Text(),
              "image_error_detail": tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: _examples(path, self._image_folder, self.problems, self.sizes)
              for split, path in self._splits.items()}

    def _generate_examples(self):
      raise NotImplementedError  # `_split_generators` hands out the generators

  LlavaConversations.name = DATASET_NAME
  return LlavaConversations


def build_dataset(splits: Mapping[str, str], image_folder: str, out_dir: str, *,
                  num_shards: Optional[int] = None) -> BuildResult:
  """Writes `out_dir/llava_conversations/1.0.0/` with one split per {split: json_path}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  for split, path in splits.items():
    if not os.path.isfile(path):
      raise ValueError(f"split {split!r}: data file {path!r} does not exist")
  target = os.path.join(out_dir, DATASET_NAME, VERSION)
  if os.path.exists(os.path.join(target, "dataset_info.json")):
    raise ValueError(f"{target} already holds a dataset; remove it or choose another --out")
  with registered.skip_registration():
    cls = _builder_class()
  builder = cls(splits=splits, image_folder=image_folder, data_dir=out_dir,
                file_format="array_record")
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return BuildResult(path=builder.data_dir,
                     records={s: builder.info.splits[s].num_examples for s in splits},
                     image_problems=dict(builder.problems), image_bytes=sum(builder.sizes))
