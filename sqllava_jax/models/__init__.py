"""Flax NNX modules: CLIP vision tower, LLaMA decoder, LoRA, projectors, the composite model."""
