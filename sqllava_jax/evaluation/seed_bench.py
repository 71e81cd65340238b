"""SEED-Bench (image part): accuracy per evaluation dimension, and the leaderboard's file.

Questions come from LLaVA's `llava-seed-bench.jsonl` (the options and the "answer with the
letter" line already in each `text`); the image part is the questions whose image lies under
`SEED-Bench-image/` (configs/eval/seed_bench.yaml). Ground truth is the official
`SEED-Bench.json`: `{"question_type": {name: id}, "questions": [{"question_id", "answer":
"A".."D", "data_type": "image" | "video", "question_type_id", ...}]}`.

Scored as LLaVA's scripts/convert_seed_for_submission.py does: an answer is right only when
its text equals the gold letter exactly (no stripping or case folding beyond the decoder's
own strip); a question of the scored data type without an answer counts wrong; accuracy per
dimension (question type) and over all. The upload file holds one `{"question_id",
"prediction"}` line per answered question, in the annotation file's order.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

from sqllava_jax.evaluation.answers import as_answer_records, load_json_or_jsonl
from sqllava_jax.evaluation.outputs import write_jsonl


def _annotation(annotations: Any) -> Mapping:
  if isinstance(annotations, (str, os.PathLike)):
    annotations = load_json_or_jsonl(annotations)
  if not isinstance(annotations, Mapping) or "questions" not in annotations:
    raise ValueError("seed_bench: annotations must be SEED-Bench.json's content, an object "
                     "with 'questions' and 'question_type'")
  return annotations


def seed_scores(predictions: Any, annotations: Any, *, data_type: str = "image") -> dict:
  """predictions: answer records (`question_id`, `text`) or an answers JSONL path.
  Returns `accuracy`, `per_dimension` ({dimension name: accuracy}), `num_questions` (of
  `data_type` in the annotations) and `num_answered`."""
  data = _annotation(annotations)
  names = {int(i): name for name, i in data.get("question_type", {}).items()}
  answers = {str(p["question_id"]): str(p["text"])
             for p in as_answer_records(predictions, "seed_bench")}
  known = {str(q["question_id"]) for q in data["questions"]}
  unknown = sorted(set(answers) - known)
  if unknown:
    raise ValueError(f"seed_bench: question_id {unknown[0]!r} is not in SEED-Bench.json; use "
                     "the annotation file of the same release")
  total: collections.Counter[int] = collections.Counter()
  correct: collections.Counter[int] = collections.Counter()
  answered = 0
  for q in data["questions"]:
    if q.get("data_type") != data_type:
      continue
    kind = int(q["question_type_id"])
    total[kind] += 1
    text = answers.get(str(q["question_id"]))
    answered += text is not None
    correct[kind] += text == q["answer"]
  if not total:
    raise ValueError(f"seed_bench: SEED-Bench.json has no {data_type!r} questions")
  return {"accuracy": sum(correct.values()) / sum(total.values()),
          "per_dimension": {names.get(k, str(k)): correct[k] / total[k] for k in sorted(total)},
          "num_questions": sum(total.values()), "num_answered": answered}


def write_submission(path: str, annotations: Any, predictions: Any) -> str:
  """One JSON line `{"question_id", "prediction"}` per answered question."""
  data = _annotation(annotations)
  answers = {str(p["question_id"]): p["text"]
             for p in as_answer_records(predictions, "seed_bench")}
  return write_jsonl(path, [{"question_id": q["question_id"],
                             "prediction": answers[str(q["question_id"])]}
                            for q in data["questions"] if str(q["question_id"]) in answers])
