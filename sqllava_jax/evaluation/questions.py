"""Question files for `eval`: the LLaVA eval layout, LLaVA's ScienceQA file and the synthetic
set's files read as it; the screening of records that cannot be asked; the skip report.

LLaVA eval layout: JSONL, one question per line, `{"question_id", "image" (relative path,
optional), "text", ...}`; other fields (gold answers, categories) ride along for scoring.
The synthetic set's `vqa_eval.json` (`id`, `image`, `question`, `answer`, `scene`) and its
stage-2 files (`id`, `image`, `scene`, `conversations`; one item per image, the opening
request as the question) read as the same layout, so `--data` can point at them directly.
LLaVA's ScienceQA files (`llava_test_CQM-A.json`, `-I.json`: `id`, `image`, `conversations`)
share the training layout; read with `scienceqa=True`, each asks its problem (the first human
turn), as llava/eval/model_vqa_science.py does.

A record that cannot be read as a question (not an object, a JSONL line that is not JSON, no
id or text) still takes its place in the list, marked `malformed`, so that positions in the
file stay the positions `eval` logs; `screen` then turns it, and every repeat of an earlier
question, into a counted skip (`data.errors` reasons `malformed_question`,
`duplicate_question`), or with `strict` into the `BadRecord` that names it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

from sqllava_jax.data.errors import BadRecord, SkipLog
from sqllava_jax.evaluation.answers import load_json_or_jsonl
from sqllava_jax.evaluation.self_questioning import DESCRIBE

MALFORMED = "malformed"  # the key of a record that could not be read, holding why
REPORT_FIRST = 5  # skipped question ids a report lists


def _record_id(record: Any, index: int) -> Any:
  if isinstance(record, Mapping):
    for key in ("question_id", "id"):
      if isinstance(record.get(key), (str, int)) and not isinstance(record.get(key), bool):
        return record[key]
  return f"#{index}"


def malformed(record: Any, index: int, why: str) -> dict:
  """The stand-in for a record that cannot be read as a question."""
  return {"question_id": _record_id(record, index), "text": "", MALFORMED: why}


def _scienceqa_question(record: Mapping[str, Any], index: int) -> dict:
  """The problem's first human turn, `<image>` taken out; as the recorded prompt the same
  with `<image>\\n` in front where the problem has an image (the prompt the official scorer
  reads)."""
  try:
    text = record["conversations"][0]["value"].replace("<image>", "").strip()
  except (KeyError, IndexError, TypeError, AttributeError):
    return malformed(record, index, "no conversations[0].value (LLaVA's ScienceQA layout)")
  q = {"question_id": record["id"], "text": text, "prompt": text}
  if record.get("image"):
    q.update(image=record["image"], prompt=f"<image>\n{text}")
  return q


def _from_record(record: Any, index: int, scienceqa: bool) -> dict:
  if not isinstance(record, Mapping):
    return malformed(record, index, f"expected a JSON object, got {type(record).__name__}")
  if "question_id" in record and "text" in record:
    return dict(record)
  if "question" in record and "id" in record:  # synthetic vqa_{split}.json
    out = {k: v for k, v in record.items() if k not in ("id", "question", "conversations")}
    return {"question_id": record["id"], "text": record["question"], **out}
  if "conversations" in record and "id" in record:
    if scienceqa:
      return _scienceqa_question(record, index)
    # a LLaVA training record: its image, described
    out = {k: v for k, v in record.items() if k not in ("id", "conversations")}
    return {"question_id": record["id"], "text": DESCRIBE, **out}
  return malformed(record, index, "neither 'question_id' and 'text' (LLaVA eval layout) nor a "
                   f"synthetic-set or ScienceQA layout: {json.dumps(record)[:200]}")


def _read_records(path: str) -> list:
  """The file's records; in JSONL a line that is not JSON becomes a malformed stand-in."""
  if not path.endswith(".jsonl"):
    try:
      return load_json_or_jsonl(path)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON ({e}); a question file is a JSON list or JSONL "
                       "(one question per line)") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  records = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        records.append(malformed(None, len(records), f"line {n} is not JSON ({e})"))
  return records


