"""Building blocks shared by the towers: parameters with logical axes, Linear (+LoRA), norms,
embeddings, activations and the scanned layer stack (attention: `attention.py`).

Small modules take plain numbers; only the top-level models read the config.
Kernels are stored `[in, out]` (flax layout); the HF key maps transpose torch's `[out, in]`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sqllava_jax.parallel.logical import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def param(value: jax.Array, axes: Sequence[Optional[str]]) -> nnx.Param:
  """A parameter annotated with logical axis names (sharded later by the mesh rules)."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {tuple(axes)} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


_threefry_unrolled = False


def unroll_threefry_on_cpu() -> bool:
  """Lowers JAX's threefry RNG on CPU unrolled, as GPU and TPU do, for programs lowered from
  now on. The CPU default is a rolled loop that XLA runs as whole-array passes (and whose
  state it keeps in memory for the whole mask); unrolled, the rounds fuse into one vectorised
  loop: the same algorithm and the same bits, and the dropout masks of a train step about 20x
  faster on CPU.

  This changes how JAX lowers every later program of the process, so nothing calls it on
  import or construction: the commands that train or plan (`train`, `plan`, `demo`) and the
  benchmarks call it once, first; a library user who wants the speed calls it too. Returns
  False where this JAX version lacks the rule (the rules are JAX internals; nothing changes
  then, only speed)."""
  global _threefry_unrolled
  try:
    # JAX internals, imported only here: a JAX without them still runs everything else.
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32 as tf  # pylint: disable=g-import-not-at-top
    mlir.register_lowering(tf.threefry2x32_p, tf._threefry2x32_lowering_rule, platform="cpu")
  except (ImportError, AttributeError):
    return False
  _threefry_unrolled = True
  return True


def threefry_unrolled_on_cpu() -> bool:
  """Whether `unroll_threefry_on_cpu` has put its rule in place in this process."""
  return _threefry_unrolled


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or `rate` is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Linear(nnx.Module):
  """`y = x W + b`, optionally plus LoRA: `(alpha / rank) * B(A(dropout(x)))` with B = 0 at init.

  Parameters: `kernel` [in, out], `bias` [out] (if `use_bias`), and with `lora_rank > 0`
  `lora_a` [in, rank] (Kaiming-uniform as PEFT) and `lora_b` [rank, out] (zeros).
  `merged` records whether the LoRA product has been folded into `kernel`.
  """

  def __init__(self, in_features: int, out_features: int, *,
               axes: tuple[Optional[str], Optional[str]], use_bias: bool = False,
               lora_rank: int = 0, lora_alpha: float = 0.0,
               lora_dropout: float = 0.0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(stddev=0.02)
    self.kernel = param(init(rngs.params(), (in_features, out_features), param_dtype), axes)
    self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
    self.lora_rank = lora_rank
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    self.lora_dropout = lora_dropout
    self.merged = False
    self.dtype = dtype
    if lora_rank:
      # PEFT's default: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
      bound = 1.0 / math.sqrt(in_features)
      a = jax.random.uniform(rngs.params(), (in_features, lora_rank), param_dtype, -bound, bound)
      self.lora_a = param(a, (axes[0], "lora"))
      self.lora_b = param(jnp.zeros((lora_rank, out_features), param_dtype), ("lora", axes[1]))

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """x: [..., in] -> [..., out]."""
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.lora_rank and not self.merged:
      h = dropout(x, self.lora_dropout, rng) @ self.lora_a[...].astype(self.dtype)
      y = y + (h @ self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (as torch does for fp32 inputs)."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype=jnp.float32):
    self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
    self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
    return (y * scale + bias).astype(dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: normalise in float32, cast back, then scale (transformers' order)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * h.astype(dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]."""

  def __init__(self, num_embeddings: int, features: int, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(stddev=0.02)
    self.embedding = param(init(rngs.params(), (num_embeddings, features), param_dtype),
                           ("vocab", "embed"))

  def __call__(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """ids: int[B, T] -> [B, T, embed]."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query", "key", "value"),
}


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """Wraps a scanned layer body in `jax.checkpoint` with the named policy ('none': as is)."""
  if policy == "none":
    return fn
  try:
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
  except KeyError:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of none, "
                     f"{', '.join(REMAT_POLICIES)}") from None


def make_layer_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                     rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num_layers` copies of a layer with parameters stacked on a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> nnx.Module:
    return make_layer(r)

  return create(rngs)


def scan_layers(stack: nnx.Module, body: Callable, carry: Any, xs: Any = None, *,
                num_layers: Optional[int] = None, remat_policy: str = "none") -> tuple[Any, Any]:
  """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers with `lax.scan`.

  One compiled layer body per tower. `num_layers` runs only the first n layers (the vision
  tower stops at the selected hidden state). `xs` are per-layer inputs (e.g. KV caches).
  """
  graphdef, state = nnx.split(stack)
  if num_layers is not None:
    state = jax.tree.map(lambda a: a[:num_layers], state)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  return jax.lax.scan(maybe_remat(step, remat_policy), carry, (state, xs))


def shard_activation(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  return constrain(x, names)
