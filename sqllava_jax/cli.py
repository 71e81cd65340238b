"""`sqllava-jax`: one command with sub-commands.

Each sub-command lives in its own module under `sqllava_jax.commands` and is imported only
when it runs, so `sqllava-jax --help` stays fast and a broken optional dependency of one
command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sqllava_jax.configlib import ConfigError

# The demo's registrations, so that every command's config and `--task` can name them: the
# `synthetic` data source and the `synthetic_vqa` / `synthetic_sq` tasks (importing them
# only adds to the registries).
from sqllava_jax.demo import synthetic, tasks  # noqa: F401  pylint: disable=unused-import

# name -> (module, one-line help)
COMMANDS = {
    "info": ("sqllava_jax.commands.info", "parameter counts per group of a config"),
    "convert": ("sqllava_jax.commands.convert",
                "import / export Hugging Face and reference checkpoints"),
    "show-example": ("sqllava_jax.commands.show_example",
                     "what training sees for one record: prompt, trained spans, labels"),
    "build-dataset": ("sqllava_jax.commands.build_dataset",
                      "LLaVA JSON + images -> TFDS ArrayRecord shards"),
    "train": ("sqllava_jax.commands.train", "train a config (resumes from its output_dir)"),
    "check-checkpoint": ("sqllava_jax.commands.check_checkpoint",
                         "check checkpoint files against their checksums"),
    "generate": ("sqllava_jax.commands.generate",
                 "answer prompts (with an image) with a checkpoint"),
    "ask": ("sqllava_jax.commands.ask",
            "self-questioning: the model asks questions about an image"),
    "eval": ("sqllava_jax.commands.eval", "batched generation over a question file, scored"),
    "eval-suite": ("sqllava_jax.commands.eval_suite",
                   "every benchmark of the paper's table: answered, scored, resumable"),
    "plan": ("sqllava_jax.commands.plan",
             "per-device memory and FLOPs of a config's train step, compiled on CPU devices"),
    "demo": ("sqllava_jax.commands.demo",
             "the whole method on synthetic data on a CPU: train, evaluate, ask, export"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses a command line; only the chosen sub-command's module is imported."""
  parser = argparse.ArgumentParser(prog="sqllava-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  chosen = argv[0] if argv and argv[0] in COMMANDS else None
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(_module=module)
    if name == chosen:
      importlib.import_module(module).add_arguments(p)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return int(importlib.import_module(args._module).run(args) or 0)
  except (ConfigError, FileNotFoundError) as e:
    print(f"sqllava-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
