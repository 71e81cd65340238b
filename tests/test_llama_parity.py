"""LLaMA decoder vs transformers' LlamaForCausalLM on the same weights (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from sqllava_jax.convert.hf import llama_from_hf
from sqllava_jax.models.llama import KVCache, Rotary
from tests.hf_fixtures import save_llama, tiny_llama_config, to_np

SEQ = 200  # long enough for rotary mistakes to show
ATOL = 1e-4


@pytest.fixture(scope="module", params=[4, 2, 1], ids=lambda k: f"kv{k}")
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f"llama_kv{request.param}")
  hf = save_llama(path, tiny_llama_config(num_kv_heads=request.param), seed=request.param)
  return hf, llama_from_hf(str(path))


@nnx.jit
def forward(model, ids, positions, cache, token_valid=None):
  return model(ids, positions, cache=cache, token_valid=token_valid)


def tokens(batch, length, seed=0):
  return np.random.default_rng(seed).integers(3, 128, size=(batch, length)).astype(np.int64)


def test_logits_match_without_padding(pair):
  hf, ours = pair
  ids = tokens(2, SEQ)
  with torch.no_grad():
    ref = to_np(hf(torch.from_numpy(ids)).logits)
  got, _ = ours(jnp.asarray(ids, jnp.int32))
  assert np.abs(ref).max() > 0.1, "reference logits are degenerate"
  for pos in (0, 1, SEQ // 2, SEQ - 1):
    np.testing.assert_allclose(np.asarray(got)[:, pos], ref[:, pos], atol=ATOL, rtol=0,
                               err_msg=f"position {pos}")
  np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_with_padding(pair, side):
  hf, ours = pair
  lengths = np.array([SEQ, 137, 60])
  ids = tokens(3, SEQ, seed=1)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    if side == "right":
      mask[i, :n] = 1
    else:
      mask[i, SEQ - n:] = 1
  ids = np.where(mask == 1, ids, 0)
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    ref = to_np(hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits)
  got, _ = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                segment_ids=jnp.asarray(mask, jnp.int32))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], ref[real], atol=ATOL, rtol=0)


def test_kv_cache_prefill_then_decode_matches_full_forward(pair):
  hf, ours = pair
  ids = tokens(2, SEQ, seed=2)
  full, _ = ours(jnp.asarray(ids, jnp.int32))
  prefill = 150
  cache = KVCache.init(ours.cfg, batch=2, max_len=SEQ)
  positions = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
  logits, cache = forward(ours, jnp.asarray(ids[:, :prefill], jnp.int32), positions[:, :prefill],
                          cache)
  steps = [np.asarray(logits)]
  for t in range(prefill, SEQ):
    logits, cache = forward(ours, jnp.asarray(ids[:, t:t + 1], jnp.int32), positions[:, t:t + 1],
                            cache)
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, axis=1)
  assert int(cache.index) == SEQ
  np.testing.assert_allclose(got, np.asarray(full), atol=ATOL, rtol=0)


def test_kv_cache_with_left_padding_matches_transformers(pair):
  """Left-padded prompts of different lengths, decoded one token at a time."""
  hf, ours = pair
  total, prompt = 48, 32
  ids = tokens(2, total, seed=3)
  mask = np.ones_like(ids)
  mask[1, :10] = 0  # row 1: a 22-token prompt, left padded
  ids = np.where(mask == 1, ids, 0)
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    ref = to_np(hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits)
  cache = KVCache.init(ours.cfg, batch=2, max_len=total)
  logits, cache = forward(ours, jnp.asarray(ids[:, :prompt], jnp.int32),
                          jnp.asarray(positions[:, :prompt]), cache,
                          jnp.asarray(mask[:, :prompt] == 1))
  steps = [np.asarray(logits)]
  for t in range(prompt, total):
    logits, cache = forward(ours, jnp.asarray(ids[:, t:t + 1], jnp.int32),
                            jnp.asarray(positions[:, t:t + 1]), cache)
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)


def test_bin_checkpoint_loads_the_same(tmp_path):
  hf = save_llama(tmp_path / "bin", seed=5, safe=False)
  assert list((tmp_path / "bin").glob("pytorch_model*.bin")), "expected a .bin checkpoint"
  ours = llama_from_hf(str(tmp_path / "bin"))
  ids = tokens(1, 16, seed=4)
  with torch.no_grad():
    ref = to_np(hf(torch.from_numpy(ids)).logits)
  got, _ = ours(jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)


def test_rotary_table_matches_transformers_at_any_position():
  """The looked-up cos/sin equal transformers' LlamaRotaryEmbedding at scattered positions
  (left-padded starts, a decode position near the cache end, one past the model's limit)."""
  config = tiny_llama_config()
  head_dim = config.hidden_size // config.num_attention_heads
  limit = config.max_position_embeddings
  positions = np.array([[0, 0, 0, 1, 2, 3], [5, 17, 199, limit - 1, limit, limit + 7]])
  ref_cos, ref_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(positions))
  theta = config.rope_parameters["rope_theta"]
  got = Rotary.at(jnp.asarray(positions, jnp.int32), head_dim, theta, jnp.float32,
                  max_position=limit + 8)
  np.testing.assert_allclose(np.asarray(got.cos), to_np(ref_cos), atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.sin), to_np(ref_sin), atol=1e-6)
