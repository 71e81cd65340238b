"""`sqllava-jax eval-suite --ckpt CKPT --suite configs/eval/paper.yaml --data DIR --out OUT`:
every benchmark of the suite whose files are under DIR (LLaVA's `playground/data/eval`
layout), answered with the reference's prompts and decoding, scored, judged or written as
the server's submission file; `OUT/results.md` puts the paper's numbers beside ours.

A killed run continues where it stopped when run again with the same arguments: answers
are appended per batch and judge replies cached, so no question is asked twice and no judge
request paid twice. Judged benchmarks (LLaVA-Bench, MM-Vet) need `--judge-url` and
`--judge-model` (any OpenAI-compatible endpoint; the key is read from `--judge-key-env`).
"""

from __future__ import annotations

import argparse
import os
import sys

from sqllava_jax.commands.eval import add_run_arguments
from sqllava_jax.commands.model_flags import add_model_arguments, model_options
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation import loading, suite
from sqllava_jax.evaluation.benchmarks import load_suite
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.judge import JudgeConfig
from sqllava_jax.evaluation.suite import SuiteOptions
from sqllava_jax.parallel.multihost import maybe_initialize_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--suite", required=True, help="suite YAML, e.g. configs/eval/paper.yaml")
  parser.add_argument("--data", required=True,
                      help="benchmark data folder (LLaVA's playground/data/eval layout)")
  parser.add_argument("--out", required=True, help="output folder (one run owns it)")
  parser.add_argument("--batch-size", type=int, default=8, help="global batch (all processes)")
  parser.add_argument("--max-new-tokens", type=int, default=None,
                      help="cap every benchmark's budget (smoke runs; not the paper's protocol)")
  parser.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="run only this benchmark (repeatable)")
  parser.add_argument("--model-id", default=None, help="default: the checkpoint folder's name")
  parser.add_argument("--judge-url", default=None,
                      help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
  parser.add_argument("--judge-model", default=None, help="judge model, e.g. gpt-4-0613")
  parser.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                      help="environment variable holding the judge's API key")
  add_run_arguments(parser)


def _options(args: argparse.Namespace) -> SuiteOptions:
  judge = None
  if args.judge_url or args.judge_model:
    if not (args.judge_url and args.judge_model):
      raise ValueError("give both --judge-url and --judge-model, or neither")
    judge = JudgeConfig(base_url=args.judge_url, model=args.judge_model,
                        api_key_env=args.judge_key_env)
  return SuiteOptions(data_dir=args.data, out_dir=args.out,
                      model_id=args.model_id or os.path.basename(os.path.normpath(args.ckpt)),
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      only=tuple(args.only), judge=judge, progress=args.progress,
                      strict=args.strict,
                      checkpoint=loading.checkpoint_identity(args.ckpt, args.step))


def run(args: argparse.Namespace) -> int:
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  try:
    options = _options(args)
    load_suite(args.suite)  # a broken suite fails before the model loads
    model_opts = model_options(args)
    model, cfg, tokenizer = loading.load(model_opts)
    engine = Engine(model, tokenizer,
                    **loading.engine_options(model_opts, cfg, dp.eval_mesh_if_parallel()))
    report = suite.run_suite(engine, args.suite, options,
                             aspect_ratio=cfg.data.image_aspect_ratio)
  except ValueError as e:
    print(f"sqllava-jax eval-suite: error: {e}", file=sys.stderr)
    return 2
  if report is None:
    return 0
  print(suite.markdown(report))
  print(f"wrote {os.path.join(args.out, 'results.md')} and results.json")
  failed = [b["name"] for b in report["benchmarks"] if b["status"] == "error"]
  if failed:
    print(f"sqllava-jax eval-suite: error: {', '.join(failed)} could not be scored (see the "
          "table's notes); their answers are kept for a rerun", file=sys.stderr)
    return 1
  return 0
