"""The original SQ-LLaVA code's checkpoints and loading, written out for the conversion tests.

Checkpoints are built as the original's `train.py` builds and saves them, with transformers
and peft classes in the original's module tree (`LlavaLlamaForCausalLM`: a LLaMA whose
`model` also holds `mm_projector` and `vision_tower.vision_tower.vision_model`; PEFT around
the whole model first, then around the tower inside it), never with our code.
`original_load` is `load_pretrained_model` (builder.py) step by step, in fp32, and
`original_forward` its multimodal forward.
"""

import copy
import json
import os
from unittest import mock

import numpy as np
import torch
import transformers

from tests.convert_helpers import (
  IMAGE_ID,
  assert_close,
  load_safetensors_dir,
  nchw,
  original_clip_tree,
  our_logits_and_assignments,
  our_vision_hidden,
  peft_load_strict,
  pixels_nhwc,
  text_ids,
)
from tests.hf_fixtures import randomize_, to_np
from tests.test_projector_parity import torch_prototype_extractor

ATOL = 1e-5  # fp32 on both sides
LLM_R, LLM_ALPHA, VIT_R, VIT_ALPHA = 4, 8, 2, 6
# The original hard-codes Clustering(mm_hidden_size, hidden_size, 256, 2); a 64-pixel image
# in patches of 4 gives 256 tokens, one per prototype in the initial pooling.
PROTOTYPES, ITERATIONS, IMAGE, PATCH = 256, 2, 64, 4
TOKENS = (IMAGE // PATCH) ** 2
CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"
# adapter_config.json as PEFT 0.4.0 writes it (the original pins peft==0.4.0).
PEFT_040 = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "modules_to_save": None, "peft_type": "LORA",
            "revision": None}
# The LLaMA fields transformers 4.31 writes into config.json (no rope_theta, no head_dim).
LLAMA_431 = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "hidden_act",
             "max_position_embeddings", "initializer_range", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class Clustering(torch.nn.Module):
  """The original's cluster projector's parameters (`multimodal_projector/cluster.py`: its
  `mlp` is Linear, QuickGELU, Linear); its forward is test_projector_parity's PyTorch one."""

  def __init__(self, d, h):
    super().__init__()
    self.sim_alpha = torch.nn.Parameter(torch.ones(1, 1, 1))
    self.sim_beta = torch.nn.Parameter(torch.zeros(1, 1, 1))
    self.c, self.v, self.f = (torch.nn.Linear(d, d) for _ in range(3))
    self.ln_1 = torch.nn.LayerNorm(d)
    self.mlp = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Identity(),  # QuickGELU
                                   torch.nn.Linear(h, h))

  def forward(self, x):  # [B, L, D] -> [B, L, H]
    return torch_prototype_extractor(x, dict(self.state_dict()), PROTOTYPES, ITERATIONS)


# Prototypes after the extractor's soft iterations are nearly equal (for any weights: the
# softmax over N sees cosines of unit vectors against channel-normalised values, ~1/sqrt(L)),
# so the best prototype of a token often wins by 1e-6 or less and float noise decides. Where
# the reference's best beats ours by less than NOISE, either is the reference's answer: the
# reference is then run with ours there, and must agree with ours everywhere else.
NOISE = 1e-5


def projector_with_ties(projector, x, ours):
  """(output [B, L, H], s [B, N, L] before the argmax) of the torch forward, taking `ours`
  (int[B, L]) at tokens whose reference scores say ours is within NOISE of its best; fails
  where ours is not (a real difference, whatever the margin)."""
  caught, sigmoid, one_hot = [], torch.sigmoid, torch.nn.functional.one_hot

  def tie_break(best, n):
    s = caught[0]                                                  # [B, N, L]
    ours_t = torch.as_tensor(np.asarray(ours), dtype=torch.long)
    mine = s.gather(1, ours_t[:, None]).squeeze(1)                 # [B, L]
    gap = (s.max(dim=1).values - mine).numpy()
    assert (gap <= NOISE).all(), (
        f"{np.sum(gap > NOISE)} tokens assigned to a prototype the reference scores "
        f"{gap.max():.1e} below its best (its margins: clear there)")
    return one_hot(ours_t, n)

  with mock.patch.object(torch, "sigmoid", lambda t: caught.append(sigmoid(t)) or caught[-1]), \
       mock.patch.object(torch.nn.functional, "one_hot", tie_break):
    out = projector(x)
  return out, caught[0]


def find_all_linear_names(model, prevent=()):
  """train.py's LoRA targets: the last name of every Linear outside `prevent`, not lm_head."""
  names = {n.split(".")[-1] for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not any(k in n for k in prevent)}
  return sorted(names - {"lm_head"})


def llama_431_config(llama_cfg):
  hf = llama_cfg.to_dict()
  return {k: hf[k] for k in LLAMA_431}


