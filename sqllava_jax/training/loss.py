"""Next-token cross-entropy without materialising [B, T, V] float32 logits.

The vocabulary projection runs over chunks of the sequence under `jax.checkpoint`, so the
forward keeps one chunk of logits at a time and the backward recomputes them per chunk.
Losses are returned as a sum with the count of trained tokens; callers normalise over the
global batch and every accumulation step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def shift_targets(labels: jax.Array) -> jax.Array:
  """HF-style labels [B, T] -> targets [B, T]: hidden state t predicts labels[t + 1]."""
  pad = jnp.full(labels.shape[:1] + (1,), IGNORE, labels.dtype)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """hidden: [B, T, D]; kernel: [D, V]; targets: int[B, T] (IGNORE: no loss).

  Returns (sum of token losses, number of trained tokens), both float32 scalars.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  pad = (-t) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
  n = (t + pad) // chunk
  hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h, tgt):
    logits = (h @ kernel.astype(h.dtype)).astype(jnp.float32)  # [B, C, V]
    valid = tgt != IGNORE
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
