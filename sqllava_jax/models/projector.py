"""Vision -> LLM projectors: SQ-LLaVA's prototype extractor and LLaVA-1.5's MLPs.

The prototype extractor (`mm_projector_type: cluster`) mirrors `Clustering` in the
reference's `llava/model/multimodal_projector/cluster.py`: prototypes start as adaptive
average pools of the patch features, are refined T times by a softmax over prototypes, and
every visual token then receives its nearest prototype's pooled feature back (hard
assignment, weighted by a learned sigmoid similarity) before the MLP into the LLM width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqllava_jax.config import ProjectorConfig
from sqllava_jax.models.key_map import KeySpec, linear_key_map, norm_key_map, reshape_to, transpose
from sqllava_jax.models.layers import LayerNorm, Linear, param, quick_gelu


def adaptive_avg_pool(x: jax.Array, out_len: int) -> jax.Array:
  """[B, L, D] -> [B, N, D]; window i averages tokens floor(i L / N) .. ceil((i+1) L / N) - 1,
  exactly torch's AdaptiveAvgPool1d (windows overlap when N does not divide L)."""
  length = x.shape[1]
  i = np.arange(out_len)
  starts, ends = (i * length) // out_len, -(-((i + 1) * length) // out_len)
  # A fixed [N, L] averaging matrix: static shapes, one matmul, exact window semantics.
  j = np.arange(length)
  inside = (j[None, :] >= starts[:, None]) & (j[None, :] < ends[:, None])
  pool = jnp.asarray(inside / (ends - starts)[:, None], x.dtype)
  return jnp.einsum("nl,bld->bnd", pool, x)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
  """torch's F.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class PrototypeExtractor(nnx.Module):
  """x: [B, L, D] -> [B, L, H]; N prototypes, T refinements (docs/design.md section 2.2)."""

  def __init__(self, in_dim: int, out_dim: int, *, num_prototypes: int, num_iterations: int,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    linear = lambda i, o, axes: Linear(i, o, axes=axes, use_bias=True, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
    self.c = linear(in_dim, in_dim, ("vision_embed", None))
    self.v = linear(in_dim, in_dim, ("vision_embed", None))
    self.f = linear(in_dim, in_dim, ("vision_embed", None))
    self.sim_alpha = param(jnp.ones((), param_dtype), ())
    self.sim_beta = param(jnp.zeros((), param_dtype), ())
    # The reference builds `ln_1` but never applies it; kept so checkpoints round-trip.
    self.ln_1 = LayerNorm(in_dim, eps=1e-5, axis_name="vision_embed", param_dtype=param_dtype)
    self.mlp_in = linear(in_dim, out_dim, ("vision_embed", "embed"))
    self.mlp_out = linear(out_dim, out_dim, ("embed", None))
    self.num_prototypes = num_prototypes
    self.num_iterations = num_iterations
    self.dtype = dtype

  def __call__(self, x: jax.Array):
    """Returns (out [B, L, H], aux) with aux['assignments'] int[B, L] (nearest prototype)."""
    x = x.astype(self.dtype)
    value = self.v(x)                                    # [B, L, D]
    feature = self.f(x)                                  # [B, L, D]
    centers = adaptive_avg_pool(x, self.num_prototypes)  # [B, N, D]
    centers_feature = adaptive_avg_pool(feature, self.num_prototypes)
    # The reference normalises `value` transposed to [B, D, L] along its last axis: each
    # channel is scaled to unit length over the tokens (not a per-token cosine).
    value_t = l2_normalize(value.swapaxes(1, 2), axis=-1)  # [B, D, L]
    for _ in range(self.num_iterations):
      centers = self.c(centers)
      sim = jax.nn.softmax(l2_normalize(centers, axis=-1) @ value_t, axis=1)  # [B, N, L]
      centers = sim @ feature
    cos = l2_normalize(centers, -1) @ l2_normalize(x, -1).swapaxes(1, 2)   # [B, N, L]
    sim = jax.nn.sigmoid(self.sim_beta[...].astype(self.dtype)
                         + self.sim_alpha[...].astype(self.dtype) * cos)
    assignments = jnp.argmax(sim, axis=1)                                # [B, L]
    onehot = jax.nn.one_hot(assignments, self.num_prototypes, axis=1, dtype=sim.dtype)
    sim = sim * onehot
    proto = (sim @ feature + centers_feature) / (onehot.sum(-1, keepdims=True) + 1.0)  # [B, N, D]
    out = x + sim.swapaxes(1, 2) @ proto
    out = self.mlp_out(quick_gelu(self.mlp_in(out)))
    return out, {"assignments": assignments}


class MLPProjector(nnx.Module):
  """LLaVA-1.5 `mlp2x_gelu` (Linear, GELU, Linear) or `linear` (one Linear)."""

  def __init__(self, in_dim: int, out_dim: int, *, depth: int, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = Linear(in_dim, out_dim, axes=("vision_embed", "embed"), use_bias=True,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = (Linear(out_dim, out_dim, axes=("embed", None), use_bias=True, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs) if depth == 2 else None)

  def __call__(self, x: jax.Array):
    h = self.linear_1(x)
    if self.linear_2 is not None:
      h = self.linear_2(jax.nn.gelu(h, approximate=False))
    return h, {}


def make_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int, *, dtype, param_dtype,
                   rngs: nnx.Rngs) -> nnx.Module:
  if cfg.type == "cluster":
    return PrototypeExtractor(in_dim, out_dim, num_prototypes=cfg.num_prototypes,
                              num_iterations=cfg.num_iterations, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
  depth = {"mlp2x_gelu": 2, "linear": 1}[cfg.type]
  return MLPProjector(in_dim, out_dim, depth=depth, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def reference_key_map(cfg: ProjectorConfig) -> list[KeySpec]:
  """Our projector paths <-> the reference code's `mm_projector.*` names (no prefix)."""
  if cfg.type == "cluster":
    specs = []
    for name in ("c", "v", "f"):
      specs += linear_key_map(name, name, bias=True)
    specs += [KeySpec("sim_alpha", "sim_alpha", reshape_to(()), reshape_to((1, 1, 1))),
              KeySpec("sim_beta", "sim_beta", reshape_to(()), reshape_to((1, 1, 1))),
              *norm_key_map("ln_1", "ln_1", bias=True),
              *linear_key_map("mlp_in", "mlp.0", bias=True),
              *linear_key_map("mlp_out", "mlp.2", bias=True)]
    return specs
  if cfg.type == "mlp2x_gelu":
    return linear_key_map("linear_1", "0", bias=True) + linear_key_map("linear_2", "2", bias=True)
  return [KeySpec("linear_1/kernel", "weight", transpose, transpose),
          KeySpec("linear_1/bias", "bias")]


def llava_key_map(cfg: ProjectorConfig) -> list[KeySpec]:
  """Our projector paths <-> transformers' `LlavaMultiModalProjector` names (no prefix)."""
  if cfg.type != "mlp2x_gelu":
    raise ValueError(f"transformers' LLaVA projector is mlp2x_gelu; this one is {cfg.type!r}")
  return linear_key_map("linear_1", "linear_1", bias=True) + linear_key_map("linear_2", "linear_2",
                                                                          bias=True)
