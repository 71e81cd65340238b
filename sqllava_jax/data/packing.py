"""Sequence packing: several examples in one row of `max_length` tokens (`data.packing`).

Packing is Grain's first-fit packer (`grain.experimental.FirstFitPackIterDataset`): it
fills `num_bins` rows at a time, putting each example into the first row with room for its
tokens *and* its image, and keeps its iterator state (the parent's state where the current
rows began plus the next row to emit), so a packed pipeline checkpoints and resumes exactly.
Each example enters the packer as

    input_ids, labels  int32[n]               tokens, packed along the row (length T)
    pixels             uint8[k, H, W, 3]      k = 1 with an image, 0 without (K slots per row)
    example_index      int                    kept per row as a list
    _skipped           [(reason, message)]    bad records since the previous example

and a packed row comes out with Grain's `<feature>_segment_ids` / `<feature>_positions`:
segment ids 1, 2, ... per example (0 = padding), positions restarting at 0. An example's
image goes to the next free image slot of its row, so the k-th image of a row belongs to the
k-th example that has one, in token order: the model's cumulative-sum scatter over the row's
placeholders then hands every example its own image (`SQLLaVA.embed_inputs`).

Bad records travel as `Skipped` markers until the packer; `CarrySkips` attaches them to the
next good example (or, at the very end, to an empty one), so the counts reach the batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from sqllava_jax.data import images
from sqllava_jax.data.errors import Skipped
from sqllava_jax.data.labels import IGNORE_INDEX

SKIPS = "_skipped"
META = ("example_index", SKIPS)


class _CarrySkipsIterator(grain.DatasetIterator):
  """Examples with the `Skipped` markers before each one attached to it. Between calls no
  marker is pending, so the parent's state is this iterator's state."""

  def __init__(self, parent, image_size: int, max_skips: int):
    super().__init__(parent)
    self._empty_pixels = np.zeros((0, image_size, image_size, 3), np.uint8)
    self._max_skips = max_skips
    self._done = False

  def __next__(self) -> dict[str, Any]:
    skipped = []
    while not self._done:
      try:
        element = next(self._parent)
      except StopIteration:
        self._done = True
        break
      if isinstance(element, Skipped):
        skipped.append((element.reason, element.message))
        if len(skipped) >= self._max_skips:
          raise ValueError(f"{len(skipped)} records in a row were skipped, the last: "
                           f"{element.message}")
        continue
      return self._packable(element, skipped)
    if skipped:  # bad records after the last good one still reach the counts
      return {"input_ids": np.zeros((0,), np.int32), "labels": np.zeros((0,), np.int32),
              "pixels": self._empty_pixels, "example_index": -1, SKIPS: skipped}
    raise StopIteration

  def _packable(self, ex: dict[str, Any], skipped: list) -> dict[str, Any]:
    pixels = self._empty_pixels if ex["pixels"] is None else ex["pixels"][None]
    return {"input_ids": np.asarray(ex["input_ids"], np.int32),
            "labels": np.asarray(ex["labels"], np.int32), "pixels": pixels,
            "example_index": int(ex["example_index"]), SKIPS: skipped}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._done = False


class CarrySkips(grain.IterDataset):
  def __init__(self, parent, *, image_size: int, max_skips: int):
    super().__init__(parent)
    self._image_size = image_size
    self._max_skips = max_skips

  def __iter__(self):
    return _CarrySkipsIterator(self._parent.__iter__(), self._image_size, self._max_skips)


def pack(ds: grain.IterDataset, *, length: int, image_slots: int, max_examples: int,
         num_bins: int, image_size: int, pad_id: int, max_skips: int) -> grain.IterDataset:
  """Examples (and `Skipped` markers) -> packed rows (see the module docstring).
  max_skips: this many bad records in a row is a configuration error, raised."""
  ds = CarrySkips(ds, image_size=image_size, max_skips=max_skips)
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"input_ids": length, "labels": length, "pixels": image_slots},
      num_packing_bins=num_bins, shuffle_bins=False, meta_features=META,
      padding_struct={"input_ids": pad_id, "labels": IGNORE_INDEX, "pixels": 0},
      max_sequences_per_bin=max_examples)


def collate_packed(rows: Sequence[dict[str, Any]], *, batch_size: int, length: int,
                   image_size: int, image_slots: int, max_examples: int, pad_id: int,
                   alloc=np.empty) -> dict[str, np.ndarray]:
  """Packed rows -> one batch (rows past len(rows) are empty padding rows):

  input_ids, labels, attention_mask, positions, segment_ids: int32[B, T];
  pixel_values: float32[B, K, H, W, 3] (CLIP-normalised, zeros in empty slots);
  has_image: bool[B, K]; example_index: int64[B, E] (-1 where no example).
  """
  assert len(rows) <= batch_size, (len(rows), batch_size)
  shape = (batch_size, length)
  batch = {
      "input_ids": np.full(shape, pad_id, np.int32),
      "labels": np.full(shape, IGNORE_INDEX, np.int32),
      "positions": np.zeros(shape, np.int32),
      "segment_ids": np.zeros(shape, np.int32),
      "pixel_values": alloc((batch_size, image_slots, image_size, image_size, 3), np.float32),
      "has_image": np.zeros((batch_size, image_slots), bool),
      "example_index": np.full((batch_size, max_examples), -1, np.int64),
  }
  for i, row in enumerate(rows):
    batch["input_ids"][i] = row["input_ids"]
    batch["labels"][i] = row["labels"]
    batch["positions"][i] = row["input_ids_positions"]
    batch["segment_ids"][i] = row["input_ids_segment_ids"]
    batch["has_image"][i] = row["pixels_segment_ids"] > 0
    real = [e for e in row["example_index"] if e >= 0]
    batch["example_index"][i, :len(real)] = real
  batch["attention_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
  for i, row in enumerate(rows):
    n = int(batch["has_image"][i].sum())  # the packer fills a row's image slots in order
    images.normalize_into(row["pixels"][:n], batch["pixel_values"][i, :n])
  batch["pixel_values"][~batch["has_image"]] = 0.0
  return batch


def skipped_of(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
  """The bad-record markers the packed rows carry, in order."""
  return [s for row in rows for per_example in row[SKIPS] for s in per_example]
