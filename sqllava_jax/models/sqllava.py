"""The composite SQ-LLaVA model: vision tower -> projector -> LLaMA, with static-shape merge.

The data pipeline expands each `<image>` into `num_image_tokens` placeholder positions
(input id `image_token_id`, -200 as in the reference). The model encodes the image, then
scatters its projected features into exactly those positions: a mask and a cumulative-sum
index, so every batch has a fixed shape and nothing re-traces (MaxText's
`multimodal/utils.py` merge, written once per example and vmapped).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqllava_jax.config import ModelConfig
from sqllava_jax.models.layers import dtype_of
from sqllava_jax.models.llama import KVCache, Llama
from sqllava_jax.models.lora import is_lora_path
from sqllava_jax.models.projector import make_projector
from sqllava_jax.models.vision import VisionTower


def _merge_one(text: jax.Array, features: jax.Array, is_image: jax.Array) -> jax.Array:
  """text: [T, H], features: [P, H], is_image: bool[T] -> [T, H]; the k-th image position
  receives feature k."""
  index = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
  return jnp.where(is_image[:, None], features[index].astype(text.dtype), text)


def merge_image_features(text_embeds: jax.Array, image_features: jax.Array,
                         image_mask: jax.Array) -> jax.Array:
  """text_embeds: [B, T, H]; image_features: [B, P, H]; image_mask: bool[B, T] -> [B, T, H]."""
  if (text_embeds.shape[0] != image_features.shape[0]
      or text_embeds.shape[-1] != image_features.shape[-1]):
    raise ValueError(f"cannot merge image features of shape {image_features.shape} into text "
                     f"embeddings of shape {text_embeds.shape}: batch and width must agree")
  if image_mask.shape != text_embeds.shape[:2]:
    raise ValueError(f"image_mask has shape {image_mask.shape}; expected {text_embeds.shape[:2]}")
  return jax.vmap(_merge_one)(text_embeds, image_features, image_mask)


def check_image_placeholders(input_ids: np.ndarray, has_image: np.ndarray, num_image_tokens: int,
                             image_token_id: int) -> None:
  """Host-side check that each row holds exactly `num_image_tokens` placeholders per image
  (has_image: bool[B], or bool[B, K] for K image slots per row) and rows without one hold
  none (inside jit a wrong count would silently misplace features)."""
  counts = (np.asarray(input_ids) == image_token_id).sum(axis=1)
  has_image = np.asarray(has_image)
  expected = has_image.reshape(has_image.shape[0], -1).sum(axis=1) * num_image_tokens
  bad = np.nonzero(counts != expected)[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"row {i} holds {int(counts[i])} image placeholders ({image_token_id}); "
                     f"expected {int(expected[i])} (num_image_tokens={num_image_tokens})")


class SQLLaVA(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = dtype_of(cfg.compute_dtype), dtype_of(cfg.param_dtype)
    self.vision = VisionTower(cfg.vision, cfg.vit_lora, dtype=dtype, param_dtype=param_dtype,
                              remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl,
                              rngs=rngs)
    self.projector = make_projector(cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.llm = Llama(cfg.llm, cfg.llm_lora, dtype=dtype, param_dtype=param_dtype,
                     remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl,
                     attention_block_size=cfg.attention_block_size, rngs=rngs)

  def encode_images(self, pixel_values: jax.Array, rng: Optional[jax.Array] = None):
    """float[B, H, W, C] -> (features [B, P, llm width], aux)."""
    features, _ = self.vision(pixel_values, rng)
    projected, proj_aux = self.projector(features)
    aux = {"vision/features": features}
    aux.update({f"projector/{k}": v for k, v in proj_aux.items()})
    return projected, aux

  def embed_inputs(self, input_ids: jax.Array, pixel_values: Optional[jax.Array],
                   rng: Optional[jax.Array] = None):
    """int[B, T] (image positions = image_token_id) + images -> (embeddings [B, T, H], aux).

    pixel_values: [B, H, W, C], one image per row, or [B, K, H, W, C], K image slots per row
    (packed rows). A row's k-th image fills its k-th run of placeholders: the features of
    its slots are concatenated [K * P, H] and scattered in order, so the same cumulative
    index serves one image or several."""
    image_mask = input_ids == self.cfg.image_token_id
    text_ids = jnp.where(image_mask, self.cfg.llm.pad_token_id, input_ids)
    embeds = self.llm.embed(text_ids)
    if pixel_values is None:
      return embeds, {}
    b = pixel_values.shape[0]
    if pixel_values.ndim == 5:  # encode all slots as one batch of images
      pixel_values = pixel_values.reshape(-1, *pixel_values.shape[2:])
    features, aux = self.encode_images(pixel_values, rng)
    features = features.reshape(b, -1, features.shape[-1])  # [B, K * P, H]
    return merge_image_features(embeds, features, image_mask), aux

  def __call__(self, input_ids: jax.Array, pixel_values: Optional[jax.Array],
               positions: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None, token_valid: Optional[jax.Array] = None,
               rng: Optional[jax.Array] = None):
    """Returns (final-normed hidden [B, T, H], aux). Logits: `model.llm.logits(hidden)`; the
    training loss projects to the vocabulary in chunks instead (no [B, T, V] in memory)."""
    vision_rng, llm_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
    embeds, aux = self.embed_inputs(input_ids, pixel_values, vision_rng)
    hidden, cache = self.llm.decode(embeds, positions, segment_ids=segment_ids, cache=cache,
                                    token_valid=token_valid, rng=llm_rng)
    aux["cache"] = cache
    return hidden, aux


# The model's parts, for counting parameters (`sqllava-jax info`); what trains is decided by
# the optimizer's parameter groups (`train.param_groups`), not by these.
COMPONENTS = ("vision tower", "ViT-LoRA", "projector", "LLM", "LLM-LoRA")


def component_of(path: tuple) -> str:
  """Which of COMPONENTS a parameter path (('llm', 'layers', ...)) belongs to."""
  top, lora = str(path[0]), is_lora_path(path)
  if top == "vision":
    return "ViT-LoRA" if lora else "vision tower"
  if top == "llm":
    return "LLM-LoRA" if lora else "LLM"
  if top == "projector":
    return "projector"
  raise ValueError(f"parameter {'/'.join(map(str, path))} belongs to no component")


def abstract_model(cfg: ModelConfig) -> SQLLaVA:
  """The model with shape-only parameters (no memory), for counting, planning and restoring."""
  return nnx.eval_shape(lambda: SQLLaVA(cfg, rngs=nnx.Rngs(0)))
