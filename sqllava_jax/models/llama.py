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
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sqllava_jax.config import LLMConfig, LoRAConfig
from sqllava_jax.convert.keymap import KeySpec, linear_specs, norm_specs, transpose
from sqllava_jax.models import layers as L
from sqllava_jax.models.attention import attention
from sqllava_jax.models.lora import fold_rng, linear_factory


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer: k, v [layers, B, S, kv_heads, head_dim], or with
  `per_layer=True` tuples of one heads-major [B, kv_heads, S, head_dim] array per layer (the
  layout of `decode(..., layers=...)`); `valid` [B, S] marks slots holding real tokens;
  `index` is the next slot to write (shared by all rows)."""
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.float32, *,
           per_layer: bool = False) -> "KVCache":
    if per_layer:
      shape = (batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
      k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
      shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
      k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(k=k, v=v, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x: [B, T, N, H]; positions: int[B, T]. Rotate-half rotary embedding (transformers' form)."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
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
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    self.theta = cfg.rope_theta
    self.impl, self.block_size = impl, block_size
    d, nh, nk = cfg.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = make_linear("q_proj", d, nh, ("embed", "heads"))
    self.k_proj = make_linear("k_proj", d, nk, ("embed", "kv_heads"))
    self.v_proj = make_linear("v_proj", d, nk, ("embed", "kv_heads"))
    self.o_proj = make_linear("o_proj", nh, d, ("heads", "embed"))

  def __call__(self, x, positions, masking, cache_kv, rng):
    """x: [B, T, D]; positions: int[B, T]; masking: segment ids int[B, T] or None without a
    cache, the cache mask [B, 1, T, S] with one; cache_kv: (k, v, index) or None."""
    b, t, _ = x.shape
    q = self.q_proj(x, fold_rng(rng, 0)).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x, fold_rng(rng, 1)).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, fold_rng(rng, 2)).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = checkpoint_name(rotary(q, positions, self.theta), "query")
    k = checkpoint_name(rotary(k, positions, self.theta), "key")
    v = checkpoint_name(v, "value")
    new_kv = None
    if cache_kv is None:
      out = attention(q, k, v, impl=self.impl, segment_ids=masking, is_causal=True,
                      block_size=self.block_size)
    else:
      ck, cv, index = cache_kv
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      out = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), impl=self.impl, mask=masking)
      new_kv = (ck, cv)
    out = L.shard_activation(out, ("batch", "length", "heads", None))
    return self.o_proj(out.reshape(b, t, -1), fold_rng(rng, 3)), new_kv


class MLP(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, make_linear):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = make_linear("gate_proj", d, f, ("embed", "mlp"))
    self.up_proj = make_linear("up_proj", d, f, ("embed", "mlp"))
    self.down_proj = make_linear("down_proj", f, d, ("mlp", "embed"))

  def __call__(self, x, rng):
    h = jax.nn.silu(self.gate_proj(x, fold_rng(rng, 0))) * self.up_proj(x, fold_rng(rng, 1))
    h = L.shard_activation(h, ("batch", "length", "mlp"))
    return self.down_proj(h, fold_rng(rng, 2))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype, param_dtype, impl: str,
               block_size: int, rngs: nnx.Rngs):
    make = linear_factory(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          lora_targets=lora.targets, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    self.input_layernorm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, make_linear=make, impl=impl, block_size=block_size)
    self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                              param_dtype=param_dtype)
    self.mlp = MLP(cfg, make_linear=make)

  def __call__(self, x, positions, masking, cache_kv, rng):
    h, new_kv = self.self_attn(self.input_layernorm(x), positions, masking, cache_kv,
                               fold_rng(rng, 0))
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), fold_rng(rng, 1))
    return L.shard_activation(x, ("batch", "length", "embed")), new_kv


class Llama(nnx.Module):
  """The decoder: `embed` ids, run `decode` over embeddings, project with `logits`."""

  def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, remat_policy: str = "none", attention_impl: str = "xla",
               attention_block_size: int = 128, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.layers = L.make_layer_stack(
        lambda r: DecoderLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype,
                               impl=attention_impl, block_size=attention_block_size, rngs=r),
        cfg.num_layers, rngs)
    self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      init = jax.nn.initializers.normal(stddev=0.02)
      self.lm_head = L.param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
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
             rng: Optional[jax.Array] = None,
             layers: Optional[Sequence[nnx.Module]] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """Runs the layers and the final norm. x: [B, T, D]; positions: int[B, T].

    Without `cache`: causal self-attention (within segments if `segment_ids` [B, T]).
    With `cache`: writes T new slots at `cache.index`; `token_valid` bool[B, T] says which
    of the new tokens are real (left padding is not). Returns (hidden [B, T, D], cache).
    `layers` (with a per-layer cache): the decoder layers as separate modules, run one
    after another instead of scanned. A scan slices each layer's weights out of the stacked
    arrays, which XLA does with a copy: every decode step would write all the weights once
    more and read them twice. Separate arrays are read once, in place.
    """
    x = L.shard_activation(x.astype(self.dtype), ("batch", "length", "embed"))
    n = self.cfg.num_layers
    rngs = None if rng is None else jax.random.split(rng, n)
    if cache is None:

      def body(layer, h, layer_rng):
        h, _ = layer(h, positions, segment_ids, None, layer_rng)
        return h, None

      x, _ = L.scan_layers(self.layers, body, x, rngs, remat_policy=self.remat_policy)
      return self.norm(x), None

    t = x.shape[1]
    new_valid = jnp.ones(x.shape[:2], bool) if token_valid is None else token_valid
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
    mask = cache_mask(valid, cache.index, t)
    if layers is not None:
      x, k, v = _run_unstacked(layers, x, positions, mask, cache, rngs)
      return self.norm(x), KVCache(k=k, v=v, valid=valid, index=cache.index + t)
    if cache.per_layer:
      raise ValueError("a per-layer KV cache goes with unstacked layers: pass "
                       "layers=model.unstacked_layers() or use KVCache.init(per_layer=False)")

    def body_cached(layer, h, inputs):
      layer_rng, ck, cv = inputs
      h, (ck, cv) = layer(h, positions, mask, (ck, cv, cache.index), layer_rng)
      return h, (ck, cv)

    x, (k, v) = L.scan_layers(self.layers, body_cached, x, (rngs, cache.k, cache.v))
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


def _run_unstacked(layers, x, positions, mask, cache: KVCache, rngs):
  """The decoder layers in turn, each with its own cache arrays (updated in place)."""
  if not cache.per_layer or len(cache.k) != len(layers):
    raise ValueError(f"unstacked layers need a per-layer KV cache with one entry per layer "
                     f"({len(layers)}): KVCache.init(..., per_layer=True)")
  ks, vs = [], []
  for i, layer in enumerate(layers):
    layer_rng = None if rngs is None else rngs[i]
    x, k, v = _decode_layer(layer, x, positions, mask, cache.k[i], cache.v[i], cache.index,
                            layer_rng)
    ks.append(k)
    vs.append(v)
  return x, tuple(ks), tuple(vs)


def _decode_layer(layer: DecoderLayer, x, positions, mask, ck, cv, index, rng):
  """`DecoderLayer.__call__` with a heads-major cache ck, cv [B, K, S, H]: the attention
  products read keys and values where they lie. With the [B, S, K, H] layout XLA transposes
  both whole caches in every layer at every step, which on a CPU costs more than the
  layer's matmuls at batch 8. Returns (x [B, T, D], ck, cv)."""
  attn, attn_rng = layer.self_attn, fold_rng(rng, 0)
  h = layer.input_layernorm(x)
  b, t, _ = h.shape
  q = attn.q_proj(h, fold_rng(attn_rng, 0)).reshape(b, t, attn.num_heads, attn.head_dim)
  k = attn.k_proj(h, fold_rng(attn_rng, 1)).reshape(b, t, attn.num_kv_heads, attn.head_dim)
  v = attn.v_proj(h, fold_rng(attn_rng, 2)).reshape(b, t, attn.num_kv_heads, attn.head_dim)
  q, k = rotary(q, positions, attn.theta), rotary(k, positions, attn.theta)
  ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2).astype(ck.dtype), (0, 0, index, 0))
  cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype), (0, 0, index, 0))
  out = heads_major_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask)
  x = x + attn.o_proj(out.reshape(b, t, -1), fold_rng(attn_rng, 3))
  x = x + layer.mlp(layer.post_attention_layernorm(x), fold_rng(rng, 1))
  return x, ck, cv


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q: [B, T, N, H]; k, v: [B, K, S, H] (N % K == 0: query head n reads kv head n // (N/K),
  as transformers' `repeat_kv`); mask: bool[B, 1, T, S] -> [B, T, N, H]. Scores and softmax
  in float32."""
  b, t, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = n // kh
  q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / h ** 0.5)
  mask = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def hf_key_map(cfg: LLMConfig) -> list[KeySpec]:
  """Our paths (inside the decoder) <-> transformers `LlamaForCausalLM` names."""
  n, layer = cfg.num_layers, "model.layers.{layer}"
  specs = [KeySpec("embed_tokens/embedding", "model.embed_tokens.weight"),
           *norm_specs("norm", "model.norm", bias=False)]
  if not cfg.tie_word_embeddings:
    specs.append(KeySpec("lm_head", "lm_head.weight", transpose, transpose))
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    specs += linear_specs(f"layers/self_attn/{name}", f"{layer}.self_attn.{name}", bias=False,
                          num_layers=n)
  for name in ("gate_proj", "up_proj", "down_proj"):
    specs += linear_specs(f"layers/mlp/{name}", f"{layer}.mlp.{name}", bias=False, num_layers=n)
  for name in ("input_layernorm", "post_attention_layernorm"):
    specs += norm_specs(f"layers/{name}", f"{layer}.{name}", bias=False, num_layers=n)
  return specs


def hf_ignored(name: str) -> bool:
  """Buffers older LLaMA checkpoints saved that carry no weights."""
  return name.endswith("rotary_emb.inv_freq")
