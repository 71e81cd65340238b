"""Batched, jitted generation over the KV cache: prefill, then a `lax.while_loop` of decode steps.

    gen = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = gen.generate([ids_a, ids_b], pixel_values, max_new_tokens=64, sampling=GREEDY, seed=0)
    out.new_tokens(0)  # the ids generated for prompt 0, up to and including `</s>`

Prompts of different lengths are left-padded to a bucket length (powers of two up to 128,
then multiples of 128), so one compiled program serves every request of the same
(batch, bucket, max_new_tokens, greedy-or-sampling) shape; temperature, top-k and top-p are
traced values. A row stops at `eos_id` (later slots hold `pad_id`); the loop stops when
every row has stopped or after `max_new_tokens`. Prefill and the loop run in one program,
so a request is one device call.

`model` is a composite `SQLLaVA` (image placeholders in the ids are filled with image
features from `pixel_values`) or a bare `Llama` (text only).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqllava_jax.evaluation import data_parallel
from sqllava_jax.evaluation.sampling import GREEDY, Sampling, next_token
from sqllava_jax.models.llama import KVCache, Llama
from sqllava_jax.models.sqllava import SQLLaVA, check_image_placeholders

# How many times the generation program has been traced (tests assert it stays put).
_TRACES = {"count": 0}


def trace_count() -> int:
  return _TRACES["count"]


def bucket_length(n: int, *, min_length: int = 16, step: int = 128) -> int:
  """The padded prompt length for a prompt of `n` tokens: the next power of two (at least
  `min_length`) up to `step`, then the next multiple of `step`."""
  if n <= 0:
    raise ValueError(f"a prompt needs at least one token (got {n}); add BOS")
  if n > step:
    return -(-n // step) * step
  return max(min_length, 1 << (n - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids int32[B, length], mask bool[B, length]), each right-aligned."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {i} has {len(p)} tokens; expected 1..{length}")
    ids[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return ids, mask


@dataclasses.dataclass(frozen=True)
class Generated:
  """tokens: int32[B, max_new_tokens], pad after a row's `</s>`; num_new: int32[B], the
  tokens each row generated (its `</s>` included)."""
  tokens: np.ndarray
  num_new: np.ndarray

  def new_tokens(self, row: int) -> list[int]:
    return [int(t) for t in self.tokens[row, :self.num_new[row]]]


def _parts(model: nnx.Module):
  """(decoder, embed(ids, pixel_values) -> [B, T, D]) of a composite model or a bare Llama."""
  if isinstance(model, SQLLaVA):
    return model.llm, lambda ids, pixels: model.embed_inputs(ids, pixels)[0]
  if isinstance(model, Llama):
    return model, lambda ids, pixels: model.embed(ids)
  raise TypeError(f"cannot generate with a {type(model).__name__}; pass an SQLLaVA or a Llama")


def _prefill(llm: Llama, layers, embeds, mask, max_new_tokens: int):
  """embeds [B, T, D], mask bool[B, T] -> (last-position logits [B, V], cache, lengths int[B])."""
  b, t, _ = embeds.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = KVCache.init(llm.cfg, b, t + max_new_tokens, dtype=llm.dtype,
                       per_layer=layers is not None)
  hidden, cache = llm.decode(embeds, positions, cache=cache, token_valid=mask, layers=layers)
  # Prompts are left-padded, so the last position is real in every row.
  return llm.logits(hidden[:, -1:])[:, 0], cache, mask.sum(axis=1).astype(jnp.int32)


def _decode_loop(llm: Llama, layers, cache, first, lengths, key, params, *,
                 max_new_tokens: int, greedy: bool, eos_id: jax.Array, pad_id: jax.Array):
  """Feeds each new token back until every row has produced `eos_id` or the budget is spent.

  first, lengths: int32[B]; eos_id, pad_id: int32 scalars (traced: no recompile per
  tokenizer). Returns (tokens int32[B, N], num_new int32[B]).
  """
  b = first.shape[0]
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = first == eos_id
  num_new = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, out, done, num_new = carry
    positions = (lengths + step - 1)[:, None]
    hidden, cache = llm.decode(llm.embed(token[:, None]), positions, cache=cache, layers=layers)
    logits = llm.logits(hidden)[:, 0]
    token = next_token(logits, jax.random.fold_in(key, step), params, greedy=greedy)
    token = jnp.where(done, pad_id, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    num_new = num_new + (~done).astype(jnp.int32)
    return step + 1, token, cache, out, done | (token == eos_id), num_new

  carry = (jnp.int32(1), first, cache, out, done, num_new)
  _, _, _, out, _, num_new = jax.lax.while_loop(cond, body, carry)
  return out, num_new


def _generate(graphdef, state, layer_def, layer_states, ids, pixels, mask, key, params, *,
              max_new_tokens: int, greedy: bool, eos_id: jax.Array, pad_id: jax.Array):
  _TRACES["count"] += 1  # runs only while tracing
  llm, embed = _parts(nnx.merge(graphdef, state))
  layers = None if layer_states is None else [nnx.merge(layer_def, s) for s in layer_states]
  logits, cache, lengths = _prefill(llm, layers, embed(ids, pixels), mask, max_new_tokens)
  first = next_token(logits, jax.random.fold_in(key, 0), params, greedy=greedy)
  return _decode_loop(llm, layers, cache, first, lengths, key, params,
                      max_new_tokens=max_new_tokens, greedy=greedy, eos_id=eos_id, pad_id=pad_id)


_generate_jit = jax.jit(_generate, static_argnums=(0, 2),
                        static_argnames=("max_new_tokens", "greedy"))


class Generator:
  """Generates from a snapshot of `model`'s weights (taken at construction).

  With `mesh`, the weights are replicated over it and every batch is split along its
  leading axis over the mesh's `data` and `fsdp` axes (data-parallel decoding); each process
  then passes and gets back only its own rows.

  `unstack_layers` (default) keeps a copy of the decoder layers' weights with one array per
  layer, which decoding reads in place: twice as fast on a CPU, where slicing a layer out of
  the stacked (scanned) weights copies it at every step. It costs the decoder layers' memory
  once more; without it decoding scans the stacked layers.
  """

  def __init__(self, model: nnx.Module, *, eos_id: int, pad_id: int,
               mesh: Optional[jax.sharding.Mesh] = None, min_bucket: int = 16,
               bucket_step: int = 128, unstack_layers: bool = True):
    llm, _ = _parts(model)  # fails early for a model we cannot generate with
    self.graphdef, self.state = nnx.split(model)
    self.layer_def, self.layer_states = llm.unstacked_layers() if unstack_layers else (None, None)
    self.eos_id, self.pad_id = eos_id, pad_id
    self.cfg = model.cfg if isinstance(model, SQLLaVA) else None
    self.min_bucket, self.bucket_step = min_bucket, bucket_step
    self.mesh = mesh
    if mesh is not None:
      self.state, self.layer_states = jax.device_put((self.state, self.layer_states),
                                                     data_parallel.replicated(mesh))

  def _check_ids(self, prompts, pixel_values) -> Optional[np.ndarray]:
    if self.cfg is None:
      if pixel_values is not None or any(min(p) < 0 for p in prompts if p):
        raise ValueError("this model is a bare LLM: pass token ids only, no images")
      return None
    counts = [sum(1 for t in p if t == self.cfg.image_token_id) for p in prompts]
    has_image = np.asarray(counts) > 0
    if has_image.any() and pixel_values is None:
      raise ValueError("the prompts hold image placeholders; pass pixel_values [B, H, W, 3]")
    if pixel_values is not None and len(pixel_values) != len(prompts):
      raise ValueError(f"{len(pixel_values)} images for {len(prompts)} prompts; give one per "
                       "prompt (zeros for text-only prompts)")
    ids, _ = left_pad(prompts, max(len(p) for p in prompts), self.pad_id)
    check_image_placeholders(ids, has_image, self.cfg.num_image_tokens, self.cfg.image_token_id)
    return None if pixel_values is None else np.asarray(pixel_values, np.float32)

  def generate(self, prompts: Sequence[Sequence[int]], pixel_values: Optional[np.ndarray] = None,
               *, max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
               prompt_length: Optional[int] = None) -> Generated:
    """prompts: B lists of ids (BOS included; `image_token_id` at image positions);
    pixel_values: float32[B, H, W, 3] (CLIP-normalised) or None. `prompt_length` pads to a
    fixed length instead of the bucket (one shape for a whole eval run)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    pixels = self._check_ids(prompts, pixel_values)
    longest = max(len(p) for p in prompts)
    length = prompt_length or bucket_length(longest, min_length=self.min_bucket,
                                            step=self.bucket_step)
    if self.mesh is not None:  # every process must run the same program
      length = data_parallel.agree_max(length)
    ids, mask = left_pad(prompts, length, self.pad_id)
    key = jax.random.key(seed)
    inputs = (ids, pixels, mask)
    if self.mesh is not None:
      inputs = data_parallel.shard_batch(self.mesh, inputs)
    tokens, num_new = _generate_jit(
        self.graphdef, self.state, self.layer_def, self.layer_states, *inputs, key,
        sampling.arrays(),
        max_new_tokens=max_new_tokens, greedy=sampling.greedy, eos_id=jnp.int32(self.eos_id),
        pad_id=jnp.int32(self.pad_id))
    if self.mesh is not None:
      tokens, num_new = data_parallel.local_rows(tokens), data_parallel.local_rows(num_new)
    return Generated(np.asarray(tokens), np.asarray(num_new))
