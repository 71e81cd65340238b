"""The demo's stage configs: package data plus the run's paths and the user's overrides.

Overrides are `key.sub=value` for every stage, or `stageN.key.sub=value` for one stage
(`stage0.train.max_steps=100`); model overrides should go to every stage, since each stage
starts from the previous one's weights. On the shipped stage-0 base (the default) stage 0 is
not trained: `stage0.` overrides need `--from-scratch`, and stages 1 and 2 read the base's
tokenizer (`base_tokenizer`).
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Sequence

from sqllava_jax.config import Config, load_config

STAGES = ("stage0", "stage1", "stage2")

# `--fast`: the same pipeline on a handful of records and steps with a narrower model, to
# check the plumbing (the smoke test); the numbers it reports mean nothing.
FAST_OVERRIDES = (
    "data.synthetic.num_train=48", "data.synthetic.num_eval=6",
    "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
    "model.llm.hidden_size=32", "model.llm.intermediate_size=64", "model.llm.num_layers=2",
    "model.projector.num_prototypes=4",
    "train.per_device_batch_size=4", "train.max_steps=2", "train.log_every=1",
)


def config_file(name: str) -> str:
  """The path of the packaged `{name}.yaml` (its `base:` files sit beside it)."""
  resource = importlib.resources.files(__package__).joinpath(f"{name}.yaml")
  if not isinstance(resource, os.PathLike):
    raise FileNotFoundError(f"the demo config {name}.yaml is not a file on disk ({resource}); "
                            "install sqllava-jax from a directory or a wheel, not a zip")
  return os.fspath(resource)


def split_overrides(overrides: Sequence[str], stage: str) -> list[str]:
  """The overrides that apply to `stage`, with any `stageN.` prefix removed."""
  out = []
  for item in overrides:
    head, _, rest = item.partition(".")
    if head in STAGES:
      if head == stage:
        out.append(rest)
    else:
      out.append(item)
  return out


def base_tokenizer(out_dir: str) -> str:
  """Where a run on a stage-0 base keeps the base's tokenizer (its token ids)."""
  return os.path.join(os.path.abspath(out_dir), "stage0", "tokenizer.model")


def run_paths(out_dir: str, stage: str, *, on_base: bool = False) -> list[str]:
  """Overrides that place `stage` inside the demo's output directory; `on_base`: stage 0
  comes from a base, whose tokenizer every stage reads."""
  out = os.path.abspath(out_dir)
  paths = [f"output_dir={os.path.join(out, stage)}",
           f"data.synthetic.dir={os.path.join(out, 'data')}"]
  index = STAGES.index(stage)
  if index:
    previous = os.path.join(out, STAGES[index - 1], "checkpoints")
    paths.append(f"train.init_from={previous}")
  if on_base:
    paths.append(f"data.tokenizer={base_tokenizer(out)}")
  return paths


def check_overrides(overrides: Sequence[str], *, on_base: bool) -> None:
  """On a base stage 0 does not train, so an override for it alone would be ignored."""
  own = [item for item in overrides if item.partition(".")[0] == "stage0"]
  if on_base and own:
    raise ValueError(f"{', '.join(own)}: stage 0 is the shipped base and does not train in "
                     "this run; pass --from-scratch to train it with these overrides")


def stage_config(stage: str, out_dir: str, *, fast: bool = False,
                 overrides: Sequence[str] = (), on_base: bool = False) -> Config:
  if stage not in STAGES:
    raise ValueError(f"unknown demo stage {stage!r}; choose one of {', '.join(STAGES)}")
  items = [*run_paths(out_dir, stage, on_base=on_base), *(FAST_OVERRIDES if fast else ()),
           *split_overrides(overrides, stage)]
  return load_config(config_file(stage), items)
