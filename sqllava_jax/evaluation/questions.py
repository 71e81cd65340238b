"""Question files for `eval`: the LLaVA eval layout, and the synthetic set's files read as it.

LLaVA eval layout: JSONL, one question per line, `{"question_id", "image" (relative path,
optional), "text", ...}`; other fields (gold answers, categories) ride along for scoring.
The synthetic set's `vqa_eval.json` (`id`, `image`, `question`, `answer`, `scene`) and its
stage-2 files (`id`, `image`, `scene`, `conversations`; one item per image, the opening
request as the question) read as the same layout, so `--data` can point at them directly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from sqllava_jax.evaluation.records import load_json_or_jsonl
from sqllava_jax.evaluation.self_questioning import DESCRIBE


def _from_record(record: Mapping[str, Any], index: int) -> dict:
  if "question_id" in record and "text" in record:
    return dict(record)
  if "question" in record and "id" in record:  # synthetic vqa_{split}.json
    out = {k: v for k, v in record.items() if k not in ("id", "question", "conversations")}
    return {"question_id": record["id"], "text": record["question"], **out}
  if "conversations" in record and "id" in record:  # a LLaVA training record: images only
    out = {k: v for k, v in record.items() if k not in ("id", "conversations")}
    return {"question_id": record["id"], "text": DESCRIBE, **out}
  raise ValueError(f"question {index} has neither 'question_id' and 'text' (LLaVA eval layout) "
                   f"nor a synthetic-set layout: {json.dumps(record)[:200]}")


def load_questions(path: str | os.PathLike) -> list[dict]:
  """Questions as dicts with at least `question_id` and `text` (`image` when they have one).
  Ids may repeat (MME asks two questions per image under one id)."""
  data = load_json_or_jsonl(path)
  if isinstance(data, Mapping):
    raise ValueError(f"{path}: expected a JSONL file of questions or a JSON list, got an object")
  if not data:
    raise ValueError(f"{path} holds no questions")
  return [_from_record(r, i) for i, r in enumerate(data)]
