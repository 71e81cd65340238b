"""The original PyTorch SQ-LLaVA / LLaVA-1.5 checkpoint layouts, read as its code reads them.

The original (`llava/model/builder.py` `load_pretrained_model`, `train.py`) saves three kinds
of directory, each with a LLaVA config.json (LLaMA fields plus `mm_projector_type`,
`mm_hidden_size`, `mm_vision_select_layer`, `mm_vision_tower`, ...):

- merged: the whole `LlavaLlamaForCausalLM` state dict: `model.layers.N.*`, `lm_head.weight`,
  `model.mm_projector.*` (and `model.vision_tower.vision_tower.*`, which the original never
  reads back: its tower is delay-loaded from `mm_vision_tower`);
- LoRA: PEFT `adapter_config.json` + `adapter_model` holding
  `base_model.model.model.layers.N.<module>.lora_A.weight` / `lora_B.weight` (plus, when the
  ViT-LoRA trained, the tower's under `base_model.model.model.vision_tower.vision_tower.`,
  which the original's loading never applies) and `non_lora_trainables.bin` holding
  `base_model.model.model.mm_projector.*`, on a base LLM;
- stage 1: `mm_projector.bin` holding `model.mm_projector.*`, on a base LLM.

The ViT-LoRA the original applies is a separate PEFT directory (`Vit-lora/`, its `lora_pt`)
around its `CLIPVisionTower`: `base_model.model.vision_tower.vision_model.encoder.layers.N.*`.
On a base the model is what `LlavaLlamaForCausalLM.from_pretrained(base, config=MODEL's)`
holds (base tensors of other names ignored) with the layout's projector file laid over it
(`load_state_dict(strict=False)`: names it does not know ignored); every ignored tensor is
listed in one line of notes.

`import_hf` (`convert import-hf`) is here too: transformers' LLaMA and CLIP (`hf.py`) with,
optionally, a stage-1 `mm_projector.bin` in the original's names.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from sqllava_jax.config import (
  LLM_LORA_TARGETS,
  VIT_LORA_TARGETS,
  Config,
  LLMConfig,
  ModelConfig,
  ProjectorConfig,
)
from sqllava_jax.convert import adapters
from sqllava_jax.convert.hf import (
  abstract_shapes,
  assemble,
  config_from_hf,
  read_clip_vision,
  read_llama,
  vision_config_from_hf,
)
from sqllava_jax.convert.hf_io import (
  CheckpointError,
  CheckpointReader,
  OverlaySource,
  RenamedSource,
  TensorSource,
  read_config,
)
from sqllava_jax.convert.transfer import import_tensors
from sqllava_jax.models import llama, projector, vision
from sqllava_jax.models.key_map import KeySpec, prefixed
from sqllava_jax.models.sqllava import SQLLaVA

# Names in the original's module tree (transformers 4.31, whatever transformers runs here):
# `LlavaLlamaForCausalLM.model` holds `mm_projector` and `vision_tower` (its CLIPVisionTower,
# whose `vision_tower` is a CLIPVisionModel with a `vision_model` level); PEFT adds
# `base_model.model.` in front of the module it wraps.
PROJECTOR_PREFIX = "model.mm_projector."
VIT_LORA_PREFIX = "base_model.model.vision_tower."   # Vit-lora/: PEFT around CLIPVisionTower
ADAPTER_VIT_LORA_PREFIX = "base_model.model.model.vision_tower.vision_tower."  # adapter_model
NON_LORA_PREFIX = "base_model.model."                # non_lora_trainables.bin
NON_LORA_FILE, PROJECTOR_FILE = "non_lora_trainables.bin", "mm_projector.bin"
VIT_LORA_DIR = "Vit-lora"
PROJECTOR_TYPES = ("cluster", "mlp2x_gelu", "linear")
# `Clustering(mm_hidden_size, hidden_size, 256, 2)` in the reference's projector builder.
REFERENCE_PROTOTYPES, REFERENCE_ITERATIONS = 256, 2


def projector_key_map(cfg: ProjectorConfig) -> list[KeySpec]:
  """Our `projector/...` paths <-> the reference's `model.mm_projector.*` names."""
  return prefixed(projector.reference_key_map(cfg), ours_prefix="projector/",
                  hf_prefix=PROJECTOR_PREFIX)


