"""LLaMA decoder, numerically transformers' `LlamaForCausalLM` (Vicuna-7B/13B v1.5).

RMSNorm, rotary embeddings (rotate-half layout, as transformers), SwiGLU MLP, grouped-query
attention, an untied `lm_head`, and a KV cache for decoding. Layers are scanned.

Masks: without a cache, attention is causal and, when `segment_ids` are given, stays
inside a segment (padding is segment 0; packed examples are segments 1, 2, ...). With a
cache, every row writes the same slots (prompts are left-padded), and a per-row `valid` mask
over the cache slots hides padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sqllava_jax.config import LLMConfig, LoRAConfig
from sqllava_jax.models.attention import attention, cache_attention
from sqllava_jax.models.key_map import KeySpec, linear_key_map, norm_key_map, transpose
from sqllava_jax.models.layers import (
  Embed,
  RMSNorm,
  make_layer_stack,
  param,
  scan_layers,
  shard_activation,
)
from sqllava_jax.models.lora import fold_rng, linear_factory

# Logical axes of a layer's cache [B, K, S, H] and of the stacked cache [L, B, K, S, H]:
# rows over the batch axes, kv heads over `tensor`, as the activations they hold.
CACHE_AXES = ("batch", "kv_heads", "length", None)
STACKED_CACHE_AXES = ("layers",) + CACHE_AXES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer, heads-major (the layout `cache_attention` reads in place):
  k, v [layers, B, kv_heads, S, head_dim], or with `per_layer=True` tuples of one
  [B, kv_heads, S, head_dim] array per layer (the layout of `decode(..., layers=...)`);
  `valid` [B, S] marks slots holding real tokens; `index` is the next slot to write (shared
  by all rows)."""
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.float32, *,
           per_layer: bool = False) -> "KVCache":
    """Zeros, sharded like `CACHE_AXES` under active axis rules."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.effective_head_dim)

    def zeros() -> jax.Array | tuple[jax.Array, ...]:
      if per_layer:
        return tuple(shard_activation(jnp.zeros(shape, dtype), CACHE_AXES)
                     for _ in range(cfg.num_layers))
      return shard_activation(jnp.zeros((cfg.num_layers,) + shape, dtype), STACKED_CACHE_AXES)

    valid = shard_activation(jnp.zeros((batch, max_len), bool), ("batch", "length"))
    return cls(k=zeros(), v=zeros(), valid=valid, index=jnp.zeros((), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  def _map(self, fn) -> "KVCache":
    """`fn(array, its logical axes)` applied to k, v and valid; the index kept."""
    if isinstance(self.k, tuple) and isinstance(self.v, tuple):
      k: jax.Array | tuple[jax.Array, ...] = tuple(fn(a, CACHE_AXES) for a in self.k)
      v: jax.Array | tuple[jax.Array, ...] = tuple(fn(a, CACHE_AXES) for a in self.v)
    else:
      assert not isinstance(self.k, tuple) and not isinstance(self.v, tuple)
      k, v = fn(self.k, STACKED_CACHE_AXES), fn(self.v, STACKED_CACHE_AXES)
    return KVCache(k=k, v=v, valid=fn(self.valid, ("batch", "length")), index=self.index)

  def take_rows(self, rows: jax.Array) -> "KVCache":
    """The cache whose row i is this cache's row `rows[i]` (int[B']): several continuations
    of one prompt head read its keys and values without computing them again."""
    take = lambda a, axes: shard_activation(jnp.take(a, rows, axis=axes.index("batch")), axes)
    return self._map(take)

  def grow(self, max_len: int) -> "KVCache":
    """The cache with empty slots added up to `max_len`."""
    extra = max_len - self.valid.shape[1]
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of {self.valid.shape[1]} slots to {max_len}")

    def pad(a, axes):
      widths = [(0, 0)] * a.ndim
      widths[axes.index("length")] = (0, extra)
      return shard_activation(jnp.pad(a, widths), axes)

    return self._map(pad)


class LayerCache(NamedTuple):
  """What one layer gets of the cache: the stacked k, v [L, B, K, S, H] and its own index
  in them, or (layer None) its own k, v [B, K, S, H]; `start`, the first slot to write; and whether
  the cache held nothing before (a prefill: the new tokens attend only to each other,
  through the training attention, and are then written; no [T, S] scores over the cache)."""
  k: jax.Array
  v: jax.Array
  layer: Any
  start: jax.Array
  fresh: bool = False


def write_slots(cache: jax.Array, new: jax.Array, layer, index) -> jax.Array:
  """cache [L, B, K, S, H] (or [B, K, S, H] when `layer` is None) with new [B, T, K, H]
  written at layer `layer`, slots index..index+T-1, in place (only the new slots)."""
  new = new.swapaxes(1, 2).astype(cache.dtype)
  if layer is None:
    out = jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return shard_activation(out, CACHE_AXES)
  out = jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, index, 0))
  return shard_activation(out, STACKED_CACHE_AXES)


class Rotary(NamedTuple):
  """The rotary angles' cos and sin at each position, [B, T, H] each (rotate-half layout, as
  transformers): looked up once per forward and shared by every layer, as transformers'
  `rotary_emb` computes them once."""
  cos: jax.Array
  sin: jax.Array

  @classmethod
  def at(cls, positions: jax.Array, head_dim: int, theta: float, dtype, *,
         max_position: int) -> "Rotary":
    """positions int[B, T], each below `max_position` -> the table rows at them.

    The angles of every position below `max_position` are computed once (float32, as
    transformers: position times inverse frequency) and gathered: cos and sin taken of the
    [B, T, H] angles directly get fused by XLA into each consumer, which on a CPU recomputed
    them for every head of every layer (the largest cost of a prefill after the matmuls)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(max_position, dtype=jnp.float32)[:, None] * inv_freq  # [P, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return cls(jnp.cos(angles).astype(dtype)[positions], jnp.sin(angles).astype(dtype)[positions])

  def apply(self, x: jax.Array) -> jax.Array:
    """x: [B, T, N, H] -> x rotated by its position."""
    h = x.shape[-1]
    cos, sin = self.cos[:, :, None, :], self.sin[:, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def cache_mask(valid: jax.Array, index: jax.Array, t: int) -> jax.Array:
  """[B, 1, T, S]: query i (slot index + i) sees valid slots up to and including its own."""
  s = valid.shape[1]
  q_slots = index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
  return jnp.logical_and(causal[None], valid[:, None, :])[:, None]


class Attention(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, make_linear, impl: str, block_size: int):
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.head_dim = cfg.effective_head_dim
    self.impl, self.block_size = impl, block_size
    d, nh, nk = cfg.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = make_linear("q_proj", d, nh, ("embed", "heads"))
    self.k_proj = make_linear("k_proj", d, nk, ("embed", "kv_heads"))
    self.v_proj = make_linear("v_proj", d, nk, ("embed", "kv_heads"))
    self.o_proj = make_linear("o_proj", nh, d, ("heads", "embed"))

  def __call__(self, x, rope: Rotary, masking, cache_kv, rng):
    """x: [B, T, D]; rope: the positions' rotary table; masking: segment ids int[B, T] or
    None without a cache or with a fresh one, the cache mask [B, 1, T, S] with any other;
    cache_kv: None or a `LayerCache`. Returns (out [B, T, D], the updated (k, v) or None)."""
    b, t, _ = x.shape
    q = self.q_proj(x, fold_rng(rng, 0)).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x, fold_rng(rng, 1)).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, fold_rng(rng, 2)).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = checkpoint_name(rope.apply(q), "query")
    k = checkpoint_name(rope.apply(k), "key")
    v = checkpoint_name(v, "value")
    new_kv = None
    if cache_kv is None or cache_kv.fresh:
      out = attention(q, k, v, impl=self.impl, segment_ids=masking, is_causal=True,
                      block_size=self.block_size)
    if cache_kv is not None:
      c = cache_kv
      ck, cv = write_slots(c.k, k, c.layer, c.start), write_slots(c.v, v, c.layer, c.start)
      new_kv = (ck, cv)
    if cache_kv is not None and not cache_kv.fresh:
      this_k, this_v = (ck, cv) if c.layer is None else (ck[c.layer], cv[c.layer])
      keys = shard_activation(this_k.astype(q.dtype), CACHE_AXES)
      values = shard_activation(this_v.astype(q.dtype), CACHE_AXES)
      out = cache_attention(q, keys, values, masking)
    out = shard_activation(out, ("batch", "length", "heads", None))
    return self.o_proj(out.reshape(b, t, -1), fold_rng(rng, 3)), new_kv


