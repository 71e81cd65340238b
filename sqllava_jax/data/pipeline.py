"""The Grain input pipeline: record indices -> fixed-shape batches, checkpointable.

  range(N) -> seeded shuffle -> repeat(epochs) -> shard by process -> build example
  (parse, relabel, tokenise, label, load image, truncate) -> [pack, `data.packing`]
  -> batch + pad -> worker processes

Bad records travel as `Skipped` markers to the batcher, which drops them and attaches them
to the next batch; the iterator at the top counts them per reason in the main process
(whatever worker saw them) and keeps the counts in its checkpoint state.

    ds = make_pipeline(cfg, batch_size=8)
    it = iter(ds)
    batch = next(it)             # dict of numpy arrays, see `examples.collate`
    state = it.get_state()       # JSON-serialisable; also grain.checkpoint.CheckpointHandler
    it.skipped, it.skip_summary()
"""

from __future__ import annotations

from typing import Any, Optional

import grain
import jax
import numpy as np
from absl import flags

from sqllava_jax.data import packing, sources
from sqllava_jax.data.errors import SkipLog, Skipped
from sqllava_jax.data.examples import BuildOrSkip, ExampleBuilder, batch_length, collate
from sqllava_jax.data.tokenizer import Tokenizer

SKIPPED_KEY = "_skipped"
# This many bad records in a row without one good one means the configuration, not the
# data, is wrong (paths, template): stop instead of skipping forever.
MAX_SKIPS_IN_A_ROW = 10_000


class _BatchIterator(grain.DatasetIterator):
  """Collects `batch_size` rows, passing over `Skipped` markers (reported with the batch).
  A row is one example, or with `packed` one packed row carrying its own markers."""

  def __init__(self, parent, *, batch_size, drop_remainder, collate_kwargs, shared_memory):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._collate_kwargs = dict(collate_kwargs)
    self._packed = self._collate_kwargs.pop("packed", None)
    # In a worker process the images go straight into shared memory: no copy on the way
    # to the training process.
    self._alloc = grain.multiprocessing.SharedMemoryArray if shared_memory else np.empty

  def __next__(self):
    rows, skipped = [], []
    while len(rows) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        # A short last batch is kept only when asked; with skips to report it may hold
        # no rows at all (all padding) so the counts are not lost.
        if self._drop_remainder or not (rows or skipped):
          raise
        break
      if isinstance(element, Skipped):
        skipped.append((element.reason, element.message))
        if not rows and len(skipped) >= MAX_SKIPS_IN_A_ROW:
          raise ValueError(f"{len(skipped)} records in a row were skipped, the last: "
                           f"{element.message}")
      else:
        rows.append(element)
    if self._packed is not None:
      batch = packing.collate_packed(rows, batch_size=self._batch_size, alloc=self._alloc,
                                     image_size=self._collate_kwargs["image_size"],
                                     length=self._collate_kwargs["max_length"],
                                     pad_id=self._collate_kwargs["pad_id"], **self._packed)
      batch[SKIPPED_KEY] = skipped + packing.skipped_of(rows)
      return batch
    longest = max((len(r["input_ids"]) for r in rows), default=1)
    length = batch_length(longest, self._collate_kwargs["buckets"],
                          self._collate_kwargs["max_length"])
    batch = collate(rows, batch_size=self._batch_size, length=length,
                    image_size=self._collate_kwargs["image_size"],
                    pad_id=self._collate_kwargs["pad_id"], alloc=self._alloc)
    batch[SKIPPED_KEY] = skipped
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class BatchDataset(grain.IterDataset):
  """Fixed-shape batches of examples; see `examples.collate`."""

  def __init__(self, parent, *, batch_size: int, drop_remainder: bool, **collate_kwargs):
    super().__init__(parent)
    self._kwargs = dict(batch_size=batch_size, drop_remainder=drop_remainder,
                        collate_kwargs=collate_kwargs)
    self._shared_memory = False

  def enable_shared_memory_output(self) -> None:
    """Called by Grain's `mp_prefetch` (the `SupportsSharedMemoryOutput` protocol)."""
    self._shared_memory = True

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), shared_memory=self._shared_memory,
                          **self._kwargs)


class PipelineIterator(grain.DatasetIterator):
  """The pipeline's iterator: batches, checkpoint state, and the skipped-record counts."""

  def __init__(self, parent, *, log_first: int):
    super().__init__(parent)
    self._skips = SkipLog(log_first)
    self._examples = 0

  def __next__(self):
    batch = next(self._parent)
    for reason, message in batch.pop(SKIPPED_KEY):
      self._skips.add(reason, message)
    self._examples += int((batch["example_index"] >= 0).sum())
    return batch

  @property
  def skipped(self) -> dict[str, int]:
    """Records skipped so far, per reason."""
    return dict(self._skips.counts)

  @property
  def examples_seen(self) -> int:
    return self._examples

  def skip_summary(self) -> str:
    return self._skips.summary(self._examples)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "skips": self._skips.state(),
            "examples": self._examples}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._skips.restore(state["skips"])
    self._examples = int(state["examples"])


