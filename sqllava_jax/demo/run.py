"""The demo from end to end: data, three training stages, evaluation, self-questioning,
export and the report. Everything it prints goes to stderr; `run_demo` returns the summary
that the command prints as its one JSON line on stdout."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from typing import Optional, Sequence

from sqllava_jax.demo import evaluate as ev
from sqllava_jax.demo import report
from sqllava_jax.demo.configs import STAGES, stage_config
from sqllava_jax.demo.timing import Timings

MARKER = "sqllava-jax-demo.json"
EXPORT_FORMATS = ("llama", "clip")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
  out: str = "runs/demo"
  fast: bool = False
  overwrite: bool = False
  overrides: tuple[str, ...] = ()
  plan: ev.EvalPlan = ev.EvalPlan()


def say(message: str) -> None:
  print(f"[demo] {message}", file=sys.stderr, flush=True)


def prepare_output(out: str, overwrite: bool, argv: Sequence[str]) -> None:
  """Creates `out`; an existing demo output is replaced only with `overwrite`, and a folder
  that is not a demo output never (so a wrong --out cannot delete someone's files)."""
  if os.path.exists(out) and os.listdir(out):
    if not os.path.isfile(os.path.join(out, MARKER)):
      raise FileExistsError(f"{out} exists and is not a demo output; choose another --out")
    if not overwrite:
      raise FileExistsError(f"{out} holds an earlier demo run; pass --overwrite to replace it "
                            "or choose another --out")
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, MARKER), "w") as f:
    json.dump({"argv": list(argv)}, f)


def make_data(cfg) -> str:
  from sqllava_jax.data import synthetic
  paths = synthetic.ensure_dataset(cfg.data.synthetic, image_size=cfg.model.vision.image_size)
  return paths.root


class StageInterrupted(RuntimeError):
  """A stage stopped before its last step (SIGTERM): the demo must not go on from it."""


def train_stage(cfg) -> dict:
  from sqllava_jax.demo.stages import describe_stage, loss_summary
  from sqllava_jax.training.trainer import Trainer
  summary = Trainer(cfg).run()
  if summary.get("stopped_early"):
    # The trainer saves and returns on SIGTERM (preemption); the next stage would start
    # from a half-trained checkpoint and the report would score it as the demo.
    raise StageInterrupted(
        f"training in {cfg.output_dir} stopped at step {summary['steps']} of "
        f"{summary['total_steps']} (SIGTERM); its checkpoint is saved there, and the demo "
        "stops instead of going on from a half-trained stage (run it again with --overwrite)")
  return {**describe_stage(cfg), **summary, **loss_summary(cfg.output_dir)}


def export(ckpt: str, out: str) -> dict[str, str]:
  from sqllava_jax.convert.export import export_checkpoint
  return {fmt: export_checkpoint(ckpt, os.path.join(out, fmt), fmt) for fmt in EXPORT_FORMATS}


def evaluate(ckpt: str, data_dir: str, out: str, plan: ev.EvalPlan, timings: Timings) -> dict:
  engine, cfg = ev.load_engine(ckpt)
  results = {}
  with timings.step("evaluate: answer accuracy (synthetic_vqa)"):
    say("answering the held-out questions (synthetic_vqa, vicuna_v1, greedy)")
    results["vqa"] = ev.answer_accuracy(engine, cfg, data_dir, os.path.join(out, "vqa"), plan)
  with timings.step("evaluate: self-questioning (synthetic_sq)"):
    say("asking questions about held-out images (synthetic_sq, v1_sq protocol)")
    results["sq"] = ev.question_validity(engine, cfg, data_dir, os.path.join(out, "sq"), plan)
  with timings.step("ask: 3 questions about one held-out image"):
    results["ask"] = ev.ask_one(engine, cfg, data_dir, plan)
  return results


@contextlib.contextmanager
def compile_fast(enabled: bool):
  """A plumbing check spends most of its time compiling: unoptimised programs compile in
  about half the time and run a few steps just as well."""
  if not enabled:
    yield
    return
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def run_steps(cfgs: dict, out: str, plan: ev.EvalPlan, timings: Timings) -> tuple:
  """(stage summaries, evaluation results, exported directories)."""
  with timings.step("data: generate the synthetic set"):
    say(f"generating the synthetic set in {cfgs['stage0'].data.synthetic.dir}")
    data_dir = make_data(cfgs["stage0"])
  stages = {}
  for i, stage in enumerate(STAGES):
    with timings.step(f"train: {report.STAGE_TITLES[stage]}"):
      say(f"{stage} ({i + 1}/{len(STAGES)}): {report.STAGE_TITLES[stage]}")
      stages[stage] = train_stage(cfgs[stage])
  final = os.path.join(cfgs["stage2"].output_dir, "checkpoints")
  results = evaluate(final, data_dir, os.path.join(out, "eval"), plan, timings)
  with timings.step("export: Hugging Face llama + clip"):
    say("exporting the final model to Hugging Face format")
    exported = export(final, os.path.join(out, "export"))
  return stages, results, exported


def run_demo(options: DemoOptions, argv: Sequence[str] = (),
             timings: Optional[Timings] = None) -> dict:
  """Runs the demo into `options.out`; `timings` may have been started earlier (before the
  heavy imports) so that the reported wall time covers them."""
  out = os.path.abspath(options.out)
  # Configs first: a bad override fails before anything is written.
  cfgs = {s: stage_config(s, out, fast=options.fast, overrides=options.overrides)
          for s in STAGES}
  prepare_output(out, options.overwrite, argv)
  timings = timings or Timings()
  timings.sampler.start()
  try:
    with compile_fast(options.fast):
      stages, results, exported = run_steps(cfgs, out, options.plan, timings)
  finally:
    timings.sampler.stop()
  summary = report.summary_line(stages, results, out, timings)
  report.write(out, options, stages, results, exported, timings, summary, argv)
  return summary
