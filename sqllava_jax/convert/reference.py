"""The reference PyTorch SQ-LLaVA / LLaVA-1.5 checkpoint layout, read and written.

The reference (`llava/model/builder.py`, `llava/train/train.py`) saves three kinds of
directory, each with a LLaVA config.json (LLaMA fields plus `mm_projector_type`,
`mm_hidden_size`, `mm_vision_select_layer`, `mm_vision_tower`, ...):

- merged: the whole `LlavaLlamaForCausalLM` state dict: `model.layers.N.*`, `lm_head.weight`,
  `model.mm_projector.*` (and `model.vision_tower.vision_tower.*`, which the reference
  never reads back: its tower is built from `mm_vision_tower`);
- LoRA: PEFT `adapter_config.json` + `adapter_model` holding
  `base_model.model.model.layers.N.<module>.lora_A.weight` / `lora_B.weight` (plus, when the
  ViT-LoRA trained, the same tensors of the vision tower, which the reference ignores) and
  `non_lora_trainables.bin` holding `base_model.model.model.mm_projector.*`, on a base LLM;
- stage 1: `mm_projector.bin` holding `model.mm_projector.*`, on a base LLM.

The ViT-LoRA is a separate PEFT directory (`Vit-lora/`) around the reference's
`CLIPVisionTower`: `base_model.model.vision_tower.vision_model.encoder.layers.N.*.lora_A.weight`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from sqllava_jax.config import (LLM_LORA_TARGETS, VIT_LORA_TARGETS, Config, LLMConfig,
                                ModelConfig, ProjectorConfig)
from sqllava_jax.convert import adapters
from sqllava_jax.convert.hf_io import CheckpointError, CheckpointReader, read_config
from sqllava_jax.convert.keymap import (KeySpec, RenamedSource, import_tensors, prefixed)
from sqllava_jax.models import llama, projector, vision

PROJECTOR_PREFIX = "model.mm_projector."
VIT_LORA_PREFIX = "base_model.model.vision_tower."
PROJECTOR_TYPES = ("cluster", "mlp2x_gelu", "linear")
# `Clustering(mm_hidden_size, hidden_size, 256, 2)` in the reference's projector builder.
REFERENCE_PROTOTYPES, REFERENCE_ITERATIONS = 256, 2


def projector_specs(cfg: ProjectorConfig) -> list[KeySpec]:
  """Our `projector/...` paths <-> the reference's `model.mm_projector.*` names."""
  return prefixed(projector.reference_key_map(cfg), ours_prefix="projector/",
                  hf_prefix=PROJECTOR_PREFIX)


def llm_specs(cfg: LLMConfig) -> list[KeySpec]:
  return prefixed(llama.hf_key_map(cfg), ours_prefix="llm/")


def canonical_projector_name(name: str) -> str:
  """Any spelling of a projector tensor (`base_model.model.model.mm_projector.c.weight`,
  `model.mm_projector.c.weight`, `mm_projector.c.weight`) -> `model.mm_projector.c.weight`."""
  if "mm_projector." in name:
    return PROJECTOR_PREFIX + name.split("mm_projector.", 1)[1]
  return name


def canonical_vit_lora_name(name: str) -> str:
  """ViT-LoRA tensors under any wrapper (the reference's CLIPVisionTower, a bare
  CLIPVisionModel of transformers 4 or 5) -> the reference's Vit-lora spelling."""
  if "encoder.layers." in name:
    return f"{VIT_LORA_PREFIX}vision_model." + name[name.index("encoder.layers."):]
  return name


def reference_model_config(hf: dict, base: ModelConfig, vision_dir: str, *,
                           where: str) -> ModelConfig:
  """Our model config from a reference config.json (LLM fields, projector type, feature
  selection) and the vision tower's own config; LoRA and the projector's prototype counts
  (hard-coded in the reference) come from `base`."""
  from sqllava_jax.convert.hf import vision_config_from_hf
  kind = hf.get("mm_projector_type", "linear")
  if kind not in PROJECTOR_TYPES:
    raise CheckpointError(f"{where}/config.json: mm_projector_type {kind!r} is not supported; "
                          f"choose one of {', '.join(PROJECTOR_TYPES)}")
  vis = vision_config_from_hf(vision_dir, select_layer=hf.get("mm_vision_select_layer", -2),
                              select_feature=hf.get("mm_vision_select_feature", "patch"))
  width = hf.get("mm_hidden_size", vis.hidden_size)
  if width != vis.hidden_size:
    raise CheckpointError(f"{where}/config.json says mm_hidden_size={width}, but the vision "
                          f"tower {vision_dir} has hidden_size={vis.hidden_size}; pass the "
                          "tower the model was trained with (--vision)")
  return dataclasses.replace(base, llm=LLMConfig.from_hf_config(hf), vision=vis,
                             projector=dataclasses.replace(base.projector, type=kind))


