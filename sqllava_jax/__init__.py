"""sqllava-jax: SQ-LLaVA (self-questioning vision-language assistant) in JAX / Flax NNX."""

__version__ = "0.1.0"