def llm_key_map(cfg: LLMConfig) -> list[KeySpec]:
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


# The LlamaConfig fields transformers 4.31 (the original's pin) writes: no rope_theta (it is
# always 10000 there) and no head_dim (always hidden_size / num_attention_heads).
LLAMA_431_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "hidden_act",
                    "max_position_embeddings", "initializer_range", "rms_norm_eps",
                    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
ROPE_THETA_431 = 10000.0


def check_original_llm(llm: LLMConfig) -> None:
  """Refuses an LLM that transformers 4.31's LLaMA (which the original runs) cannot express."""
  if llm.rope_theta != ROPE_THETA_431:
    raise CheckpointError(f"the LLM uses rope_theta={llm.rope_theta}; the original's "
                          f"transformers 4.31 always uses {ROPE_THETA_431}: export it as llama")
  if llm.effective_head_dim * llm.num_heads != llm.hidden_size:
    raise CheckpointError(f"the LLM's head_dim={llm.effective_head_dim} is not hidden_size / "
                          f"num_heads ({llm.hidden_size} / {llm.num_heads}), which transformers "
                          "4.31 assumes: export it as llama")


def reference_config(cfg: Config, *, vision_tower: str, dtype: str,
                     stage1: bool = False) -> dict:
  """config.json of the original's `LlavaLlamaForCausalLM` as its train.py saves it
  (`tune_mm_mlp_adapter` true for a stage-1 save)."""
  m = cfg.model
  hf = m.llm.to_hf_config()
  out = {key: hf[key] for key in LLAMA_431_FIELDS}
  out.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], torch_dtype=dtype,
             transformers_version="4.31.0", pretraining_tp=1, rope_scaling=None, use_cache=True,
             mm_vision_tower=vision_tower, mm_hidden_size=m.vision.hidden_size,
             mm_projector_type=m.projector.type, mm_vision_select_layer=m.vision.select_layer,
             mm_vision_select_feature=m.vision.select_feature, mm_use_im_start_end=False,
             mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=stage1,
             freeze_mm_mlp_adapter=False, image_aspect_ratio=cfg.data.image_aspect_ratio,
             image_grid_pinpoints=None, num_latents=m.projector.num_prototypes,
             mm_projector_lr=None, vision_tower_lr=None, qav_loss=False)
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
  return import_tensors(projector_key_map(cfg), RenamedSource(reader, rename), expected)


def import_hf(base: Config, *, llm_dir: str, vision_dir: str,
              projector_file: Optional[str] = None) -> tuple[SQLLaVA, Config]:
  """`convert import-hf`: the full config `base` with the LLM and vision architectures of the
  transformers checkpoints, their weights, the projector from `projector_file` (a stage-1
  `mm_projector.bin`, the original's names) if given, everything else freshly initialised
  from `base.seed`."""
  model_cfg = config_from_hf(base.model, llm_dir, vision_dir)
  make = lambda r: SQLLaVA(model_cfg, rngs=r)
  shapes = abstract_shapes(make)
  loaded = read_llama(llm_dir, model_cfg.llm, shapes, prefix="llm/")
  loaded.update(read_clip_vision(vision_dir, model_cfg.vision, shapes, prefix="vision/"))
  if projector_file:
    loaded.update(read_projector_file(projector_file, model_cfg.projector, shapes))
  return assemble(make, loaded, base.seed), dataclasses.replace(base, model=model_cfg)


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
  """What a reference checkpoint directory holds (see the module docstring)."""
  kind: str                       # merged | lora | projector
  model_dir: str
  hf: dict
  vision_dir: str
  vit_lora_dir: Optional[str]


