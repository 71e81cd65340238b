"""`sqllava-jax generate --ckpt CKPT --prompt TEXT [--image IMG] ...`: answer prompts.

Each `--prompt` is one row of a batch; `--image` is given once (for every prompt) or once
per prompt. Prints the answers, or with `--json` one object per prompt with `text` and
`token_ids` (the new tokens). Temperature 0 (the default) is greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqllava_jax.commands.model_flags import add_model_arguments, model_options
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.prompts import TEMPLATE_CHOICES, load_image, question_prompt
from sqllava_jax.evaluation.sampling import Sampling


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, prefix: str = "") -> None:
  parser.add_argument(f"--{prefix}temperature", type=float, default=temperature,
                      help=f"0 is greedy (default {temperature})")
  parser.add_argument(f"--{prefix}top-k", type=int, default=top_k,
                      help=f"keep the k likeliest tokens; 0 keeps all (default {top_k})")
  parser.add_argument(f"--{prefix}top-p", type=float, default=top_p,
                      help=f"keep the smallest set with this much probability (default {top_p})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--prompt", action="append", required=True,
                      help="the question or text (repeat for a batch)")
  parser.add_argument("--image", action="append", default=[],
                      help="image file: once for all prompts, or once per prompt")
  parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="vicuna_v1",
                      help="conversation template; raw feeds BOS + the prompt's tokens")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  add_sampling_arguments(parser)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                      help="print one JSON object per prompt (prompt, text, token_ids)")


def images_per_prompt(images: list[str], n: int) -> list:
  if not images:
    return [None] * n
  if len(images) == 1:
    return images * n
  if len(images) != n:
    raise ValueError(f"{len(images)} --image for {n} --prompt; give one image for all prompts "
                     "or one per prompt")
  return images


def run(args: argparse.Namespace) -> int:
  try:
    done = answer_prompts(args)
  except ValueError as e:
    print(f"sqllava-jax generate: error: {e}", file=sys.stderr)
    return 2
  for question, completion in zip(args.prompt, done):
    if args.json:
      print(json.dumps({"prompt": question, "text": completion.text,
                        "token_ids": completion.token_ids}))
    else:
      print(completion.text)
  return 0


def answer_prompts(args: argparse.Namespace):
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  options = model_options(args)
  model, cfg, tokenizer = loading.load(options)
  engine = Engine(model, tokenizer, **loading.engine_options(options, cfg))
  paths = images_per_prompt(args.image, len(args.prompt))
  cache = {p: load_image(p, size=engine.image_size, aspect_ratio=cfg.data.image_aspect_ratio)
           for p in set(paths) if p is not None}
  pixels = [cache.get(p) for p in paths]
  prompts = [question_prompt(q, template=args.template, image=p is not None)
             for q, p in zip(args.prompt, paths)]
  return engine.complete(prompts, pixels, max_new_tokens=args.max_new_tokens,
                         sampling=sampling, seed=args.seed)
