"""Attention behind one call, with the implementation picked by `model.attention_impl`.

    xla      `jax.nn.dot_product_attention` on XLA with a dense mask: the reference, and the
             fallback wherever another implementation does not apply.
    blocked  causal self-attention over query blocks, flash-style: each query block sees
             exactly the key blocks at or before it (the upper triangle is never computed),
             and a custom backward keeps only the log-sum-exp, not the [T, T] probabilities.
             About half the score work of `xla` and a fraction of its memory; plain XLA, so
             it runs everywhere (the CPU's fastest).
    cudnn    cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU;
             bfloat16/float16, head_dim a multiple of 8 up to 128).
    splash   the Pallas splash-attention kernel (TPU), segment ids handled in the kernel.
    auto     cudnn on GPU, splash on TPU, blocked elsewhere, each where it applies.

Decoding over a KV cache goes through `cache_attention`: the cache is heads-major
[B, K, S, H], so its products read keys and values where they lie (with a [B, S, K, H] cache
XLA would transpose both whole caches in every layer at every step).

Segment ids (int[B, T]; padding 0, packed examples 1, 2, ...) keep attention inside an
example without a [B, 1, T, T] mask in memory for `blocked` and `splash`; `xla` and `cudnn`
build the dense mask. Calls an implementation cannot take (non-causal, cross-attention over a
KV cache, a sequence length its blocks do not divide) run `xla` instead; asking for `cudnn` or
`splash` on another platform is an error.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sqllava_jax.parallel.logical import active, logical_to_spec

IMPLS = ("xla", "blocked", "cudnn", "splash", "auto")
PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}
SPLASH_BLOCK = 128  # the TPU kernel's tile: sequence lengths must be whole multiples


def platform() -> str:
  return jax.default_backend()


def check_impl(impl: str, on: Optional[str] = None) -> None:
  """Raises if `impl` is unknown or needs another platform than `on` (default: this one)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(IMPLS)}")
  need, on = PLATFORM_OF.get(impl), on or platform()
  if need is not None and need != on:
    raise ValueError(f"model.attention_impl={impl} runs on {need.upper()} only; this is {on}: "
                     f"use auto (picks per platform), blocked or xla")


