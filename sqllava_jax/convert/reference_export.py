"""`export-hf` in the original code's layouts: what its `load_pretrained_model` (and so its
eval scripts and `merge_lora_weights.py`) and its stage 2 (`--pretrain_mm_mlp_adapter`,
`--pretrain_lora`) read.

  sqllava         merged: config.json, `model.*` + `lm_head.weight` + `model.mm_projector.*`
                  safetensors, the merged tower in `vision_tower/`, the slow tokenizer
  sqllava-lora    a stage-2 LoRA save: adapter_config.json + adapter_model.bin (the LLM LoRA,
                  and the ViT-LoRA under the whole model's names, as train.py saves it),
                  non_lora_trainables.bin (the projector), config.json, Vit-lora/
  sqllava-stage1  a stage-1 save: mm_projector.bin, config.json, Vit-lora/

Every name is the original's module tree's (`reference.py`), pinned here as data: nothing
depends on the transformers installed. `.bin` files are torch pickles of plain tensors
(`torch.load(weights_only=True)` reads them), as PEFT 0.4.0 and train.py wrote them.
`mm_vision_tower` is what the user gives (`--vision-tower`: a hub id or a path as the
original will resolve it), written as given.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

import numpy as np

from sqllava_jax.config import Config
from sqllava_jax.convert import adapters, reference, tokenizer_files
from sqllava_jax.convert.hf_export import (
  ExportOptions,
  Job,
  export_clip,
  generation_config,
  tokenizer_path,
  write_json,
  write_weights,
)
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.convert.transfer import export_tensors
from sqllava_jax.models import llama, vision
from sqllava_jax.models.key_map import KeySpec, prefixed

# Format -> the branch of `load_pretrained_model` that must read it (`original_loading_path`).
LOADING_PATHS = {"sqllava": "merged", "sqllava-lora": "lora", "sqllava-stage1": "projector"}
ADAPTER_FORMATS = ("sqllava-lora", "sqllava-stage1")  # LoRA kept apart, never merged


def llm_lora_key_map(cfg: Config) -> list[KeySpec]:
  """Our LLM LoRA <-> `base_model.model.model.layers.N.<module>.lora_{A,B}.weight`."""
  m = cfg.model
  return prefixed(adapters.lora_key_map(llama.hf_key_map(m.llm), m.llm_lora.targets),
                  ours_prefix="llm/")


def vit_lora_key_map(cfg: Config, prefix: str) -> list[KeySpec]:
  """Our ViT-LoRA <-> `<prefix>vision_model.encoder.layers.N.<module>.lora_{A,B}.weight`."""
  m = cfg.model
  return prefixed(adapters.lora_key_map(vision.hf_key_map(m.vision), m.vit_lora.targets,
                                        hf_prefix=prefix), ours_prefix="vision/")


def save_bin(path: str, tensors: Iterable[tuple[str, np.ndarray]], dtype: np.dtype) -> None:
  """A torch pickle of {name: tensor} in `dtype` (plain tensors, nothing else)."""
  import torch  # Only here: the original reads torch pickles; nothing else needs torch.
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[np.dtype(dtype).name]
  out = {}
  for name, value in tensors:
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    out[name] = torch.from_numpy(value).to(torch_dtype)
  torch.save(out, path)


def write_vit_lora(directory: str, job: Job) -> None:
  """A `Vit-lora/` PEFT directory as train.py saves it around the original's CLIPVisionTower
  (task_type null): `--lora_pretrain DIR` and `--pretrain_lora DIR/adapter_model.bin` load it."""
  os.makedirs(directory)
  write_json(directory, adapters.CONFIG_NAME,
             adapters.original_adapter_config(job.cfg.model.vit_lora, task_type=None))
  key_map = vit_lora_key_map(job.cfg, reference.VIT_LORA_PREFIX)
  save_bin(os.path.join(directory, adapters.WEIGHT_NAMES[1]),
           export_tensors(key_map, job.source.get), job.dtype)


def vision_tower_name(job: Job) -> str:
  """`mm_vision_tower` to write: `--vision-tower` (`check` requires it where the layout has no
  tower), else the merged layout's own `vision_tower/`, inside --out as the user spelled it."""
  return job.options.vision_tower or os.path.join(job.out_arg, "vision_tower")


