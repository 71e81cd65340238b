"""Tiny training runs shared by the training tests."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from sqllava_jax.config import load_config
from sqllava_jax.tree_paths import flat

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def tiny_cfg(output_dir, data_dir, *overrides):
  return load_config(CONFIG, [f"output_dir={output_dir}", f"data.synthetic.dir={data_dir}",
                              "train.async_checkpointing=false", *overrides])


def subprocess_env(devices: int) -> dict:
  """The environment for a `sqllava-jax` subprocess on `devices` simulated CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def metrics(output_dir) -> list[dict]:
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def host_params(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(jax.device_get(v)) for k, v in flat(params).items()}


def trainable(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in params.items() if k.endswith(("lora_a", "lora_b")) or
          k.startswith("projector/")}
