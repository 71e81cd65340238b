"""GQA exact match and ScienceQA multiple-choice accuracy.

GQA follows LLaVA's pipeline: scripts/convert_gqa_for_eval.py lowercases the answer and strips
trailing periods, then the GQA `eval.py` counts exact matches with the gold answer.
ScienceQA follows llava/eval/eval_science_qa.py (a bare letter, "A. text", or "The answer is
A."), with two more forms the reference counts wrong: a letter in brackets or followed by a
period alone ("(B)", "B."), and the full text of one option.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqllava_jax.evaluation.records import (PathLike, Record, as_answer_records, lookup,
                                            match_answers, mean, question_id_resolver,
                                            records_by_question_id)

OPTION_LETTERS = string.ascii_uppercase


def normalize_gqa_answer(text: str) -> str:
  """"Yes." -> "yes", as scripts/convert_gqa_for_eval.py does (plus surrounding whitespace)."""
  return text.strip().rstrip(".").lower()


def _per_group(correct: Sequence[bool], groups: Sequence[Any]) -> dict[str, float]:
  by_group = defaultdict(list)
  for ok, group in zip(correct, groups):
    if group is not None:
      by_group[str(group)].append(float(ok))
  return {g: mean(v) for g, v in sorted(by_group.items())}


def gqa_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """GQA accuracy: exact match after lowercasing and stripping trailing periods.

  predictions: answer records (`question_id`, `text`) or an answers JSONL path.
  annotations: a GQA questions file's content (`{question_id: {"answer": ..., "types":
    {"structural": ..., "semantic": ...}}}`, e.g. testdev_balanced_questions.json) or a list
    of records with `question_id` and `answer`.
  Returns `accuracy`, `correct`, `num_questions`, and `per_structural_type` and
  `per_semantic_type` when the annotations carry `types`.
  """
  task = "gqa"
  records = as_answer_records(predictions, task)
  index = records_by_question_id(annotations, task)
  pairs = match_answers(records, question_id_resolver(index, task), task)
  correct, structural, semantic = [], [], []
  for prediction, annotation in pairs:
    if "answer" not in annotation:
      raise ValueError(f"gqa: annotation of question_id {prediction['question_id']!r} has no "
                       f"'answer'; use a balanced questions file with answers (not the test set)")
    correct.append(normalize_gqa_answer(prediction["text"]) == annotation["answer"])
    types = annotation.get("types") or {}
    structural.append(types.get("structural"))
    semantic.append(types.get("semantic"))
  report = {"accuracy": mean(correct), "correct": sum(correct), "num_questions": len(correct)}
  if any(t is not None for t in structural):
    report["per_structural_type"] = _per_group(correct, structural)
  if any(t is not None for t in semantic):
    report["per_semantic_type"] = _per_group(correct, semantic)
  return report


# "The answer is C." as the reference matches it, with the phrase in any case; the letter
# must be a capital, so "the answer is a cat" is not read as option A.
_ANSWER_IS = re.compile(r"(?i:the answer is)\s*\(?([A-Z])\)?(?![A-Za-z])")
_BARE_LETTER = re.compile(r"\(?([A-Z])\)?[.:]?")
_LETTER_THEN_TEXT = re.compile(r"([A-Z])[.)] ")


def _option_text(text: str) -> str:
  return " ".join(text.lower().strip().rstrip(".").split())


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
  """The option index a free-text answer picks, or None when no form matches.

  Recognised, in order: a bare letter ("A", "B.", "(C)"); a letter opening the answer ("A. a
  cat", "B) dog"); "The answer is X", all such phrases naming the same letter; the full text
  of exactly one option ("a cat." for option "A cat"). A letter past the last option is None.
  """
  text = text.strip()
  letter = None
  if match := _BARE_LETTER.fullmatch(text):
    letter = match.group(1)
  elif match := _LETTER_THEN_TEXT.match(text):
    letter = match.group(1)
  elif len(set(found := _ANSWER_IS.findall(text))) == 1:
    letter = found[0]
  if letter is not None:
    index = OPTION_LETTERS.index(letter)
    return index if index < len(choices) else None
  same = [i for i, choice in enumerate(choices) if _option_text(choice) == _option_text(text)]
  return same[0] if len(same) == 1 else None


def _scienceqa_problem(index: Mapping[str, Record], question_id: Any) -> Record:
  problem = lookup(index, question_id, "scienceqa")
  if "choices" not in problem or "answer" not in problem:
    raise ValueError(f"scienceqa: problem {question_id!r} needs 'choices' and 'answer' (the "
                     f"index of the right choice), as in ScienceQA's problems.json")
  return problem


def scienceqa_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """ScienceQA accuracy over the answered problems; unparseable answers count wrong.

  predictions: answer records (`question_id` = problem id, `text`) or an answers JSONL path.
  annotations: ScienceQA's problems.json content (`{pid: {"choices": [...], "answer": int,
    "image": file name or None, ...}}`) or a list of such records with `question_id`.
  Returns `accuracy`, `correct`, `num_questions`, `img_accuracy` and `num_img_questions` (the
  problems with an image, as the reference's IMG column), `unparsed` (how many answers no
  form matched) and `unparsed_ids`.
  """
  task = "scienceqa"
  records = as_answer_records(predictions, task)
  index = records_by_question_id(annotations, task)
  pairs = match_answers(records, lambda p: _scienceqa_problem(index, p["question_id"]), task)
  correct, with_image, unparsed_ids = [], [], []
  for prediction, problem in pairs:
    choice = parse_choice(prediction["text"], problem["choices"])
    if choice is None:
      unparsed_ids.append(prediction["question_id"])
    correct.append(choice == problem["answer"])
    with_image.append(bool(problem.get("image")))
  img_correct = [ok for ok, img in zip(correct, with_image) if img]
  return {
      "accuracy": mean(correct), "correct": sum(correct), "num_questions": len(correct),
      "img_accuracy": mean(img_correct) if img_correct else None,
      "num_img_questions": len(img_correct),
      "unparsed": len(unparsed_ids), "unparsed_ids": unparsed_ids,
  }
