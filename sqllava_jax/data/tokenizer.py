"""SentencePiece tokenizer with the legacy LLaMA handling of special tokens.

The reference trained with transformers' slow `LlamaTokenizer` in legacy mode: the text is
cut at special-token strings (`<s>`, `</s>`, `<unk>`), each special becomes its id, and each
piece in between is encoded by SentencePiece on its own, dummy-prefix space included. So
`A1</s>VUSER:` encodes `VUSER` as `▁VUSER`, and ` ASSISTANT:` after `</s>` starts with two
spaces' worth of `▁`. `<image>` is never text: `encode_prompt` cuts the prompt there and
writes the placeholder id once per image position (llava `mm_utils.tokenizer_image_token`).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

IMAGE_TOKEN = "<image>"


class Tokenizer:
  """A `tokenizer.model` (LLaMA layout: unk, bos, eos; pad = unk) with legacy splitting."""

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = os.fspath(model_path)
    if not os.path.isfile(self.model_path):
      raise ValueError(f"tokenizer model {self.model_path!r} does not exist; set data.tokenizer "
                       "to a SentencePiece tokenizer.model")
    with open(self.model_path, "rb") as f:
      self._load(f.read())

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()
    if min(self.bos_id, self.eos_id, self.unk_id) < 0:
      raise ValueError(f"tokenizer model {self.model_path!r} lacks unk/bos/eos (ids {self.unk_id}, "
                       f"{self.bos_id}, {self.eos_id}); train it with unk_id=0 bos_id=1 eos_id=2")
    # LLaMA has no pad token; the reference pads with unk.
    self.pad_id = self.unk_id
    specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
    self._special_ids = specials
    pattern = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True))
    self._split = re.compile(f"({pattern})")

  def __getstate__(self):
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load(state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS; special-token strings inside become their ids."""
    if not any(p in text for p in self._special_ids):
      return self._sp.encode(text) if text else []
    ids: list[int] = []
    for piece in self._split.split(text):
      special = self._special_ids.get(piece)
      if special is not None:
        ids.append(special)
      elif piece:
        ids.extend(self._sp.encode(piece))
    return ids

  def encode_prompt(self, prompt: str, *, num_image_tokens: int, image_token_id: int = -200,
                    add_bos: bool = True) -> list[int]:
    """BOS + ids of `prompt`, each `<image>` written as `num_image_tokens` placeholder ids."""
    ids = [self.bos_id] if add_bos else []
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
      if i:
        ids.extend([image_token_id] * num_image_tokens)
      ids.extend(self.encode(chunk))
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; image placeholders (negative ids) are dropped, and so are BOS/EOS/pad
    unless `skip_special_tokens` is False."""
    ids = [int(i) for i in ids if int(i) >= 0]
    if skip_special_tokens:
      drop = {self.bos_id, self.eos_id, self.pad_id}
      return self._sp.decode([i for i in ids if i not in drop])
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      if i in (self.bos_id, self.eos_id, self.unk_id):
        if run:
          out.append(self._sp.decode(run))
          run = []
        out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._sp.id_to_piece(int(i)) if int(i) >= 0 else IMAGE_TOKEN for i in ids]

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
