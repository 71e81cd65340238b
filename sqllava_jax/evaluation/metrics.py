"""Benchmark metrics behind one entry point: `score(task, predictions, annotations)`.

predictions: the answers of one run in the LLaVA eval layout, a list of records with
  `question_id`, `prompt`, `text`, `answer_id`, `model_id` (only `question_id` and `text` are
  required, plus `prompt` for MME and LLaVA-layout TextVQA), or the path of that JSONL file.
annotations: the benchmark's ground truth in its own layout, parsed or as a path (a `.jsonl`
  file is read as records, other files as JSON; for MME also the
  MME_Benchmark_release_version folder). Each task's scorer documents what it expects.

Every result is a dict; accuracies are fractions in [0, 1] (papers print them times 100), MME
scores are MME points, caption metrics their usual scales. An answer whose question the
annotations do not know raises `ValueError` naming its `question_id`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqllava_jax.evaluation import mmbench, seed_bench
from sqllava_jax.evaluation.caption_metrics import (caption_metric_availability, caption_scores,
                                                    preprocess_caption, score_captions)
from sqllava_jax.evaluation.mme import (MME_COGNITION, MME_PERCEPTION, load_mme_annotations,
                                        mme_scores, parse_yes_no_mme)
from sqllava_jax.evaluation.pope import (POPE_SPLITS, binary_scores, parse_yes_no_pope,
                                         pope_annotations, pope_scores)
from sqllava_jax.evaluation.qa_metrics import gqa_accuracy, parse_choice, scienceqa_accuracy
from sqllava_jax.evaluation.answers import load_json_or_jsonl
from sqllava_jax.evaluation.vqa_metrics import (normalize_answer, normalize_answer_evalai,
                                                textvqa_accuracy, vizwiz_accuracy,
                                                vqa_soft_score, vqav2_accuracy)

__all__ = [
    "TASKS", "score", "register_task", "load_annotations",
    "vqav2_accuracy", "vizwiz_accuracy", "textvqa_accuracy", "normalize_answer",
    "normalize_answer_evalai", "vqa_soft_score", "gqa_accuracy", "scienceqa_accuracy",
    "parse_choice", "pope_scores", "pope_annotations", "parse_yes_no_pope", "binary_scores",
    "POPE_SPLITS", "mme_scores", "load_mme_annotations", "parse_yes_no_mme", "MME_PERCEPTION",
    "MME_COGNITION", "score_captions", "caption_scores", "caption_metric_availability",
    "preprocess_caption",
]

Scorer = Callable[[Any, Any], dict]

# task name -> scorer(predictions, annotations) -> dict
TASKS: dict[str, Scorer] = {
    "vqav2": vqav2_accuracy,
    "vizwiz": vizwiz_accuracy,
    "textvqa": textvqa_accuracy,
    "gqa": gqa_accuracy,
    "scienceqa": scienceqa_accuracy,
    "pope": pope_scores,
    "mme": mme_scores,
    "caption": score_captions,
    "mmbench": mmbench.circular_scores,
    "seed_bench": seed_bench.seed_scores,
}


def register_task(name: str, scorer: Scorer) -> None:
  """Adds a task to `score`; `scorer(predictions, annotations)` returns a dict."""
  if name in TASKS:
    raise ValueError(f"task {name!r} is already registered (by {TASKS[name].__qualname__})")
  TASKS[name] = scorer


def load_annotations(task: str, path: str | os.PathLike) -> Any:
  """Reads an annotation file (JSON, or JSONL as records), or MME's benchmark folder."""
  if task == "mme" and os.path.isdir(path):
    return load_mme_annotations(path)
  if task == "mmbench":
    return mmbench.read_tsv(path)[1]
  return load_json_or_jsonl(path)


def score(task: str, predictions: Any, annotations: Any) -> dict:
  """Scores `predictions` against `annotations` with the metric of `task`.

  Returns the task's result dict with `task` added. Raises `ValueError` for an unknown task,
  an empty answers file, or an answer whose question the annotations do not know.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
  if isinstance(annotations, (str, os.PathLike)):
    annotations = load_annotations(task, annotations)
  return {"task": task, **TASKS[task](predictions, annotations)}
