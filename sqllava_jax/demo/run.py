"""The demo from end to end: data, stage 0 (the shipped base, or trained from scratch), stages
1 and 2, evaluation, self-questioning, export and the report. Everything it prints goes to
stderr; `run_demo` returns the summary that the command prints as its one JSON line on
stdout."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence

import jax

from sqllava_jax.convert.export import export_checkpoint
from sqllava_jax.data.pipeline import tokenizer_path
from sqllava_jax.demo import base, report, synthetic
from sqllava_jax.demo import evaluate as ev
from sqllava_jax.demo.configs import STAGES, check_overrides, run_paths, stage_config
from sqllava_jax.demo.stages import describe_stage, loss_record, loss_summary
from sqllava_jax.demo.timing import Timings
from sqllava_jax.training import trainer

MARKER = "sqllava-jax-demo.json"
EXPORT_FORMATS = ("llama", "clip")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
  out: str = "runs/demo"
  fast: bool = False
  overwrite: bool = False
  overrides: tuple[str, ...] = ()
  plan: ev.EvalPlan = ev.EvalPlan()
  # Train stage 0 here instead of starting from a base; `--fast` does unless given `base`.
  from_scratch: bool = False
  # A base folder (`base.py`) instead of the shipped one.
  base: Optional[str] = None


def base_dir(options: DemoOptions) -> Optional[str]:
  """The stage-0 base folder this run starts from; None when it trains stage 0 itself."""
  if options.from_scratch and options.base:
    raise ValueError("--base and --from-scratch exclude each other: a run either trains "
                     "stage 0 or starts from a base")
  if options.from_scratch or (options.fast and not options.base):
    return None  # the shipped base is the full model; --fast's narrower one trains its own
  return os.path.abspath(options.base) if options.base else base.shipped_dir()


def made_by(options: DemoOptions) -> str:
  """The command that makes the same stage 0 (for a base's recipe)."""
  flags = ["--from-scratch", *(["--fast"] if options.fast else [])]
  return shlex.join(["sqllava-jax", "demo", *flags, *options.overrides])


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
  paths = synthetic.ensure_dataset(cfg.data.synthetic, image_size=cfg.model.vision.image_size)
  return paths.root


class StageInterrupted(RuntimeError):
  """A stage stopped before its last step (SIGTERM): the demo must not go on from it."""


def train_stage(cfg) -> dict:
  summary = trainer.Trainer(cfg).run()
  if summary.get("stopped_early"):
    # The trainer saves and returns on SIGTERM (preemption); the next stage would start
    # from a half-trained checkpoint and the report would score it as the demo.
    raise StageInterrupted(
        f"training in {cfg.output_dir} stopped at step {summary['steps']} of "
        f"{summary['total_steps']} (SIGTERM); its checkpoint is saved there, and the demo "
        "stops instead of going on from a half-trained stage (run it again with --overwrite)")
  return {**describe_stage(cfg), **summary, **loss_summary(cfg.output_dir),
          "loss_curve": loss_record(cfg.output_dir)}


def stage0_from_base(base_dir: str, recipe: Mapping, out: str) -> dict:
  """Installs the base as stage 0's checkpoint; the stage's summary as the recipe records it."""
  cfg = base.base_config(recipe, run_paths(out, "stage0", on_base=True))
  base.install(base_dir, recipe, cfg, os.path.join(cfg.output_dir, "checkpoints"))
  return {**describe_stage(cfg), **base.stage_summary(recipe, base_dir)}


def stage0_from_scratch(cfg, options: DemoOptions, out: str, timings: Timings) -> dict:
  """Trains stage 0 and writes it as a base folder, `out/base`."""
  start = time.time()
  summary = train_stage(cfg)
  recorded = {k: summary[k] for k in ("steps", "batch_size", "first_loss", "final_loss",
                                      "final_mean", "wall_s")}
  load = timings.sampler.mean(start, time.time())
  path = base.write(os.path.join(cfg.output_dir, "checkpoints"), tokenizer_path(cfg.data),
                    os.path.join(out, "base"), made_by=made_by(options),
                    stage={**recorded, "cpus": os.cpu_count(),
                           "mean_load": None if load is None else round(load, 2)},
                    loss=summary["loss_curve"])
  return {**summary, "base_written": path}


def export(ckpt: str, out: str) -> dict[str, str]:
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
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def run_steps(cfgs: dict, out: str, options: DemoOptions, timings: Timings,
              base_from: Optional[tuple[str, Mapping]]) -> tuple:
  """(stage summaries, evaluation results, exported directories); `base_from` is (folder,
  recipe) of the stage-0 base, None to train stage 0 here."""
  with timings.step("data: generate the synthetic set"):
    say(f"generating the synthetic set in {cfgs['stage0'].data.synthetic.dir}")
    data_dir = make_data(cfgs["stage0"])
  stages = {}
  if base_from:
    with timings.step("stage 0: install the shipped base"):
      say(f"stage0: the stage-0 base in {base_from[0]} (--from-scratch trains it instead)")
      stages["stage0"] = stage0_from_base(*base_from, out)
  else:
    with timings.step(f"train: {report.STAGE_TITLES['stage0']}"):
      say(f"stage0 (1/3): {report.STAGE_TITLES['stage0']}")
      stages["stage0"] = stage0_from_scratch(cfgs["stage0"], options, out, timings)
  for i, stage in enumerate(STAGES[1:], start=2):
    with timings.step(f"train: {report.STAGE_TITLES[stage]}"):
      say(f"{stage} ({i}/{len(STAGES)}): {report.STAGE_TITLES[stage]}")
      stages[stage] = train_stage(cfgs[stage])
  final = os.path.join(cfgs["stage2"].output_dir, "checkpoints")
  results = evaluate(final, data_dir, os.path.join(out, "eval"), options.plan, timings)
  with timings.step("export: Hugging Face llama + clip"):
    say("exporting the final model to Hugging Face format")
    exported = export(final, os.path.join(out, "export"))
  return stages, results, exported


def run_demo(options: DemoOptions, argv: Sequence[str] = (),
             timings: Optional[Timings] = None) -> dict:
  """Runs the demo into `options.out`; `timings` may have been started earlier (before the
  heavy imports) so that the reported wall time covers them."""
  out = os.path.abspath(options.out)
  # Configs and the base first: a bad override or base fails before anything is written.
  folder = base_dir(options)
  check_overrides(options.overrides, on_base=folder is not None)
  cfgs = {s: stage_config(s, out, fast=options.fast, overrides=options.overrides,
                          on_base=folder is not None) for s in STAGES}
  base_from = (folder, base.check(folder, cfgs["stage0"])) if folder else None
  prepare_output(out, options.overwrite, argv)
  timings = timings or Timings()
  timings.sampler.start()
  try:
    with compile_fast(options.fast):
      stages, results, exported = run_steps(cfgs, out, options, timings, base_from)
  finally:
    timings.sampler.stop()
  summary = report.summary_line(stages, results, out, timings)
  report.write(out, options, stages, results, exported, timings, summary, argv)
  return summary