def reference_config(cfg: Config, *, vision_tower: str, dtype: str) -> dict:
  """config.json of the reference's `LlavaLlamaForCausalLM` for our model config."""
  m = cfg.model
  out = m.llm.to_hf_config()
  out.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], torch_dtype=dtype,
             mm_vision_tower=vision_tower, mm_hidden_size=m.vision.hidden_size,
             mm_projector_type=m.projector.type, mm_vision_select_layer=m.vision.select_layer,
             mm_vision_select_feature=m.vision.select_feature, mm_use_im_start_end=False,
             mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=False,
             freeze_mm_mlp_adapter=False, image_aspect_ratio=cfg.data.image_aspect_ratio,
             num_latents=m.projector.num_prototypes, use_cache=True)
  return out


def read_projector_file(path: str, cfg: ProjectorConfig,
                        expected: dict[str, tuple]) -> dict:
  """{our `projector/...` path: array} from `mm_projector.bin` (or a safetensors file) whose
  names are the reference's, with any prefix, or bare (`c.weight`, `mlp.0.bias`)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"projector file {path} does not exist")
  reader = CheckpointReader(os.path.dirname(path) or ".", files=[path])
  reader.where = path
  bare = not any("mm_projector." in name for name in reader.keys())
  rename = (lambda n: PROJECTOR_PREFIX + n) if bare else canonical_projector_name
  return import_tensors(projector_specs(cfg), RenamedSource(reader, rename), expected)


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
  """What a reference checkpoint directory holds (see the module docstring)."""
  kind: str                       # merged | lora | projector
  model_dir: str
  hf: dict
  vision_dir: str
  vit_lora_dir: Optional[str]


def detect_layout(model_dir: str, *, base_dir: Optional[str], vision_dir: Optional[str],
                  vit_lora_dir: Optional[str]) -> ReferenceLayout:
  hf = read_config(model_dir)
  if "mm_projector_type" not in hf and "mm_vision_tower" not in hf:
    raise CheckpointError(f"{model_dir}/config.json has no mm_projector_type or mm_vision_tower: "
                          "not an SQ-LLaVA / LLaVA checkpoint (for a plain LLaMA use import-hf)")
  if os.path.isfile(os.path.join(model_dir, adapters.CONFIG_NAME)):
    kind = "lora"
  elif os.path.isfile(os.path.join(model_dir, "mm_projector.bin")):
    kind = "projector"
  else:
    kind = "merged"
  if kind != "merged" and not base_dir:
    what = "a LoRA checkpoint" if kind == "lora" else "a stage-1 projector (mm_projector.bin)"
    raise CheckpointError(f"{model_dir} holds {what}; pass --base with the LLM it was trained on")
  if vit_lora_dir is None and os.path.isdir(os.path.join(model_dir, "Vit-lora")):
    vit_lora_dir = os.path.join(model_dir, "Vit-lora")
  return ReferenceLayout(kind, model_dir, hf, _vision_dir(model_dir, hf, vision_dir), vit_lora_dir)


def _vision_dir(model_dir: str, hf: dict, explicit: Optional[str]) -> str:
  """--vision, else a `vision_tower/` beside the weights (our `sqllava` export), else
  `mm_vision_tower` when it is a local directory (as the reference resolves it)."""
  if explicit:
    return explicit
  beside = os.path.join(model_dir, "vision_tower")
  if os.path.isfile(os.path.join(beside, "config.json")):
    return beside
  named = hf.get("mm_vision_tower") or hf.get("vision_tower")
  if named and os.path.isdir(named):
    return named
  raise CheckpointError(f"{model_dir}/config.json names the vision tower {named!r}, which is not "
                        "a local directory; download it and pass --vision DIR")


def adapter_config_or(directory: Optional[str], allowed, default):
  return adapters.read_adapter_config(directory, allowed) if directory else default


def layout_config(layout: ReferenceLayout, base: Config) -> Config:
  """The full config of the imported model: `base` with the reference's architecture."""
  model = reference_model_config(layout.hf, base.model, layout.vision_dir, where=layout.model_dir)
  llm_dir = layout.model_dir if layout.kind == "lora" else None
  model = dataclasses.replace(
      model, llm_lora=adapter_config_or(llm_dir, LLM_LORA_TARGETS, model.llm_lora),
      vit_lora=adapter_config_or(layout.vit_lora_dir, VIT_LORA_TARGETS, model.vit_lora))
  data = base.data
  if layout.hf.get("image_aspect_ratio") in ("pad", "square"):
    data = dataclasses.replace(data, image_aspect_ratio=layout.hf["image_aspect_ratio"])
  return dataclasses.replace(base, model=model, data=data)


