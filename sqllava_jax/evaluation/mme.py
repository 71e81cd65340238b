"""MME perception and cognition scores, as the MME eval tool computes them.

MME asks two yes/no questions about each image. Per subtask, accuracy is over questions and
accuracy+ over images (both questions right); the subtask score is (accuracy + accuracy+) *
100, at most 200, and the perception and cognition scores sum their subtasks (at most 2000
and 800). Answers are read as the tool's eval_tool/calculation.py reads them, and matched to
questions as LLaVA's playground/data/eval/MME/convert_answer_to_mme.py matches them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqllava_jax.evaluation.answers import (
  PathLike,
  Record,
  as_answer_records,
  index_unique,
  match_answers,
  mean,
  unknown_question,
)

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."
_YES_NO_HINT = "Please answer yes or no."


def parse_yes_no_mme(text: str) -> str:
  """"yes", "no" or "other", as calculation.py reads an answer.

  Lowercased, an answer that is exactly "yes" or "no" is that; otherwise its first four
  characters decide: "yes" in them means yes, else "no" in them means no ("not sure" too),
  else other. Surrounding whitespace is stripped first, as LLaVA strips its outputs.
  """
  text = text.strip().lower()
  if text in ("yes", "no"):
    return text
  head = text[:4]
  if "yes" in head:
    return "yes"
  if "no" in head:
    return "no"
  return "other"


def _question_key(question: str) -> str:
  # As convert_answer_to_mme.py does: drop LLaVA's short-answer hint and make sure the
  # yes/no hint is there; runs of spaces are collapsed (the MME files have some double ones,
  # which the converter retries for).
  question = question.replace("<image>", "").replace(_SHORT_ANSWER_HINT, "").strip()
  if _YES_NO_HINT not in question:
    question = f"{question} {_YES_NO_HINT}"
  return " ".join(question.split())


def _annotation_key(annotation: Record) -> tuple[str, str, str]:
  for field in ("category", "image", "question", "answer"):
    if field not in annotation:
      raise ValueError(f"mme: annotation needs category, image, question and answer; "
                       f"{field!r} is missing from {dict(annotation)!r}")
  image = os.path.splitext(os.path.basename(str(annotation["image"])))[0]
  return annotation["category"], image, _question_key(annotation["question"])


def _answer_key(prediction: Record) -> tuple[str, str, str]:
  """(subtask, image, question) of an answer whose question_id is "subtask/image.ext"."""
  qid = str(prediction["question_id"])
  if "/" not in qid or "prompt" not in prediction:
    raise ValueError(f"mme: answer {qid!r} needs a question_id 'subtask/image file' and the "
                     f"question in 'prompt', as LLaVA's llava_mme.jsonl answers have")
  image = os.path.splitext(qid.rsplit("/", 1)[-1])[0]
  return qid.split("/", 1)[0], image, _question_key(prediction["prompt"])


def _subtask_scores(results: Sequence[tuple[str, bool, str]], subtask: str) -> dict:
  """Scores of one subtask from (image, correct, parsed answer) triples."""
  by_image = defaultdict(list)
  for image, correct, _ in results:
    by_image[image].append(correct)
  for image, answers in by_image.items():
    if len(answers) != 2:
      raise ValueError(f"mme: image {subtask}/{image} has {len(answers)} answered questions; "
                       f"accuracy+ needs both questions of every image answered")
  accuracy = mean(correct for _, correct, _ in results)
  accuracy_plus = mean(all(answers) for answers in by_image.values())
  return {
      "accuracy": accuracy, "accuracy_plus": accuracy_plus,
      "score": 100 * (accuracy + accuracy_plus), "num_questions": len(results),
      "num_images": len(by_image), "other": sum(parsed == "other" for _, _, parsed in results),
  }


def mme_scores(predictions: Iterable[Record] | PathLike, annotations: Iterable[Record]) -> dict:
  """MME perception and cognition scores.

  predictions: answer records or an answers JSONL path in the LLaVA layout: `question_id` is
    "subtask/image file" (shared by the image's two questions) and `prompt` the question.
  annotations: records with `category` (subtask), `image` (file name or stem), `question`
    and `answer` ("Yes"/"No"), e.g. from `load_mme_annotations`.
  Returns `perception` and `cognition` (sums of the subtask scores answered), `per_subtask`
  (`accuracy`, `accuracy_plus`, `score`, counts, `other` = unparseable answers) and
  `missing_subtasks` (standard subtasks without answers).
  """
  task = "mme"
  records = as_answer_records(predictions, task)
  index = index_unique(annotations, _annotation_key, f"{task} annotations")

  def resolve(prediction):
    key = _answer_key(prediction)
    if key not in index:
      raise unknown_question(task, prediction["question_id"], f"question {key[2]!r}")
    return index[key]

  results = defaultdict(list)
  for prediction, annotation in match_answers(records, resolve, task):
    subtask, image, _ = _answer_key(prediction)
    if subtask not in MME_PERCEPTION + MME_COGNITION:
      raise ValueError(f"mme: unknown subtask {subtask!r}; the MME subtasks are "
                       f"{', '.join(MME_PERCEPTION + MME_COGNITION)}")
    label = str(annotation["answer"]).strip().lower()
    if label not in ("yes", "no"):
      raise ValueError(f"mme: the answer to {prediction['question_id']!r} must be Yes or No; "
                       f"got {annotation['answer']!r}")
    parsed = parse_yes_no_mme(prediction["text"])
    results[subtask].append((image, parsed == label, parsed))
  per_subtask = {name: _subtask_scores(results[name], name)
                 for name in MME_PERCEPTION + MME_COGNITION if name in results}
  return {
      "perception": sum(per_subtask[n]["score"] for n in MME_PERCEPTION if n in per_subtask),
      "cognition": sum(per_subtask[n]["score"] for n in MME_COGNITION if n in per_subtask),
      "per_subtask": per_subtask,
      "missing_subtasks": [n for n in MME_PERCEPTION + MME_COGNITION if n not in per_subtask],
  }


def _qa_folder(subtask_dir: str) -> str:
  # Some subtasks keep images/ and questions_answers_YN/ folders, the others keep each image
  # beside its .txt file (the layout convert_answer_to_mme.py reads).
  if os.path.isdir(os.path.join(subtask_dir, "images")):
    return os.path.join(subtask_dir, "questions_answers_YN")
  return subtask_dir


def load_mme_annotations(root: PathLike) -> list[dict[str, Any]]:
  """MME annotations from the MME_Benchmark_release_version folder.

  Each subtask folder has one .txt file per image, each line "question<TAB>Yes|No". Returns
  records `{"category", "image" (file stem), "question", "answer"}` for `mme_scores`.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"no MME folder at {root}")
  annotations = []
  for subtask in sorted(os.listdir(root)):
    subtask_dir = os.path.join(root, subtask)
    if not os.path.isdir(subtask_dir):
      continue
    qa_dir = _qa_folder(subtask_dir)
    for name in sorted(os.listdir(qa_dir)):
      if name.endswith(".txt"):
        annotations += _read_qa_file(os.path.join(qa_dir, name), subtask)
  if not annotations:
    raise ValueError(f"mme: no question files under {root}; point at MME_Benchmark_release_version")
  return annotations


def _read_qa_file(path: str, subtask: str) -> list[dict[str, Any]]:
  image = os.path.splitext(os.path.basename(path))[0]
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.strip().split("\t")
      if len(fields) != 2:
        raise ValueError(f"mme: {path}:{number} is not 'question<TAB>answer': {line!r}")
      records.append({"category": subtask, "image": image, "question": fields[0],
                      "answer": fields[1]})
  return records
