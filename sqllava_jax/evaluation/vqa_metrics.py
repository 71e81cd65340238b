"""VQAv2, VizWiz and TextVQA accuracy: the official pipelines, answer for answer.

Where each number comes from (the normalisations and their quirks are in
`answer_normalization`):
- VQAv2: LLaVA writes its submission file with EvalAIAnswerProcessor
  (scripts/convert_vqav2_for_submission.py); the server scores it with the VQA evaluation
  (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, 2021). We run both, so a
  local score on val is the server's.
- VizWiz: the same submission step (scripts/convert_vizwiz_for_submission.py), then the VizWiz
  API's vqaEval.py, which normalises the answer with its own (curly-apostrophe) table and
  compares it with the human answers as written.
- TextVQA: llava/eval/eval_textvqa.py with TextVQAAccuracyEvaluator of
  llava/eval/m4c_evaluator.py: EvalAI normalisation of the answer and of the ten human answers.

An answer scores min(#other humans agreeing / 3, 1) averaged over leaving each of the (ten)
human answers out; an accuracy is the mean over the answered questions, a fraction in [0, 1]
(the official scripts print it times 100).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqllava_jax.evaluation.answer_normalization import EVALAI, VIZWIZ, VQA, strip_whitespace
from sqllava_jax.evaluation.answers import (
  PathLike,
  Record,
  as_answer_records,
  index_unique,
  match_answers,
  mean,
  question_id_resolver,
  records_by_question_id,
  unknown_question,
)


def normalize_answer(text: str) -> str:
  """An answer as the official VQA evaluation normalises it ("Two dogs." -> "2 dogs")."""
  return VQA(text)


def normalize_answer_evalai(text: str) -> str:
  """An answer as EvalAIAnswerProcessor normalises it ("A man's hat" -> "man 's hat")."""
  return EVALAI(text)


def normalize_answer_vizwiz(text: str) -> str:
  """An answer as the VizWiz evaluation normalises it ("dont" -> "don\u2019t", curly)."""
  return VIZWIZ(text)


def vqa_soft_score(answer: str, human_answers: Sequence[str],
                   identities: Sequence[Any] | None = None) -> float:
  """min(#other humans giving `answer` / 3, 1), averaged over leaving each human out.

  Both sides must already be normalised. With ten distinct humans, 0, 1, 2, 3 and 4+ agreeing
  give 0, 0.3, 0.6, 0.9 and 1. identities: what tells the humans apart when one is left out
  (default: their positions). vqaEval.py leaves out every answer record equal to the left-out
  one, so records that are equal as a whole (the same answer and no distinct `answer_id`)
  leave together.
  """
  if not human_answers:
    raise ValueError("vqa_soft_score needs at least one human answer")
  if identities is None:
    identities = range(len(human_answers))
  total = 0.0
  for left_out in identities:
    agree = sum(1 for identity, human in zip(identities, human_answers)
                if identity != left_out and human == answer)
    total += min(1.0, agree / 3)
  return total / len(human_answers)


def _human_records(annotation: Record, task: str) -> list[str | Mapping]:
  """The human answers of one annotation as given: strings or `{"answer": str, ...}` records."""
  if "answers" not in annotation or not annotation["answers"]:
    raise ValueError(f"{task}: annotation has no human 'answers': {dict(annotation)!r}")
  for a in annotation["answers"]:
    if not isinstance(a, str) and not (isinstance(a, Mapping) and isinstance(a.get("answer"), str)):
      raise ValueError(f"{task}: a human answer is not a string or an {{'answer': str}} record: "
                       f"{a!r} in {dict(annotation)!r}")
  return list(annotation["answers"])


def _human_answers(annotation: Record, task: str) -> list[str]:
  return [a["answer"] if isinstance(a, Mapping) else a for a in _human_records(annotation, task)]


def _per_type(scores: Sequence[float], types: Sequence[Any]) -> dict[str, float]:
  by_type = defaultdict(list)
  for score, t in zip(scores, types):
    by_type[str(t)].append(score)
  return {t: mean(s) for t, s in sorted(by_type.items())}


def _accuracy_report(scores: Sequence[float], annotations: Sequence[Record]) -> dict:
  """`accuracy` and `num_questions`, plus `per_answer_type` and `per_question_type` (the
  official evaluation's other two tables) for the annotations that carry those fields."""
  report: dict[str, Any] = {"accuracy": mean(scores), "num_questions": len(scores)}
  for field, key in (("answer_type", "per_answer_type"), ("question_type", "per_question_type")):
    types = [a.get(field) for a in annotations]
    if any(t is not None for t in types):
      report[key] = _per_type(scores, types)
  return report


def vqav2_soft_score(text: str, human_answers: Sequence[str | Mapping]) -> float:
  """The VQAv2 score of one raw model answer against the raw human answers.

  human_answers: strings, or the annotation's `{"answer", "answer_id", ...}` records.
  The answer first goes through EvalAIAnswerProcessor, as LLaVA's submission file does. Then,
  as vqaEval.py does, both sides are normalised only when the (whitespace-stripped) humans
  disagree: when all wrote the same string, the answer must equal it as it stands, so
  "t shirt" does not match ten times "t-shirt". With records, the humans left out together
  are those equal as whole records (see `vqa_soft_score`); strings count by position.
  """
  records = [a if isinstance(a, Mapping) else {"answer": a} for a in human_answers]
  answer = strip_whitespace(EVALAI(text))
  humans = [strip_whitespace(r["answer"]) for r in records]
  if len(set(humans)) > 1:
    humans = [VQA(h) for h in humans]
    answer = VQA(answer)
  identities = None
  if all(isinstance(a, Mapping) for a in human_answers):
    identities = [{**r, "answer": h} for r, h in zip(records, humans)]
  return vqa_soft_score(answer, humans, identities)


def vqav2_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """VQAv2 accuracy as LLaVA's submission step plus the official VQA evaluation compute it.

  predictions: answer records (`question_id`, `text`) or an answers JSONL path.
  annotations: the official annotation file's content (`{"annotations": [...]}`), a list of
    its records, or `{question_id: record}`; a record has `answers` (ten
    `{"answer": ...}` dicts or strings) and optionally `answer_type` and `question_type`.
  Returns `accuracy`, `num_questions`, `per_answer_type` and `per_question_type` (fractions
  in [0, 1]; vqaEval.py prints them times 100, rounded to 2 decimals). Only the answered
  questions count; vqaEval.py refuses an answers file that misses any annotated question.
  """
  task = "vqav2"
  records = as_answer_records(predictions, task)
  if isinstance(annotations, Mapping) and "annotations" in annotations:
    annotations = annotations["annotations"]
  index = records_by_question_id(annotations, task)

  scores, matched = [], []
  for prediction, annotation in match_answers(records, question_id_resolver(index, task), task):
    scores.append(vqav2_soft_score(prediction["text"], _human_records(annotation, task)))
    matched.append(annotation)
  return _accuracy_report(scores, matched)


def _vizwiz_key(record: Record) -> str:
  # The official VizWiz files have no question ids (one question per image): they are keyed
  # by image file name unless a record carries its own `question_id`.
  if "question_id" in record:
    return str(record["question_id"])
  if "image" not in record:
    raise ValueError(f"vizwiz: annotation record has neither 'question_id' nor 'image': "
                     f"{dict(record)!r}")
  return str(record["image"])


def vizwiz_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """VizWiz VQA accuracy as LLaVA's submission step plus the VizWiz evaluation compute it.

  predictions: answer records or an answers JSONL path; `question_id` is the image file name
    ("VizWiz_val_00000000.jpg") or the annotation's own `question_id`.
  annotations: the official `val.json` content: a list of records with `image`, `answers`
    (`{"answer": ..., "answer_confidence": ...}` dicts) and `answer_type`.
  Returns `accuracy`, `num_questions` and `per_answer_type` ("unanswerable", "yes/no", ...).
  """
  task = "vizwiz"
  records = as_answer_records(predictions, task)
  if isinstance(annotations, Mapping):
    annotations = [{"question_id": k, **v} for k, v in annotations.items()]
  index = index_unique(annotations, _vizwiz_key, f"{task} annotations")

  scores, matched = [], []
  for prediction, annotation in match_answers(records, question_id_resolver(index, task), task):
    # The submission step (EvalAI processor), then the VizWiz evaluation's own normalisation
    # (its curly-apostrophe table); it leaves the human answers as written, and leaves them
    # out by position.
    answer = VIZWIZ(EVALAI(prediction["text"]))
    scores.append(vqa_soft_score(answer, _human_answers(annotation, task)))
    matched.append(annotation)
  return _accuracy_report(scores, matched)


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question_from_prompt(prompt: str) -> str:
  """The question inside a LLaVA TextVQA prompt, lowercased (as llava/eval/eval_textvqa.py
  reads it): "Q\\nReference OCR token: ...\\nAnswer ..." or "Q\\nAnswer ..." -> "q"."""
  lines = prompt.split("\n")
  if prompt.startswith("OCR tokens: "):
    match = _OCR_QUESTION.search(prompt)
    if match is None:
      raise ValueError(f"textvqa: no 'Question: ... Short answer:' in prompt {prompt!r}")
    question = match.group(1)
  elif "Reference OCR token: " in prompt and len(lines) == 3:
    question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
  elif len(lines) == 2:
    question = lines[0]
  else:
    raise ValueError(
        f"textvqa: cannot find the question in prompt {prompt!r}; expected the LLaVA layout "
        f"'QUESTION\\n[Reference OCR token: ...\\n]Answer ...', or give answers whose "
        f"question_id is the TextVQA question_id")
  return question.lower()


class _TextVQAIndex:
  """TextVQA annotations found by question id or, in the LLaVA layout, by image and question.

  LLaVA's TextVQA question file uses the image id as `question_id` (shared by the questions of
  one image), so eval_textvqa.py matches on (image id, question text from the prompt).
  """

  def __init__(self, annotations: Any):
    data = annotations["data"] if isinstance(annotations, Mapping) else annotations
    data = list(data)
    self.by_id = {str(r["question_id"]): r for r in data if "question_id" in r}
    self.by_image_question = {(str(r["image_id"]), r["question"].lower()): r
                              for r in data if "image_id" in r and "question" in r}

  def __call__(self, prediction: Record) -> Record:
    qid = str(prediction["question_id"])
    if qid in self.by_id:
      return self.by_id[qid]
    if "prompt" not in prediction:
      raise unknown_question("textvqa", prediction["question_id"],
                             "no such question id, and no 'prompt' to match image and question")
    question = textvqa_question_from_prompt(prediction["prompt"])
    try:
      return self.by_image_question[(qid, question)]
    except KeyError:
      raise unknown_question("textvqa", prediction["question_id"],
                             f"question {question!r}") from None


def textvqa_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """TextVQA accuracy as LLaVA's evaluator computes it (EvalAI normalisation on both sides).

  predictions: answer records or an answers JSONL path. `question_id` is either the TextVQA
    question id or, in the LLaVA layout, the image id with the question in `prompt`.
  annotations: the official `TextVQA_0.5.1_val.json` content (`{"data": [...]}`) or its list of
    records (`question_id`, `image_id`, `question`, `answers`: ten strings). As in
    eval_textvqa.py, two records of one image with the same lowercased question are one key,
    the later winning.
  Returns `accuracy` and `num_questions`.
  """
  task = "textvqa"
  records = as_answer_records(predictions, task)
  scores = []
  for prediction, annotation in match_answers(records, _TextVQAIndex(annotations), task):
    humans = [EVALAI(a) for a in _human_answers(annotation, task)]
    if len(humans) != 10:
      # TextVQAAccuracyEvaluator asserts ten human answers per question.
      raise ValueError(f"textvqa: question {annotation.get('question_id')!r} has {len(humans)} "
                       f"human answers; the official evaluator requires exactly 10")
    scores.append(vqa_soft_score(EVALAI(prediction["text"]), humans))
  return {"accuracy": mean(scores), "num_questions": len(scores)}
