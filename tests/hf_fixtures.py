"""Tiny random transformers models saved to temporary directories (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def tiny_llama_config(num_kv_heads: int = 2, **overrides) -> transformers.LlamaConfig:
  kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                attn_implementation="eager")
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def tiny_clip_vision_config(**overrides) -> transformers.CLIPVisionConfig:
  kwargs = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, initializer_factor=1.0, attn_implementation="eager")
  kwargs.update(overrides)
  return transformers.CLIPVisionConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
  """Every parameter random (norm weights and biases too, so none is trivially 1 or 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      is_norm_scale = "norm" in name and name.endswith("weight")
      p.copy_(1.0 + noise if is_norm_scale else noise)
  return model.eval()


def save_llama(path, config=None, seed: int = 0, safe: bool = True):
  torch.manual_seed(seed)
  model = randomize_(transformers.LlamaForCausalLM(config or tiny_llama_config()), seed)
  if safe:
    model.save_pretrained(path)
  else:  # The older layout: config.json + pytorch_model.bin (transformers now writes safetensors).
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), f"{path}/pytorch_model.bin")
  return model


def save_clip_vision(path, config=None, seed: int = 0, full: bool = False):
  torch.manual_seed(seed)
  vcfg = config or tiny_clip_vision_config()
  if full:
    text = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=16)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                           vision_config=vcfg.to_dict(),
                                                           projection_dim=16))
  else:
    model = transformers.CLIPVisionModel(vcfg)
  model = randomize_(model, seed)
  model.save_pretrained(path)
  return model


def to_np(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy()
