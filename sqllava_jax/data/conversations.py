"""LLaVA-format records: validation, `<image>` placement and the self-questioning relabel.

A record is `{"id", "image" (optional, relative path), "conversations": [{"from", "value"}]}`
with `from` in human / gpt (and vuser, an already relabelled question, for v1_sq), and
optionally `"system"`: the record's own system prompt, replacing the template's (as in
FastChat's ShareGPT records; a chat template only). Anything else in the record is ignored.
`parse_record` turns it into turns for `templates`, or raises `BadRecord` with the reason it
cannot be trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.templates import ASSISTANT, USER, VUSER
from sqllava_jax.data.tokenizer import IMAGE_TOKEN

ROLE_OF_SPEAKER = {"human": USER, "gpt": ASSISTANT, "vuser": VUSER}


@dataclasses.dataclass(frozen=True)
class Record:
  """A validated record: `turns` are (role, text) with `<image>` moved to the front of its
  turn as `<image>\\n...`; `image` is the relative image path or None (text only)."""
  index: int
  id: str
  image: Optional[str]
  turns: tuple[tuple[str, str], ...]
  system: Optional[str] = None  # the record's own system prompt; None: the template's


def record_id(raw: Any, index: int) -> str:
  """The record's id for messages, or its index when it has none."""
  if isinstance(raw, Mapping) and isinstance(raw.get("id"), (str, int)):
    return str(raw["id"])
  return f"#{index}"


def parse_record(raw: Any, *, index: int) -> Record:
  """Checks one raw JSON record and normalises its turns; raises `BadRecord`."""
  if not isinstance(raw, Mapping):
    raise BadRecord("malformed_record", f"expected a JSON object, got {type(raw).__name__}")
  rid = raw.get("id", index)
  if not isinstance(rid, (str, int)) or isinstance(rid, bool):
    raise BadRecord("malformed_record", f"'id' must be a string or integer, got {rid!r}")
  image = raw.get("image")
  if image is not None and (not isinstance(image, str) or not image):
    raise BadRecord("malformed_record", f"'image' must be a non-empty path string, got {image!r}")
  system = raw.get("system")
  if system is not None and not isinstance(system, str):
    raise BadRecord("malformed_record", f"'system' must be a string, got {type(system).__name__}")
  conversations = raw.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise BadRecord("malformed_record", "'conversations' must be a non-empty list, got "
                    f"{type(conversations).__name__}")
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, Mapping):
      raise BadRecord("malformed_record", f"turn {i} is {type(turn).__name__}, not an object")
    speaker, value = turn.get("from"), turn.get("value")
    if not isinstance(speaker, str) or not isinstance(value, str):
      raise BadRecord("malformed_record",
                      f"turn {i} needs string 'from' and 'value', got {speaker!r} / "
                      f"{type(value).__name__}")
    if speaker not in ROLE_OF_SPEAKER:
      raise BadRecord("malformed_record", f"turn {i} has unknown role {speaker!r}; use one of "
                      f"{', '.join(ROLE_OF_SPEAKER)}")
    turns.append((ROLE_OF_SPEAKER[speaker], value))
  return Record(index=index, id=str(rid), image=image, turns=_place_image(turns, image),
                system=system)


def _place_image(turns: list[tuple[str, str]], image: Optional[str]):
  counts = [text.count(IMAGE_TOKEN) for _, text in turns]
  total = sum(counts)
  if total > 1:
    raise BadRecord("too_many_image_tokens", f"{total} <image> tokens in the conversation")
  if total == 1 and image is None:
    raise BadRecord("image_token_without_image", "<image> appears but the record has no 'image'")
  if total == 0 and image is not None:
    raise BadRecord("image_without_image_token", f"image {image!r} but no <image> in the text")
  out = []
  for i, (role, text) in enumerate(turns):
    if counts[i]:
      if role != USER:
        raise BadRecord("malformed_record", f"<image> is in a {role!r} turn; it belongs to a "
                        "human turn")
      # As the reference: the image goes first, on its own line, rest of the turn stripped.
      rest = text.replace(IMAGE_TOKEN, "").strip()
      text = f"{IMAGE_TOKEN}\n{rest}" if rest else IMAGE_TOKEN
    elif not text.strip():
      raise BadRecord("empty_turn", f"turn {i} ({role}) is empty")
    out.append((role, text))
  return tuple(out)


def relabel_self_questions(record: Record, *, sq_r: float,
                           seed: int) -> tuple[tuple[str, str], ...]:
  """Turns with some human questions recast as VUSER turns (self-questioning).

  Each human turn after the first of an image record, except the one holding the image,
  becomes VUSER with probability `sq_r`. The draws come from a generator seeded by
  (seed, record index), so the relabelling of a record never depends on the order records
  are read in, the worker that reads them or a resume. Text-only records are left alone,
  as in the reference (`preprocess_v1_sq2` relabels only when the record has an image).
  """
  if sq_r <= 0.0 or record.image is None:
    return record.turns
  rng = np.random.default_rng([seed, record.index])
  out = []
  for i, (role, text) in enumerate(record.turns):
    if role == USER and i > 0 and IMAGE_TOKEN not in text and rng.random() < sq_r:
      role = VUSER
    out.append((role, text))
  return tuple(out)