def resolve(impl: str, *, on: str, dtype, head_dim: int, seq_len: int, causal: bool,
            self_attention: bool, dense_mask: bool) -> str:
  """The implementation that runs one call: `impl` where it applies, else `xla`.

  on: platform ('cpu', 'gpu', 'tpu'); self_attention: queries and keys are the same
  positions (no KV cache); dense_mask: the call brings its own [B, N, T, S] mask."""
  check_impl(impl, on)
  if impl == "auto":
    impl = {"gpu": "cudnn", "tpu": "splash"}.get(on, "blocked")
  if impl == "blocked":
    return "blocked" if causal and self_attention and not dense_mask else "xla"
  if impl == "cudnn":
    ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
          and head_dim <= 128)
    return "cudnn" if ok else "xla"
  if impl == "splash":
    ok = self_attention and not dense_mask and seq_len % SPLASH_BLOCK == 0
    return "splash" if ok else "xla"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
              segment_ids: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
              is_causal: bool = False, block_size: int = 128,
              interpret: bool = False) -> jax.Array:
  """Multi-head (grouped-query) attention. q: [B, T, N, H]; k, v: [B, S, K, H], N % K == 0.

  segment_ids: int[B, T] (self-attention, T == S): attend within the same id only.
  mask: bool broadcastable to [B, N, T, S] (True = attend), e.g. over a KV cache.
  is_causal: query i sees keys <= i (T == S). block_size: the query/key block of `blocked`.
  interpret: run the splash kernel in the Pallas interpreter (tests on CPU). Returns [B, T, N, H].
  """
  t, h = q.shape[1], q.shape[3]
  chosen = resolve(impl, on="tpu" if interpret else platform(), dtype=q.dtype, head_dim=h,
                   seq_len=t, causal=is_causal, self_attention=t == k.shape[1] and mask is None,
                   dense_mask=mask is not None)
  if chosen == "blocked":
    return blocked_attention(q, k, v, segment_ids, block_size)
  if chosen == "splash":
    return splash_attention(q, k, v, segment_ids, is_causal=is_causal, interpret=interpret)
  full = combine_masks(mask, segment_ids)
  fused: Literal["xla", "cudnn"] = "cudnn" if chosen == "cudnn" else "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=full, is_causal=is_causal,
                                      implementation=fused)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Queries over a heads-major KV cache. q: [B, T, N, H]; k, v: [B, K, S, H] (N % K == 0:
  query head n reads kv head n // (N / K), as transformers' `repeat_kv`); mask: bool
  [B, 1, T, S] (True = attend) -> [B, T, N, H]. Scores and softmax in float32."""
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


def combine_masks(mask: Optional[jax.Array],
                  segment_ids: Optional[jax.Array]) -> Optional[jax.Array]:
  """A dense bool mask [B, 1|N, T, S] from an explicit mask and same-segment ids, or None."""
  if segment_ids is None:
    return mask
  same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return same if mask is None else jnp.logical_and(mask, same)


# --- blocked: causal flash attention in plain XLA -------------------------------------------
#
# Two nested loops over [block x block] tiles, each tile computed when its turn comes: the
# forward walks query blocks and, inside, the key blocks at or before each (online softmax);
# the backward walks key blocks and, inside, the query blocks at or after each (FlashAttention-2).
# Real loops, not unrolled Python: an unrolled loop's blocks are independent, and XLA would
# schedule them side by side with all their scores alive at once.

_MASKED = float(jnp.finfo(jnp.float32).min)


def _tile(x: jax.Array, i, block: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _tile_scores(q_i, k_j, i, j, block: int, segment_ids: Optional[jax.Array]) -> jax.Array:
  """[B, K, G, block, block] float32 masked logits of query tile i against key tile j."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
  rows, cols = i * block + jnp.arange(block), j * block + jnp.arange(block)
  mask = (rows[:, None] >= cols[None, :])[None, None, None]
  if segment_ids is not None:
    same = _tile(segment_ids, i, block, 1)[:, :, None] == _tile(segment_ids, j, block, 1)[:, None]
    mask = jnp.logical_and(mask, same[:, None, None])
  return jnp.where(mask, s, _MASKED)


def _flash_forward(q, k, v, segment_ids, block):
  """q: [B, K, G, T, H] (scaled); k, v: [B, K, T, H]; T a multiple of `block`
  -> (out like q, log-sum-exp float32[B, K, G, T])."""
  tiles = q.shape[3] // block
  stats = q.shape[:3] + (block,)

  def query_block(i, carry):
    out, lse = carry
    q_i = _tile(q, i, block, 3)

    def key_block(j, acc):
      m, denom, o = acc
      s = _tile_scores(q_i, _tile(k, j, block, 2), i, j, block, segment_ids)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      scale = jnp.exp(m - m_new)
      o = o * scale[..., None] + jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype),
                                            _tile(v, j, block, 2),
                                            preferred_element_type=jnp.float32)
      return m_new, denom * scale + jnp.sum(p, axis=-1), o

    init = (jnp.full(stats, _MASKED, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32))
    m, denom, o = jax.lax.fori_loop(0, i + 1, key_block, init)
    out = jax.lax.dynamic_update_slice_in_dim(out, (o / denom[..., None]).astype(q.dtype),
                                              i * block, axis=3)
    return out, jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(denom), i * block, axis=3)

  init = (jnp.zeros_like(q), jnp.zeros(q.shape[:4], jnp.float32))
  return jax.lax.fori_loop(0, tiles, query_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, block):
  return _flash_forward(q, k, v, segment_ids, block)[0]


