"""One record -> one training example: parse, relabel, tokenise and label, load the image.

`ExampleBuilder` is a pure function of the record index (and the seed), so any process or
worker can build any example and get the same result. Examples are variable-length;
`collate` pads a list of them into a fixed-shape batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from sqllava_jax.data import images
from sqllava_jax.data.conversations import Record, parse_record, record_id, relabel_self_questions
from sqllava_jax.data.errors import BadRecord, Skipped
from sqllava_jax.data.labels import IGNORE_INDEX, TokenizedConversation, tokenize_conversation
from sqllava_jax.data.templates import get_template
from sqllava_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Explained:
  """Everything that went into one example, for `show-example` and tests."""
  record: Record
  turns: tuple[tuple[str, str], ...]
  tokens: TokenizedConversation
  pixels: Optional[np.ndarray]  # uint8[H, W, 3] or None for text-only records


class ExampleBuilder:
  """Record index -> example dict: input_ids, labels int32[L], pixels uint8[H, W, 3] or None,
  example_index int. Raises `BadRecord` (with the record's id, index and file)."""

  def __init__(self, source, tokenizer: Tokenizer, *, template: str, sq_r: float, seed: int,
               image_size: int, aspect_ratio: images.AspectRatio, max_length: int,
               num_image_tokens: int, image_token_id: int, max_image_pixels: int):
    self.source = source
    self.tokenizer = tokenizer
    self.template = get_template(template)
    self.sq_r = sq_r
    self.seed = seed
    self.image_size = image_size
    self.aspect_ratio = aspect_ratio
    self.max_length = max_length
    self.num_image_tokens = num_image_tokens
    self.image_token_id = image_token_id
    self.max_image_pixels = max_image_pixels

  def __len__(self) -> int:
    return len(self.source)

  def explain(self, index: int) -> Explained:
    raw = None
    try:
      raw, read_image = self.source[index]
      record = parse_record(raw, index=index)
      turns = relabel_self_questions(record, sq_r=self.sq_r, seed=self.seed)
      tokens = tokenize_conversation(
          self.tokenizer, self.template, turns, num_image_tokens=self.num_image_tokens,
          image_token_id=self.image_token_id, max_length=self.max_length,
          system=record.system)
      pixels = None
      if record.image is not None:
        pixels = self._pixels(raw, record, read_image)
    except BadRecord as e:
      raise e.with_context(record_id=record_id(raw, index), index=index,
                           file=getattr(self.source, "path", None)) from None
    return Explained(record, turns, tokens, pixels)

  def _pixels(self, raw, record: Record, read_image) -> np.ndarray:
    assert record.image is not None  # called for image records only
    data = read_image()
    try:
      return images.load_pixels(data, size=self.image_size, aspect_ratio=self.aspect_ratio,
                                max_pixels=self.max_image_pixels, name=record.image)
    except BadRecord as e:
      raise e.with_context(image_file=self.source.image_location(raw)) from None

  def __call__(self, index: int) -> dict[str, Any]:
    explained = self.explain(index)
    return {"input_ids": explained.tokens.input_ids, "labels": explained.tokens.labels,
            "pixels": explained.pixels, "example_index": int(index)}


class BuildOrSkip:
  """`ExampleBuilder` that returns `Skipped` for a bad record (or raises, when strict)."""

  def __init__(self, builder: ExampleBuilder, *, strict: bool):
    self.builder = builder
    self.strict = strict

  def __call__(self, index) -> dict[str, Any] | Skipped:
    try:
      return self.builder(int(index))
    except BadRecord as e:
      if self.strict:
        raise
      return Skipped(e.reason, str(e))


def batch_length(longest: int, buckets: Sequence[int], max_length: int) -> int:
  """The padded length of a batch whose longest row has `longest` tokens."""
  for b in sorted(buckets):
    if longest <= b:
      return b
  return max_length


def collate(examples: Sequence[dict[str, Any]], *, batch_size: int, length: int,
            image_size: int, pad_id: int, alloc=np.empty) -> dict[str, np.ndarray]:
  """Pads examples into one batch of fixed shapes (B = batch_size, T = length):

  input_ids, labels, attention_mask, positions, segment_ids: int32[B, T];
  pixel_values: float32[B, H, W, 3] (CLIP-normalised, zeros for text-only rows);
  has_image: bool[B]; example_index: int64[B]. Rows past len(examples) are padding
  (no tokens, example_index -1). `alloc(shape, dtype)` allocates pixel_values (the only
  large array), e.g. in shared memory for worker processes.
  """
  assert len(examples) <= batch_size, (len(examples), batch_size)
  shape = (batch_size, length)
  batch = {
      "input_ids": np.full(shape, pad_id, np.int32),
      "labels": np.full(shape, IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros(shape, np.int32),
      "positions": np.zeros(shape, np.int32),
      "segment_ids": np.zeros(shape, np.int32),
      "pixel_values": alloc((batch_size, image_size, image_size, 3), np.float32),
      "has_image": np.zeros((batch_size,), bool),
      "example_index": np.full((batch_size,), -1, np.int64),
  }
  for row, ex in enumerate(examples):
    n = len(ex["input_ids"])
    assert n <= length, (n, length)
    batch["input_ids"][row, :n] = ex["input_ids"]
    batch["labels"][row, :n] = ex["labels"]
    batch["attention_mask"][row, :n] = 1
    batch["positions"][row, :n] = np.arange(n, dtype=np.int32)
    batch["segment_ids"][row, :n] = 1
    batch["example_index"][row] = ex["example_index"]
    if ex["pixels"] is not None:
      images.normalize_into(ex["pixels"], batch["pixel_values"][row])
      batch["has_image"][row] = True
  batch["pixel_values"][~batch["has_image"]] = 0.0
  return batch