def detect_layout(model_dir: str, *, base_dir: Optional[str], vision_dir: Optional[str],
                  vit_lora_dir: Optional[str], use_vit_lora: bool = True) -> ReferenceLayout:
  hf = read_config(model_dir)
  if "mm_projector_type" not in hf and "mm_vision_tower" not in hf:
    raise CheckpointError(f"{model_dir}/config.json has no mm_projector_type or mm_vision_tower: "
                          "not an SQ-LLaVA / LLaVA checkpoint (for a plain LLaMA use import-hf)")
  if os.path.isfile(os.path.join(model_dir, adapters.CONFIG_NAME)):
    kind = "lora"
  elif os.path.isfile(os.path.join(model_dir, PROJECTOR_FILE)):
    kind = "projector"
  else:
    kind = "merged"
  if kind != "merged" and not base_dir:
    what = "a LoRA checkpoint" if kind == "lora" else "a stage-1 projector (mm_projector.bin)"
    raise CheckpointError(f"{model_dir} holds {what}; pass --base with the LLM it was trained on")
  if vit_lora_dir and os.path.abspath(vit_lora_dir) == os.path.abspath(model_dir):
    raise CheckpointError(
        f"--vit-lora {vit_lora_dir} is the LoRA checkpoint itself: the original's lora_pt loads "
        "nothing from it (its ViT tensors are named for the whole model, not the tower); pass "
        f"{os.path.join(vit_lora_dir, VIT_LORA_DIR)}")
  if not use_vit_lora:  # the original without lora_pt
    vit_lora_dir = None
  elif vit_lora_dir is None and os.path.isdir(os.path.join(model_dir, VIT_LORA_DIR)):
    vit_lora_dir = os.path.join(model_dir, VIT_LORA_DIR)
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


def original_non_lora_names(names) -> dict[str, str]:
  """{name the original loads: stored name} for `non_lora_trainables.bin`, by builder.py's
  rule: drop a leading `base_model.`; then, if any name starts `model.model.`, drop a leading
  `model.` from every name."""
  out = {(n[len("base_model."):] if n.startswith("base_model.") else n): n for n in names}
  if any(n.startswith("model.model.") for n in out):
    out = {(n[len("model."):] if n.startswith("model.") else n): old for n, old in out.items()}
  return out


def original_model_name(model_path: str) -> str:
  """The name builder.py decides by (`get_model_name_from_path` in `mm_utils.py`)."""
  parts = str(model_path).strip("/").split("/")
  return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") else parts[-1]


def original_loading_path(model_path: str, *, with_base: bool) -> str:
  """The branch of the original's `load_pretrained_model` a directory takes, chosen by its
  name alone: `llava` in it (else it loads a plain language model), then `lora` with a base
  (the LoRA path), a base without `lora` (the projector-only path), or no base (merged)."""
  name = original_model_name(model_path).lower()
  if "llava" not in name:
    return "language-model"
  if with_base:
    return "lora" if "lora" in name else "projector"
  return "merged"


# The architecture fields a base must share with the config the original builds the model from.
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads")


def check_base_fits(base_dir: str, hf: dict, model_dir: str) -> None:
  """The original builds the model from MODEL's config.json and loads the base's weights into
  it; a base of another architecture cannot fill it."""
  if not os.path.isfile(os.path.join(base_dir, "config.json")):
    return
  base = read_config(base_dir)
  base = base.get("text_config", base)
  for field in ARCH_FIELDS:
    ours, theirs = hf.get(field), base.get(field)
    if field == "num_key_value_heads":  # absent means one per head
      ours = ours or hf.get("num_attention_heads")
      theirs = theirs or base.get("num_attention_heads")
    if ours is not None and theirs is not None and ours != theirs:
      raise CheckpointError(
          f"{os.path.join(base_dir, 'config.json')}: {field}={theirs}, but "
          f"{os.path.join(model_dir, 'config.json')} (the config the original builds the model "
          f"from) says {field}={ours}: the checkpoint was trained on another base; pass that one "
          "with --base")


