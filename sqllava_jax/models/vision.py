"""CLIP ViT vision tower, numerically transformers' `CLIPVisionModel`.

Pre-LayerNorm ViT with a class token and learned position embeddings. The tower returns the
hidden state selected by `select_layer` (LLaVA's `mm_vision_select_layer`, -2 by default:
the output of the second-to-last encoder layer) and runs only the layers needed for it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sqllava_jax.config import LoRAConfig, VisionConfig
from sqllava_jax.models.attention import attention
from sqllava_jax.models.key_map import (
  KeySpec,
  conv_to_hf,
  conv_to_ours,
  linear_key_map,
  norm_key_map,
)
from sqllava_jax.models.layers import (
  ACTIVATIONS,
  LayerNorm,
  make_layer_stack,
  param,
  scan_layers,
  shard_activation,
)
from sqllava_jax.models.lora import fold_rng, linear_factory


class VisionAttention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, make_linear, impl: str):
    self.num_heads = num_heads
    self.impl = impl
    self.q_proj = make_linear("q_proj", dim, dim, ("vision_embed", "vision_heads"), True)
    self.k_proj = make_linear("k_proj", dim, dim, ("vision_embed", "vision_heads"), True)
    self.v_proj = make_linear("v_proj", dim, dim, ("vision_embed", "vision_heads"), True)
    self.out_proj = make_linear("out_proj", dim, dim, ("vision_heads", "vision_embed"), True)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
    """x: [B, P, D] -> [B, P, D]; full (non-causal) attention."""
    b, p, d = x.shape
    heads = lambda t: t.reshape(b, p, self.num_heads, d // self.num_heads)
    q = heads(self.q_proj(x, fold_rng(rng, 0)))
    k = heads(self.k_proj(x, fold_rng(rng, 1)))
    v = heads(self.v_proj(x, fold_rng(rng, 2)))
    out = attention(q, k, v, impl=self.impl)
    return self.out_proj(out.reshape(b, p, d), fold_rng(rng, 3))


class VisionLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, lora: LoRAConfig, *, dtype, param_dtype, impl: str,
               rngs: nnx.Rngs):
    make = linear_factory(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          lora_targets=lora.targets, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    d, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.layer_norm1 = LayerNorm(d, eps=eps, axis_name="vision_embed", param_dtype=param_dtype)
    self.self_attn = VisionAttention(d, cfg.num_heads, make_linear=make, impl=impl)
    self.layer_norm2 = LayerNorm(d, eps=eps, axis_name="vision_embed", param_dtype=param_dtype)
    self.fc1 = make("fc1", d, cfg.intermediate_size, ("vision_embed", "vision_mlp"), True)
    self.fc2 = make("fc2", cfg.intermediate_size, d, ("vision_mlp", "vision_embed"), True)
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), fold_rng(rng, 0))
    h = ACTIVATIONS[self.act](self.fc1(self.layer_norm2(x), fold_rng(rng, 1)))
    return x + self.fc2(h, fold_rng(rng, 2))


class VisionTower(nnx.Module):
  """pixel_values: float[B, H, W, C] (CLIP-normalised) -> features [B, P(+1), D]."""

  def __init__(self, cfg: VisionConfig, lora: LoRAConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, remat_policy: str = "none", attention_impl: str = "xla",
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat_policy = remat_policy
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    init = jax.nn.initializers.normal(stddev=0.02)
    self.patch_embedding = param(init(rngs.params(), (p, p, c, d), param_dtype),
                                   (None, None, "channels", "vision_embed"))
    self.class_embedding = param(init(rngs.params(), (d,), param_dtype), ("vision_embed",))
    position_init = jax.nn.initializers.normal(stddev=cfg.init_position_std)
    self.position_embedding = param(position_init(rngs.params(), (cfg.num_patches + 1, d),
                                                    param_dtype),
                                      (None, "vision_embed"))
    self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, axis_name="vision_embed",
                                    param_dtype=param_dtype)
    self.layers = make_layer_stack(
        lambda r: VisionLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype,
                              impl=attention_impl, rngs=r), cfg.num_layers, rngs)
    # Kept for checkpoint round trips; LLaVA's features never pass through it.
    self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, axis_name="vision_embed",
                                      param_dtype=param_dtype)

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 1 + P, D]: patchify (a stride-p convolution as one matmul)."""
    b, h, w, c = pixel_values.shape
    p = self.cfg.patch_size
    if (h, w) != (self.cfg.image_size,) * 2 or c != self.cfg.num_channels:
      size = self.cfg.image_size
      raise ValueError(f"pixel_values has shape {pixel_values.shape}; expected "
                       f"[B, {size}, {size}, {self.cfg.num_channels}]")
    x = pixel_values.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    kernel = self.patch_embedding[...].astype(self.dtype).reshape(p * p * c, -1)
    patches = x @ kernel
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding[...].astype(self.dtype)[None]

  def __call__(self, pixel_values: jax.Array, rng: Optional[jax.Array] = None,
               *, all_hidden_states: bool = False):
    """Returns (features, aux). features: [B, P, D] patch tokens of the selected layer
    ([B, 1 + P, D] with `select_feature: cls_patch`). aux['hidden_states'] (if asked):
    [num_run + 1, B, 1 + P, D], the embeddings then each run layer's output, as HF's tuple."""
    x = shard_activation(self.pre_layrnorm(self.embed(pixel_values)),
                           ("batch", None, "vision_embed"))
    n = self.cfg.feature_layer_count
    rngs = None if rng is None else jax.random.split(rng, n)

    def body(layer, h, layer_rng):
      h = layer(h, layer_rng)
      return h, (h if all_hidden_states else None)

    x_sel, per_layer = scan_layers(self.layers, body, x, rngs, num_layers=n,
                                     remat_policy=self.remat_policy)
    aux = {}
    if all_hidden_states:
      aux["hidden_states"] = jnp.concatenate([x[None], per_layer], axis=0) if n else x[None]
    features = x_sel if self.cfg.select_feature == "cls_patch" else x_sel[:, 1:]
    return features, aux


def hf_key_map(cfg: VisionConfig) -> list[KeySpec]:
  """Our paths (inside the tower) <-> transformers `CLIPVisionModel` names (`vision_model.*`)."""
  n = cfg.num_layers
  layer = "vision_model.encoder.layers.{layer}"
  specs = [
      KeySpec("patch_embedding", "vision_model.embeddings.patch_embedding.weight",
              conv_to_ours, conv_to_hf),
      KeySpec("class_embedding", "vision_model.embeddings.class_embedding"),
      KeySpec("position_embedding", "vision_model.embeddings.position_embedding.weight"),
      *norm_key_map("pre_layrnorm", "vision_model.pre_layrnorm", bias=True),
      *norm_key_map("post_layernorm", "vision_model.post_layernorm", bias=True),
  ]
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    specs += linear_key_map(f"layers/self_attn/{name}", f"{layer}.self_attn.{name}", bias=True,
                          num_layers=n)
  for name in ("fc1", "fc2"):
    specs += linear_key_map(f"layers/{name}", f"{layer}.mlp.{name}", bias=True, num_layers=n)
  for name in ("layer_norm1", "layer_norm2"):
    specs += norm_key_map(f"layers/{name}", f"{layer}.{name}", bias=True, num_layers=n)
  return specs


def hf_ignored(name: str) -> bool:
  """Tensors of a CLIP checkpoint that the vision tower does not use: the text tower and
  projections of a full `CLIPModel`, and the `position_ids` buffer of older files."""
  return not name.startswith("vision_model.") or name.endswith("embeddings.position_ids")
