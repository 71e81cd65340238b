"""What `sqllava-jax eval` does, apart from argument parsing: load, answer, merge, score."""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import jax

from sqllava_jax.config import replace
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.benchmarks import add_suffix
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings, run_eval
from sqllava_jax.evaluation.questions import load_questions, skip_report
from sqllava_jax.evaluation.sampling import SELF_QUESTION, Sampling
from sqllava_jax.evaluation.self_questioning import Protocol
from sqllava_jax.evaluation.tasks import SELF_ANNOTATED, score


def settings_from_args(args: argparse.Namespace, cfg) -> EvalSettings:
  sq = args.task == "synthetic_sq"
  template = args.template or ("v1_sq" if sq else "vicuna_v1")
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  if sq and args.temperature == 0:
    sampling = SELF_QUESTION  # the protocol samples its questions unless told how
  protocol = Protocol(template=template, describe_tokens=args.describe_tokens,
                      question_tokens=args.max_new_tokens, question_sampling=sampling)
  return EvalSettings(images_dir=args.images, template=template, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                      model_id=args.model_id or os.path.basename(os.path.normpath(args.ckpt)),
                      aspect_ratio=cfg.data.image_aspect_ratio, self_questioning=sq,
                      questions_per_image=args.questions_per_image, protocol=protocol,
                      checkpoint=loading.checkpoint_identity(args.ckpt, args.step),
                      strict=args.strict)


def score_answers(task: str, answers_path: str, annotations: Optional[str],
                  questions: list[dict]) -> dict:
  if annotations is None and task in SELF_ANNOTATED:
    return score(task, answers_path, questions)
  if annotations is None:
    return {"task": task, "scored": False,
            "note": "answers written but not scored: pass --annotations (the benchmark's "
                    "ground truth) to score them"}
  return score(task, answers_path, annotations)


def read_questions(args: argparse.Namespace) -> list[dict]:
  """The question file (ScienceQA's problems for `--task scienceqa`, as eval-suite reads
  them), cut to `--limit`, `--prompt-suffix` after each question."""
  questions = load_questions(args.data, scienceqa=args.task == "scienceqa")
  questions = questions[:args.limit] if args.limit else questions
  return add_suffix(questions, args.prompt_suffix)


def generation_eval(args: argparse.Namespace) -> Optional[dict]:
  questions = read_questions(args)
  model, cfg, tokenizer = loading.load_from_args(args)
  engine = Engine(model, tokenizer, **loading.engine_options(args, cfg, dp.eval_mesh_if_parallel()))
  settings = settings_from_args(args, cfg)
  start = time.perf_counter()
  done = run_eval(engine, questions, settings, args.out, progress=args.progress,
                  question_file=args.data)
  if done is None:
    return None
  seconds = time.perf_counter() - start
  answers_path, skipped = done
  dropped = {s["index"] for s in skipped}
  asked = [q for i, q in enumerate(questions) if i not in dropped]
  result = score_answers(args.task, answers_path, args.annotations, asked)
  result.update({"answers": answers_path, "num_items": len(questions),
                 **skip_report(skipped, len(asked)), "seconds": round(seconds, 2),
                 "examples_per_second": round(len(questions) / seconds, 3)})
  return result


def perplexity_eval(args: argparse.Namespace) -> Optional[dict]:
  from sqllava_jax.evaluation.loss_eval import evaluate_loss  # pylint: disable=g-import-not-at-top
  data = ["data.source=json", f"data.json_path={args.data}", f"data.image_folder={args.images}"]
  if args.template:
    data.append(f"data.template={args.template}")
  model, cfg = loading.load_for_inference(args.ckpt, step=args.step,
                                          overrides=[*args.override, *data],
                                          merge_lora=args.merge_lora)
  tokenizer = loading.tokenizer_for(cfg, args.ckpt, args.tokenizer)
  cfg = replace(cfg, **{"data.tokenizer": tokenizer.model_path})
  result = evaluate_loss(model, cfg, batch_size=args.batch_size,
                         mesh=dp.eval_mesh_if_parallel(), progress=args.progress)
  os.makedirs(args.out, exist_ok=True)
  return {"task": "perplexity", **result} if jax.process_index() == 0 else None


def evaluate(args: argparse.Namespace) -> Optional[dict]:
  """The result dict on process 0, None on the others."""
  if args.task == "perplexity":
    return perplexity_eval(args)
  return generation_eval(args)
