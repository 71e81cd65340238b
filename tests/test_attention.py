"""Attention implementations: which one runs where, and every CPU-runnable one against the
plain XLA reference (outputs and gradients), with and without packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqllava_jax.config import LLMConfig, LoRAConfig
from sqllava_jax.models import attention as A
from sqllava_jax.models.llama import Llama

CALL = dict(dtype=jnp.float32, head_dim=64, seq_len=1024, causal=True, self_attention=True,
            dense_mask=False)


@pytest.mark.parametrize("impl,on,changes,expected", [
    ("auto", "cpu", {}, "blocked"),
    ("auto", "gpu", {"dtype": jnp.bfloat16}, "cudnn"),
    ("auto", "gpu", {}, "xla"),                           # cuDNN takes no float32
    ("auto", "gpu", {"dtype": jnp.bfloat16, "head_dim": 256}, "xla"),
    ("auto", "tpu", {}, "splash"),
    ("auto", "tpu", {"seq_len": 1000}, "xla"),            # not whole 128-token blocks
    ("auto", "tpu", {"self_attention": False, "dense_mask": True}, "xla"),  # KV cache
    ("blocked", "cpu", {}, "blocked"),
    ("blocked", "gpu", {}, "blocked"),
    ("blocked", "cpu", {"causal": False}, "xla"),         # the vision tower
    ("blocked", "cpu", {"self_attention": False, "dense_mask": True}, "xla"),
    ("cudnn", "gpu", {"dtype": jnp.float16}, "cudnn"),
    ("splash", "tpu", {"causal": False, "seq_len": 256}, "splash"),
    ("xla", "tpu", {}, "xla"),
])
def test_selection_and_fallback(impl, on, changes, expected):
  assert A.resolve(impl, on=on, **{**CALL, **changes}) == expected


@pytest.mark.parametrize("impl,on", [("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "cpu"),
                                     ("splash", "gpu")])
def test_a_kernel_on_the_wrong_platform_is_an_error(impl, on):
  with pytest.raises(ValueError, match=f"attention_impl={impl} runs on .* only; this is {on}"):
    A.resolve(impl, on=on, **CALL)


def test_unknown_implementation_names_the_choices():
  with pytest.raises(ValueError, match="choose one of xla, blocked, cudnn, splash, auto"):
    A.check_impl("flash")


def _inputs(b, t, n, k, h, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, t, n, h)), jnp.float32)
  kv = [jnp.asarray(r.standard_normal((b, t, k, h)), jnp.float32) for _ in range(2)]
  segments = np.zeros((b, t), np.int32)  # three examples, then padding
  segments[:, : t // 3], segments[:, t // 3: t // 2], segments[:, t // 2: t - 9] = 1, 2, 3
  segments[-1] = np.where(np.arange(t) < t - 30, 1, 0)  # one example then padding
  return q, kv[0], kv[1], jnp.asarray(segments)


def _output_and_grads(fn, q, k, v):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  return (fn(q, k, v),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# (B, T, N heads, K kv heads, H, block): MHA, GQA, MQA, a last block shorter than the rest.
SHAPES = [(2, 256, 4, 4, 16, 64), (2, 256, 4, 2, 16, 128), (1, 256, 4, 1, 8, 96),
          (2, 200, 2, 2, 8, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "segments"])
@pytest.mark.parametrize("impl", ["blocked", "auto", "splash"])
def test_cpu_runnable_implementations_equal_the_xla_reference(shape, packed, impl):
  b, t, n, k, h, block = shape
  if impl == "splash" and t % A.SPLASH_BLOCK:
    pytest.skip("splash needs whole 128-token blocks")
  q, kk, v, segments = _inputs(b, t, n, k, h)
  segments = segments if packed else None
  reference = _output_and_grads(
      lambda q, k, v: A.attention(q, k, v, impl="xla", segment_ids=segments, is_causal=True),
      q, kk, v)
  # The splash kernel runs in the Pallas interpreter here: the TPU code path, on CPU.
  ours = _output_and_grads(
      lambda q, k, v: A.attention(q, k, v, impl=impl, segment_ids=segments, is_causal=True,
                                  block_size=block, interpret=impl == "splash"), q, kk, v)
  real = np.ones((b, t), bool) if segments is None else np.asarray(segments) > 0
  for name, got, want in zip(("out", "dq", "dk", "dv"), ours, reference):
    got, want = np.asarray(got)[real], np.asarray(want)[real]  # padding rows: garbage either way
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()),
                               err_msg=name)


def test_blocked_keeps_no_score_matrix():
  """The saved residuals of `blocked` are O(T), not O(T^2): q, k, v, out and log-sum-exp."""
  q, k, v, segments = _inputs(1, 512, 2, 2, 8)
  fn = lambda q: A.attention(q, k, v, impl="blocked", segment_ids=segments, is_causal=True,
                             block_size=128)
  residuals = jax.vjp(fn, q)[1]
  sizes = [x.size for x in jax.tree.leaves(residuals) if hasattr(x, "size")]
  assert max(sizes) <= 512 * 2 * 8, sizes


def test_blocked_gradient_holds_one_tile_of_scores_at_a_time():
  """Compiled, the backward's temporaries stay far below one [T, T] score matrix: the tiles
  run one after another (an unrolled loop lets XLA keep all blocks' scores alive at once)."""
  b, t, n, h = 1, 2048, 4, 32
  x = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  loss = lambda q, k, v: jnp.sum(A.attention(q, k, v, impl="blocked", is_causal=True,
                                             block_size=128))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  scores = b * n * t * t * 4
  inputs = 3 * b * t * n * h * 4
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * inputs + scores // 8


@pytest.mark.parametrize("impl", ["blocked", "auto"])
def test_llama_with_blocked_attention_equals_xla(impl):
  cfg = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2)
  lora = LoRAConfig()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 160)))
  segments = jnp.asarray(np.repeat([[1] * 70 + [2] * 80 + [0] * 10], 2, 0))
  positions = jnp.asarray(np.repeat([list(range(70)) + list(range(80)) + [0] * 10], 2, 0))
  logits = {}
  for name in ("xla", impl):
    model = Llama(cfg, lora, attention_impl=name, attention_block_size=32, rngs=nnx.Rngs(0))
    logits[name] = np.asarray(model(ids, positions, segment_ids=segments)[0])[:, :150]
  np.testing.assert_allclose(logits[impl], logits["xla"], rtol=1e-5, atol=1e-5)


def test_cudnn_on_cpu_fails_when_called():
  q, k, v, _ = _inputs(1, 128, 2, 2, 8)
  with pytest.raises(ValueError, match="runs on GPU only; this is cpu: use auto"):
    A.attention(q, k, v, impl="cudnn", is_causal=True)
