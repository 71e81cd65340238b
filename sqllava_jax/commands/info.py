"""`sqllava-jax info CONFIG [key=value ...]`: parameter counts per component, trainable vs
frozen under the config's parameter groups. Shapes only: nothing is allocated."""

from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

from sqllava_jax.config import load_config
from sqllava_jax.models.sqllava import COMPONENTS, abstract_model, component_of
from sqllava_jax.training.param_groups import assign_groups, group_by_name
from sqllava_jax.tree_paths import path_str


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def parameter_table(cfg) -> dict[str, dict[str, int]]:
  """{component: {'total', 'trainable', 'frozen'}} for the model and param groups of `cfg`."""
  state = nnx.state(abstract_model(cfg.model), nnx.Param)
  assignment = assign_groups(state, cfg.train.param_groups)
  groups = group_by_name(cfg.train.param_groups)
  table = {name: {"total": 0, "trainable": 0, "frozen": 0} for name in COMPONENTS}
  for path, leaf in nnx.to_flat_state(state):
    n = int(np.prod(leaf.shape))
    row = table[component_of(path)]
    row["total"] += n
    row["frozen" if groups[assignment[path_str(path)]].frozen else "trainable"] += n
  return table


def run(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  table = parameter_table(cfg)
  print(f"{'component':<14}{'parameters':>16}{'trainable':>16}{'frozen':>16}")
  for name, row in table.items():
    print(f"{name:<14}{row['total']:>16,}{row['trainable']:>16,}{row['frozen']:>16,}")
  total = {k: sum(r[k] for r in table.values()) for k in ("total", "trainable", "frozen")}
  print(f"{'total':<14}{total['total']:>16,}{total['trainable']:>16,}{total['frozen']:>16,}")
  base = total["total"] - table["ViT-LoRA"]["total"] - table["LLM-LoRA"]["total"]
  print(f"without adapters: {base:,} ({base / 1e9:.2f}e9); "
        f"trainable {total['trainable'] / max(total['total'], 1):.2%}")
  return 0
