"""PEFT LoRA adapters: tensor names, `adapter_config.json`, adapter-only directories.

PEFT names an adapter tensor after the module it wraps. For the Linear transformers calls
`model.layers.3.self_attn.q_proj` (weight [out, in]) the adapter is

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

and ours is `llm/layers/self_attn/q_proj/lora_a` [L, in, r] and `lora_b` [L, r, out]
(stacked, transposed), with the same scale alpha / r. The names are derived from each
module's own HF key map (`lora_key_map`), so there is one source of truth per module.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from sqllava_jax.config import LoRAConfig
from sqllava_jax.convert.hf_io import CheckpointError, CheckpointReader
from sqllava_jax.convert.safetensors_writer import write_file
from sqllava_jax.models.key_map import KeySpec, transpose

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def lora_key_map(base: Sequence[KeySpec], targets: Sequence[str], *,
                 hf_prefix: str = PEFT_PREFIX) -> list[KeySpec]:
  """The LoRA key map of every targeted Linear of a module's HF key map `base`: our
  `<module>/lora_a`, `lora_b` <-> PEFT's `<hf_prefix><hf module>.lora_A.weight`, `lora_B.weight`."""
  key_map = []
  for spec in base:
    if not spec.ours.endswith("/kernel") or not spec.hf.endswith(".weight"):
      continue
    module, hf_module = spec.ours[: -len("/kernel")], spec.hf[: -len(".weight")]
    if module.rsplit("/", 1)[-1] not in targets:
      continue
    for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      key_map.append(KeySpec(f"{module}/{ours}", f"{hf_prefix}{hf_module}.{theirs}.weight",
                             transpose, transpose, spec.num_layers))
  return key_map


def adapter_config(lora: LoRAConfig, *, base_model: str = "",
                   task_type: Optional[str] = None) -> dict:
  """The `adapter_config.json` PEFT needs to rebuild these adapters (plain LoRA, no bias)."""
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  return {"peft_type": "LORA", "base_model_name_or_path": base_model or None,
          "task_type": task_type, "r": lora.rank, "lora_alpha": alpha,
          "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
          "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
          "layers_pattern": None}


# The fields of `adapter_config.json` as PEFT 0.4.0 (the original's pin) writes them; newer
# PEFT reads this set too (absent fields take their defaults).
PEFT_040_FIELDS = ("base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
                   "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha",
                   "lora_dropout", "modules_to_save", "peft_type", "r", "revision",
                   "target_modules", "task_type")


def original_adapter_config(lora: LoRAConfig, *, task_type: Optional[str] = None) -> dict:
  """`adapter_config.json` with exactly PEFT 0.4.0's fields."""
  full = {**adapter_config(lora, task_type=task_type), "revision": None}
  return {key: full[key] for key in PEFT_040_FIELDS}


def check_ranks(source, names: Sequence[str], lora: LoRAConfig, config_path: str) -> None:
  """Every `lora_A` [r, in] and `lora_B` [out, r] of `names` in `source` has the config's rank."""
  for name in names:
    axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if axis is None:
      continue
    shape = tuple(source.get(name).shape)
    if len(shape) != 2 or shape[axis] != lora.rank:
      where = getattr(source, "where", "adapter")
      raise CheckpointError(f"{where}: tensor {name} has shape {shape}, rank "
                            f"{shape[axis] if len(shape) == 2 else '?'}, but {config_path} says "
                            f"r={lora.rank}; the adapter and its config do not belong together")


def write_adapter(directory: str, tensors: Sequence[tuple[str, np.ndarray]], config: dict) -> None:
  """`adapter_config.json` + `adapter_model.safetensors` in `directory`."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2)
  write_file(os.path.join(directory, WEIGHT_NAMES[0]), tensors, metadata={"format": "pt"})


def _unsupported(cfg: dict) -> list[str]:
  """Adapter settings whose tensors would not mean plain `W + (alpha / r) A B`."""
  problems = []
  for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
    if cfg.get(key, plain) != plain:
      problems.append(f"{key}={cfg[key]}")
  if cfg.get("bias", "none") != "none":
    problems.append(f"bias={cfg['bias']!r} (trained biases)")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      problems.append(f"{key}={cfg[key]} (per-module ranks)")
  return problems


def read_adapter_config(directory: str, allowed_targets: Sequence[str]) -> LoRAConfig:
  """Rank, alpha, dropout and targets of a PEFT LoRA adapter directory, checked."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} is not a PEFT adapter directory: no {CONFIG_NAME}")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e
  if cfg.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
  problems = _unsupported(cfg)
  if problems:
    raise CheckpointError(f"{path}: unsupported LoRA settings {', '.join(problems)}; only plain "
                          "LoRA (W + alpha/r * A B) converts")
  targets = cfg.get("target_modules")
  if isinstance(targets, str) or not targets:
    raise CheckpointError(f"{path}: target_modules must be a list of module names, got "
                          f"{targets!r}")
  unknown = sorted(set(targets) - set(allowed_targets))
  if unknown:
    raise CheckpointError(f"{path}: target_modules {unknown} are not LoRA targets here; "
                          f"choose from {', '.join(allowed_targets)}")
  return LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout", 0.0)),
                    targets=tuple(t for t in allowed_targets if t in targets))


def adapter_reader(directory: str) -> CheckpointReader:
  """Lazy reader of `adapter_model.safetensors` (or the older `adapter_model.bin`)."""
  for name in WEIGHT_NAMES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      reader = CheckpointReader(directory, files=[path])
      reader.where = path
      return reader
  raise CheckpointError(f"{directory}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")
