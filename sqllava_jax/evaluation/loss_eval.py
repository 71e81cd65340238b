"""Teacher-forced loss and perplexity on a held-out set (the training labels, no sampling).

Batches come from the training input pipeline (same template, labels and image handling),
read once in order; each process reads its shard. The loss is the training step's
(`training.step.forward_loss`), which projects to the vocabulary a chunk of positions at a
time, so [B, T, V] logits never exist at once.
Perplexity is exp(total loss / trained tokens) over the whole set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from sqllava_jax.data.labels import IGNORE_INDEX
from sqllava_jax.data.pipeline import make_pipeline
from sqllava_jax.evaluation import data_parallel
from sqllava_jax.training.step import MODEL_INPUTS, forward_loss

# Positions projected onto the vocabulary at once.
LOGITS_CHUNK = 256
_PER_TOKEN = tuple(k for k in MODEL_INPUTS if k != "pixel_values")  # the [B, T] arrays


@functools.partial(jax.jit, static_argnums=0)
def _loss_step(graphdef, state, batch):
  """(sum, count) of the training loss, without dropout. Segment ids always: on unpacked rows
  they change nothing, on packed ones they keep examples apart."""
  return forward_loss(graphdef, state, batch, None, LOGITS_CHUNK, packed=True)


def pad_length(batch: dict, length: int) -> dict:
  """Right-pads the [B, T] arrays of a pipeline batch to `length` (no loss, segment 0)."""
  extra = length - batch["input_ids"].shape[1]
  if extra == 0:
    return batch
  fill = {"labels": IGNORE_INDEX}
  return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill.get(k, 0))
          if k in _PER_TOKEN else v for k, v in batch.items()}


def blank_batch(rows: int, length: int, image_size: int) -> dict:
  """A batch with no trained token (for a process whose shard ran out before the others')."""
  batch = {k: np.zeros((rows, length), np.int32) for k in _PER_TOKEN}
  batch["labels"][:] = IGNORE_INDEX
  batch["pixel_values"] = np.zeros((rows, image_size, image_size, 3), np.float32)
  return batch


@dataclasses.dataclass
class _Totals:
  loss: float = 0.0
  tokens: float = 0.0

  def add(self, loss_and_count) -> None:
    loss, count = loss_and_count
    self.loss += float(loss)
    self.tokens += float(count)


def _next_batch(it, rows: int, cfg) -> dict:
  """The next batch's MODEL_INPUTS arrays, blank once this process's data has ended."""
  batch = next(it, None)
  if batch is None:
    batch = blank_batch(rows, cfg.data.max_length, cfg.model.vision.image_size)
  else:
    batch = {k: batch[k] for k in MODEL_INPUTS}
  # Processes pad to the same length so that they run the same program.
  return pad_length(batch, data_parallel.agree_max(batch["input_ids"].shape[1]))


def evaluate_loss(model: nnx.Module, cfg, *, batch_size: int,
                  mesh: Optional[jax.sharding.Mesh] = None, progress: bool = True) -> dict:
  """Loss and perplexity of `model` on the records `cfg.data` names (every one, in order).
  batch_size is global; with `mesh` the rows are split over its data-parallel axes."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by {count} processes")
  rows = batch_size // count
  pipeline = make_pipeline(cfg, batch_size=rows, shuffle=False, num_epochs=1,
                           drop_remainder=False, num_workers=0)
  assert pipeline.num_records is not None  # one epoch: its length is known
  steps = data_parallel.agree_max(max(1, -(-pipeline.num_records // rows)))
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, data_parallel.replicated(mesh))
  totals, start = _Totals(), time.perf_counter()
  it = iter(pipeline)
  bar = tqdm(total=steps, unit="batch", desc="loss", disable=not progress or jax.process_index())
  for _ in range(steps):
    batch = _next_batch(it, rows, cfg)
    if mesh is not None:
      batch = dict(zip(batch, data_parallel.shard_batch(mesh, list(batch.values()))))
    totals.add(_loss_step(graphdef, state, batch))
    bar.update(1)
  bar.close()
  if not totals.tokens:
    raise ValueError("the held-out set has no trained tokens (every record skipped?): "
                     f"skipped {it.skipped}")
  loss = totals.loss / totals.tokens
  return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals.tokens),
          "examples_this_process": it.examples_seen, "skipped_this_process": it.skipped,
          "seconds": time.perf_counter() - start}
