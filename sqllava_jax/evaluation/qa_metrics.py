"""GQA exact match and ScienceQA multiple-choice accuracy.

GQA follows LLaVA's pipeline: scripts/convert_gqa_for_eval.py lowercases the answer and strips
trailing periods, then the GQA `eval.py` counts exact matches with the gold answer.
ScienceQA follows llava/eval/eval_science_qa.py (haotian-liu/LLaVA; SQ-LLaVA's copy is the
same file): an answer counts only as a bare option letter, as "X. " followed by anything, or
with "The answer is X" plus one more character exactly once; anything else is FAILED and
counts wrong. A lenient reading ("B.", "(B)", "B) text", an option's text) is available
behind `lenient=True`, reported under its own keys.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqllava_jax.evaluation.answers import (
  PathLike,
  Record,
  as_answer_records,
  lookup,
  match_answers,
  mean,
  question_id_resolver,
  records_by_question_id,
)

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


# eval_science_qa.py's `--options` default: five letters, so a sixth choice can never be
# picked.
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# The official pattern "The answer is ([A-Z])." with its unescaped final "." (any character
# but a newline): "The answer is B," and "The answer is Bob" match, "The answer is B" at the
# very end does not. Case-sensitive.
_OFFICIAL_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_choice_official(text: str, num_choices: int) -> int | None:
  """The option index eval_science_qa.py reads from an answer, or None for FAILED.

  In this order, on the text exactly as written (no stripping): the whole text is one of the
  five letters ("B"); its first character is one of them and the next two are ". " ("B. a
  dog"); "The answer is X" plus any character occurs exactly once. A letter past the
  problem's last choice (get_pred_idx) is None too: it counts wrong like FAILED.
  """
  if text in SCIENCEQA_OPTIONS:
    letter = text
  elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
    letter = text[0]
  else:
    found = _OFFICIAL_ANSWER_IS.findall(text)
    letter = found[0] if len(found) == 1 else FAILED
  if letter in SCIENCEQA_OPTIONS[:num_choices]:
    return SCIENCEQA_OPTIONS.index(letter)
  return None


# The lenient reading (not the official one): "The answer is C." with the phrase in any case;
# the letter must be a capital, so "the answer is a cat" is not read as option A.
_ANSWER_IS = re.compile(r"(?i:the answer is)\s*\(?([A-Z])\)?(?![A-Za-z])")
_BARE_LETTER = re.compile(r"\(?([A-Z])\)?[.:]?")
_LETTER_THEN_TEXT = re.compile(r"([A-Z])[.)] ")


def _option_text(text: str) -> str:
  return " ".join(text.lower().strip().rstrip(".").split())


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
  """The lenient reading: the option index a free-text answer picks, or None when no form
  matches. Not the official rule (`parse_choice_official`); scores from it are not
  comparable with published ScienceQA numbers.

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


def _image_flag(prediction: Record | None, problem: Record) -> bool:
  # eval_science_qa.py counts a problem in IMG when '<image>' is in the answer's prompt (an
  # unanswered problem's prompt is 'Unknown': never IMG); where an answer has no prompt we
  # use the problem's image, which LLaVA's question file marks that way.
  if prediction is None:
    return False
  if "prompt" in prediction:
    return "<image>" in str(prediction["prompt"])
  return bool(problem.get("image"))


def _choice_report(picked: Sequence[int | None], problems: Sequence[Record],
                   with_image: Sequence[bool], ids: Sequence[Any], prefix: str) -> dict:
  correct = [p is not None and p == problem["answer"] for p, problem in zip(picked, problems)]
  img_correct = [ok for ok, img in zip(correct, with_image) if img]
  return {
      f"{prefix}accuracy": mean(correct), f"{prefix}correct": sum(correct),
      f"{prefix}img_accuracy": mean(img_correct) if img_correct else None,
      f"{prefix}failed_ids": [i for i, p in zip(ids, picked) if p is None],
  }


def scienceqa_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any, *,
                       split_ids: Sequence[Any] | None = None, lenient: bool = False) -> dict:
  """ScienceQA accuracy as llava/eval/eval_science_qa.py computes it.

  predictions: answer records (`question_id` = problem id, `text`, and `prompt`, whose
    '<image>' marks the IMG subset) or an answers JSONL path.
  annotations: ScienceQA's problems.json content (`{pid: {"choices": [...], "answer": int,
    "image": file name or None, ...}}`) or a list of such records with `question_id`.
  split_ids: the problems of the split (pid_splits.json's "test" list). When given, as in the
    official script, every one of them counts and an unanswered one is FAILED; when None, the
    answered problems are the split.
  lenient: also score with `parse_choice` under `lenient_*` keys (never the official ones).
  Returns `accuracy`, `correct`, `num_questions`, `img_accuracy` (None without IMG problems)
  and `num_img_questions`, `failed` and `failed_ids` (FAILED or a letter past the choices:
  counted wrong, in the denominator), `unanswered`; with `lenient`, `lenient_accuracy`,
  `lenient_correct`, `lenient_img_accuracy`, `lenient_failed_ids`.
  """
  task = "scienceqa"
  records = as_answer_records(predictions, task)
  index = records_by_question_id(annotations, task)
  pairs = match_answers(records, lambda p: _scienceqa_problem(index, p["question_id"]), task)
  answered = {str(p["question_id"]): (p, problem) for p, problem in pairs}
  if split_ids is not None:
    ids = [str(i) for i in split_ids]
    for pid in answered.keys() - set(ids):
      raise ValueError(f"scienceqa: problem {pid!r} was answered but is not in the split "
                       f"({len(ids)} problems); pass that split's ids or none")
    entries = [answered.get(i) or (None, _scienceqa_problem(index, i)) for i in ids]
  else:
    ids = list(answered)
    entries = list(answered.values())
  problems = [problem for _, problem in entries]
  with_image = [_image_flag(p, problem) for p, problem in entries]
  texts = [FAILED if p is None else p["text"] for p, _ in entries]
  report = _choice_report(
      [parse_choice_official(t, len(problem["choices"])) for t, problem in zip(texts, problems)],
      problems, with_image, ids, prefix="")
  report.update(num_questions=len(ids), num_img_questions=sum(with_image),
                failed=len(report["failed_ids"]),
                unanswered=sum(1 for p, _ in entries if p is None))
  if lenient:
    report.update(_choice_report(
        [parse_choice(t, problem["choices"]) if p is not None else None
         for t, (p, problem) in zip(texts, entries)], problems, with_image, ids,
        prefix="lenient_"))
  return report
