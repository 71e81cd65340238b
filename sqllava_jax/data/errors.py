"""Bad input as a named, counted event: `BadRecord` carries a reason, the record and the fix.

Every way a record can be unusable has one reason name below. The pipeline skips such a
record and counts it per reason (`SkipLog`), or, with `data.strict=true`, raises the same
`BadRecord` at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Mapping, Optional

logger = logging.getLogger("sqllava_jax.data")

# reason -> what the user can do about it.
REASONS: Mapping[str, str] = {
    "malformed_record": "each record needs 'conversations': a list of {'from', 'value'} "
                        "strings with 'from' in human/gpt (and vuser for v1_sq)",
    "roles_out_of_order": "turns must alternate human, gpt, human, gpt, ... starting with "
                          "human and ending with gpt",
    "empty_turn": "remove the empty turn (and its answer) from the record",
    "template_mismatch": "the 'plain' template takes image records with exactly one human "
                         "turn holding <image> and one gpt caption; 'vuser' turns need v1_sq",
    "image_token_without_image": "add the record's 'image' file or remove <image> from its "
                                 "text",
    "image_without_image_token": "put <image> into the first human turn or drop 'image'",
    "too_many_image_tokens": "keep exactly one <image> (one image per record)",
    "unsafe_image_path": "image paths must be relative and stay inside data.image_folder",
    "missing_image": "check data.image_folder and the record's 'image' path",
    "empty_image_file": "the image file has zero bytes; re-download it",
    "corrupt_image": "the file is not a readable image (truncated or damaged); re-download "
                     "or remove it",
    "image_too_large": "shrink the image or raise data.max_image_pixels",
    "tokenization_mismatch": "the per-turn tokens differ from the whole prompt's tokens; "
                             "check for stray whitespace or special-token text in the turns",
    "image_truncated": "the image placeholders do not fit in data.max_length; raise it or "
                       "shorten the text before <image>",
    "nothing_to_train": "no answer token survives truncation; raise data.max_length or "
                        "shorten the record",
    # Question files (`eval`, `eval-suite`, `ask`).
    "malformed_question": "each question needs a string or integer 'question_id', a non-empty "
                          "'text' and, when it has one, a non-empty 'image' path (LLaVA's eval "
                          "layout)",
    "duplicate_question": "the same question (id, text and image) appears earlier in the file; "
                          "remove the repeat",
}


class BadRecord(ValueError):
  """A record that cannot become a training example, with its reason and location."""

  def __init__(self, reason: str, detail: str, *, record_id: Optional[str] = None,
               index: Optional[int] = None, file: Optional[str] = None,
               image_file: Optional[str] = None):
    assert reason in REASONS, reason
    self.reason = reason
    self.detail = detail
    self.record_id = record_id
    self.index = index
    self.file = file  # the data file holding the record
    self.image_file = image_file
    super().__init__(self._message())

  def with_context(self, **context) -> "BadRecord":
    """The same error with record_id, index, file, image_file filled in where unknown."""
    fields = {k: getattr(self, k) for k in ("record_id", "index", "file", "image_file")}
    for key, value in context.items():
      if fields[key] is None:
        fields[key] = value
    return BadRecord(self.reason, self.detail, **fields)

  def _message(self) -> str:
    where = []
    if self.record_id is not None:
      where.append(f"record {self.record_id!r}")
    if self.index is not None:
      where.append(f"index {self.index}")
    if self.file:
      where.append(f"in {self.file}")
    if self.image_file:
      where.append(f"image file {self.image_file}")
    head = f"[{self.reason}] " + (", ".join(where) + ": " if where else "")
    return f"{head}{self.detail}. Fix: {REASONS[self.reason]}"

  def __reduce__(self):
    # Keeps reason and context when the error crosses a process boundary (Grain workers).
    return (_rebuild_bad_record, (self.reason, self.detail, self.record_id, self.index,
                                  self.file, self.image_file))


def _rebuild_bad_record(reason, detail, record_id, index, file, image_file) -> BadRecord:
  return BadRecord(reason, detail, record_id=record_id, index=index, file=file,
                   image_file=image_file)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a record the pipeline dropped; carried to the batcher to be counted."""
  reason: str
  message: str


class SkipLog:
  """Counts skipped records per reason and logs the first `log_first` of them."""

  def __init__(self, log_first: int = 5):
    self.log_first = log_first
    self.counts: collections.Counter = collections.Counter()
    self.logged = 0

  def add(self, reason: str, message: str) -> None:
    self.counts[reason] += 1
    if self.logged < self.log_first:
      self.logged += 1
      more = " (further skips are only counted)" if self.logged == self.log_first else ""
      logger.warning("skipping record: %s%s", message, more)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self, examples: Optional[int] = None) -> str:
    """One line: 'skipped 3 records (2.4% of 125 read): missing_image 2, corrupt_image 1'."""
    if not self.total:
      return "skipped 0 records"
    parts = ", ".join(f"{r} {n}" for r, n in self.counts.most_common())
    if examples is None:
      return f"skipped {self.total} records: {parts}"
    read = examples + self.total
    share = 100.0 * self.total / read
    return f"skipped {self.total} records ({share:.1f}% of {read} read): {parts}"

  def state(self) -> dict:
    return {"counts": dict(self.counts), "logged": self.logged}

  def restore(self, state: Mapping) -> None:
    self.counts = collections.Counter({str(k): int(v) for k, v in state["counts"].items()})
    self.logged = int(state["logged"])