def original_config(llama_cfg, tower, **mm):
  """config.json as train.py saves it (`model.config.save_pretrained`)."""
  cfg = {**llama_431_config(llama_cfg), "model_type": "llava", "pretraining_tp": 1,
         "architectures": ["LlavaLlamaForCausalLM"], "torch_dtype": "bfloat16",
         "transformers_version": "4.31.0", "rope_scaling": None, "use_cache": True,
         "mm_vision_tower": str(tower), "mm_projector_type": "cluster", "num_latents": 256,
         "mm_hidden_size": 32, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
         "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "mm_use_im_start_end": False,
         "mm_use_im_patch_token": False, "mm_projector_lr": 2e-5, "vision_tower_lr": 2e-5,
         "qav_loss": False, "use_mm_proj": True, "freeze_mm_mlp_adapter": False}
  cfg.update(mm)
  return cfg


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def save_peft(directory, named_params, rank, alpha, targets, task, dropout):
  """A PEFT 0.4.0 save: the `lora_` parameters, adapter name dropped, as bf16 pickles."""
  tensors = {k.replace(".default", ""): v.detach().to(torch.bfloat16).clone()
             for k, v in named_params if "lora_" in k}
  os.makedirs(directory, exist_ok=True)
  torch.save(tensors, os.path.join(directory, "adapter_model.bin"))
  write_json(os.path.join(directory, "adapter_config.json"),
             {**PEFT_040, "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": targets, "task_type": task})
  return tensors


def randomize_lora_(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def train_original(llama_cfg, base_state, clip, *, llm_lora: bool, seed: int):
  """What train.py holds after training: the LLaVA tree on the base, PEFT around it (stage 2),
  the tower and the cluster projector added, then the ViT-LoRA injected into that tower."""
  import peft  # Slow to import; only the LoRA layouts need it.
  model = transformers.LlamaForCausalLM(llama_cfg)
  model.model.mm_projector = Clustering(32, llama_cfg.hidden_size)
  model.load_state_dict(base_state, strict=False)
  if llm_lora:
    targets = find_all_linear_names(model, ("mm_projector", "vision_tower"))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LLM_R, lora_alpha=LLM_ALPHA, target_modules=targets, lora_dropout=0.05,
        bias="none", task_type="CAUSAL_LM"))
  inner = model.base_model.model if llm_lora else model
  inner.model.vision_tower = original_clip_tree(copy.deepcopy(clip).requires_grad_(False))
  randomize_(inner.model.mm_projector, seed)
  with torch.no_grad():
    inner.model.mm_projector.sim_alpha.fill_(1.3)
    inner.model.mm_projector.sim_beta.fill_(-0.2)
  for p in inner.model.mm_projector.parameters():
    p.requires_grad = True
  tower = peft.get_peft_model(inner.model.vision_tower, peft.LoraConfig(
      r=VIT_R, lora_alpha=VIT_ALPHA, target_modules=find_all_linear_names(
          inner.model.vision_tower), lora_dropout=0.2, bias="none"))
  randomize_lora_(model, seed + 1)
  return model, tower


def save_stage2(directory, model, tower, cfg):
  """train.py's LoRA branch: config, adapter (every `lora_` parameter of the whole model),
  non-LoRA trainables (the projector), and the tower's own PEFT save in Vit-lora/."""
  write_json(os.path.join(directory, "config.json"), cfg)
  targets = sorted(model.peft_config["default"].target_modules)
  adapter = save_peft(directory, model.named_parameters(), LLM_R, LLM_ALPHA, targets,
                      "CAUSAL_LM", 0.05)
  non_lora = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()
              if "lora_" not in k and v.requires_grad}
  torch.save(non_lora, os.path.join(directory, "non_lora_trainables.bin"))
  vit = save_peft(os.path.join(directory, "Vit-lora"), tower.named_parameters(), VIT_R,
                  VIT_ALPHA, sorted(tower.peft_config["default"].target_modules), None, 0.2)
  return adapter, non_lora, vit


def save_stage1(directory, model, tower, cfg):
  """Stage 1 (tune_mm_mlp_adapter): mm_projector.bin, config, Vit-lora/."""
  write_json(os.path.join(directory, "config.json"), {**cfg, "tune_mm_mlp_adapter": True})
  torch.save({k: v.detach().clone() for k, v in model.named_parameters() if "mm_projector" in k},
             os.path.join(directory, "mm_projector.bin"))
  save_peft(os.path.join(directory, "Vit-lora"), tower.named_parameters(), VIT_R, VIT_ALPHA,
            sorted(tower.peft_config["default"].target_modules), None, 0.2)


def save_sharded_bin(directory, state, config):
  """fp16 pytorch_model-0000N-of-00002.bin shards with an index (transformers 4.31's save)."""
  names = sorted(state)
  halves = {"pytorch_model-00001-of-00002.bin": names[::2],
            "pytorch_model-00002-of-00002.bin": names[1::2]}
  os.makedirs(directory, exist_ok=True)
  for file, part in halves.items():
    torch.save({n: state[n].to(torch.float16).clone() for n in part},
               os.path.join(directory, file))
  write_json(os.path.join(directory, "pytorch_model.bin.index.json"),
             {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}})
  write_json(os.path.join(directory, "config.json"), config)


