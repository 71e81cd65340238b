"""`convert export-hf`: a sqllava-jax checkpoint -> Hugging Face, original-code or PEFT directories.

Formats:
  llama           the LLM, LoRA merged, as transformers' `LlamaForCausalLM`
  clip            the vision tower, ViT-LoRA merged, as transformers' `CLIPVisionModel`
  llava           (`mlp2x_gelu` models) transformers' `LlavaForConditionalGeneration` +
                  `AutoProcessor`
  sqllava         the original code's merged layout (`reference_export`)
  sqllava-lora    the original's stage-2 LoRA layout (`reference_export`)
  sqllava-stage1  the original's stage-1 layout (`reference_export`)
  peft            adapters only: `llm/` (on `LlamaForCausalLM`) and `vision/` (the original's
                  `Vit-lora/`, on its CLIPVisionTower) PEFT LoRA directories

Weights stream tensor by tensor from the restored parameters into safetensors shards (LoRA
merged per tensor, `params.ParamSource`), with a progress bar; everything lands in a
temporary directory that becomes `--out` only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from sqllava_jax.config import Config
from sqllava_jax.convert import FORMATS, adapters, reference, reference_export, tokenizer_files
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.convert.keymap import KeySpec, export_tensors, prefixed
from sqllava_jax.convert.output import atomic_directory, check_output
from sqllava_jax.convert.params import ParamSource, load_for_export, output_dtype
from sqllava_jax.convert.safetensors_writer import ShardedWriter
from sqllava_jax.models import llama, vision

ADAPTER_FORMATS = ("peft",) + reference_export.ADAPTER_FORMATS  # LoRA written apart, unmerged


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  dtype: str = "auto"                 # auto (model.param_dtype), float32, bfloat16, float16
  merge_lora: bool = True             # False: base weights only (for PEFT adapters on top)
  max_shard_bytes: int = 5 * 10**9
  tokenizer: Optional[str] = None     # default: tokenizer.model beside the checkpoint, else
                                      # the config's data tokenizer
  progress: bool = True
  vision_tower: Optional[str] = None  # mm_vision_tower of the original's layouts, as given


@dataclasses.dataclass
class Job:
  """One export in progress: the model, its config, where to write and how."""
  source: ParamSource
  cfg: Config
  options: ExportOptions
  dtype: np.dtype
  final_dir: str  # where the output will live once renamed
  ckpt: str
  fmt: str = ""
  out_arg: str = ""  # --out as the user gave it (relative stays relative)

  @property
  def dtype_name(self) -> str:
    return self.dtype.name


def clip_specs(job: Job) -> list[KeySpec]:
  return prefixed(vision.hf_key_map(job.cfg.model.vision), ours_prefix="vision/")


def tensor_count(specs: Sequence[KeySpec]) -> int:
  return sum(len(s.hf_names()) for s in specs)


def write_weights(directory: str, job: Job, specs: Sequence[KeySpec], *, desc: str,
                  edit: Callable[[str, np.ndarray], np.ndarray] = lambda name, x: x) -> None:
  """Streams `specs` from the checkpoint into sharded safetensors in the job's dtype;
  `edit(hf name, array)` may change a tensor on its way (the LLaVA vocabulary row)."""
  from tqdm import tqdm
  writer = ShardedWriter(directory, max_shard_bytes=job.options.max_shard_bytes)
  stream: Iterator = export_tensors(specs, job.source.get)
  with tqdm(total=tensor_count(specs), desc=desc, unit="tensor", file=sys.stderr,
            disable=not job.options.progress) as bar:
    for name, value in stream:
      writer.add(name, edit(name, value).astype(job.dtype, copy=False))
      bar.update(1)
  writer.close()


def write_json(directory: str, name: str, data: dict) -> None:
  with open(os.path.join(directory, name), "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)


def generation_config(job: Job, **extra) -> dict:
  llm = job.cfg.model.llm
  return {"bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id,
          "pad_token_id": llm.pad_token_id, **extra}


def tokenizer_path(job: Job) -> Optional[str]:
  """The tokenizer to ship; a warning (the weights are still useful) when there is none."""
  path = tokenizer_files.find_tokenizer(job.options.tokenizer, job.cfg, job.ckpt)
  if path is None:
    print("export-hf: warning: no tokenizer beside the checkpoint or in its config; pass "
          "--tokenizer to ship tokenizer files", file=sys.stderr)
  return path


def export_llama(directory: str, job: Job) -> None:
  llm = job.cfg.model.llm
  write_json(directory, "config.json", {**llm.to_hf_config(), "torch_dtype": job.dtype_name})
  write_json(directory, "generation_config.json", generation_config(job))
  path = tokenizer_path(job)
  if path:
    tokenizer_files.write_fast_tokenizer(directory, path,
                                         model_max_length=llm.max_position_embeddings)
  write_weights(directory, job, reference.llm_specs(llm), desc="llama")


def export_clip(directory: str, job: Job) -> None:
  vis = job.cfg.model.vision
  write_json(directory, "config.json", {**vis.to_hf_config(), "torch_dtype": job.dtype_name})
  tokenizer_files.write_image_processor(directory, vis)
  write_weights(directory, job, clip_specs(job), desc="clip")


def export_peft(directory: str, job: Job) -> None:
  """`llm/` (on `LlamaForCausalLM`) and `vision/` (the original's `Vit-lora/` layout, whose
  names are the original's module tree's, whatever transformers is installed)."""
  m = job.cfg.model
  if m.llm_lora.enabled:
    specs = prefixed(adapters.lora_key_map(llama.hf_key_map(m.llm), m.llm_lora.targets),
                     ours_prefix="llm/")
    tensors = [(n, v.astype(job.dtype, copy=False))
               for n, v in export_tensors(specs, job.source.get)]
    adapters.write_adapter(os.path.join(directory, "llm"), tensors,
                           adapters.adapter_config(m.llm_lora, task_type="CAUSAL_LM"))
  if m.vit_lora.enabled:
    reference_export.write_vit_lora(os.path.join(directory, "vision"), job)


def export_llava(directory: str, job: Job) -> None:
  from sqllava_jax.convert import llava_format
  llava_format.export(directory, job)


EXPORTERS: dict[str, Callable[[str, Job], None]] = {
    "llama": export_llama, "clip": export_clip, "llava": export_llava, "peft": export_peft,
    **reference_export.EXPORTERS}


def check_exportable(fmt: str, cfg: Config, options: ExportOptions, ckpt: str, out: str) -> None:
  """Refuses up front (before anything is written) what a format cannot represent."""
  m = cfg.model
  if fmt == "peft" and not (m.llm_lora.enabled or m.vit_lora.enabled):
    raise CheckpointError("this checkpoint has no LoRA adapters (llm_lora and vit_lora rank 0): "
                          "nothing to export as peft")
  if fmt == "llava":
    from sqllava_jax.convert import llava_format
    llava_format.check(cfg, tokenizer_files.find_tokenizer(options.tokenizer, cfg, ckpt))
  if fmt in reference_export.EXPORTERS:
    reference_export.check(fmt, cfg, options, out)


def export_checkpoint(ckpt: str, out: str, fmt: str, options: ExportOptions = ExportOptions(),
                      *, step: Optional[int] = None, overwrite: bool = False) -> str:
  """Writes checkpoint `ckpt` as `fmt` to `out` (atomically); returns the output path."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  final = check_output(out, overwrite=overwrite)
  model, cfg = load_for_export(ckpt, step)
  check_exportable(fmt, cfg, options, ckpt, out)
  job = Job(ParamSource(model, merge_lora=options.merge_lora and fmt not in ADAPTER_FORMATS),
            cfg, options, output_dtype(options.dtype, cfg), final, ckpt, fmt=fmt, out_arg=out)
  with atomic_directory(final, overwrite=overwrite) as tmp:
    EXPORTERS[fmt](tmp, job)
  return final
