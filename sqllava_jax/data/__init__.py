"""Tokenizer, templates and labels, images, the Grain pipeline, the TFDS builder, synthetic data."""
