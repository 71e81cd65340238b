"""Shared pieces of the data tests: a tokenizer trained on the fly, transformers' LLaMA
tokenizers built from it, and the reference round-by-round label procedure written out."""

from __future__ import annotations

import os

from sqllava_jax.demo import synthetic

IGNORE = -100
IMAGE_ID = -200

SYSTEM_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "Also, the artificial intelligence assistant is a curious virtual user.",
    "The virtual user asks complex questions that are relevant to the content in the image,",
    "for example, asking about background knowledge of the objects in the image, asking to",
    "discuss about events happening in the image, etc. Again, do not ask about uncertain details.",
]
DIALOGUE_TEXT = [
    "USER: What is in the picture? ASSISTANT: A cat sleeping on a red sofa.",
    "VUSER: What colour is the sofa? ASSISTANT: The sofa is red.",
    "USER: How many people are there? ASSISTANT: There are 2 people, a man and a woman.",
    "Describe the image briefly.", "A dog runs across a green field, chasing a ball.",
    "What is the man holding? ASSISTANT: He holds an umbrella.",
    "Is it raining? Yes, it is raining heavily in the city streets at night.",
]


def train_tiny_tokenizer(directory: str, vocab_size: int = 400) -> str:
  """A byte-fallback BPE `tokenizer.model` (LLaMA layout) in `directory`; returns its path."""
  lines = (SYSTEM_TEXT + DIALOGUE_TEXT) * 20
  return synthetic.train_tokenizer(lines, os.path.join(directory, "tokenizer.model"),
                                   vocab_size=vocab_size)


def hf_llama_tokenizer(directory: str):
  """transformers' `LlamaTokenizer` with `legacy=True`, converted from `tokenizer.model`."""
  from transformers import LlamaTokenizer  # pylint: disable=g-import-not-at-top
  return LlamaTokenizer.from_pretrained(directory, legacy=True, add_bos_token=True)


def hf_llama_tokenizer_v4_layout(directory: str):
  """The same tokenizer in the layout transformers 4.x converted LLaMA into (normalizer:
  prepend '▁' to every piece between special tokens, spaces to '▁'; no pre-tokenizer),
  which reproduces the slow legacy `LlamaTokenizer` the reference trained with. From 5.x,
  `legacy=True` uses a Metaspace pre-tokenizer that prepends '▁' only to pieces that do not
  already start with a space, so ' ASSISTANT' after '</s>' loses one '▁'."""
  from tokenizers import normalizers  # pylint: disable=g-import-not-at-top
  tok = hf_llama_tokenizer(directory)
  backend = tok.backend_tokenizer
  backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                             normalizers.Replace(" ", "▁")])
  backend.pre_tokenizer = None
  return tok


def reference_image_tokenize(prompt: str, hf) -> list[int]:
  """BOS, then each piece between `<image>`s tokenised on its own, one -200 per image."""
  ids = [hf.bos_token_id]
  for i, chunk in enumerate(prompt.split("<image>")):
    if i:
      ids.append(IMAGE_ID)
    ids.extend(hf(chunk).input_ids[1:])
  return ids


def reference_labels(prompt: str, hf, template: str, has_image: bool):
  """(input_ids, labels) as the reference computes them: count each round's tokens
  separately and mask the instruction part, setting everything to ignore on a mismatch."""
  def count(text):
    return len(reference_image_tokenize(text, hf)) if has_image else len(hf(text).input_ids)

  ids = reference_image_tokenize(prompt, hf) if has_image else hf(prompt).input_ids
  labels = list(ids)
  if template == "plain":
    n = count("<image>")
    return ids, [IGNORE] * n + labels[n:]
  answer_sep = " ASSISTANT: "
  labels[0] = IGNORE
  pos = 1
  for i, round_text in enumerate(prompt.split("</s>")):
    if not round_text:
      break
    parts = round_text.split(answer_sep)
    round_len = count(round_text)  # its BOS stands for the '</s>' split off the round
    if len(parts) == 2:
      masked = count(parts[0] + answer_sep) - 2  # minus BOS and the trailing '▁'
    elif template == "v1_sq" and i > 0:
      masked = count("VUSER: ") - 2
    else:
      break
    labels[pos:pos + masked] = [IGNORE] * masked
    pos += round_len
  labels[pos:] = [IGNORE] * (len(labels) - pos)
  if pos != len(ids):
    labels = [IGNORE] * len(ids)
  return ids, labels


def trained_spans(tokenizer, input_ids, labels) -> list[str]:
  """The text of each run of consecutive trained tokens."""
  spans, run = [], []
  for token, label in zip(list(input_ids) + [0], list(labels) + [IGNORE]):
    if label != IGNORE:
      assert label == token, (label, token)
      run.append(int(token))
    elif run:
      spans.append(tokenizer.decode(run, skip_special_tokens=False))
      run = []
  return spans
