"""LoRA: config, apply, split, merge, unmerge.

LoRA lives inside `layers.Linear`: a targeted linear gains two parameters next to its frozen
`kernel`. For the LLM's stacked (scanned) layers the tree looks like

    llm/layers/attn/q_proj/kernel   [L, embed, heads*head_dim]     base (frozen)
    llm/layers/attn/q_proj/lora_a   [L, embed, r]                  adapter, Kaiming-uniform
    llm/layers/attn/q_proj/lora_b   [L, r, heads*head_dim]         adapter, zeros at init

and the output is `x W + (alpha / r) * B(A(dropout(x)))`. `merge` folds the product into
`kernel` (`W + (alpha / r) A B`) and switches the adapter path off, `unmerge` reverses it;
`split` separates adapter parameters from base ones (for adapter-only export and optimizer
groups, which select them by the `lora_` name).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sqllava_jax.models.layers import Linear

LORA_PARAM_NAMES = ("lora_a", "lora_b")


def linear_factory(*, lora_rank: int, lora_alpha: float, lora_dropout: float,
                   lora_targets: tuple[str, ...], dtype, param_dtype,
                   rngs: nnx.Rngs) -> Callable[..., Linear]:
  """`make(name, in, out, axes, use_bias)` builds a Linear, with LoRA if `name` is targeted."""

  def make(name: str, in_features: int, out_features: int, axes: tuple[str, str],
           use_bias: bool = False) -> Linear:
    rank = lora_rank if name in lora_targets else 0
    return Linear(in_features, out_features, axes=axes, use_bias=use_bias, lora_rank=rank,
                  lora_alpha=lora_alpha, lora_dropout=lora_dropout, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)

  return make


def lora_linears(module: nnx.Module):
  """(path, Linear) for every LoRA-carrying Linear inside `module`."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, Linear) and node.lora_rank:
      yield path, node


def delta(linear: Linear) -> jax.Array:
  """`(alpha / r) A B` in the kernel's shape (stacked layers broadcast over the leading axis)."""
  a = linear.lora_a[...].astype(jnp.float32)
  b = linear.lora_b[...].astype(jnp.float32)
  return jnp.matmul(a, b) * linear.lora_scale


def merge(module: nnx.Module) -> int:
  """Folds every adapter into its kernel in place; returns how many were merged."""
  count = 0
  for _, linear in lora_linears(module):
    if not linear.merged:
      kernel = linear.kernel[...]
      linear.kernel[...] = (kernel.astype(jnp.float32) + delta(linear)).astype(kernel.dtype)
      linear.merged = True
      count += 1
  return count


def unmerge(module: nnx.Module) -> int:
  """Reverses `merge`: subtracts each adapter product from its kernel again."""
  count = 0
  for _, linear in lora_linears(module):
    if linear.merged:
      kernel = linear.kernel[...]
      linear.kernel[...] = (kernel.astype(jnp.float32) - delta(linear)).astype(kernel.dtype)
      linear.merged = False
      count += 1
  return count


def is_lora_path(path: tuple) -> bool:
  return bool(path) and str(path[-1]) in LORA_PARAM_NAMES


def split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(base, lora) parts of a parameter state, by parameter name."""
  lora = nnx.filter_state(state, lambda path, _: is_lora_path(path))
  base = nnx.filter_state(state, lambda path, _: not is_lora_path(path))
  return base, lora


def fold_rng(rng: Optional[jax.Array], index: int) -> Optional[jax.Array]:
  """A distinct dropout key per linear inside a layer; None stays None (no dropout)."""
  return None if rng is None else jax.random.fold_in(rng, index)
