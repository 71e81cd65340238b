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
merged per tensor, `params.ParamSource`; the writers are `hf_export`'s), with a progress
bar; everything lands in a temporary directory that becomes `--out` only when complete.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from sqllava_jax.config import Config
from sqllava_jax.convert import FORMATS, adapters, llava_format, reference_export, tokenizer_files
from sqllava_jax.convert.hf_export import ExportOptions, Job, export_clip, export_llama
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.convert.output import atomic_directory, check_output
from sqllava_jax.convert.params import ParamSource, load_for_export, output_dtype
from sqllava_jax.convert.transfer import export_tensors

ADAPTER_FORMATS = ("peft",) + reference_export.ADAPTER_FORMATS  # LoRA written apart, unmerged


def export_peft(directory: str, job: Job) -> None:
  """`llm/` (on `LlamaForCausalLM`) and `vision/` (the original's `Vit-lora/` layout, whose
  names are the original's module tree's, whatever transformers is installed)."""
  m = job.cfg.model
  if m.llm_lora.enabled:
    tensors = [(n, v.astype(job.dtype, copy=False))
               for n, v in export_tensors(reference_export.llm_lora_key_map(job.cfg),
                                          job.source.get)]
    adapters.write_adapter(os.path.join(directory, "llm"), tensors,
                           adapters.adapter_config(m.llm_lora, task_type="CAUSAL_LM"))
  if m.vit_lora.enabled:
    reference_export.write_vit_lora(os.path.join(directory, "vision"), job)


EXPORTERS: dict[str, Callable[[str, Job], None]] = {
    "llama": export_llama, "clip": export_clip, "llava": llava_format.export,
    "peft": export_peft,
    **reference_export.EXPORTERS}


def check_exportable(fmt: str, cfg: Config, options: ExportOptions, ckpt: str, out: str) -> None:
  """Refuses up front (before anything is written) what a format cannot represent."""
  m = cfg.model
  if fmt == "peft" and not (m.llm_lora.enabled or m.vit_lora.enabled):
    raise CheckpointError("this checkpoint has no LoRA adapters (llm_lora and vit_lora rank 0): "
                          "nothing to export as peft")
  if fmt == "llava":
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