def _llm_and_projector(layout: ReferenceLayout, cfg: ModelConfig, base_dir: Optional[str],
                       shapes: dict, notes: list[str]) -> dict:
  """The LLM's and the projector's tensors for each layout."""
  from sqllava_jax.convert.hf import read_llama
  if layout.kind == "merged":
    reader = RenamedSource(CheckpointReader(layout.model_dir), canonical_projector_name)
    ignored = [n for n in reader.keys() if n.startswith("model.vision_tower.")]
    if ignored:
      notes.append(f"ignored {len(ignored)} vision-tower tensors in {layout.model_dir}: the "
                   f"reference builds its tower from {layout.vision_dir} instead")
    skip = lambda n: llama.hf_ignored(n) or n.startswith("model.vision_tower.")
    return import_tensors(llm_specs(cfg.llm) + projector_specs(cfg.projector), reader, shapes,
                          ignore=skip)
  loaded = read_llama(base_dir, cfg.llm, shapes, prefix="llm/")
  name = "non_lora_trainables.bin" if layout.kind == "lora" else "mm_projector.bin"
  path = os.path.join(layout.model_dir, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"{layout.model_dir}: no {name}, which holds the projector of this "
                          "layout")
  loaded.update(read_projector_file(path, cfg.projector, shapes))
  return loaded


def _llm_lora(layout: ReferenceLayout, cfg: ModelConfig, shapes: dict, notes: list[str]) -> dict:
  specs = prefixed(adapters.lora_key_map(llama.hf_key_map(cfg.llm), cfg.llm_lora.targets),
                   ours_prefix="llm/")
  reader = adapters.adapter_reader(layout.model_dir)
  vit = [n for n in reader.keys() if "vision_tower" in n]
  if vit:
    notes.append(f"ignored {len(vit)} ViT-LoRA tensors in {layout.model_dir}/adapter_model, as "
                 "the reference does: its ViT-LoRA comes from the Vit-lora directory")
  return import_tensors(specs, reader, shapes, ignore=lambda n: "vision_tower" in n)


def _vit_lora(directory: str, cfg: ModelConfig, shapes: dict) -> dict:
  base = vision.hf_key_map(cfg.vision)
  specs = prefixed(adapters.lora_key_map(base, cfg.vit_lora.targets, hf_prefix=VIT_LORA_PREFIX),
                   ours_prefix="vision/")
  reader = RenamedSource(adapters.adapter_reader(directory), canonical_vit_lora_name)
  return import_tensors(specs, reader, shapes)


def import_reference(model_dir: str, base: Config, *, base_dir: Optional[str] = None,
                     vision_dir: Optional[str] = None, vit_lora_dir: Optional[str] = None):
  """(SQLLaVA, Config, notes) from a reference checkpoint; adapters the checkpoint lacks are
  freshly initialised (B = 0, so they change nothing until trained)."""
  from sqllava_jax.convert.hf import abstract_shapes, assemble, read_clip_vision
  from sqllava_jax.models.sqllava import SQLLaVA
  layout = detect_layout(model_dir, base_dir=base_dir, vision_dir=vision_dir,
                         vit_lora_dir=vit_lora_dir)
  cfg = layout_config(layout, base)
  make = lambda r: SQLLaVA(cfg.model, rngs=r)
  shapes = abstract_shapes(make)
  notes: list[str] = []
  loaded = _llm_and_projector(layout, cfg.model, base_dir, shapes, notes)
  loaded.update(read_clip_vision(layout.vision_dir, cfg.model.vision, shapes, prefix="vision/"))
  if layout.kind == "lora":
    loaded.update(_llm_lora(layout, cfg.model, shapes, notes))
  if layout.vit_lora_dir:
    loaded.update(_vit_lora(layout.vit_lora_dir, cfg.model, shapes))
  return assemble(make, loaded, cfg.seed), cfg, notes


def source_tokenizer(*directories: Optional[str]) -> Optional[str]:
  """The first `tokenizer.model` in `directories` (a Vicuna or reference directory ships
  one); the importers copy it beside the checkpoint, where `generate`, `ask` and `export-hf`
  look for it."""
  for directory in directories:
    path = os.path.join(directory, "tokenizer.model") if directory else ""
    if path and os.path.isfile(path):
      return path
  return None
