"""What every `export-hf` format shares, and transformers' own two: `llama` and `clip`.

A `Job` is one export in progress: the checkpoint's parameters (`params.ParamSource`), its
config, the options and the output dtype. `write_weights` streams a key map's tensors into
safetensors shards with a progress bar; `write_json` and the tokenizer lookup serve every
format (`llava_format`, `reference_export`); `export.py` picks the format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from sqllava_jax.config import Config
from sqllava_jax.convert import reference, tokenizer_files
from sqllava_jax.convert.params import ParamSource
from sqllava_jax.convert.safetensors_writer import ShardedWriter
from sqllava_jax.convert.transfer import export_tensors
from sqllava_jax.models import vision
from sqllava_jax.models.key_map import KeySpec, prefixed


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


def clip_key_map(job: Job) -> list[KeySpec]:
  return prefixed(vision.hf_key_map(job.cfg.model.vision), ours_prefix="vision/")


def tensor_count(key_map: Sequence[KeySpec]) -> int:
  return sum(len(s.hf_names()) for s in key_map)


def write_weights(directory: str, job: Job, key_map: Sequence[KeySpec], *, desc: str,
                  edit: Callable[[str, np.ndarray], np.ndarray] = lambda name, x: x) -> None:
  """Streams `key_map`'s tensors from the checkpoint into sharded safetensors in the job's
  dtype; `edit(hf name, array)` may change a tensor on its way (the LLaVA vocabulary row)."""
  writer = ShardedWriter(directory, max_shard_bytes=job.options.max_shard_bytes)
  stream: Iterator = export_tensors(key_map, job.source.get)
  with tqdm(total=tensor_count(key_map), desc=desc, unit="tensor", file=sys.stderr,
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
  write_weights(directory, job, reference.llm_key_map(llm), desc="llama")


def export_clip(directory: str, job: Job) -> None:
  vis = job.cfg.model.vision
  write_json(directory, "config.json", {**vis.to_hf_config(), "torch_dtype": job.dtype_name})
  tokenizer_files.write_image_processor(directory, vis)
  write_weights(directory, job, clip_key_map(job), desc="clip")