def load_questions(path: str | os.PathLike, *, scienceqa: bool = False) -> list[dict]:
  """Questions as dicts with at least `question_id` and `text` (`image` when they have one),
  in file order; unreadable records marked `malformed` (see `screen`). Ids may repeat with
  other questions (MME asks two questions per image under one id, TextVQA's ids are images).
  `scienceqa`: records in the training layout are LLaVA's ScienceQA problems."""
  path = os.fspath(path)
  data = _read_records(path)
  if isinstance(data, Mapping):
    raise ValueError(f"{path}: expected a JSONL file of questions or a JSON list, got an object")
  if not data:
    raise ValueError(f"{path} holds no questions")
  return [_from_record(r, i, scienceqa) for i, r in enumerate(data)]


def _problem(q: Mapping[str, Any]) -> Optional[str]:
  """Why `q` cannot be asked, or None."""
  if MALFORMED in q:
    return q[MALFORMED]
  qid, text, image = q.get("question_id"), q.get("text"), q.get("image")
  if not isinstance(qid, (str, int)) or isinstance(qid, bool):
    return f"'question_id' must be a string or integer, got {qid!r}"
  if not isinstance(text, str) or not text.strip():
    return f"'text' must be a non-empty string, got {text!r}"
  if image is not None and not isinstance(image, str):
    return f"'image' must be a path string, got {image!r}"
  return None


TEXT_ONLY = "text_only"  # the skip reason of an imageless question where one is needed


def screen(questions: Sequence[Mapping[str, Any]], *, file: Optional[str] = None,
           strict: bool = False, needs_image: bool = False) -> list[dict]:
  """The questions that cannot be asked, as skip entries `{"index", "question_id", "reason",
  "message"}` in file order: malformed records and repeats of an earlier question (same id,
  text and image; questions that only share an id are distinct). `strict`: raises the first
  one's `BadRecord` instead. `needs_image` (self-questioning): questions without an image are
  skipped too, as `text_only`, strict or not (nothing wrong with them, nothing to ask)."""
  skipped, seen = [], set()
  for index, q in enumerate(questions):
    problem = _problem(q)
    error = None
    if problem is not None:
      error = BadRecord("malformed_question", problem)
    else:
      key = json.dumps([str(q["question_id"]), q["text"], q.get("image")], ensure_ascii=False)
      if key in seen:
        error = BadRecord("duplicate_question", f"question {q['question_id']!r} is asked again")
      seen.add(key)
    if error is None:
      if needs_image and not q.get("image"):
        skipped.append({"index": index, "question_id": q["question_id"], "reason": TEXT_ONLY,
                        "message": f"question {q['question_id']!r} has no image to question"})
      continue
    error = error.with_context(record_id=str(q.get("question_id")), index=index, file=file)
    if strict:
      raise error
    skipped.append(skip_entry(index, q.get("question_id"), error))
  return skipped


def skip_entry(index: int, question_id: Any, error: BadRecord) -> dict:
  return {"index": index, "question_id": question_id, "reason": error.reason,
          "message": str(error)}


def skip_report(skipped: Sequence[Mapping[str, Any]], asked: int) -> dict:
  """The result's account of skipped questions: how many, per reason, and the first ids (in
  file order); the first few are also logged, as the training data's `SkipLog` does."""
  skipped = sorted(skipped, key=lambda s: s.get("index", 0))
  log = SkipLog(log_first=REPORT_FIRST)
  for s in skipped:
    log.add(s["reason"], s["message"])
  return {"skipped": log.total, "skipped_by_reason": dict(log.counts.most_common()),
          "skipped_first": [s["question_id"] for s in skipped[:REPORT_FIRST]],
          "skip_summary": log.summary(asked)}
