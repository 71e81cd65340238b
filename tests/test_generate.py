"""Jitted generation vs transformers' `generate` on the same weights; compile-once checks."""

import contextlib
import types

import jax
import numpy as np
import pytest
import torch

from sqllava_jax.convert.hf import llama_from_hf
from sqllava_jax.evaluation import generate as G
from sqllava_jax.evaluation.sampling import Sampling
from tests.hf_fixtures import save_llama, tiny_llama_config

NEW = 32
LENGTHS = (5, 30, 17, 9)  # one bucket (32), different per-row lengths


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen_llama")
  hf = save_llama(path, tiny_llama_config(num_kv_heads=2), seed=11)
  return hf, llama_from_hf(str(path))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [[1] + rng.integers(3, 128, size=n - 1).tolist() for n in LENGTHS]


def hf_greedy(hf, prompts, eos_id, max_new_tokens=NEW):
  """transformers' greedy `generate` with left padding and an attention mask."""
  t = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), t), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
  with torch.no_grad():
    out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                      pad_token_id=0)
  new = out[:, t:].numpy()
  rows = []
  for r in new:
    stop = np.nonzero(r == eos_id)[0]
    rows.append(r[:stop[0] + 1].tolist() if stop.size else r.tolist())
  return rows


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "scanned"])
def test_greedy_matches_transformers(pair, prompts, unstack):
  hf, ours = pair
  expected = hf_greedy(hf, prompts, eos_id=2)
  gen = G.Generator(ours, eos_id=2, pad_id=0, unstack_layers=unstack)
  out = gen.generate(prompts, max_new_tokens=NEW)
  assert out.tokens.shape == (len(prompts), NEW)
  assert len({tuple(r) for r in expected}) == len(prompts), "rows should differ"
  for i, want in enumerate(expected):
    assert out.new_tokens(i) == want, f"row {i} (prompt length {LENGTHS[i]})"


def test_rows_stop_at_eos_like_transformers(pair, prompts):
  """An end token the model really produces, at a different step in each row."""
  hf, ours = pair
  free = G.Generator(ours, eos_id=2, pad_id=0).generate(prompts, max_new_tokens=NEW)
  eos = int(free.tokens[0, 6])  # row 0 stops at step 6 (or earlier)
  expected = hf_greedy(hf, prompts, eos_id=eos)
  lengths = [len(r) for r in expected]
  assert min(lengths) < NEW and len(set(lengths)) > 1, f"want early, varied stops: {lengths}"
  out = G.Generator(ours, eos_id=eos, pad_id=0).generate(prompts, max_new_tokens=NEW)
  for i, want in enumerate(expected):
    assert out.new_tokens(i) == want, f"row {i}"
    assert (out.tokens[i, len(want):] == 0).all(), f"row {i}: pad after the end token"


def test_top_k_1_is_greedy_and_sampling_is_seeded(pair, prompts):
  _, ours = pair
  gen = G.Generator(ours, eos_id=2, pad_id=0)
  greedy = gen.generate(prompts, max_new_tokens=NEW).tokens
  top1 = gen.generate(prompts, max_new_tokens=NEW, sampling=Sampling(1.5, top_k=1), seed=3)
  np.testing.assert_array_equal(top1.tokens, greedy)
  hot = Sampling(temperature=1.0)
  a = gen.generate(prompts, max_new_tokens=NEW, sampling=hot, seed=7).tokens
  b = gen.generate(prompts, max_new_tokens=NEW, sampling=hot, seed=7).tokens
  c = gen.generate(prompts, max_new_tokens=NEW, sampling=hot, seed=8).tokens
  np.testing.assert_array_equal(a, b)
  assert (a != c).any(), "another seed should sample other tokens"
  assert (a != greedy).any(), "temperature 1 should leave the greedy path"


@contextlib.contextmanager
def traces_of(fun_name: str):
  """Counts how often JAX traces the function `fun_name` for compilation while inside."""
  traces = types.SimpleNamespace(count=0)

  def listener(event: str, _duration: float, **kwargs):
    if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == fun_name:
      traces.count += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield traces
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_compiles_once_per_shape(pair, prompts):
  _, ours = pair
  gen = G.Generator(ours, eos_id=2, pad_id=0)
  hot = Sampling(temperature=0.7, top_k=5, top_p=0.9)
  gen.generate(prompts, max_new_tokens=8, sampling=hot, seed=0)
  with traces_of("_generate") as traces:
    rng = np.random.default_rng(1)
    other = [[1] + rng.integers(3, 128, size=n).tolist() for n in (20, 3, 31, 12)]
    gen.generate(other, max_new_tokens=8, sampling=Sampling(1.3, top_k=50, top_p=0.5), seed=5)
    G.Generator(ours, eos_id=2, pad_id=0).generate(prompts, max_new_tokens=8, sampling=hot)
    assert traces.count == 0, "same shapes must not re-trace"
    gen.generate([p[:3] for p in prompts], max_new_tokens=8, sampling=hot)  # bucket 16
    assert traces.count == 1


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (100, 112), (107, 112),
                                         (128, 128), (129, 144), (257, 288), (600, 640),
                                         (650, 704), (2048, 2048), (2049, 2304)])
def test_bucket_length(n, expected):
  assert G.bucket_length(n) == expected


def test_bucket_length_bounds_padding_and_programs():
  """Padding adds at most an eighth above 128 tokens, and an octave holds at most 8 buckets."""
  lengths = {n: G.bucket_length(n) for n in range(1, 4097)}
  assert all(n <= b for n, b in lengths.items())
  assert all(b - n < max(16, n / 8) for n, b in lengths.items())
  for k in range(4, 12):
    octave = {b for n, b in lengths.items() if 2 ** k < n <= 2 ** (k + 1)}
    assert len(octave) <= 8, (k, sorted(octave))


def test_left_pad_and_errors():
  ids, mask = G.left_pad([[1, 5], [1, 6, 7]], 4, pad_id=0)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 5], [0, 1, 6, 7]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
  with pytest.raises(ValueError, match="prompt 0 has 0 tokens"):
    G.left_pad([[]], 4, pad_id=0)
  with pytest.raises(ValueError, match="at least one token"):
    G.bucket_length(0)
