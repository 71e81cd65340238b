"""Next-token cross-entropy without materialising [B, T, V] float32 logits.

The vocabulary projection runs over chunks of the sequence, so one chunk of logits exists at
a time. `chunked_cross_entropy` is the plain form (its backward recomputes each chunk's
logits under `jax.checkpoint`); `fused_cross_entropy` computes the same value and, when
differentiated, forms each chunk's gradient (softmax - one-hot) while its logits are at
hand: no second vocabulary projection, no [D, V] weight gradient unless the output kernel
trains, and no projection at all of chunks without a trained position (each row's trained
positions are moved to the front first). `next_token_loss` shifts HF-style labels onto
their targets first; training and the held-out loss both call it. Losses are returned as a
sum with the count of trained tokens; callers normalise over the global batch and every
accumulation step.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sqllava_jax.data.labels import IGNORE_INDEX


def shift_targets(labels: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """HF-style labels [B, T] -> targets [B, T]: hidden state t predicts labels[t + 1].

  With segment ids (packed rows), the last token of an example predicts nothing: the next
  position starts another example."""
  pad = jnp.full(labels.shape[:1] + (1,), IGNORE_INDEX, labels.dtype)
  targets = jnp.concatenate([labels[:, 1:], pad], axis=1)
  if segment_ids is None:
    return targets
  same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                          jnp.zeros(labels.shape[:1] + (1,), bool)], axis=1)
  return jnp.where(same, targets, IGNORE_INDEX)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """hidden: [B, T, D]; kernel: [D, V]; targets: int[B, T] (IGNORE_INDEX: no loss).

  Returns (sum of token losses, number of trained tokens), both float32 scalars.
  """
  hs, ts = _chunks(hidden, targets, chunk)

  @jax.checkpoint
  def one_chunk(h, tgt):
    logits = (h @ kernel.astype(h.dtype)).astype(jnp.float32)  # [B, C, V]
    valid = tgt != IGNORE_INDEX
    safe = jnp.where(valid, tgt, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)

  def body(carry, xs):
    total, count = carry
    s, c = one_chunk(*xs)
    return (total + s, count + c), None

  zero = jnp.zeros((), jnp.float32)
  (total, count), _ = jax.lax.scan(body, (zero, zero), (hs, ts))
  return total, count


def _chunks(hidden, targets, chunk):
  """[B, T, D], [B, T] -> [n, B, C, D], [n, B, C] (padded with ignored positions)."""
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  pad = (-t) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
  n = (t + pad) // chunk
  return hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1)


def _trained_first(hidden, targets):
  """Each row's positions reordered so the ones with a target come first (stable).

  Returns (hidden [B, T, D], targets [B, T]) in that order, the order itself (to put the
  gradient back) and the largest number of trained positions in any row: chunks that start
  past it hold no target, and their vocabulary projection is skipped."""
  order = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)
  longest = jnp.max(jnp.sum(targets != IGNORE_INDEX, axis=1))
  return (jnp.take_along_axis(hidden, order[..., None], axis=1),
          jnp.take_along_axis(targets, order, axis=1), order, longest)


def _loss_and_grads(hidden, kernel, targets, chunk, kernel_grad):
  """(sum, count) and their gradient w.r.t. `hidden` [B, T, D] (and `kernel`, if asked).

  Only chunks that hold a trained position are projected onto the vocabulary: positions
  are first moved so each row's trained ones lead (`_trained_first`). With images and
  prompts unlabelled that skips a third or more of the largest matmul of the step."""
  b, t, d = hidden.shape
  sorted_hidden, sorted_targets, order, longest = _trained_first(hidden, targets)
  hs, ts = _chunks(sorted_hidden, sorted_targets, chunk)
  c = hs.shape[2]
  w = kernel.astype(hidden.dtype)

  def project(carry, h, tgt):
    total, count, d_kernel = carry
    logits = (h @ w).astype(jnp.float32)  # [B, C, V]
    valid = tgt != IGNORE_INDEX
    safe = jnp.where(valid, tgt, 0)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    total = total + jnp.sum(jnp.where(valid, (lse - picked)[..., 0], 0.0))
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
    d_logits = ((jnp.exp(logits - lse) - onehot) * valid[..., None]).astype(h.dtype)
    d_h = d_logits @ w.T
    if kernel_grad:
      d_kernel = d_kernel + jnp.einsum("bcd,bcv->dv", h, d_logits,
                                       preferred_element_type=jnp.float32)
    return (total, count + jnp.sum(valid).astype(jnp.float32), d_kernel), d_h

  def skip(carry, h, tgt):
    del tgt
    return carry, jnp.zeros_like(h)

  def body(carry, xs):
    i, h, tgt = xs
    return jax.lax.cond(i * c < longest, project, skip, carry, h, tgt)

  zero = jnp.zeros((), jnp.float32)
  d_kernel = jnp.zeros(kernel.shape, jnp.float32) if kernel_grad else zero
  steps = jnp.arange(hs.shape[0])
  (total, count, d_kernel), d_hs = jax.lax.scan(body, (zero, zero, d_kernel), (steps, hs, ts))
  d_sorted = d_hs.swapaxes(0, 1).reshape(b, -1, d)[:, :t]
  d_hidden = jnp.take_along_axis(d_sorted, jnp.argsort(order, axis=1)[..., None], axis=1)
  return (total, count), (d_hidden, d_kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int,
                        kernel_grad: bool = True) -> tuple[jax.Array, jax.Array]:
  """`chunked_cross_entropy` with the gradient formed in the forward pass (see the module
  docstring). kernel_grad=False: the kernel is frozen, its gradient is reported as zeros and
  never computed."""
  return chunked_cross_entropy(hidden, kernel, targets, chunk)


def _fused_fwd(hidden, kernel, targets, chunk, kernel_grad):
  out, grads = _loss_and_grads(hidden, kernel, targets, chunk, kernel_grad)
  return out, (grads, targets)


def _fused_bwd(chunk, kernel_grad, residuals, cotangents):
  (d_hidden, d_kernel), targets = residuals
  g = cotangents[0]  # the count does not depend on the inputs
  d_kernel = (g * d_kernel).astype(d_kernel.dtype) if kernel_grad else None
  return ((g * d_hidden).astype(d_hidden.dtype), d_kernel,
          np.zeros(targets.shape, jax.dtypes.float0))


fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)


def next_token_loss(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int, *,
                    segment_ids: Optional[jax.Array] = None,
                    kernel_grad: bool = True) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, trained tokens) of HF-style labels [B, T] (unshifted): the loss of
  training and of held-out evaluation. segment_ids: packed rows (see `shift_targets`)."""
  targets = shift_targets(labels, segment_ids)
  return fused_cross_entropy(hidden, kernel, targets, chunk, kernel_grad)
