"""Hugging Face import: transformers LLaMA and CLIP checkpoint directories -> our modules.

The configs come from each checkpoint's config.json; weights go through the modules' own key
maps (`models.llama.hf_key_map`, `models.vision.hf_key_map`). Parameters a checkpoint does not
hold (LoRA adapters, the projector) are initialised from the seed, inside one jit so that
only those parameters are ever materialised. `convert import-hf`, which can also take the
original's projector file, is `reference.import_hf`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, TypeVar

import jax
import numpy as np
from flax import nnx, traverse_util

from sqllava_jax.config import LLMConfig, LoRAConfig, ModelConfig, VisionConfig
from sqllava_jax.convert.hf_io import (
  CheckpointError,
  CheckpointReader,
  PrefixedSource,
  TensorSource,
  read_config,
)
from sqllava_jax.convert.transfer import import_tensors
from sqllava_jax.models import llama, vision
from sqllava_jax.models.key_map import prefixed
from sqllava_jax.models.layers import dtype_of
from sqllava_jax.models.sqllava import SQLLaVA
from sqllava_jax.tree_paths import flat_state, path_str

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def llm_config_from_hf(directory: str) -> LLMConfig:
  hf = read_config(directory)
  if hf.get("model_type") not in ("llama", None):
    raise CheckpointError(f"{directory}: model_type {hf.get('model_type')!r} is not a LLaMA "
                          "checkpoint (expected 'llama')")
  return LLMConfig.from_hf_config(hf)


def vision_config_from_hf(directory: str, **overrides) -> VisionConfig:
  hf = read_config(directory)
  if hf.get("model_type") not in ("clip", "clip_vision_model"):
    raise CheckpointError(f"{directory}: model_type {hf.get('model_type')!r} is not a CLIP "
                          "checkpoint (expected 'clip' or 'clip_vision_model')")
  return VisionConfig.from_hf_config(hf, **overrides)


def read_llama(directory: str, cfg: LLMConfig, expected: Mapping[str, tuple], *,
               prefix: str = "") -> dict[str, np.ndarray]:
  """{our path: array} for a transformers LLaMA directory; `prefix` is the module's path."""
  key_map = prefixed(llama.hf_key_map(cfg), ours_prefix=prefix)
  return import_tensors(key_map, CheckpointReader(directory), expected, ignore=llama.hf_ignored)


def read_clip_vision(directory: str, cfg: VisionConfig, expected: Mapping[str, tuple], *,
                     prefix: str = "") -> dict[str, np.ndarray]:
  """{our path: array} for a transformers CLIP (full or vision-only) directory."""
  key_map = prefixed(vision.hf_key_map(cfg), ours_prefix=prefix)
  reader: TensorSource = CheckpointReader(directory)
  if not any(name.startswith("vision_model.") for name in reader.keys()):
    reader = PrefixedSource(reader, "vision_model.")
  return import_tensors(key_map, reader, expected, ignore=vision.hf_ignored)


def abstract_shapes(make: Callable[[nnx.Rngs], nnx.Module]) -> dict[str, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  return {path: tuple(v.shape) for path, v in flat_state(nnx.state(abstract)).items()}


def assemble(make: Callable[[nnx.Rngs], ModuleT], loaded: Mapping[str, np.ndarray],
             seed: int = 0) -> ModuleT:
  """Builds `make(rngs)` with the `loaded` parameters ({path: array}); every other parameter
  is initialised from `seed` without materialising the loaded ones twice."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  variables = flat_state(state)
  unknown = sorted(set(loaded) - set(variables))
  if unknown:
    raise ValueError(f"{len(unknown)} loaded tensors have no place in the model: {unknown[:5]}")
  missing = [name for name in variables if name not in loaded]

  def init_missing():
    fresh = nnx.state(make(nnx.Rngs(seed)))
    values = {path: v[...] for path, v in flat_state(fresh).items()}
    return {name: values[name] for name in missing}

  # Runs once: XLA's backend optimisation would cost far more (seconds) than it saves.
  fast_compile: dict[str, str | bool] = {"xla_backend_optimization_level": "0"}
  values = dict(jax.jit(init_missing).lower().compile(fast_compile)()) if missing else {}
  for name, array in loaded.items():
    values[name] = jax.numpy.asarray(array, dtype=variables[name].dtype)
  nested = {path: values[path_str(path)] for path, _ in nnx.to_flat_state(state)}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(nested))
  return nnx.merge(graphdef, state)


def llama_from_hf(directory: str, *, lora: LoRAConfig = LoRAConfig(), dtype: str = "float32",
                  param_dtype: str = "float32", seed: int = 0, **kwargs) -> llama.Llama:
  """A `Llama` decoder with the weights of a transformers LLaMA checkpoint directory."""
  cfg = llm_config_from_hf(directory)
  make = lambda r: llama.Llama(cfg, lora, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype),
                               rngs=r, **kwargs)
  return assemble(make, read_llama(directory, cfg, abstract_shapes(make)), seed)


def vision_from_hf(directory: str, *, lora: LoRAConfig = LoRAConfig(), select_layer: int = -2,
                   select_feature: str = "patch", dtype: str = "float32",
                   param_dtype: str = "float32", seed: int = 0, **kwargs) -> vision.VisionTower:
  """A `VisionTower` with the weights of a transformers CLIP checkpoint directory."""
  cfg = vision_config_from_hf(directory, select_layer=select_layer, select_feature=select_feature)
  make = lambda r: vision.VisionTower(cfg, lora, dtype=dtype_of(dtype),
                                      param_dtype=dtype_of(param_dtype), rngs=r, **kwargs)
  return assemble(make, read_clip_vision(directory, cfg, abstract_shapes(make)), seed)


def config_from_hf(base: ModelConfig, llm_dir: str, vision_dir: str) -> ModelConfig:
  """`base` with the LLM and vision architectures taken from the checkpoints' config.json
  (feature selection stays as `base` says)."""
  vis = vision_config_from_hf(vision_dir, select_layer=base.vision.select_layer,
                              select_feature=base.vision.select_feature)
  return dataclasses.replace(base, llm=llm_config_from_hf(llm_dir), vision=vis)


def model_from_hf(base: ModelConfig, *, llm_dir: str, vision_dir: str,
                  projector: Optional[Mapping[str, np.ndarray]] = None,
                  seed: int = 0) -> tuple[SQLLaVA, ModelConfig]:
  """SQ-LLaVA from a LLaMA and a CLIP checkpoint; `projector` ({path inside the projector:
  array}) if given, else the projector and all adapters are freshly initialised."""
  cfg = config_from_hf(base, llm_dir, vision_dir)
  make = lambda r: SQLLaVA(cfg, rngs=r)
  shapes = abstract_shapes(make)
  loaded = read_llama(llm_dir, cfg.llm, shapes, prefix="llm/")
  loaded.update(read_clip_vision(vision_dir, cfg.vision, shapes, prefix="vision/"))
  for name, value in (projector or {}).items():
    loaded[f"projector/{name}"] = value
  return assemble(make, loaded, seed), cfg