def load_weights_dir(directory):
  """Every tensor of a checkpoint directory's .bin or .safetensors files (from_pretrained's)."""
  state = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith(".bin"):
      state.update(torch.load(os.path.join(directory, f), weights_only=True))
  if not state:
    state = {k: torch.from_numpy(v) for k, v in load_safetensors_dir(directory).items()}
  return state


def strip_non_lora(state):
  """builder.py: drop `base_model.`, then `model.` when any name starts `model.model.`."""
  state = {(k[11:] if k.startswith("base_model.") else k): v for k, v in state.items()}
  if any(k.startswith("model.model.") for k in state):
    state = {(k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
  return state


def original_load(model_dir, base_dir=None, lora_pt=None):
  """builder.py's load_pretrained_model in fp32: (LLM with projector, tower, config)."""
  import peft  # Slow to import; only the LoRA layouts need it.
  name = os.path.basename(str(model_dir).rstrip("/")).lower()
  assert "llava" in name, "the original loads a plain LM for this name"
  with open(os.path.join(model_dir, "config.json")) as f:
    cfg = json.load(f)
  llama_cfg = transformers.LlamaConfig(**{k: cfg[k] for k in LLAMA_431},
                                       attn_implementation="eager")
  model = transformers.LlamaForCausalLM(llama_cfg)
  model.model.mm_projector = Clustering(cfg["mm_hidden_size"], cfg["hidden_size"])
  llm_keys = {k for k in model.state_dict() if "mm_projector" not in k}
  missing, _ = model.load_state_dict(load_weights_dir(base_dir or model_dir), strict=False)
  assert not llm_keys & set(missing), "the base must hold the whole LLM"
  if "lora" in name and base_dir:
    state = torch.load(os.path.join(model_dir, "non_lora_trainables.bin"), weights_only=True)
    model.load_state_dict(strip_non_lora(state), strict=False)
    model = peft.PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
  elif base_dir:  # the original also casts these to fp16 (it runs all in fp16); fp32 here
    state = torch.load(os.path.join(model_dir, "mm_projector.bin"), weights_only=True)
    model.load_state_dict(state, strict=False)
  tower = original_clip_tree(transformers.CLIPVisionModel.from_pretrained(
      cfg["mm_vision_tower"], attn_implementation="eager"))
  if lora_pt:
    tower = peft_load_strict(tower, str(lora_pt))
  return model.float().eval(), tower.eval(), cfg


def multimodal_ids(seed):
  """[1, 1 + TOKENS + 24]: BOS, the image's positions, text."""
  return np.concatenate([[[1]], np.full((1, TOKENS), IMAGE_ID), text_ids(1, 24, 128, seed)], 1)


def original_forward(model, tower, cfg, ids, pixels, assignments):
  """The original's multimodal forward (encode_images, then the image features in place of
  the image positions), ties broken as `assignments` (see NOISE): every hidden state, the
  projector's input and output, logits."""
  with torch.no_grad():
    hidden = tower(nchw(pixels))
    features = hidden[cfg["mm_vision_select_layer"]][:, 1:]           # patch tokens
    projected, _ = projector_with_ties(model.model.mm_projector, features, assignments)
    ids_t = torch.from_numpy(ids)
    embeds = model.model.embed_tokens(ids_t.clamp(min=0))
    embeds[ids_t == IMAGE_ID] = projected.reshape(-1, projected.shape[-1])
    logits = model(inputs_embeds=embeds).logits
  return dict(hidden=hidden, features=features, logits=to_np(logits))


def compare_with_original(model, reference, what, seed=0):
  """Our model vs the original's on one image + text: tower, projector, logits (1e-5)."""
  model_t, tower, cfg = reference
  pixels, ids = pixels_nhwc(1, IMAGE, seed), multimodal_ids(seed)
  logits, assignments = our_logits_and_assignments(model, ids, pixels)
  want = original_forward(model_t, tower, cfg, ids, pixels, assignments)
  ours = our_vision_hidden(model, pixels)
  diff_v = max(assert_close(ours[i], to_np(want["hidden"][i]), ATOL, f"{what}: tower layer {i}")
               for i in range(ours.shape[0]))
  # The projector alone, on the reference's own tower features.
  out, aux = model.projector(to_np(want["features"]))
  with torch.no_grad():
    projected, sims = projector_with_ties(model_t.model.mm_projector, want["features"],
                                          aux["assignments"])
  diff_p = assert_close(out, to_np(projected), ATOL, f"{what}: projector")
  assert len(np.unique(np.asarray(aux["assignments"]))) > 8, "weak input: few prototypes used"
  diff_l = assert_close(logits, want["logits"], ATOL, f"{what}: logits")
  print(f"{what}: tower {diff_v:.1e}, projector {diff_p:.1e}, logits {diff_l:.1e}")


