"""`sqllava-jax ask --ckpt CKPT --image IMG --n 3 [--answer]`: the model questions an image.

The reference self-questioning protocol by default (docs/design.md section 6): a
greedy detailed description first, then each question sampled from the prompt ending
`</s>VUSER:` at temperature 1.2, top-k 300, top-p 0.95; `--answer` then answers each
question greedily. Every setting can be overridden.

As a data engine, `ask --images DIR [--data LLAVA.json] --out OUT` questions every image of
the folder (or every image record of the JSON, its paths relative to DIR) in batches, each
process its shard, and writes `OUT/records.json`: LLaVA-format training records (the
description, then each asked question as a human turn with the model's answer) that `train`
reads (`data.source=json`); see `evaluation.data_engine`. Results are appended per batch, so
a killed run given the same command again continues where it stopped; an image that cannot
be read or a malformed record is skipped and counted (`--strict`: stops, naming it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sqllava_jax.commands.eval import add_run_arguments
from sqllava_jax.commands.generate import add_sampling_arguments
from sqllava_jax.commands.model_flags import add_model_arguments, model_options
from sqllava_jax.evaluation import data_engine as de
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings
from sqllava_jax.evaluation.prompts import TEMPLATE_CHOICES, load_image
from sqllava_jax.evaluation.sampling import SELF_QUESTION, Sampling
from sqllava_jax.evaluation.self_questioning import DESCRIBE, Protocol, self_question
from sqllava_jax.parallel.multihost import maybe_initialize_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--image", help="one image file: print its questions")
  parser.add_argument("--images", help="data engine: a folder of images (with --data: the "
                      "folder the JSON's image paths are in)")
  parser.add_argument("--data", help="data engine: a LLaVA-format JSON; its image records")
  parser.add_argument("--out", help="data engine: output folder (records.json; one run owns it)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="data engine: images per global batch (all processes)")
  add_run_arguments(parser)  # --strict, --progress and the processes: the data engine's
  parser.add_argument("--n", type=int, default=3, help="questions to ask")
  parser.add_argument("--answer", action=argparse.BooleanOptionalAction, default=False,
                      help="also answer each question (the data engine always answers)")
  parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="v1_sq")
  parser.add_argument("--describe", default=DESCRIBE, help="the opening request")
  parser.add_argument("--describe-tokens", type=int, default=256)
  parser.add_argument("--question-tokens", type=int, default=64)
  parser.add_argument("--answer-tokens", type=int, default=128)
  add_sampling_arguments(parser, temperature=SELF_QUESTION.temperature,
                         top_k=SELF_QUESTION.top_k, top_p=SELF_QUESTION.top_p)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                      help="print one JSON object: description, questions (and answers)")


def protocol_from_args(args: argparse.Namespace) -> Protocol:
  return Protocol(template=args.template, describe=args.describe,
                  describe_tokens=args.describe_tokens, question_tokens=args.question_tokens,
                  answer_tokens=args.answer_tokens,
                  question_sampling=Sampling(args.temperature, args.top_k, args.top_p))


def print_result(result, as_json: bool) -> None:
  if as_json:
    print(json.dumps({"description": result.description, "questions": result.questions,
                      **({"answers": result.answers} if result.answers is not None else {})}))
    return
  print(f"Description: {result.description}")
  for i, q in enumerate(result.questions):
    print(f"Q{i + 1}: {q}")
    if result.answers is not None:
      print(f"A{i + 1}: {result.answers[i]}")


def _check_mode(args: argparse.Namespace) -> None:
  if args.image and (args.images or args.data or args.out):
    raise ValueError("give --image (one image, printed) or --images/--data with --out (the "
                     "data engine), not both")
  if not args.image and not args.images:
    raise ValueError("give --image IMG, or --images DIR [--data LLAVA.json] --out OUT")
  if args.images and not args.out:
    raise ValueError("the data engine (--images) needs --out, the folder records.json goes to")


def ask_one(args: argparse.Namespace) -> int:
  protocol = protocol_from_args(args)
  options = model_options(args)
  model, cfg, tokenizer = loading.load(options)
  engine = Engine(model, tokenizer, **loading.engine_options(options, cfg))
  pixels = load_image(args.image, size=engine.image_size,
                      aspect_ratio=cfg.data.image_aspect_ratio)
  [result] = self_question(engine, [pixels], n=args.n, protocol=protocol, answer=args.answer,
                           seed=args.seed)
  print_result(result, args.json)
  return 0


def data_engine(args: argparse.Namespace) -> int:
  protocol = protocol_from_args(args)
  if args.data:
    questions = de.json_questions(args.data, protocol.describe)
  else:
    questions = de.folder_questions(args.images, protocol.describe)
  options = model_options(args)
  model, cfg, tokenizer = loading.load(options)
  engine = Engine(model, tokenizer,
                  **loading.engine_options(options, cfg, dp.eval_mesh_if_parallel()))
  settings = EvalSettings(
      images_dir=args.images, template=protocol.template, batch_size=args.batch_size,
      max_new_tokens=protocol.question_tokens, sampling=protocol.question_sampling,
      seed=args.seed, model_id=os.path.basename(os.path.normpath(args.ckpt)),
      aspect_ratio=cfg.data.image_aspect_ratio, self_questioning=True,
      questions_per_image=args.n, protocol=protocol,
      checkpoint=loading.checkpoint_identity(args.ckpt, args.step), answer_questions=True,
      strict=args.strict)
  summary = de.run_data_engine(engine, questions, settings, args.out, progress=args.progress,
                               question_file=args.data)
  if summary is not None:
    print(json.dumps(summary))
  return 0


def run(args: argparse.Namespace) -> int:
  try:
    _check_mode(args)
    if args.image:
      return ask_one(args)
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return data_engine(args)
  except ValueError as e:
    print(f"sqllava-jax ask: error: {e}", file=sys.stderr)
    return 2
