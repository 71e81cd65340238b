"""Parameter trees as flat dicts keyed by '/'-joined paths ('llm/layers/self_attn/q_proj/kernel').

The path string is the one name of a parameter everywhere: parameter groups match it, key
maps map it, checkpoints and exports list it. Low level on purpose (flax only), so the
models, training and the converters share it without importing one another.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx, traverse_util


def path_str(path: tuple) -> str:
  """('llm', 'layers', 'mlp', 'up_proj', 'kernel') -> 'llm/layers/mlp/up_proj/kernel'."""
  return "/".join(str(p) for p in path)


def flat(tree: Mapping) -> dict[str, Any]:
  """A nested dict of leaves -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(items: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> the nested dict (`flat`'s inverse)."""
  return traverse_util.unflatten_dict(dict(items), sep="/")


def flat_state(state: nnx.State) -> dict[str, Any]:
  """{'a/b/c': variable} of an nnx state, in the state's order."""
  return {path_str(p): v for p, v in nnx.to_flat_state(state)}
