"""The files the benchmarks' servers take, written from an answers file as LLaVA's scripts do.

- vqav2 (scripts/convert_vqav2_for_submission.py): a JSON list of `{"question_id", "answer"}`
  over the whole test split the server expects (`llava_vqav2_mscoco_test2015.jsonl` when
  present, else the questions asked), each answer through the EvalAI answer processor, ""
  for a question not answered.
- vizwiz (scripts/convert_vizwiz_for_submission.py): `{"image", "answer"}` per question,
  EvalAI-processed.
- gqa (scripts/convert_gqa_for_eval.py): `{"questionId", "prediction"}` with trailing full
  stops stripped and lowercased, the input of GQA's own eval.py.
- mmbench, seed_bench, mmvet: see those modules.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from sqllava_jax.evaluation import mmbench, mmvet, seed_bench
from sqllava_jax.evaluation.answers import as_answer_records, load_json_or_jsonl
from sqllava_jax.evaluation.outputs import write_json
from sqllava_jax.evaluation.vqa_metrics import normalize_answer_evalai


def _texts(answers: Any, task: str) -> dict[str, str]:
  return {str(a["question_id"]): a["text"] for a in as_answer_records(answers, task)}


def vqav2(path: str, answers: Any, questions: Sequence[Mapping]) -> str:
  texts = _texts(answers, "vqav2")
  return write_json(path, [
      {"question_id": q["question_id"],
       "answer": normalize_answer_evalai(texts[str(q["question_id"])])
                 if str(q["question_id"]) in texts else ""} for q in questions])


def vizwiz(path: str, answers: Any, questions: Sequence[Mapping]) -> str:
  texts = _texts(answers, "vizwiz")
  missing = [q["question_id"] for q in questions if str(q["question_id"]) not in texts]
  if missing:  # the reference asserts every question is answered; the server needs all
    raise ValueError(f"vizwiz: {len(missing)} questions unanswered (first {missing[0]!r}); "
                     "rerun to finish them before submitting")
  return write_json(path, [{"image": q["image"],
                             "answer": normalize_answer_evalai(texts[str(q["question_id"])])}
                            for q in questions])


def gqa(path: str, answers: Any, questions: Sequence[Mapping]) -> str:
  del questions
  return write_json(path, [{"questionId": a["question_id"],
                             "prediction": a["text"].rstrip(".").lower()}
                            for a in as_answer_records(answers, "gqa")])


# name -> (file name, writer(path, answers, context)); the context is what each one reads:
# the questions, the question file, or the annotations.
Writer = Callable[[str, Any, Mapping[str, Any]], str]
WRITERS: dict[str, tuple[str, Writer]] = {
    "vqav2": ("submission.json", lambda p, a, c: vqav2(p, a, c["all_questions"])),
    "vizwiz": ("submission.json", lambda p, a, c: vizwiz(p, a, c["questions"])),
    "gqa": ("testdev_balanced_predictions.json", lambda p, a, c: gqa(p, a, c["questions"])),
    "mmbench": ("submission.xlsx", lambda p, a, c: mmbench.write_submission(
        p, c["question_file"], a)),
    "seed_bench": ("submission.jsonl", lambda p, a, c: seed_bench.write_submission(
        p, c["annotations"], a)),
    "mmvet": ("submission.json", lambda p, a, c: mmvet.write_submission(p, a)),
}

# What each writer needs in its context beyond the asked questions.
NEEDS_ANNOTATIONS = ("seed_bench",)


def write(name: str, out_dir: str, answers: Any, context: Mapping[str, Any]) -> str:
  filename, writer = WRITERS[name]
  return writer(os.path.join(out_dir, filename), answers, context)


def all_questions(path: str) -> list[dict]:
  """A whole test split's question records (vqav2's `submission_questions`)."""
  data = load_json_or_jsonl(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSONL file of questions")
  return data