class Pipeline(grain.IterDataset):
  """Top of the pipeline; iterating it gives a `PipelineIterator`."""

  def __init__(self, parent, *, log_first: int, num_records: Optional[int]):
    super().__init__(parent)
    self._log_first = log_first
    self.num_records = num_records

  def __iter__(self) -> PipelineIterator:
    return PipelineIterator(self._parent.__iter__(), log_first=self._log_first)


def take_absl_flags_as_parsed() -> None:
  """Marks absl's flags as parsed, with their defaults, for the whole process.

  Grain's worker prefetch reads its settings from absl flags, which only absl-based programs
  parse; this project's commands use argparse, and a library caller may use neither. So
  `make_pipeline` calls this, once, before it starts worker processes (a no-op when a program
  has parsed them already); nothing else touches absl's state."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_source(data, *, split: Optional[str] = None, image_size: int = 336):
  """The record source a `DataConfig` names (`sources.SOURCES`), for `split` (default
  `data.split`); image_size is the vision tower's (the synthetic set renders at it)."""
  # The source's own checks ran when the `DataConfig` was built (`check_data_config`).
  return sources.source_kind(data.source).build(data, split or data.split, image_size)


def tokenizer_path(data) -> str:
  """`data.tokenizer`, else the one the source brings (the synthetic set trains its own)."""
  if data.tokenizer:
    return data.tokenizer
  kind = sources.source_kind(data.source)
  if kind.tokenizer is not None:
    return kind.tokenizer(data)
  raise ValueError("data.tokenizer is not set; point it at a SentencePiece tokenizer.model")


def make_example_builder(cfg, *, num_image_tokens: Optional[int] = None,
                         split: Optional[str] = None) -> ExampleBuilder:
  """The per-record transform of the pipeline, on its own (for `show-example`, evaluation)."""
  data = cfg.data
  image_size = cfg.model.vision.image_size
  source = make_source(data, split=split, image_size=image_size)
  if not len(source):
    raise ValueError(f"{source} has no records")
  return ExampleBuilder(
      source, Tokenizer(tokenizer_path(data)), template=data.template, sq_r=data.sq_r,
      seed=data.seed, image_size=image_size, aspect_ratio=data.image_aspect_ratio,
      max_length=data.max_length,
      num_image_tokens=cfg.model.num_image_tokens if num_image_tokens is None else num_image_tokens,
      image_token_id=cfg.model.image_token_id, max_image_pixels=data.max_image_pixels)


def make_pipeline(cfg, *, batch_size: int, num_image_tokens: Optional[int] = None,
                  split: Optional[str] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, shuffle: Optional[bool] = None,
                  num_epochs: Optional[int] = None, drop_remainder: Optional[bool] = None,
                  num_workers: Optional[int] = None) -> Pipeline:
  """The input pipeline of `cfg.data` for this process: `batch_size` rows per batch.

  num_image_tokens: placeholder positions per `<image>` (default `cfg.model.num_image_tokens`).
  process_index / process_count: this process's shard (default: `jax.process_index()` of
  `jax.process_count()`). shuffle, num_epochs (<= 0: forever), drop_remainder, num_workers
  and split default to `cfg.data`. `Pipeline.num_records` is how many records this process
  reads over all epochs (None when repeating forever).
  """
  data = cfg.data
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0")
  builder = make_example_builder(cfg, num_image_tokens=num_image_tokens, split=split)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in 0..process_count-1={process_count - 1}")
  shuffle = data.shuffle if shuffle is None else shuffle
  num_epochs = data.num_epochs if num_epochs is None else num_epochs
  drop_remainder = data.drop_remainder if drop_remainder is None else drop_remainder
  num_workers = data.num_workers if num_workers is None else num_workers

  ds = grain.MapDataset.range(len(builder))
  if shuffle:
    ds = ds.shuffle(seed=data.seed)
  ds = ds.repeat(num_epochs if num_epochs > 0 else None)
  ds = ds[process_index::process_count]
  num_records = len(ds) if num_epochs > 0 else None
  ds = ds.map(BuildOrSkip(builder, strict=data.strict))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads,
                                            prefetch_buffer_size=batch_size * data.prefetch))
  image_size, pad_id = cfg.model.vision.image_size, builder.tokenizer.pad_id
  packed = None
  if data.packing:
    packed = {"image_slots": data.image_slots(builder.num_image_tokens),
              "max_examples": data.max_examples_per_row}
    ds = packing.pack(ds, length=data.max_length, num_bins=batch_size, image_size=image_size,
                      pad_id=pad_id, max_skips=MAX_SKIPS_IN_A_ROW, **packed)
  ds = BatchDataset(ds, batch_size=batch_size, drop_remainder=drop_remainder,
                    buckets=tuple(data.length_buckets), max_length=data.max_length,
                    image_size=image_size, pad_id=pad_id, packed=packed)
  if num_workers > 0:
    take_absl_flags_as_parsed()  # Grain's workers read absl flags: see there
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=data.prefetch))
  return Pipeline(ds, log_first=data.log_first_bad, num_records=num_records)
