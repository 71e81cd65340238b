"""Hugging Face and original-code checkpoint import and export."""

# `convert export-hf --format` (kept here, free of heavy imports, for the command line).
FORMATS = ("llama", "clip", "llava", "sqllava", "sqllava-lora", "sqllava-stage1", "peft")