def check(fmt: str, cfg: Config, options: ExportOptions, out: str) -> None:
  """Refuses up front what the original cannot read; warns where it would read it wrongly."""
  m = cfg.model
  reference.check_original_llm(m.llm)
  if fmt == "sqllava-lora" and not m.llm_lora.enabled:
    raise CheckpointError("this checkpoint has no LLM LoRA (llm_lora rank 0): the sqllava-lora "
                          "layout is an LLM adapter; export it as sqllava-stage1 or sqllava")
  if fmt in ADAPTER_FORMATS and not options.vision_tower:
    raise CheckpointError(f"the {fmt} layout does not hold the vision tower; pass --vision-tower "
                          "with the one the original should load (a hub id such as "
                          "openai/clip-vit-large-patch14-336, or a path as it will resolve it)")
  path = reference.original_loading_path(out, with_base=fmt in ADAPTER_FORMATS)
  if path != LOADING_PATHS[fmt]:
    print(f"export-hf: warning: the original picks its loading path by the directory name: it "
          f"needs 'llava' in it, and 'lora' for sqllava-lora (none for the others); "
          f"{reference.original_model_name(out)!r} would take its {path} path, not "
          f"{LOADING_PATHS[fmt]}; rename the directory before loading it there", file=sys.stderr)
  p = m.projector
  if p.type == "cluster" and (p.num_prototypes, p.num_iterations) != (
      reference.REFERENCE_PROTOTYPES, reference.REFERENCE_ITERATIONS):
    print(f"export-hf: warning: the original always builds the prototype extractor with "
          f"{reference.REFERENCE_PROTOTYPES} prototypes and {reference.REFERENCE_ITERATIONS} "
          f"iterations; this model uses {p.num_prototypes} and {p.num_iterations} (the weights "
          "load, the outputs differ)", file=sys.stderr)


def _config(directory: str, job: Job, *, stage1: bool = False) -> None:
  write_json(directory, "config.json", reference.reference_config(
      job.cfg, vision_tower=vision_tower_name(job), dtype=job.dtype_name, stage1=stage1))


def export_merged(directory: str, job: Job) -> None:
  """The merged layout (`merge_lora_weights.py`'s), its tower merged in `vision_tower/`."""
  m = job.cfg.model
  tower = os.path.join(directory, "vision_tower")
  os.makedirs(tower)
  export_clip(tower, job)
  _config(directory, job)
  write_json(directory, "generation_config.json", generation_config(job))
  path = tokenizer_path(job)
  if path:
    tokenizer_files.write_slow_tokenizer(directory, path,
                                         model_max_length=m.llm.max_position_embeddings)
  key_map = reference.llm_key_map(m.llm) + reference.projector_key_map(m.projector)
  write_weights(directory, job, key_map, desc="sqllava")


def export_lora(directory: str, job: Job) -> None:
  """A stage-2 LoRA save, as train.py writes it."""
  m = job.cfg.model
  _config(directory, job)
  write_json(directory, adapters.CONFIG_NAME,
             adapters.original_adapter_config(m.llm_lora, task_type="CAUSAL_LM"))
  key_map = llm_lora_key_map(job.cfg)
  if m.vit_lora.enabled:  # train.py's adapter also holds the tower's, under the model's names
    key_map += vit_lora_key_map(job.cfg, reference.ADAPTER_VIT_LORA_PREFIX)
  save_bin(os.path.join(directory, adapters.WEIGHT_NAMES[1]),
           export_tensors(key_map, job.source.get), job.dtype)
  projector = prefixed(reference.projector_key_map(m.projector),
                       hf_prefix=reference.NON_LORA_PREFIX)
  save_bin(os.path.join(directory, reference.NON_LORA_FILE),
           export_tensors(projector, job.source.get), job.dtype)
  if m.vit_lora.enabled:
    write_vit_lora(os.path.join(directory, reference.VIT_LORA_DIR), job)


def _check_llm_untrained(job: Job) -> None:
  """A stage-1 save has no place for an LLM adapter; refuse to drop a trained one."""
  m = job.cfg.model
  if not m.llm_lora.enabled:
    return
  trained = [s.ours for s in llm_lora_key_map(job.cfg)
             if s.ours.endswith("/lora_b") and np.any(np.asarray(job.source.get(s.ours)))]
  if trained:
    raise CheckpointError(f"this checkpoint's LLM LoRA is trained ({trained[0]} is not zero); "
                          "the sqllava-stage1 layout has no place for it: export sqllava-lora")


def export_stage1(directory: str, job: Job) -> None:
  """A stage-1 save: `--pretrain_mm_mlp_adapter mm_projector.bin` and
  `--pretrain_lora Vit-lora/adapter_model.bin` start the original's stage 2 from it."""
  _check_llm_untrained(job)
  _config(directory, job, stage1=True)
  save_bin(os.path.join(directory, reference.PROJECTOR_FILE),
           export_tensors(reference.projector_key_map(job.cfg.model.projector), job.source.get),
           job.dtype)
  if job.cfg.model.vit_lora.enabled:
    write_vit_lora(os.path.join(directory, reference.VIT_LORA_DIR), job)


EXPORTERS = {"sqllava": export_merged, "sqllava-lora": export_lora,
             "sqllava-stage1": export_stage1}
