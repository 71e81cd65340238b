"""Inference prompts: a question (and image) -> the prompt text and its token ids.

Templates are the training ones (`data.templates`), ending with the tag of the role that
speaks next; `raw` is the user's text as is (BOS + its tokens). Benchmarks use `vicuna_v1`
with the image first, `<image>\\n{question}`, as the reference's eval scripts do
(llava `eval/model_vqa_loader.py`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional, Sequence

import numpy as np

from sqllava_jax.data import images
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.templates import ASSISTANT, TEMPLATES, USER, build_prompt
from sqllava_jax.data.tokenizer import IMAGE_TOKEN, Tokenizer

RAW = "raw"
TEMPLATE_CHOICES = (*TEMPLATES, RAW)


def with_image(text: str, image: bool) -> str:
  """`<image>\\n` + text when there is an image and the text does not place it already."""
  if not image or IMAGE_TOKEN in text:
    return text
  return f"{IMAGE_TOKEN}\n{text}"


def chat_prompt(template: str, turns: Sequence[tuple[str, str]], *,
                next_role: Optional[str] = ASSISTANT) -> str:
  """The prompt of `turns` in `template`, ending with `next_role`'s tag (ValueError if the
  template cannot lay the turns out)."""
  if template not in TEMPLATE_CHOICES:
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
  if template == RAW:
    return "".join(text for _, text in turns)
  try:
    return build_prompt(template, turns, next_role=next_role)
  except BadRecord as e:
    raise ValueError(f"template {template!r} cannot build this prompt: {e}") from None


def question_prompt(question: str, *, template: str, image: bool) -> str:
  """A single question to the assistant: `... USER: <image>\\n{question} ASSISTANT:`."""
  if template == "plain" and not image:
    raise ValueError("template 'plain' (stage-1 captioning) needs an image; pass --image or "
                     "choose vicuna_v1, v1_sq or raw")
  return chat_prompt(template, [(USER, with_image(question, image))])


def encode(tokenizer: Tokenizer, prompt: str, *, num_image_tokens: int,
           image_token_id: int) -> list[int]:
  """BOS + prompt ids, each `<image>` as `num_image_tokens` placeholders."""
  if prompt.count(IMAGE_TOKEN) > 1:
    raise ValueError(f"the prompt holds {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens; "
                     "the model takes one image per prompt")
  return tokenizer.encode_prompt(prompt, num_image_tokens=num_image_tokens,
                                 image_token_id=image_token_id)


def load_image(path: str, *, size: int, aspect_ratio: images.AspectRatio = "pad",
               max_pixels: int = 50_000_000) -> np.ndarray:
  """float32[size, size, 3], CLIP-normalised, as training preprocesses it. A missing or
  unreadable file raises `BadRecord` (a `ValueError`) that says which and why."""
  return load_image_bytes(images.read_image_file(path, name=path), name=path, size=size,
                          aspect_ratio=aspect_ratio, max_pixels=max_pixels)


def load_image_bytes(data: bytes, *, name: str, size: int, aspect_ratio: images.AspectRatio = "pad",
                     max_pixels: int = 50_000_000) -> np.ndarray:
  """`load_image` for an encoded image already in memory; `name` appears in errors."""
  pixels = images.load_pixels(data, size=size, aspect_ratio=aspect_ratio, max_pixels=max_pixels,
                              name=name)
  return images.normalize(pixels)


def load_inline_image(encoded: str, *, name: str, size: int,
                      aspect_ratio: images.AspectRatio = "pad") -> np.ndarray:
  """`load_image` for a base64-encoded image (MMBench's TSV `image` column)."""
  try:
    data = base64.b64decode(encoded, validate=False)
  except (binascii.Error, ValueError) as e:
    raise BadRecord("corrupt_image", f"image {name!r} is not valid base64: {e}") from None
  return load_image_bytes(data, name=name, size=size, aspect_ratio=aspect_ratio)
