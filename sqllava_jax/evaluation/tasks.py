"""Every task `score(task, predictions, annotations)` knows, in one registry.

The benchmarks' metrics register here; other code adds its tasks with `register_task` (the
demo registers its synthetic set's `synthetic_vqa` and `synthetic_sq` in
`sqllava_jax.demo.tasks`, found through its entry point: `sqllava_jax.plugins`).
A task is its scorer plus how `eval` treats it (`Task`).

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

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from sqllava_jax import plugins
from sqllava_jax.evaluation import mmbench, seed_bench
from sqllava_jax.evaluation.answers import load_json_or_jsonl
from sqllava_jax.evaluation.caption_metrics import score_captions
from sqllava_jax.evaluation.mme import load_mme_annotations, mme_scores
from sqllava_jax.evaluation.pope import pope_scores
from sqllava_jax.evaluation.qa_metrics import gqa_accuracy, scienceqa_accuracy
from sqllava_jax.evaluation.vqa_metrics import textvqa_accuracy, vizwiz_accuracy, vqav2_accuracy

Scorer = Callable[[Any, Any], dict]
ReadAnnotations = Callable[[str | os.PathLike], Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """scorer(predictions, annotations) -> dict; read_annotations(path) parses a ground-truth
  path. self_annotated: the question records are the annotations (`eval` needs no
  `--annotations`). self_questioning: `eval` runs the self-questioning protocol, and the
  scorer judges the questions the model asked."""
  scorer: Scorer
  read_annotations: ReadAnnotations = load_json_or_jsonl
  self_annotated: bool = False
  self_questioning: bool = False


# task name -> Task; see `register_task`.
TASKS: dict[str, Task] = {}


def register_task(name: str, scorer: Scorer, *,
                  read_annotations: ReadAnnotations = load_json_or_jsonl,
                  self_annotated: bool = False, self_questioning: bool = False) -> None:
  """Adds a task to `score` (and to `eval --task`); see `Task`."""
  if name in TASKS:
    raise ValueError(f"task {name!r} is already registered "
                     f"(by {TASKS[name].scorer.__qualname__})")
  TASKS[name] = Task(scorer, read_annotations, self_annotated, self_questioning)


def get_task(name: str) -> Task:
  task = plugins.lookup(TASKS, plugins.TASKS, name)
  if task is None:
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
  return task


def load_annotations(task: str, path: str | os.PathLike) -> Any:
  """Reads a task's annotation file (JSON, or JSONL as records; MME's benchmark folder)."""
  return get_task(task).read_annotations(path)


def score(task: str, predictions: Any, annotations: Any) -> dict:
  """Scores `predictions` against `annotations` with the metric of `task`.

  Returns the task's result dict with `task` added. Raises `ValueError` for an unknown task,
  an empty answers file, or an answer whose question the annotations do not know.
  """
  scorer = get_task(task).scorer
  if isinstance(annotations, (str, os.PathLike)):
    annotations = load_annotations(task, annotations)
  return {"task": task, **scorer(predictions, annotations)}


def _mme_annotations(path: str | os.PathLike) -> Any:
  return load_mme_annotations(path) if os.path.isdir(path) else load_json_or_jsonl(path)


def _mmbench_annotations(path: str | os.PathLike) -> Any:
  return mmbench.read_tsv(path)[1]


register_task("vqav2", vqav2_accuracy)
register_task("vizwiz", vizwiz_accuracy)
register_task("textvqa", textvqa_accuracy)
register_task("gqa", gqa_accuracy)
register_task("scienceqa", scienceqa_accuracy)
register_task("pope", pope_scores)
register_task("mme", mme_scores, read_annotations=_mme_annotations)
register_task("caption", score_captions)
register_task("mmbench", mmbench.circular_scores, read_annotations=_mmbench_annotations)
register_task("seed_bench", seed_bench.seed_scores)
# The library's own tasks: the benchmarks' metrics (registered tasks follow them in `TASKS`).
BENCHMARK_TASKS = tuple(TASKS)
