"""`sqllava-jax eval --ckpt CKPT --task TASK --data FILE --images DIR --out DIR`: answer a
question file with batched, jitted generation and score the answers.

Questions are in the LLaVA eval layout (JSONL of question_id, image, text; the synthetic
set's `vqa_eval.json` and stage-2 files also work). Answers go to `OUT/answers.jsonl`, the
score to `OUT/scores.json`. Benchmarks default to the `vicuna_v1` template and greedy
decoding, as the reference does; `synthetic_sq` runs the self-questioning protocol instead.
`--task perplexity` computes the teacher-forced loss of a LLaVA-format training file.
`--task scienceqa` reads LLaVA's ScienceQA file (`llava_test_CQM-I.json`) as eval-suite does:
each problem's question. Every process answers its shard of the questions; the batch is split
over all devices. A question that cannot be asked (malformed record, repeated question, image
missing, unreadable or outside `--images`) is skipped and counted in the result per reason,
with the first ids; `--strict` stops at it instead, naming it.
Answers are appended per batch, so a killed run given the same command again continues
where it stopped; an `--out` holding another run's answers (other settings, questions or
checkpoint) is refused. `sqllava-jax eval-suite` runs whole benchmark suites.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sqllava_jax.commands.generate import add_sampling_arguments
from sqllava_jax.commands.model_flags import add_model_arguments, model_options
from sqllava_jax.evaluation.eval_command import PERPLEXITY, EvalRequest, evaluate
from sqllava_jax.evaluation.prompts import TEMPLATE_CHOICES
from sqllava_jax.evaluation.sampling import Sampling
from sqllava_jax.evaluation.tasks import TASKS
from sqllava_jax.parallel.multihost import maybe_initialize_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  # Every registered task: the benchmarks' and those `cli` loads (the demo's).
  parser.add_argument("--task", required=True, choices=(*TASKS, PERPLEXITY))
  parser.add_argument("--data", required=True, help="question file (JSONL, LLaVA eval layout); "
                      "for perplexity a LLaVA-format JSON of conversations")
  parser.add_argument("--images", default="", help="folder the questions' image paths are in")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--annotations", default=None,
                      help="ground truth for the benchmark tasks (synthetic tasks: --data)")
  parser.add_argument("--batch-size", type=int, default=8, help="global batch (all processes)")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                      help="default vicuna_v1 (synthetic_sq: v1_sq)")
  add_sampling_arguments(parser)  # synthetic_sq: temperature 0 means the protocol's sampling
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--limit", type=int, default=0, help="only the first N questions")
  parser.add_argument("--prompt-suffix", default="",
                      help="appended to each question on a new line unless it ends with it "
                           "(the reference's answer-format line, e.g. ScienceQA's: see "
                           "configs/eval/*.yaml)")
  parser.add_argument("--questions-per-image", type=int, default=1, help="synthetic_sq")
  parser.add_argument("--describe-tokens", type=int, default=256,
                      help="synthetic_sq: new tokens of the opening description")
  parser.add_argument("--model-id", default=None, help="default: the checkpoint folder's name")
  add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of a long, resumable, multi-process inference run (eval, eval-suite, ask)."""
  parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                      help="stop at the first question that cannot be asked (malformed, "
                           "repeated, image missing, unreadable or outside the image folder), "
                           "naming it, instead of skipping and counting it")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
  parser.add_argument("--num-processes", type=int, help="number of processes")
  parser.add_argument("--process-id", type=int, help="this process's index")


def request_of(args: argparse.Namespace) -> EvalRequest:
  return EvalRequest(
      task=args.task, model=model_options(args), data=args.data, out=args.out,
      images=args.images, annotations=args.annotations, batch_size=args.batch_size,
      max_new_tokens=args.max_new_tokens, template=args.template,
      sampling=Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
      limit=args.limit, prompt_suffix=args.prompt_suffix,
      questions_per_image=args.questions_per_image, describe_tokens=args.describe_tokens,
      model_id=args.model_id, strict=args.strict, progress=args.progress)


def run(args: argparse.Namespace) -> int:
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  try:
    result = evaluate(request_of(args))
  except ValueError as e:
    print(f"sqllava-jax eval: error: {e}", file=sys.stderr)
    return 2
  if result is not None:
    with open(os.path.join(args.out, "scores.json"), "w") as f:
      json.dump(result, f, indent=1)
    print(json.dumps(result))
  return 0
