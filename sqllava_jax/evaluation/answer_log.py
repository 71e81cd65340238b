"""Answers appended as they come, so that a killed evaluation continues where it stopped.

Each process appends its answer records to its own log, `answers.{i}-of-{n}.jsonl` in the
output folder, one JSON line per record with the question's position in the question file
(`index`), one write and flush per batch. A question whose image could not be read is logged
as `{"index": i, "skipped": {...}}`, so a rerun does not try it again either. On a rerun the
logs tell which questions are done; only the others are asked. A line cut short by a kill is
dropped (the file is truncated after its last complete line) and its question asked again.

`answers.run.json` beside the logs holds the run's fingerprint (decoding settings, process
count, a hash of the questions): a rerun with other settings or another question file into
the same folder is refused instead of mixing two runs' answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

RUN_FILE = "answers.run.json"


def log_path(out_dir: str, index: int, count: int) -> str:
  return os.path.join(out_dir, f"answers.{index}-of-{count}.jsonl")


def questions_digest(questions: Sequence[Mapping[str, Any]]) -> str:
  """sha256 over each question's id, text and image name (inline image bytes excluded:
  the id and text already tell the questions apart, and hashing them is slow)."""
  h = hashlib.sha256()
  for q in questions:
    key = [str(q.get("question_id")), q.get("text"), q.get("image")]
    h.update(json.dumps(key, ensure_ascii=False).encode("utf-8") + b"\n")
  return h.hexdigest()


def claim(out_dir: str, fingerprint: Mapping[str, Any], *, write: bool) -> None:
  """Records `fingerprint` as the run of `out_dir` (when `write` and none is recorded yet),
  or raises `ValueError` when the folder already belongs to a run with another one."""
  path = os.path.join(out_dir, RUN_FILE)
  fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    if recorded != fingerprint:
      changed = sorted(k for k in set(recorded) | set(fingerprint)
                       if recorded.get(k) != fingerprint.get(k))
      raise ValueError(f"{out_dir} holds answers of another run ({', '.join(changed)} "
                       f"differ, see {path}); choose another output folder or delete it")
    return
  if write:
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _complete_lines(path: str) -> list[dict]:
  """The records of a log, after cutting a trailing partial line off the file."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    with open(path, "r+b") as f:
      f.truncate(end)
  records = []
  for n, line in enumerate(data[:end].splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n} is not JSON ({e}); the log is damaged: delete "
                         "the output folder to start this evaluation over") from None
  return records


def read_logs(out_dir: str, count: int) -> list[dict]:
  """Every complete record of the `count` process logs in `out_dir` (missing logs: none)."""
  records = []
  for i in range(count):
    path = log_path(out_dir, i, count)
    if os.path.isfile(path):
      records += _complete_lines(path)
  return records


def done_indices(records: Iterable[Mapping[str, Any]]) -> set[int]:
  return {int(r["index"]) for r in records}


class AnswerLog:
  """This process's log, opened for appending; `append` writes one batch and flushes it."""

  def __init__(self, out_dir: str, index: int, count: int):
    os.makedirs(out_dir, exist_ok=True)
    self.path = log_path(out_dir, index, count)
    if os.path.isfile(self.path):
      _complete_lines(self.path)  # cut a partial last line before appending after it
    self._file = open(self.path, "ab")

  def append(self, records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
      return
    data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
    self._file.write(data)
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "AnswerLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
