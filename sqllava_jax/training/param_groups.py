"""Parameter groups: which parameters train, at which learning rate, and which are frozen.

A group is config data (`ParamGroup`: name, regex patterns over parameter paths such as
`llm/layers/self_attn/q_proj/lora_a`, an lr or `frozen`). Every parameter must match exactly
one group; otherwise the run stops and lists the paths (big_vision's `optax.py` habit).
"""

from __future__ import annotations

import re
from typing import Sequence

from flax import nnx

from sqllava_jax.config import ParamGroup
from sqllava_jax.tree_paths import path_str


def assign_groups(state: nnx.State, groups: Sequence[ParamGroup]) -> dict[str, str]:
  """Maps every parameter path ('a/b/c') of `state` to the name of the one group it matches."""
  return assign_groups_flat([path_str(p) for p, _ in nnx.to_flat_state(state)], groups)


def assign_groups_flat(names: Sequence[str], groups: Sequence[ParamGroup]) -> dict[str, str]:
  """Maps every parameter path ('a/b/c') to the name of the one group it matches."""
  if not groups:
    raise ValueError("train.param_groups is empty: list at least one group (see configs/)")
  compiled = [(g.name, [re.compile(p) for p in g.patterns]) for g in groups]
  assignment, unmatched, ambiguous = {}, [], []
  for name in names:
    hits = [g for g, pats in compiled if any(p.search(name) for p in pats)]
    if not hits:
      unmatched.append(name)
    elif len(hits) > 1:
      ambiguous.append(f"{name} ({', '.join(hits)})")
    else:
      assignment[name] = hits[0]
  problems = []
  if unmatched:
    problems.append(f"{len(unmatched)} parameters match no group: {_head(unmatched)}")
  if ambiguous:
    problems.append(f"{len(ambiguous)} parameters match several groups: {_head(ambiguous)}")
  if problems:
    raise ValueError("; ".join(problems) + ". Fix the patterns in train.param_groups.")
  return assignment


def _head(items: list[str], n: int = 8) -> str:
  more = f" ... and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def group_by_name(groups: Sequence[ParamGroup]) -> dict[str, ParamGroup]:
  return {g.name: g for g in groups}