def _original_state(layout: ReferenceLayout, base_dir: Optional[str]):
  """The LLM + projector tensors, by the original's names, that its model holds before the
  LoRA merge: the merged directory's, or the base's under the layout's projector file."""
  if layout.kind == "merged":
    return CheckpointReader(layout.model_dir)
  assert base_dir is not None  # detect_layout refuses the other layouts without a base
  name = NON_LORA_FILE if layout.kind == "lora" else PROJECTOR_FILE
  path = os.path.join(layout.model_dir, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"{layout.model_dir}: no {name}, which holds the projector of this "
                          "layout")
  top: TensorSource = CheckpointReader(layout.model_dir, files=[path])
  top.where = path
  if layout.kind == "lora":  # the projector-only path loads mm_projector.bin's names verbatim
    inverse = {old: new for new, old in original_non_lora_names(top.keys()).items()}
    top = RenamedSource(top, inverse.__getitem__)
  return OverlaySource([CheckpointReader(base_dir), top])


def _check_projector_present(source, key_map: list[KeySpec], layout: ReferenceLayout) -> None:
  """A projector file whose names the original would not find is refused, not half-loaded."""
  names = [n for s in key_map for n in s.hf_names()]
  missing = [n for n in names if n not in source.keys()]
  if missing and layout.kind != "merged":
    found = sorted(n for n in source.keys() if "mm_projector" in n)[:3]
    name = NON_LORA_FILE if layout.kind == "lora" else PROJECTOR_FILE
    raise CheckpointError(
        f"{os.path.join(layout.model_dir, name)}: no {', '.join(missing[:3])}: the original "
        "loads the projector by these names (load_state_dict(strict=False)) and would leave "
        f"it random; found {', '.join(found) or 'no mm_projector tensors'}")


def _llm_and_projector(layout: ReferenceLayout, cfg: ModelConfig, base_dir: Optional[str],
                       shapes: dict, ignored: "Ignored") -> dict:
  """The LLM's and the projector's tensors for each layout."""
  source = _original_state(layout, base_dir)
  key_map = llm_key_map(cfg.llm) + projector_key_map(cfg.projector)
  _check_projector_present(source, projector_key_map(cfg.projector), layout)
  used = {n for s in key_map for n in s.hf_names()}
  where_of = getattr(source, "where_of", lambda name: source.where)
  for name in source.keys():
    if name not in used and not llama.hf_ignored(name):
      ignored.add(where_of(name), name)
  return import_tensors(key_map, source, shapes, ignore=lambda n: n not in used)


def _llm_lora(layout: ReferenceLayout, cfg: ModelConfig, shapes: dict,
              ignored: "Ignored") -> dict:
  """The LLM adapter of `adapter_model`; its ViT tensors are left out, as the original's
  loading leaves them (its tower is not loaded yet when PEFT applies the adapter, and their
  names fit no module then)."""
  key_map = prefixed(adapters.lora_key_map(llama.hf_key_map(cfg.llm), cfg.llm_lora.targets),
                   ours_prefix="llm/")
  reader = adapters.adapter_reader(layout.model_dir)
  used = {n for s in key_map for n in s.hf_names()}
  for name in reader.keys():
    if name not in used:
      ignored.add(reader.where, name)
  adapters.check_ranks(reader, [n for n in reader.keys() if n in used], cfg.llm_lora,
                       os.path.join(layout.model_dir, adapters.CONFIG_NAME))
  return import_tensors(key_map, reader, shapes, ignore=lambda n: n not in used)


def _vit_lora(directory: str, layout: ReferenceLayout, cfg: ModelConfig, shapes: dict) -> dict:
  """The `lora_pt` ViT-LoRA; names of either CLIP module tree (transformers 4's `vision_model`
  level or 5's flat one, under any wrapper) map to the same tensors."""
  base = vision.hf_key_map(cfg.vision)
  key_map = prefixed(adapters.lora_key_map(base, cfg.vit_lora.targets, hf_prefix=VIT_LORA_PREFIX),
                   ours_prefix="vision/")
  reader = RenamedSource(adapters.adapter_reader(directory), canonical_vit_lora_name)
  adapters.check_ranks(reader, list(reader.keys()), cfg.vit_lora,
                       os.path.join(directory, adapters.CONFIG_NAME))
  return import_tensors(key_map, reader, shapes)


