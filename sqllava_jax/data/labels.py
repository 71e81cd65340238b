"""Token ids and loss labels of a conversation, checked against the whole prompt's tokens.

The reference finds the trained tokens by tokenising each round again and counting
(llava `train.py`, `preprocess_v1_sq2`); when the counts disagree it silently sets every
label of the example to ignore. Here each segment of `templates.render_segments` is
tokenised once, labels follow the segments, and the concatenation must equal the legacy
tokenisation of the whole prompt; an example where it does not is refused
(`tokenization_mismatch`), as is one left with nothing to train after truncation.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np

from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.templates import Segment, Template, get_template, render_segments
from sqllava_jax.data.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  """input_ids, labels: int32[L] (labels unshifted, IGNORE_INDEX where no loss);
  segment_of_token: int32[L], the index into `segments` each token came from;
  segment_lengths: tokens of each segment before truncation."""
  prompt: str
  segments: tuple[Segment, ...]
  input_ids: np.ndarray
  labels: np.ndarray
  segment_of_token: np.ndarray
  segment_lengths: tuple[int, ...]

  @property
  def num_trained(self) -> int:
    return int((self.labels != IGNORE_INDEX).sum())


def tokenize_segments(tokenizer: Tokenizer, segments: Sequence[Segment], *,
                      num_image_tokens: int, image_token_id: int) -> list[list[int]]:
  """Token ids of each segment (a text segment after text drops the space its dummy
  prefix stands for)."""
  out = []
  previous = None
  for seg in segments:
    if seg.kind == "bos":
      ids = [tokenizer.bos_id]
    elif seg.kind == "eos":
      ids = [tokenizer.eos_id]
    elif seg.kind == "image":
      ids = [image_token_id] * num_image_tokens
    else:
      text = seg.text
      if previous == "text":
        assert text.startswith(" "), f"segment {seg!r} continues a text chunk without a space"
        text = text[1:]
      ids = tokenizer.encode(text)
    out.append(ids)
    previous = seg.kind
  return out


def tokenize_conversation(tokenizer: Tokenizer, template: str | Template,
                          turns: Sequence[tuple[str, str]], *, num_image_tokens: int,
                          image_token_id: int = -200,
                          max_length: Optional[int] = None,
                          system: Optional[str] = None) -> TokenizedConversation:
  """Tokens and labels of a training conversation, truncated to `max_length`; `system`
  replaces the template's system prompt.

  Raises `BadRecord` when the turns do not fit the template, when the per-segment tokens
  differ from the whole prompt's, or when truncation leaves no trained token or cuts
  through the image placeholders.
  """
  template = get_template(template)
  segments = tuple(render_segments(template, turns, system=system))
  per_segment = tokenize_segments(tokenizer, segments, num_image_tokens=num_image_tokens,
                                  image_token_id=image_token_id)
  check_against_whole_chunks(tokenizer, segments, per_segment)
  lengths = np.asarray([len(x) for x in per_segment])
  input_ids = np.array(list(itertools.chain.from_iterable(per_segment)), np.int32)
  owner = np.repeat(np.arange(len(segments), dtype=np.int32), lengths)
  trained = np.asarray([seg.trained for seg in segments])[owner]
  labels = np.where(trained, input_ids, np.int32(IGNORE_INDEX)).astype(np.int32)
  if max_length is not None and len(input_ids) > max_length:
    input_ids, labels, owner = _truncate(input_ids, labels, owner, max_length, image_token_id)
  if not (labels != IGNORE_INDEX).any():
    raise BadRecord("nothing_to_train",
                    f"no trained token among the {len(input_ids)} tokens kept"
                    + (f" (max_length {max_length})" if max_length else ""))
  prompt = "".join(s.text for s in segments)
  return TokenizedConversation(prompt, segments, input_ids, labels, owner,
                               tuple(int(n) for n in lengths))


def check_against_whole_chunks(tokenizer: Tokenizer, segments: Sequence[Segment],
                               per_segment: Sequence[list[int]]) -> None:
  """Raises `tokenization_mismatch` unless the segments' tokens are those of the whole prompt.

  The legacy tokenizer encodes each run of text between BOS, `</s>` and `<image>` on its
  own, so comparing run by run is comparing with the whole prompt; a run of one segment
  was encoded exactly so already and needs no second look.
  """
  run: list[int] = []
  position = 0
  for k, seg in enumerate(list(segments) + [None]):
    if seg is not None and seg.kind == "text":
      run.append(k)
      continue
    if len(run) > 1:
      ids = [i for j in run for i in per_segment[j]]
      whole = tokenizer.encode("".join(segments[j].text for j in run))
      if ids != whole:
        at = next((n for n, (a, b) in enumerate(zip(ids, whole)) if a != b),
                  min(len(ids), len(whole)))
        raise BadRecord(
            "tokenization_mismatch",
            f"token {position + at} differs ({len(ids)} per-turn tokens vs {len(whole)} for "
            f"the same text as a whole) near {_context(tokenizer, whole, at)!r}")
    position += sum(len(per_segment[j]) for j in run)
    if seg is not None:
      position += len(per_segment[k])
    run = []


def _truncate(input_ids, labels, owner, max_length, image_token_id):
  is_image = input_ids == image_token_id
  if is_image.any() and is_image[max_length:].any():
    raise BadRecord("image_truncated",
                    f"max_length {max_length} cuts the image placeholders at "
                    f"{int(np.argmax(is_image))}..{len(is_image) - int(np.argmax(is_image[::-1]))}")
  return input_ids[:max_length], labels[:max_length], owner[:max_length]


def _context(tokenizer: Tokenizer, ids: Sequence[int], at: int) -> str:
  return tokenizer.decode(ids[max(0, at - 8):at + 8], skip_special_tokens=False)
