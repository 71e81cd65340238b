"""Which rows of a batch begin with the same tokens on the same image, so that the prefill
computes that head once (vision tower included) and each row only its own tail.

Rows share a head when they hold the same image (byte-identical pixels) and the same tokens
up to the end of its placeholders; their head is the longest prefix all of them share, short
of each row's last token (every row prefills at least one token of its own, whose logits
give its first new token). Text-only rows share the prefix they have in common (a system
prompt), split by their first token where they have none. This is what a batch of
questions on one image looks like: the questions `ask` samples from one prompt per image
(the whole prompt is shared), its answers to them, and the consecutive questions that
benchmarks ask of each image (POPE, MME).

    heads = plan_heads(prompts, pixels, image_token_id=-200)
    heads.heads, heads.head_of, heads.tails   # or None: nothing worth sharing
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np

__all__ = ["PromptHeads", "plan_heads"]

# Sharing runs a second program shape; below this share of the prompt tokens saved, the plain
# prefill is used.
MIN_SAVED_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class PromptHeads:
  """heads: the distinct heads (ids); source: for each head, a row whose image it carries;
  head_of: for each row, its head's index; tails: for each row, its ids after the head (at
  least one)."""
  heads: list[list[int]]
  source: list[int]
  head_of: list[int]
  tails: list[list[int]]

  @property
  def saved_tokens(self) -> int:
    """Prompt tokens the batch no longer prefills."""
    return sum(len(self.heads[h]) for h in self.head_of) - sum(len(h) for h in self.heads)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
  first, n = rows[0], min(len(r) for r in rows)
  for i in range(n):
    if any(r[i] != first[i] for r in rows[1:]):
      return i
  return n


def _image_key(prompt: Sequence[int], pixels: Optional[np.ndarray],
               image_token_id: Optional[int]):
  """What rows must agree on to share a head, and the head length its image needs: the image
  bytes and the tokens up to its last placeholder (nothing for a text-only row)."""
  marks = [i for i, t in enumerate(prompt) if t == image_token_id]
  if not marks:
    return None, 0
  if pixels is None:
    raise ValueError("a prompt holds image placeholders but no pixels were given")
  digest = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()
  return (digest, tuple(prompt[:marks[-1] + 1])), marks[-1] + 1


def plan_heads(prompts: Sequence[Sequence[int]], pixels: Optional[np.ndarray], *,
               image_token_id: Optional[int], min_saved_share: float = MIN_SAVED_SHARE
               ) -> Optional[PromptHeads]:
  """The heads of `prompts` (pixels: [B, H, W, 3], or None for text-only rows), or None when
  sharing would save under `min_saved_share` of the prompt tokens. `image_token_id`: the
  placeholder id (None: a text-only model)."""
  groups: dict = {}
  needs: dict = {}  # per group, the head length its image placeholders need
  for i, p in enumerate(prompts):
    key, need = _image_key(p, None if pixels is None else pixels[i], image_token_id)
    groups.setdefault(key, []).append(i)
    needs[key] = need
  if len(groups) == len(prompts):
    return None
  heads: list[list[int]] = []
  source: list[int] = []
  head_of = [0] * len(prompts)
  tails: list[list[int]] = [[] for _ in prompts]
  pending = list(groups.items())
  while pending:
    key, members = pending.pop(0)
    rows = [prompts[i] for i in members]
    length = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
    if length < max(needs[key], 1):
      if len(members) == 1:  # a prompt ending in its image, or a one-token prompt
        return None
      # Text rows with no common first token: split by it (then row by row).
      split: dict = {}
      for i in members:
        split.setdefault(prompts[i][0], []).append(i)
      parts = list(split.values()) if len(split) > 1 else [[i] for i in members]
      pending[:0] = [(key, part) for part in parts]
      continue
    for i in members:
      head_of[i], tails[i] = len(heads), list(prompts[i][length:])
    heads.append(list(rows[0][:length]))
    source.append(members[0])
  plan = PromptHeads(heads, source, head_of, tails)
  if plan.saved_tokens < min_saved_share * sum(len(p) for p in prompts):
    return None
  return plan