def _flash_fwd(q, k, v, segment_ids, block):
  out, lse = _flash_forward(q, k, v, segment_ids, block)
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(block, residuals, d_out):
  """Recomputes each tile's probabilities from the saved log-sum-exp (FlashAttention-2)."""
  q, k, v, segment_ids, out, lse = residuals
  tiles = q.shape[3] // block
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]

  def key_block(j, carry):
    dq, dk, dv = carry
    k_j, v_j = _tile(k, j, block, 2), _tile(v, j, block, 2)

    def query_block(i, acc):
      dq, dk_j, dv_j = acc
      q_i, do_i = _tile(q, i, block, 3), _tile(d_out, i, block, 3)
      s = _tile_scores(q_i, k_j, i, j, block, segment_ids)
      p = jnp.exp(s - _tile(lse, i, block, 3)[..., None])
      dv_j = dv_j + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - _tile(delta, i, block, 3)[..., None])).astype(q.dtype)
      dk_j = dk_j + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = _tile(dq, i, block, 3) + jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j,
                                                 preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, axis=3), dk_j, dv_j

    init = (dq, jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
    dq, dk_j, dv_j = jax.lax.fori_loop(j, tiles, query_block, init)
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * block, axis=2)
    return dq, dk, jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * block, axis=2)

  init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.lax.fori_loop(0, tiles, key_block, init)
  seg_ct = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), seg_ct


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      segment_ids: Optional[jax.Array], block_size: int) -> jax.Array:
  """Causal self-attention by query blocks. q: [B, T, N, H]; k, v: [B, T, K, H] -> [B, T, N, H].

  Head-major inside ([B, K, G, T, H]): the per-block products are then plain batched
  matmuls, which the CPU runs markedly faster than the token-major einsums."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  block = max(1, min(block_size, t))
  padded = -(-t // block) * block  # whole tiles; padded keys lie after every real query
  pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2),
                                   constant_values=value)
  q, k, v = pad(q), pad(k), pad(v)
  if segment_ids is not None:
    segment_ids = pad(segment_ids, -1)
  qh = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(b, padded, kh, n // kh, h)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = _flash(qh.transpose(0, 2, 3, 1, 4), kt, vt, segment_ids, block)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, h)[:, :t]


# --- splash: the Pallas TPU kernel ----------------------------------------------------------

def _splash_kernel(heads: int, t: int, *, causal: bool, mqa: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only dependency
  one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
  b = min(512, t) if t % 512 == 0 else SPLASH_BLOCK
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  make = sa.make_splash_mqa if mqa else sa.make_splash_mha
  kernel = make(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)
  return kernel, sa.SegmentIds


def _splash_local(q, k, v, segment_ids, *, causal: bool, interpret: bool):
  """One device's rows. q: [B, T, N, H] (scaled); k, v: [B, T, K, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  kernel, segment_type = _splash_kernel(n if kh == n else n // kh, t, causal=causal,
                                        mqa=kh != n, interpret=interpret)
  ids = segment_type(q=segment_ids, kv=segment_ids)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  if kh == n:
    out = jax.vmap(kernel)(q.transpose(0, 2, 1, 3), kt, vt, ids)  # [B, N, T, H]
    return out.transpose(0, 2, 1, 3)
  # Grouped queries: the MQA kernel (one K/V head, G query heads) once per K/V head.
  qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  per_kv = jax.vmap(kernel, in_axes=(0, 0, 0, None))
  out = jax.vmap(per_kv)(qg, kt, vt, ids)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: Optional[jax.Array],
                     *, is_causal: bool, interpret: bool = False) -> jax.Array:
  """Self-attention through splash. A Pallas kernel is opaque to XLA's partitioner, so under
  an active mesh it runs in `shard_map` over the batch and head axes (as the rules shard them)."""
  scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # splash does not scale the logits
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  local = functools.partial(_splash_local, causal=is_causal, interpret=interpret)
  ctx = active()
  if ctx is None:
    return local(scaled, k, v, segment_ids)
  mesh, rules = ctx
  qs = logical_to_spec(("batch", "length", "heads", None), rules)
  kvs = logical_to_spec(("batch", "length", "kv_heads", None), rules)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, logical_to_spec(
      ("batch", "length"), rules)), out_specs=qs, check_vma=False)
  return fn(scaled, k, v, segment_ids)
