"""`sqllava-jax ask --ckpt CKPT --image IMG --n 3 [--answer]`: the model questions an image.

The reference self-questioning protocol by default (docs/design.md section 6): a
greedy detailed description first, then each question sampled from the prompt ending
`</s>VUSER:` at temperature 1.2, top-k 300, top-p 0.95; `--answer` then answers each
question greedily. Every setting can be overridden.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqllava_jax.commands.generate import add_sampling_arguments
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.prompts import TEMPLATE_CHOICES, load_image
from sqllava_jax.evaluation.sampling import SELF_QUESTION, Sampling
from sqllava_jax.evaluation.self_questioning import DESCRIBE, Protocol, self_question


def add_arguments(parser: argparse.ArgumentParser) -> None:
  loading.add_model_arguments(parser)
  parser.add_argument("--image", required=True, help="image file")
  parser.add_argument("--n", type=int, default=3, help="questions to ask")
  parser.add_argument("--answer", action=argparse.BooleanOptionalAction, default=False,
                      help="also answer each question")
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


def run(args: argparse.Namespace) -> int:
  try:
    protocol = protocol_from_args(args)
    model, cfg, tokenizer = loading.load_from_args(args)
    engine = Engine(model, tokenizer)
    pixels = load_image(args.image, size=engine.image_size,
                        aspect_ratio=cfg.data.image_aspect_ratio)
    [result] = self_question(engine, [pixels], n=args.n, protocol=protocol, answer=args.answer,
                             seed=args.seed)
  except ValueError as e:
    print(f"sqllava-jax ask: error: {e}", file=sys.stderr)
    return 2
  print_result(result, args.json)
  return 0
