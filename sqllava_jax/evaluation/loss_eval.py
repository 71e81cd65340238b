"""Teacher-forced loss and perplexity on a held-out set (the training labels, no sampling).

Batches come from the training input pipeline (same template, labels and image handling),
read once in order; each process reads its shard. The jitted step projects to the
vocabulary a chunk of positions at a time, so [B, T, V] logits never exist at once.
Perplexity is exp(total loss / trained tokens) over the whole set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sqllava_jax.evaluation import data_parallel as dp

IGNORE = -100
STEP_KEYS = ("input_ids", "labels", "positions", "segment_ids", "pixel_values")


def summed_loss(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                chunk: int = 256) -> tuple[jax.Array, jax.Array]:
  """hidden [B, T, D], kernel [D, V], labels int[B, T] (unshifted, IGNORE: no loss).
  Position t predicts labels[t + 1]. Returns (sum of token losses, trained tokens), float32."""
  b, t, d = hidden.shape
  targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
  chunk = min(chunk, t)
  pad = (-t) % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
  n = (t + pad) // chunk

  def one(args):
    h, tgt = args  # [B, C, D], [B, C]
    logits = (h @ kernel.astype(h.dtype)).astype(jnp.float32)
    valid = tgt != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)

  hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
  sums, counts = jax.lax.map(one, (hs, ts))
  return sums.sum(), counts.sum()


@functools.partial(jax.jit, static_argnums=0)
def _loss_step(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  hidden, _ = model(batch["input_ids"], batch["pixel_values"], batch["positions"],
                    segment_ids=batch["segment_ids"])
  return summed_loss(hidden, model.llm.output_kernel(), batch["labels"])


def pad_length(batch: dict, length: int) -> dict:
  """Right-pads the [B, T] arrays of a pipeline batch to `length` (no loss, segment 0)."""
  extra = length - batch["input_ids"].shape[1]
  if extra == 0:
    return batch
  fill = {"labels": IGNORE}
  return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill.get(k, 0))
          if k in ("input_ids", "labels", "positions", "segment_ids") else v
          for k, v in batch.items()}


def blank_batch(rows: int, length: int, image_size: int) -> dict:
  """A batch with no trained token (for a process whose shard ran out before the others')."""
  batch = {k: np.zeros((rows, length), np.int32) for k in STEP_KEYS if k != "pixel_values"}
  batch["labels"][:] = IGNORE
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
  """The next batch's STEP_KEYS arrays, blank once this process's data has ended."""
  batch = next(it, None)
  if batch is None:
    batch = blank_batch(rows, cfg.data.max_length, cfg.model.vision.image_size)
  else:
    batch = {k: batch[k] for k in STEP_KEYS}
  # Processes pad to the same length so that they run the same program.
  return pad_length(batch, dp.agree_max(batch["input_ids"].shape[1]))


def evaluate_loss(model: nnx.Module, cfg, *, batch_size: int,
                  mesh: Optional[jax.sharding.Mesh] = None, progress: bool = True) -> dict:
  """Loss and perplexity of `model` on the records `cfg.data` names (every one, in order).
  batch_size is global; with `mesh` the rows are split over its data-parallel axes."""
  from sqllava_jax.data.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by {count} processes")
  rows = batch_size // count
  pipeline = make_pipeline(cfg, batch_size=rows, shuffle=False, num_epochs=1,
                           drop_remainder=False, num_workers=0)
  steps = dp.agree_max(max(1, -(-pipeline.num_records // rows)))
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, dp.replicated(mesh))
  totals, start = _Totals(), time.perf_counter()
  it = iter(pipeline)
  bar = tqdm(total=steps, unit="batch", desc="loss", disable=not progress or jax.process_index())
  for _ in range(steps):
    batch = _next_batch(it, rows, cfg)
    if mesh is not None:
      batch = dict(zip(batch, dp.shard_batch(mesh, list(batch.values()))))
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
