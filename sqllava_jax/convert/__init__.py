"""Hugging Face and reference-checkpoint import and export."""
