"""Answer and annotation records: loading them and matching answers to annotations.

Answers follow the LLaVA eval layout: one JSON object per line with `question_id`, `prompt`,
`text` (the model's answer), `answer_id` and `model_id`. Only `question_id` and `text` are
required everywhere; some benchmarks also read `prompt` to tell apart questions that share a
`question_id` (TextVQA, MME in the LLaVA layout).

Question ids are compared as strings, so `1` in an answers file matches `"1"` in an
annotation file (GQA ids are strings, VQAv2 ids integers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

Record = Mapping[str, Any]
PathLike = str | os.PathLike


def load_json_or_jsonl(path: PathLike) -> Any:
  """Reads `path`: a `.jsonl` file gives a list of records, any other file one JSON value."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def as_answer_records(predictions: Iterable[Record] | PathLike, task: str) -> list[Record]:
  """Answers as a list of dicts, each with at least `question_id` and `text`.

  `predictions` is a list of answer records or the path of an answers JSONL file. Raises
  `ValueError` when there is nothing to score or a record lacks a required field.
  """
  if isinstance(predictions, (str, os.PathLike)):
    records: list[Record] = list(load_json_or_jsonl(predictions))
  else:
    records = list(predictions)
  if not records:
    raise ValueError(f"{task}: no predictions to score; the answers file is empty")
  for i, record in enumerate(records):
    if not isinstance(record, Mapping) or "question_id" not in record or "text" not in record:
      raise ValueError(
          f"{task}: answer record {i} needs 'question_id' and 'text' (the LLaVA answers "
          f"layout: question_id, prompt, text, answer_id, model_id); got {record!r}")
  return records


def index_unique(items: Iterable[Any], key: Callable[[Any], Hashable], what: str) -> dict:
  """`{key(item): item}`, raising `ValueError` naming the first key seen twice."""
  index = {}
  for item in items:
    k = key(item)
    if k in index:
      raise ValueError(f"{what}: {k!r} appears twice; each question must be scored once")
    index[k] = item
  return index


def records_by_question_id(annotations: Mapping[Any, Record] | Iterable[Record],
                           what: str) -> dict[str, Record]:
  """Annotations keyed by question id as a string.

  Accepts a mapping `{question_id: record}` (GQA questions, ScienceQA problems) or a list
  of records that each carry `question_id`.
  """
  if isinstance(annotations, Mapping):
    return {str(k): v for k, v in annotations.items()}
  records = list(annotations)
  for i, record in enumerate(records):
    if not isinstance(record, Mapping) or "question_id" not in record:
      raise ValueError(f"{what}: annotation record {i} has no 'question_id': {record!r}")
  return index_unique(records, lambda r: str(r["question_id"]), f"{what} annotations")


def unknown_question(task: str, question_id: Any, detail: str = "") -> ValueError:
  """The error for an answer whose question the annotations do not know."""
  extra = f" ({detail})" if detail else ""
  return ValueError(
      f"{task}: question_id {question_id!r}{extra} is not in the annotations; check that the "
      f"answers and the annotation file come from the same benchmark split")


def lookup(index: Mapping[str, Record], question_id: Any, task: str) -> Record:
  """The annotation of `question_id`, or a `ValueError` naming the id."""
  try:
    return index[str(question_id)]
  except KeyError:
    raise unknown_question(task, question_id) from None


def question_id_resolver(index: Mapping[str, Record], task: str) -> Callable[[Record], Record]:
  """For `match_answers`: finds an answer's annotation by its `question_id`."""
  return lambda prediction: lookup(index, prediction["question_id"], task)


def match_answers(predictions: Iterable[Record], resolve: Callable[[Record], Record],
                  task: str) -> list[tuple[Record, Record]]:
  """Pairs each answer with its annotation (`resolve` raises for an unknown question).

  Raises `ValueError` when two answers resolve to the same question: a merged answers file
  with overlapping shards would otherwise count that question twice.
  """
  first_answer: dict[int, Record] = {}
  pairs = []
  for prediction in predictions:
    annotation = resolve(prediction)
    if id(annotation) in first_answer:
      qid, earlier = prediction["question_id"], first_answer[id(annotation)]
      what = (f"question_id {qid!r} is answered twice" if qid == earlier else
              f"question_id {qid!r} answers the same question as question_id {earlier!r}")
      raise ValueError(f"{task}: {what}; each question must be answered once")
    first_answer[id(annotation)] = prediction["question_id"]
    pairs.append((prediction, annotation))
  return pairs


def mean(values: Iterable[float]) -> float:
  values = list(values)
  assert values, "mean of nothing"
  return float(sum(values) / len(values))
