"""LoRA: zero-initialised B changes nothing; merged == unmerged; unmerge restores the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqllava_jax.config import LLM_LORA_TARGETS, LLMConfig, LoRAConfig
from sqllava_jax.models import lora
from sqllava_jax.models.layers import Linear
from sqllava_jax.models.llama import Llama

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=LLM_LORA_TARGETS)


def copy_base(src: Llama, dst: Llama) -> None:
  """Copies every non-adapter parameter of `src` into `dst`."""
  base, _ = lora.split(nnx.state(src, nnx.Param))
  nnx.update(dst, base)


def randomize_adapters(model, seed=0):
  rng = np.random.default_rng(seed)
  for _, linear in lora.lora_linears(model):
    linear.lora_b[...] = jnp.asarray(rng.normal(size=linear.lora_b.shape) * 0.1, jnp.float32)


def test_zero_b_leaves_outputs_unchanged():
  plain = Llama(CFG, LoRAConfig(), rngs=nnx.Rngs(0))
  adapted = Llama(CFG, LORA, rngs=nnx.Rngs(1))
  copy_base(plain, adapted)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  ref, _ = plain(ids)
  got, _ = adapted(ids)
  a = adapted.layers.self_attn.q_proj.lora_a[...]
  assert float(jnp.abs(a).max()) > 0, "A must be random so that only B = 0 explains the equality"
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=0)


def test_merged_equals_unmerged_and_unmerge_restores():
  model = Llama(CFG, LORA, rngs=nnx.Rngs(2))
  randomize_adapters(model)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  unmerged, _ = model(ids)
  base_only = Llama(CFG, LoRAConfig(), rngs=nnx.Rngs(3))
  copy_base(model, base_only)
  plain, _ = base_only(ids)
  assert float(jnp.abs(unmerged - plain).max()) > 1e-3, "adapters must change the output"
  kernel_before = np.asarray(model.layers.mlp.down_proj.kernel[...]).copy()
  assert lora.merge(model) == len(LLM_LORA_TARGETS)
  assert model.layers.self_attn.q_proj.merged
  merged, _ = model(ids)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=0)
  assert lora.unmerge(model) == len(LLM_LORA_TARGETS)
  np.testing.assert_allclose(np.asarray(model.layers.mlp.down_proj.kernel[...]), kernel_before,
                             atol=1e-6, rtol=0)


def test_lora_formula_on_one_linear():
  layer = Linear(6, 5, axes=("embed", "mlp"), use_bias=True, lora_rank=2, lora_alpha=6.0,
                 rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.ones((2, 5)) * 0.5
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6)), jnp.float32)
  w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  a, bb = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
  expected = np.asarray(x) @ w + b + (6.0 / 2) * (np.asarray(x) @ a @ bb)
  np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-5, rtol=0)


def test_dropout_only_with_a_key_and_only_on_the_adapter_path():
  layer = Linear(16, 8, axes=("embed", "mlp"), lora_rank=4, lora_alpha=4.0, lora_dropout=0.5,
                 rngs=nnx.Rngs(0))
  x = jnp.ones((4, 16))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer(x)))
  # B = 0: dropout on the adapter input cannot change the output.
  np.testing.assert_allclose(np.asarray(layer(x, jax.random.key(0))), np.asarray(layer(x)),
                             atol=1e-6)
  layer.lora_b[...] = jnp.ones((4, 8))
  assert float(jnp.abs(layer(x, jax.random.key(0)) - layer(x)).max()) > 1e-3


def test_split_separates_adapters_by_name():
  model = Llama(CFG, LORA, rngs=nnx.Rngs(0))
  base, adapters = lora.split(nnx.state(model, nnx.Param))
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(adapters)}
  assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
  assert len(names) == 2 * len(LLM_LORA_TARGETS)
  base_names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(base)}
  assert not base_names & names and "lm_head" in base_names
