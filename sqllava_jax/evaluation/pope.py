"""POPE object-hallucination probing, scored per split as llava/eval/eval_pope.py does.

Every POPE question asks whether an object is in the image; the label is "yes" or "no". The
free-text answer is read as "no" when its first sentence has the word "No", "no" or "not",
else as "yes". Each split (random, popular, adversarial) reports accuracy, precision, recall,
F1 (with "yes" as the positive class) and the fraction of "yes" answers; the headline is the
mean F1 over the splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqllava_jax.evaluation.answers import (
  PathLike,
  Record,
  as_answer_records,
  match_answers,
  mean,
  question_id_resolver,
  records_by_question_id,
)

POPE_SPLITS = ("random", "popular", "adversarial")
_NO_WORDS = frozenset({"No", "no", "not"})


def parse_yes_no_pope(text: str) -> bool:
  """True when the answer reads as "yes", following llava/eval/eval_pope.py exactly.

  Keeps the text before the first period, drops commas, splits on single spaces; the answer
  is "no" when a piece is "No", "no" or "not" (so "NO" or "No!" read as "yes", as there).
  """
  first_sentence = text.split(".")[0]
  words = first_sentence.replace(",", "").split(" ")
  return not any(word in _NO_WORDS for word in words)


def _ratio(numerator: float, denominator: float) -> float:
  # The reference divides by zero here (a split with no "yes" answers); report 0 instead,
  # as scikit-learn's zero_division=0 does.
  return numerator / denominator if denominator else 0.0


def binary_scores(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict:
  """Accuracy, precision, recall, F1 ("yes" positive), yes-ratio and the four counts."""
  if len(predicted_yes) != len(label_yes) or not label_yes:
    raise ValueError(f"binary_scores needs as many predictions as labels, at least one; got "
                     f"{len(predicted_yes)} and {len(label_yes)}")
  pairs = list(zip(predicted_yes, label_yes))
  tp = sum(p and y for p, y in pairs)
  fp = sum(p and not y for p, y in pairs)
  tn = sum(not p and not y for p, y in pairs)
  fn = sum(not p and y for p, y in pairs)
  precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
  return {
      "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
      "f1": _ratio(2 * precision * recall, precision + recall),
      "yes_ratio": sum(predicted_yes) / len(pairs),
      "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_questions": len(pairs),
  }


def _label_is_yes(annotation: Record, question_id: Any) -> bool:
  label = str(annotation.get("label", "")).strip().lower()
  if label not in ("yes", "no"):
    raise ValueError(f"pope: question_id {question_id!r} needs a 'label' of 'yes' or 'no'; got "
                     f"{annotation.get('label')!r}")
  return label == "yes"


def _split_of(annotation: Record, question_id: Any) -> str:
  split = annotation.get("category")
  if split not in POPE_SPLITS:
    raise ValueError(f"pope: question_id {question_id!r} has category {split!r}; choose one of "
                     f"{', '.join(POPE_SPLITS)}")
  return split


def pope_scores(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """POPE scores per split and their mean.

  predictions: answer records (`question_id`, `text`) or an answers JSONL path.
  annotations: `{question_id: {"label": "yes"|"no", "category": split}}` or a list of records
    with `question_id`, `label` and `category` (see `pope_annotations` to build them from
    LLaVA's question file and the POPE label files).
  Returns `per_split` (`{split: binary_scores}` for the splits answered), `mean_f1` and
  `mean_accuracy` over those splits, and `num_questions`.
  """
  task = "pope"
  records = as_answer_records(predictions, task)
  index = records_by_question_id(annotations, task)
  by_split: dict[str, tuple[list, list]] = {split: ([], []) for split in POPE_SPLITS}
  resolve = question_id_resolver(index, task)
  for prediction, annotation in match_answers(records, resolve, task):
    qid = prediction["question_id"]
    predicted, labels = by_split[_split_of(annotation, qid)]
    predicted.append(parse_yes_no_pope(prediction["text"]))
    labels.append(_label_is_yes(annotation, qid))
  per_split = {s: binary_scores(p, y) for s, (p, y) in by_split.items() if y}
  return {
      "per_split": per_split,
      "mean_f1": mean(r["f1"] for r in per_split.values()),
      "mean_accuracy": mean(r["accuracy"] for r in per_split.values()),
      "num_questions": len(records),
  }


def _read_json_lines(path: PathLike) -> list[Record]:
  # POPE's label files are JSON lines even where they are named .json.
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _label_files(directory: PathLike) -> dict[str, list[Record]]:
  """`{split: label records}` from a folder of `coco_pope_{split}.json` files."""
  labels = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    split = stem.rsplit("_", 1)[-1]
    if ext in (".json", ".jsonl") and split in POPE_SPLITS:
      labels[split] = _read_json_lines(os.path.join(directory, name))
  if not labels:
    raise ValueError(f"pope: no label files named like coco_pope_random.json in {directory}")
  return labels


def pope_annotations(questions: Iterable[Record] | PathLike,
                     labels: Mapping[str, Iterable[Record]] | PathLike) -> dict[str, dict]:
  """POPE annotations from LLaVA's layout: a question file plus one label file per split.

  questions: records with `question_id`, `image` and `category` (llava_pope_test.jsonl) or
    its path.
  labels: `{split: label records}` or the folder of `coco_pope_{split}.json` files (records
    with `image` and `label`).
  As llava/eval/eval_pope.py does, the i-th question of a split takes the i-th label of that
  split's file; the images of each pair must agree. Returns `{question_id: {"label",
  "category"}}` for `pope_scores`.
  """
  if isinstance(questions, (str, os.PathLike)):
    questions = _read_json_lines(questions)
  if isinstance(labels, (str, os.PathLike)):
    labels = _label_files(labels)
  questions = list(questions)
  annotations = {}
  for split, split_labels in labels.items():
    split_labels = list(split_labels)
    split_questions = [q for q in questions if q.get("category") == split]
    if len(split_questions) != len(split_labels):
      raise ValueError(f"pope: split {split!r} has {len(split_questions)} questions but "
                       f"{len(split_labels)} labels; use the label files of the same POPE set")
    for question, label in zip(split_questions, split_labels):
      if "image" in question and "image" in label and question["image"] != label["image"]:
        raise ValueError(f"pope: question_id {question['question_id']!r} shows "
                         f"{question['image']!r} but its label is for {label['image']!r}")
      annotations[str(question["question_id"])] = {"label": label["label"], "category": split}
  return annotations
