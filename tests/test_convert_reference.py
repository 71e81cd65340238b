"""`convert import-sqllava` on checkpoints in the reference code's layouts, built here with
torch from the names its `train.py` and `builder.py` use: a merged model, a LoRA checkpoint
(`adapter_model` + `non_lora_trainables.bin` + `Vit-lora/`) on a base LLM, and a stage-1
`mm_projector.bin`. Each import is checked against transformers / peft / a hand-assembled
model on the same tensors."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from sqllava_jax.convert.hf import abstract_shapes, assemble, read_clip_vision, read_llama
from sqllava_jax.models.sqllava import SQLLaVA
from sqllava_jax.training.checkpoint import load_model
from tests.convert_helpers import (
  IMAGE_ID,
  assert_close,
  nchw,
  our_logits,
  our_vision_hidden,
  pixels_nhwc,
  run_cli,
  text_ids,
  write_yaml,
)
from tests.hf_fixtures import save_clip_vision, save_llama, tiny_llama_config, to_np

ATOL = 1e-4
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LLM_R, LLM_ALPHA, VIT_R, VIT_ALPHA = 4, 8, 2, 6


def lora_tensors(model, targets, rank, key, seed):
  """{PEFT name: tensor} with random A [r, in] and B [out, r] for every targeted Linear;
  `key(module name)` spells the wrapped module's name as the reference saved it."""
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
      out[f"{key(name)}.lora_A.weight"] = (
        torch.randn(rank, module.in_features, generator=gen) * 0.1)
      out[f"{key(name)}.lora_B.weight"] = (
        torch.randn(module.out_features, rank, generator=gen) * 0.1)
  return out


def projector_tensors(seed, width=32, out=64):
  gen = torch.Generator().manual_seed(seed)
  shapes = {"c": (width, width), "v": (width, width), "f": (width, width), "mlp.0": (out, width),
            "mlp.2": (out, out)}
  t = {}
  for name, shape in shapes.items():
    t[f"{name}.weight"] = torch.randn(*shape, generator=gen) * 0.2
    t[f"{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.1
  t.update({"sim_alpha": torch.full((1, 1, 1), 1.3), "sim_beta": torch.full((1, 1, 1), -0.2),
            "ln_1.weight": 1 + torch.randn(width, generator=gen) * 0.1,
            "ln_1.bias": torch.randn(width, generator=gen) * 0.1})
  return t


def adapter_dir(path, tensors, rank, alpha, targets, task):
  os.makedirs(path, exist_ok=True)
  cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05,
         "target_modules": list(targets), "bias": "none", "task_type": task,
         "fan_in_fan_out": False, "base_model_name_or_path": None}
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(cfg, f)
  torch.save(tensors, os.path.join(path, "adapter_model.bin"))


