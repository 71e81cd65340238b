"""`sqllava-jax demo [--out DIR] [--from-scratch] [--fast] [key=value ...]`: the whole method on
synthetic data, on a CPU: generate the shapes set; stage 0 is a tiny vision tower, projector
and LLM standing in for CLIP and Vicuna, shipped with the package (`--from-scratch` trains it
here instead, most of the time of such a run, and writes it as a base folder); stage 1
aligns the prototype extractor and the ViT-LoRA on captions; stage 2 tunes LLM-LoRA,
projector and ViT-LoRA with self-questioning; then it measures held-out answer accuracy and
self-question validity, asks three questions about a held-out image, exports to Hugging Face
format and writes `report.md` and `report.html` with the images, answers and loss curves.

Progress goes to stderr; stdout gets one JSON line with the headline numbers. Overrides are
`key.sub=value` for every stage or `stageN.key.sub=value` for one (`stage0.train.max_steps=50`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
  parser.add_argument("--from-scratch", action=argparse.BooleanOptionalAction, default=False,
                      help="train stage 0 (the stand-in for CLIP and Vicuna) here instead of "
                           "starting from the shipped base; several times longer; writes "
                           "the result as a base folder, OUT/base")
  parser.add_argument("--base", default=None, metavar="DIR",
                      help="start from the stage-0 base in DIR (one that a --from-scratch run "
                           "wrote) instead of the shipped one")
  parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                      help="a few steps on a few records with a narrower model: checks the "
                           "plumbing in about a minute (trains its own stage 0 unless --base)")
  parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                      help="replace an earlier demo run in --out")
  parser.add_argument("--sq-images", type=int, default=None,
                      help="held-out images to self-question (default 100)")
  parser.add_argument("--vqa-limit", type=int, default=None,
                      help="only the first N held-out questions (default: all)")
  parser.add_argument("--seed", type=int, default=0,
                      help="sampling seed of the evaluation (the override seed=N seeds the "
                           "training's initialisation)")
  parser.add_argument("overrides", nargs="*", help="[stageN.]key.sub=value config overrides")


def _plan(args: argparse.Namespace):
  from sqllava_jax.demo.evaluate import FAST_PLAN, EvalPlan
  plan = FAST_PLAN if args.fast else EvalPlan()
  changes = {"seed": args.seed}
  if args.sq_images is not None:
    changes["sq_images"] = args.sq_images
  if args.vqa_limit is not None:
    changes["vqa_limit"] = args.vqa_limit
  return dataclasses.replace(plan, **changes)


def command_line(args: argparse.Namespace) -> list[str]:
  """The options of this run as `sqllava-jax demo` arguments (for the report)."""
  out = (["--out", args.out] + (["--from-scratch"] if args.from_scratch else [])
         + (["--fast"] if args.fast else []))
  for flag, value in (("--base", args.base), ("--sq-images", args.sq_images),
                      ("--vqa-limit", args.vqa_limit)):
    out += [flag, str(value)] if value is not None else []
  return out + (["--seed", str(args.seed)] if args.seed else []) + list(args.overrides)


def run(args: argparse.Namespace) -> int:
  from sqllava_jax.demo.timing import Timings
  timings = Timings()  # before the heavy imports, so that the wall time covers them
  from sqllava_jax.demo.run import DemoOptions, StageInterrupted, run_demo
  from sqllava_jax.models.layers import unroll_threefry_on_cpu
  unroll_threefry_on_cpu()  # the stages train; process-wide: see its docstring
  options = DemoOptions(out=args.out, fast=args.fast, overwrite=args.overwrite,
                        overrides=tuple(args.overrides), plan=_plan(args),
                        from_scratch=args.from_scratch, base=args.base)
  try:
    # Only the summary goes to stdout, whatever the stages print on the way.
    with contextlib.redirect_stdout(sys.stderr):
      summary = run_demo(options, command_line(args), timings)
  except (FileExistsError, ValueError) as e:
    print(f"sqllava-jax demo: error: {e}", file=sys.stderr)
    return 2
  except StageInterrupted as e:
    print(f"sqllava-jax demo: stopped: {e}", file=sys.stderr)
    return 128 + signal.SIGTERM
  print(json.dumps(summary), flush=True)
  return 0