class MLP(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, make_linear):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = make_linear("gate_proj", d, f, ("embed", "mlp"))
    self.up_proj = make_linear("up_proj", d, f, ("embed", "mlp"))
    self.down_proj = make_linear("down_proj", f, d, ("mlp", "embed"))

  def __call__(self, x, rng):
    h = jax.nn.silu(self.gate_proj(x, fold_rng(rng, 0))) * self.up_proj(x, fold_rng(rng, 1))
    h = shard_activation(h, ("batch", "length", "mlp"))
    return self.down_proj(h, fold_rng(rng, 2))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype, param_dtype, impl: str,
               block_size: int, rngs: nnx.Rngs):
    make = linear_factory(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          lora_targets=lora.targets, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, make_linear=make, impl=impl, block_size=block_size)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                              param_dtype=param_dtype)
    self.mlp = MLP(cfg, make_linear=make)

  def __call__(self, x, rope: Rotary, masking, cache_kv, rng):
    h, new_kv = self.self_attn(self.input_layernorm(x), rope, masking, cache_kv,
                               fold_rng(rng, 0))
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), fold_rng(rng, 1))
    return shard_activation(x, ("batch", "length", "embed")), new_kv


class Llama(nnx.Module):
  """The decoder: `embed` ids, run `decode` over embeddings, project with `logits`."""

  def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, remat_policy: str = "none", attention_impl: str = "xla",
               attention_block_size: int = 128, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.layers = make_layer_stack(
        lambda r: DecoderLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype,
                               impl=attention_impl, block_size=attention_block_size, rngs=r),
        cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      init = jax.nn.initializers.normal(stddev=0.02)
      self.lm_head = param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                             ("embed", "vocab"))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int[B, T] -> [B, T, D] (ids must be valid vocabulary ids)."""
    return self.embed_tokens(input_ids, self.dtype)

  def output_kernel(self) -> jax.Array:
    """[D, V] projection to the vocabulary (the embedding's transpose when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.embedding[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] final-normed hidden -> [B, T, V] logits in the compute dtype."""
    return hidden @ self.output_kernel().astype(hidden.dtype)

  def decode(self, x: jax.Array, positions: jax.Array, *, segment_ids: Optional[jax.Array] = None,
             cache: Optional[KVCache] = None, token_valid: Optional[jax.Array] = None,
             rng: Optional[jax.Array] = None, layers: Optional[Sequence[nnx.Module]] = None,
             fresh_cache: bool = False) -> tuple[jax.Array, Optional[KVCache]]:
    """Runs the layers and the final norm. x: [B, T, D]; positions: int[B, T].

    Without `cache`: causal self-attention (within segments if `segment_ids` [B, T]).
    With `cache`: writes T new slots at `cache.index`; `token_valid` bool[B, T] says which
    of the new tokens are real (left padding is not). Returns (hidden [B, T, D], cache).
    `fresh_cache`: the cache holds nothing yet and `cache.index` is 0 (a prefill): the new
    tokens attend causally among themselves, padding apart, with the model's attention
    implementation (blocked or a fused kernel: no [T, S] scores), then fill the cache.
    `layers` (with a per-layer cache): the decoder layers as separate modules, run one
    after another instead of scanned. A scan slices each layer's weights out of the stacked
    arrays, which the CPU does with a copy: every decode step would write all the weights
    once more and read them twice. Separate arrays are read once, in place.
    """
    x = shard_activation(x.astype(self.dtype), ("batch", "length", "embed"))
    # Positions stay below the cache length (with a cache) or the sequence length (packed
    # examples restart at 0); the model's own limit covers callers' explicit positions.
    limit = max(self.cfg.max_position_embeddings,
                x.shape[1] if cache is None else cache.valid.shape[1])
    rope = Rotary.at(positions, self.cfg.effective_head_dim, self.cfg.rope_theta, self.dtype,
                     max_position=limit)
    n = self.cfg.num_layers
    rngs = None if rng is None else jax.random.split(rng, n)
    if cache is None:

      def body(layer, h, layer_rng):
        h, _ = layer(h, rope, segment_ids, None, layer_rng)
        return h, None

      x, _ = scan_layers(self.layers, body, x, rngs, remat_policy=self.remat_policy)
      return self.norm(x), None

    t = x.shape[1]
    new_valid = jnp.ones(x.shape[:2], bool) if token_valid is None else token_valid
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
    if fresh_cache:  # padding is segment 0, the prompt segment 1
      mask = new_valid.astype(jnp.int32)
    else:
      mask = cache_mask(valid, cache.index, t)
    if (layers is not None) != cache.per_layer:
      raise ValueError("a per-layer KV cache goes with unstacked layers: pass both "
                       "layers=model.unstacked_layers() and KVCache.init(per_layer=True), "
                       "or neither")
    if layers is not None:
      x, k, v = _run_unstacked(layers, x, rope, mask, cache, rngs, fresh_cache)
      return self.norm(x), KVCache(k=k, v=v, valid=valid, index=cache.index + t)

    def body_cached(layer, carry, inputs):
      # The whole cache rides in the carry and each layer writes only its new slots: as
      # scanned inputs and outputs it would be held twice and copied whole at every step.
      h, ck, cv = carry
      layer_rng, i = inputs
      h, (ck, cv) = layer(h, rope, mask, LayerCache(ck, cv, i, cache.index, fresh_cache),
                          layer_rng)
      return (h, ck, cv), None

    (x, k, v), _ = scan_layers(self.layers, body_cached, (x, cache.k, cache.v),
                                 (rngs, jnp.arange(n)))
    return self.norm(x), KVCache(k=k, v=v, valid=valid, index=cache.index + t)

  def unstacked_layers(self) -> tuple[nnx.GraphDef, list[nnx.State]]:
    """(graphdef, one state per layer): copies of the stacked layer parameters, one array per
    layer, for `decode(layers=...)`. Call outside jit; it costs the layers' memory again."""
    graphdef, state = nnx.split(self.layers)
    return graphdef, [jax.tree.map(lambda a: jnp.array(a[i]), state)
                      for i in range(self.cfg.num_layers)]

  def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None, **kwargs):
    """Convenience full forward: int[B, T] -> (logits [B, T, V], cache)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden, cache = self.decode(self.embed(input_ids), positions, **kwargs)
    return self.logits(hidden), cache


def _run_unstacked(layers, x, rope: Rotary, mask, cache: KVCache, rngs, fresh: bool):
  """The decoder layers in turn, each with its own cache arrays [B, K, S, H] (updated in
  place)."""
  if len(cache.k) != len(layers):
    raise ValueError(f"{len(layers)} unstacked layers but a per-layer KV cache of "
                     f"{len(cache.k)}: KVCache.init(..., per_layer=True) for this model")
  ks, vs = [], []
  for i, layer in enumerate(layers):
    layer_rng = None if rngs is None else rngs[i]
    slot = LayerCache(cache.k[i], cache.v[i], None, cache.index, fresh)
    x, (k, v) = layer(x, rope, mask, slot, layer_rng)
    ks.append(k)
    vs.append(v)
  return x, tuple(ks), tuple(vs)


def hf_key_map(cfg: LLMConfig) -> list[KeySpec]:
  """Our paths (inside the decoder) <-> transformers `LlamaForCausalLM` names."""
  n, layer = cfg.num_layers, "model.layers.{layer}"
  specs = [KeySpec("embed_tokens/embedding", "model.embed_tokens.weight"),
           *norm_key_map("norm", "model.norm", bias=False)]
  if not cfg.tie_word_embeddings:
    specs.append(KeySpec("lm_head", "lm_head.weight", transpose, transpose))
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    specs += linear_key_map(f"layers/self_attn/{name}", f"{layer}.self_attn.{name}", bias=False,
                          num_layers=n)
  for name in ("gate_proj", "up_proj", "down_proj"):
    specs += linear_key_map(f"layers/mlp/{name}", f"{layer}.mlp.{name}", bias=False, num_layers=n)
  for name in ("input_layernorm", "post_attention_layernorm"):
    specs += norm_key_map(f"layers/{name}", f"{layer}.{name}", bias=False, num_layers=n)
  return specs


def hf_ignored(name: str) -> bool:
  """Buffers older LLaMA checkpoints saved that carry no weights."""
  return name.endswith("rotary_emb.inv_freq")