def reference_config(llama_dir, clip_dir):
  with open(os.path.join(llama_dir, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"],
             mm_projector_type="cluster", mm_hidden_size=32, mm_vision_select_layer=-2,
             mm_vision_select_feature="patch", mm_vision_tower=str(clip_dir),
             image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False)
  return cfg


def write_dir(path, cfg, **files):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  for name, tensors in files.items():
    torch.save(tensors, os.path.join(path, name.replace("_bin", ".bin")))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  root = tmp_path_factory.mktemp("reference")
  llama = save_llama(root / "vicuna", tiny_llama_config(), seed=21)
  clip = save_clip_vision(root / "clip", seed=22)
  cfg = reference_config(root / "vicuna", root / "clip")
  proj = projector_tensors(23)
  llm_lora = lora_tensors(llama, LLM_TARGETS, LLM_R, lambda n: f"base_model.model.{n}", 24)
  vit_lora = lora_tensors(clip, VIT_TARGETS, VIT_R,
                          lambda n: "base_model.model.vision_tower.vision_model." + n, 25)
  # A LoRA run: adapters + non-LoRA trainables; the ViT tensors in adapter_model are noise
  # the reference never reads (its ViT-LoRA comes from Vit-lora/).
  noise = lora_tensors(clip, VIT_TARGETS, VIT_R, lambda n: (
      "base_model.model.model.vision_tower.vision_tower.vision_model." + n), 26)
  write_dir(root / "sqllava-lora", cfg, non_lora_trainables_bin={
      f"base_model.model.model.mm_projector.{k}": v for k, v in proj.items()})
  adapter_dir(root / "sqllava-lora", {**llm_lora, **noise}, LLM_R, LLM_ALPHA, LLM_TARGETS,
              "CAUSAL_LM")
  adapter_dir(root / "sqllava-lora" / "Vit-lora", vit_lora, VIT_R, VIT_ALPHA, VIT_TARGETS, None)
  # Stage 1: the projector alone (+ the ViT-LoRA it trained).
  write_dir(root / "sqllava-pretrain", cfg,
            mm_projector_bin={f"model.mm_projector.{k}": v for k, v in proj.items()})
  adapter_dir(root / "sqllava-pretrain" / "Vit-lora", vit_lora, VIT_R, VIT_ALPHA, VIT_TARGETS, None)
  return dict(root=root, llama=llama, clip=clip, cfg=cfg, proj=proj, llm_lora=llm_lora,
              vit_lora=vit_lora, config=write_yaml(root / "tiny.yaml"))


def merged_llama(ref):
  """transformers' LLaMA with the LoRA folded in by peft itself (reference `merge_and_unload`)."""
  import peft  # Slow to import; only the LoRA layouts need it.
  base = transformers.LlamaForCausalLM.from_pretrained(ref["root"] / "vicuna",
                                                       attn_implementation="eager")
  merged = peft.PeftModel.from_pretrained(base, ref["root"] / "sqllava-lora").merge_and_unload()
  return merged.eval()


def merged_clip(ref):
  """CLIP with W + (alpha / r) B A folded into every targeted Linear, in torch."""
  model = transformers.CLIPVisionModel.from_pretrained(ref["root"] / "clip",
                                                       attn_implementation="eager")
  with torch.no_grad():
    for name, module in model.named_modules():
      key = f"base_model.model.vision_tower.vision_model.{name}.lora_A.weight"
      if key in ref["vit_lora"]:
        b = ref["vit_lora"][key.replace("lora_A", "lora_B")]
        module.weight += (VIT_ALPHA / VIT_R) * b @ ref["vit_lora"][key]
  return model.eval()


def import_ref(ref, name, *args):
  out = ref["root"] / f"imported-{name}"
  assert run_cli("import-sqllava", "--model", ref["root"] / name, *args, "--config",
                 ref["config"], "--out", out) == 0
  return load_model(str(out))


@pytest.fixture(scope="module")
def lora_import(ref):
  return import_ref(ref, "sqllava-lora", "--base", ref["root"] / "vicuna")


def test_lora_checkpoint_config(lora_import):
  _, cfg = lora_import
  assert (cfg.model.llm_lora.rank, cfg.model.llm_lora.alpha) == (LLM_R, LLM_ALPHA)
  assert (cfg.model.vit_lora.rank, cfg.model.vit_lora.alpha) == (VIT_R, VIT_ALPHA)
  assert cfg.model.llm_lora.dropout == 0.05 and cfg.model.llm_lora.targets == LLM_TARGETS
  assert cfg.model.projector.type == "cluster" and cfg.data.image_aspect_ratio == "pad"


def test_lora_checkpoint_matches_peft_and_torch(ref, lora_import):
  model, _ = lora_import
  ids = text_ids(2, 64, 128, seed=1)
  with torch.no_grad():
    want = to_np(merged_llama(ref)(torch.from_numpy(ids)).logits)
  diff = assert_close(our_logits(model, ids), want, ATOL, "LLM + LoRA vs peft")
  pixels = pixels_nhwc(2, 32, seed=2)
  with torch.no_grad():
    hidden = merged_clip(ref)(pixel_values=nchw(pixels), output_hidden_states=True).hidden_states
  ours = our_vision_hidden(model, pixels)
  diff_v = max(assert_close(ours[i], to_np(hidden[i]), ATOL, f"ViT + LoRA layer {i}")
               for i in range(ours.shape[0]))
  print(f"reference LoRA import: llm {diff:.2e}, vision {diff_v:.2e}")


def test_lora_checkpoint_equals_direct_assembly(ref, lora_import):
  """Same logits as a model assembled here from the same tensors (names mapped by hand)."""
  model, cfg = lora_import
  make = lambda r: SQLLaVA(cfg.model, rngs=r)
  shapes = abstract_shapes(make)
  loaded = read_llama(str(ref["root"] / "vicuna"), cfg.model.llm, shapes, prefix="llm/")
  loaded.update(read_clip_vision(str(ref["root"] / "clip"), cfg.model.vision, shapes,
                                 prefix="vision/"))
  p = {k: v.numpy() for k, v in ref["proj"].items()}
  for ours, theirs in (("c", "c"), ("v", "v"), ("f", "f"), ("mlp_in", "mlp.0"),
                       ("mlp_out", "mlp.2")):
    loaded[f"projector/{ours}/kernel"] = p[f"{theirs}.weight"].T
    loaded[f"projector/{ours}/bias"] = p[f"{theirs}.bias"]
  loaded.update({"projector/sim_alpha": p["sim_alpha"].reshape(()),
                 "projector/sim_beta": p["sim_beta"].reshape(()),
                 "projector/ln_1/scale": p["ln_1.weight"], "projector/ln_1/bias": p["ln_1.bias"]})
  loaded.update(stacked_lora(ref["llm_lora"], "base_model.model.model.layers", "llm", 2))
  loaded.update(stacked_lora(ref["vit_lora"],
                             "base_model.model.vision_tower.vision_model.encoder.layers",
                             "vision", 3))
  direct = assemble(make, loaded, seed=1)
  n = cfg.model.num_image_tokens
  ids = np.concatenate([[[1]], np.full((1, n), IMAGE_ID), text_ids(1, 24, 128, seed=3)], 1)
  pixels = pixels_nhwc(1, 32, seed=4)
  assert_close(our_logits(model, ids, pixels), our_logits(direct, ids, pixels), 1e-6,
               "imported vs direct")


def stacked_lora(tensors, prefix, ours, num_layers):
  """{our lora path: [L, ...] array} from per-layer PEFT tensors, transposed to [in, r]/[r, out]."""
  out = {}
  modules = {k[len(prefix) + 1:].split(".", 1)[1].rsplit(".lora_", 1)[0]
             for k in tensors if k.startswith(prefix)}
  for module in modules:
    path = module.replace("mlp.fc", "fc").replace(".", "/")
    for theirs, mine in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
      out[f"{ours}/layers/{path}/{mine}"] = np.stack([
          tensors[f"{prefix}.{i}.{module}.{theirs}.weight"].numpy().T for i in range(num_layers)])
  return out


def test_stage1_projector_on_a_base(ref):
  model, cfg = import_ref(ref, "sqllava-pretrain", "--base", ref["root"] / "vicuna")
  np.testing.assert_array_equal(np.asarray(model.projector.f.kernel[...]),
                                ref["proj"]["f.weight"].numpy().T)
  assert float(model.projector.sim_alpha[...]) == pytest.approx(1.3)
  np.testing.assert_array_equal(np.asarray(model.llm.layers.mlp.up_proj.kernel[...][1]),
                                to_np(ref["llama"].model.layers[1].mlp.up_proj.weight).T)
  # The LLM adapters are fresh (B = 0: no change until trained); the ViT-LoRA is imported.
  assert not np.asarray(model.llm.layers.self_attn.q_proj.lora_b[...]).any()
  key = "base_model.model.vision_tower.vision_model.encoder.layers.2.mlp.fc2.lora_B.weight"
  np.testing.assert_array_equal(np.asarray(model.vision.layers.fc2.lora_b[...][2]),
                                ref["vit_lora"][key].numpy().T)
  assert cfg.model.vit_lora.rank == VIT_R


def test_merged_checkpoint(ref, tmp_path):
  """A merged save (`model.*`, `lm_head`, `model.mm_projector.*`, the unread vision tower)."""
  merged = merged_llama(ref)
  state = {k: v.clone() for k, v in merged.state_dict().items()}
  state.update({f"model.mm_projector.{k}": v for k, v in ref["proj"].items()})
  state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v * 0
                for k, v in ref["clip"].state_dict().items()})
  ref["root"].joinpath("sqllava-merged").mkdir()
  write_dir(ref["root"] / "sqllava-merged", ref["cfg"], pytorch_model_bin=state)
  model, cfg = import_ref(ref, "sqllava-merged")
  ids = text_ids(1, 64, 128, seed=5)
  with torch.no_grad():
    want = to_np(merged(torch.from_numpy(ids)).logits)
  diff = assert_close(our_logits(model, ids), want, ATOL, "merged LLM vs transformers")
  # The tower comes from mm_vision_tower (as in the reference), not the zeroed copy.
  np.testing.assert_array_equal(np.asarray(model.vision.class_embedding[...]),
                                to_np(ref["clip"].embeddings.class_embedding))
  np.testing.assert_array_equal(np.asarray(model.projector.c.bias[...]), ref["proj"]["c.bias"])
  print(f"reference merged import: llm {diff:.2e}")