class Ignored:
  """Tensors the original does not load, by file, summarised for one line of output."""

  def __init__(self) -> None:
    self.by_file: dict[str, list[str]] = {}

  def add(self, where: str, name: str) -> None:
    self.by_file.setdefault(where, []).append(name)

  def line(self) -> Optional[str]:
    if not self.by_file:
      return None
    parts = []
    for where, names in self.by_file.items():
      patterns = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
      shown = ", ".join(patterns[:4]) + (", ..." if len(patterns) > 4 else "")
      parts.append(f"{len(names)} of {where} ({shown})")
    return "ignored, as the original does: " + "; ".join(parts)


def _layout_notes(layout: ReferenceLayout, cfg: ModelConfig, base_dir: Optional[str]) -> list:
  notes = []
  path = original_loading_path(layout.model_dir, with_base=bool(base_dir))
  if path != layout.kind:
    notes.append(f"the original would not load {layout.model_dir} as this {layout.kind} layout: "
                 f"by its directory name it takes its {path} path (it needs 'llava' in the name, "
                 "and 'lora' for a LoRA checkpoint, none for a stage-1 one); rename it for the "
                 "original")
  p = cfg.projector
  if p.type == "cluster" and (p.num_prototypes, p.num_iterations) != (REFERENCE_PROTOTYPES,
                                                                      REFERENCE_ITERATIONS):
    notes.append(f"the original always builds the prototype extractor with "
                 f"{REFERENCE_PROTOTYPES} prototypes and {REFERENCE_ITERATIONS} iterations; "
                 f"--config gives {p.num_prototypes} and {p.num_iterations}")
  if layout.vit_lora_dir:
    notes.append(f"ViT-LoRA from {layout.vit_lora_dir} (the original's lora_pt)")
  else:
    notes.append(f"no ViT-LoRA (none given, or --no-vit-lora): the tower is {layout.vision_dir} "
                 "as is (the original without lora_pt)")
  return notes


def import_reference(model_dir: str, base: Config, *, base_dir: Optional[str] = None,
                     vision_dir: Optional[str] = None, vit_lora_dir: Optional[str] = None,
                     use_vit_lora: bool = True):
  """(SQLLaVA, Config, notes) from a checkpoint of the original: the model its
  `load_pretrained_model(model_dir, base_dir, lora_pt=...)` builds, `lora_pt` being
  `vit_lora_dir`, else MODEL/Vit-lora, none with `use_vit_lora=False`. Adapters the
  checkpoint lacks are freshly initialised (B = 0, so they change nothing until trained)."""
  layout = detect_layout(model_dir, base_dir=base_dir, vision_dir=vision_dir,
                         vit_lora_dir=vit_lora_dir, use_vit_lora=use_vit_lora)
  if layout.kind != "merged":
    assert base_dir is not None  # detect_layout refuses these layouts without a base
    check_base_fits(base_dir, layout.hf, model_dir)
  cfg = layout_config(layout, base)
  make = lambda r: SQLLaVA(cfg.model, rngs=r)
  shapes = abstract_shapes(make)
  ignored = Ignored()
  loaded = _llm_and_projector(layout, cfg.model, base_dir, shapes, ignored)
  loaded.update(read_clip_vision(layout.vision_dir, cfg.model.vision, shapes, prefix="vision/"))
  if layout.kind == "lora":
    loaded.update(_llm_lora(layout, cfg.model, shapes, ignored))
  if layout.vit_lora_dir:
    loaded.update(_vit_lora(layout.vit_lora_dir, layout, cfg.model, shapes))
  notes = _layout_notes(layout, cfg.model, base_dir)
  if ignored.line():
    notes.append(ignored.line())
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
