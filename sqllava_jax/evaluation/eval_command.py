"""What `sqllava-jax eval` does, apart from argument parsing: load, answer, merge, score.

`EvalRequest` holds what the command's flags say; `evaluate(request)` runs it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax

from sqllava_jax.config import Config, replace
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.benchmarks import add_suffix
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings, run_eval
from sqllava_jax.evaluation.loss_eval import evaluate_loss
from sqllava_jax.evaluation.questions import load_questions, skip_report
from sqllava_jax.evaluation.sampling import GREEDY, SELF_QUESTION, Sampling
from sqllava_jax.evaluation.self_questioning import Protocol
from sqllava_jax.evaluation.tasks import get_task, score

# Not a scored task: the teacher-forced loss of a LLaVA-format training file.
PERPLEXITY = "perplexity"


@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """One `eval` run.

  task: a task of `tasks.TASKS`, or `perplexity`; data: the question file (for perplexity a
  LLaVA-format JSON of conversations); images: the folder their image paths are in; out:
  the output folder; annotations: the ground truth (None: unscored, unless the task is
  self-annotated). template: None for the task's default (vicuna_v1; self-questioning
  tasks v1_sq). sampling: greedy means the protocol's sampling for self-questioning tasks.
  limit: only the first N questions (0: all); prompt_suffix: appended to each question on a
  new line unless it ends with it. questions_per_image, describe_tokens: self-questioning.
  model_id: None for the checkpoint folder's name.
  """
  task: str
  model: loading.ModelOptions
  data: str
  out: str
  images: str = ""
  annotations: Optional[str] = None
  batch_size: int = 8
  max_new_tokens: int = 128
  template: Optional[str] = None
  sampling: Sampling = GREEDY
  seed: int = 0
  limit: int = 0
  prompt_suffix: str = ""
  questions_per_image: int = 1
  describe_tokens: int = 256
  model_id: Optional[str] = None
  strict: bool = False
  progress: bool = True


def settings_for(request: EvalRequest, cfg) -> EvalSettings:
  sq = get_task(request.task).self_questioning
  template = request.template or ("v1_sq" if sq else "vicuna_v1")
  sampling = request.sampling
  if sq and sampling.temperature == 0:
    sampling = SELF_QUESTION  # the protocol samples its questions unless told how
  protocol = Protocol(template=template, describe_tokens=request.describe_tokens,
                      question_tokens=request.max_new_tokens, question_sampling=sampling)
  ckpt = request.model.ckpt
  return EvalSettings(images_dir=request.images, template=template,
                      batch_size=request.batch_size, max_new_tokens=request.max_new_tokens,
                      sampling=sampling, seed=request.seed,
                      model_id=request.model_id or os.path.basename(os.path.normpath(ckpt)),
                      aspect_ratio=cfg.data.image_aspect_ratio, self_questioning=sq,
                      questions_per_image=request.questions_per_image, protocol=protocol,
                      checkpoint=loading.checkpoint_identity(ckpt, request.model.step),
                      strict=request.strict)


def score_answers(task: str, answers_path: str, annotations: Optional[str],
                  questions: list[dict]) -> dict:
  if annotations is None and get_task(task).self_annotated:
    return score(task, answers_path, questions)
  if annotations is None:
    return {"task": task, "scored": False,
            "note": "answers written but not scored: pass --annotations (the benchmark's "
                    "ground truth) to score them"}
  return score(task, answers_path, annotations)


def read_questions(request: EvalRequest) -> list[dict]:
  """The question file (ScienceQA's problems for task `scienceqa`, as eval-suite reads
  them), cut to `limit`, `prompt_suffix` after each question."""
  questions = load_questions(request.data, scienceqa=request.task == "scienceqa")
  questions = questions[:request.limit] if request.limit else questions
  return add_suffix(questions, request.prompt_suffix)


def generation_eval(request: EvalRequest) -> Optional[dict]:
  questions = read_questions(request)
  model, cfg, tokenizer = loading.load(request.model)
  engine = Engine(model, tokenizer,
                  **loading.engine_options(request.model, cfg, dp.eval_mesh_if_parallel()))
  settings = settings_for(request, cfg)
  start = time.perf_counter()
  done = run_eval(engine, questions, settings, request.out, progress=request.progress,
                  question_file=request.data)
  if done is None:
    return None
  seconds = time.perf_counter() - start
  answers_path, skipped = done
  dropped = {s["index"] for s in skipped}
  asked = [q for i, q in enumerate(questions) if i not in dropped]
  result = score_answers(request.task, answers_path, request.annotations, asked)
  result.update({"answers": answers_path, "num_items": len(questions),
                 **skip_report(skipped, len(asked)), "seconds": round(seconds, 2),
                 "examples_per_second": round(len(questions) / seconds, 3)})
  return result


def perplexity_config(cfg: Config, request: EvalRequest) -> Config:
  """`cfg` reading `request.data` as LLaVA-format training records, their images under
  `request.images` (and `request.template`, when given). The values are set as they are,
  not parsed again: a folder named `2024` stays the string '2024'."""
  data = {"data.source": "json", "data.json_path": request.data,
          "data.image_folder": request.images}
  if request.template:
    data["data.template"] = request.template
  return replace(cfg, **data)


def perplexity_eval(request: EvalRequest) -> Optional[dict]:
  options = request.model
  model, cfg = loading.load_for_inference(options.ckpt, step=options.step,
                                          overrides=options.overrides,
                                          merge_lora=options.merge_lora)
  cfg = perplexity_config(cfg, request)
  tokenizer = loading.tokenizer_for(cfg, options.ckpt, options.tokenizer)
  cfg = replace(cfg, **{"data.tokenizer": tokenizer.model_path})
  result = evaluate_loss(model, cfg, batch_size=request.batch_size,
                         mesh=dp.eval_mesh_if_parallel(), progress=request.progress)
  os.makedirs(request.out, exist_ok=True)
  return {"task": PERPLEXITY, **result} if jax.process_index() == 0 else None


def evaluate(request: EvalRequest) -> Optional[dict]:
  """The result dict on process 0, None on the others."""
  if request.task == PERPLEXITY:
    return perplexity_eval(request)
  return generation_eval(request)
