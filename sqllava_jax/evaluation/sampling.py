"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

The order of the filters is transformers' (`TemperatureLogitsWarper`, then `TopKLogitsWarper`,
then `TopPLogitsWarper`), so the same settings mean the same distribution. Temperature, k
and p are traced values: changing them does not recompile; only greedy vs sampling does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 switches top-k off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 switches top-p off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature, top_k, top_p) as scalars for the jitted loop (greedy: dummies)."""
    t = 1.0 if self.greedy else self.temperature
    return (jnp.float32(t), jnp.int32(self.top_k), jnp.float32(self.top_p))


GREEDY = Sampling()
# The reference's self-questioning settings (docs/design.md section 6).
SELF_QUESTION = Sampling(temperature=1.2, top_k=300, top_p=0.95)


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                    top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits float[B, V] -> (sorted logits float[B, V] with filtered entries at -inf, the
  vocabulary id of each sorted entry int32[B, V]), sorted descending.

  Top-k keeps the k largest; top-p then keeps the smallest prefix whose probability
  reaches p (the most likely token always stays).
  """
  v = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / temperature
  ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), scaled.shape)
  neg_sorted, ids = jax.lax.sort((-scaled, ids), dimension=-1, num_keys=1)
  ranked = -neg_sorted
  rank = jnp.arange(v)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  ranked = jnp.where(rank < k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  ranked = jnp.where((mass_before < top_p) | (rank == 0), ranked, -jnp.inf)
  return ranked, ids


def next_token(logits: jax.Array, key: jax.Array, params: tuple[jax.Array, ...], *,
               greedy: bool) -> jax.Array:
  """logits float[B, V] -> int32[B]: argmax, or a draw from the filtered distribution."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  ranked, ids = filtered_logits(logits, *params)
  choice = jax.random.categorical(key, ranked, axis=-1)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
