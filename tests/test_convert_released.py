"""The released SQ-LLaVA layouts in and out, against the original code's loading.

The authors' layouts are rebuilt by `convert_original` as the original's train.py writes
them: the stage-2 LoRA save (`adapter_model.bin` with the LLM's and the tower's adapters,
`non_lora_trainables.bin`, `Vit-lora/`, bf16 pickles) on a ShareGPT4V-style base whose shards
also carry an MLP projector and a tower, the stage-1 save (`mm_projector.bin`, `Vit-lora/`),
and merge_lora_weights.py's fp16 shards. Imports and exports are compared with the original's
`load_pretrained_model` written out there: tower features, projector outputs and logits at
1e-5 (fp32).
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
import transformers

from sqllava_jax.training.checkpoint import load_model
from tests.convert_helpers import fails, original_clip_tree, run_cli
from tests.convert_original import (
  CLIP_HUB_ID,
  IMAGE,
  ITERATIONS,
  LLM_R,
  PATCH,
  PROTOTYPES,
  VIT_ALPHA,
  VIT_R,
  Clustering,
  compare_with_original,
  find_all_linear_names,
  llama_431_config,
  original_config,
  original_load,
  save_sharded_bin,
  save_stage1,
  save_stage2,
  train_original,
)
from tests.hf_fixtures import (
  randomize_,
  save_clip_vision,
  tiny_clip_vision_config,
  tiny_llama_config,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """The authors' layouts: base, tower, stage-1 and stage-2 saves, a LoRA save without
  Vit-lora/, and merge_lora_weights.py's output."""
  root = tmp_path_factory.mktemp("released")
  llama_cfg = tiny_llama_config(vocab_size=128)
  base = randomize_(transformers.LlamaForCausalLM(llama_cfg), 41)
  clip_cfg = tiny_clip_vision_config(image_size=IMAGE, patch_size=PATCH)
  clip = save_clip_vision(root / "clip", clip_cfg, seed=42)
  # ShareGPT4V's base: a LLaVA save whose shards also hold its MLP projector and a tower
  # (a different one here: the original never reads it).
  state = dict(base.state_dict())
  state.update({"model.mm_projector.0.weight": torch.randn(64, 32),
                "model.mm_projector.0.bias": torch.randn(64),
                "model.mm_projector.2.weight": torch.randn(64, 64),
                "model.mm_projector.2.bias": torch.randn(64)})
  other = randomize_(transformers.CLIPVisionModel(clip_cfg), 43)
  state.update({f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
                for k, v in other.state_dict().items()})
  save_sharded_bin(root / "sharegpt4v-base", state,
                   {**llama_431_config(llama_cfg), "model_type": "share4v",
                    "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": CLIP_HUB_ID})
  cfg = original_config(llama_cfg, root / "clip")
  model, tower = train_original(llama_cfg, base.state_dict(), clip, llm_lora=True, seed=44)
  saved = save_stage2(root / "sqllava-lora-7b", model, tower, cfg)
  shutil.copytree(root / "sqllava-lora-7b", root / "sqllava-lora-novit",
                  ignore=shutil.ignore_patterns("Vit-lora"))
  # Stage 1 on the same base, with its own projector and ViT-LoRA.
  model1, tower1 = train_original(llama_cfg, base.state_dict(), clip, llm_lora=False, seed=45)
  save_stage1(root / "sqllava-pretrain", model1, tower1, cfg)
  # merge_lora_weights.py: load_pretrained_model (no lora_pt) then save_pretrained, fp16.
  merged, merged_tower, _ = original_load(root / "sqllava-lora-7b", root / "sharegpt4v-base")
  state = dict(merged.state_dict())
  state.update({f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
                for k, v in clip.state_dict().items()})
  save_sharded_bin(root / "sqllava-7b-merged", state, cfg)
  config = root / "tiny.yaml"
  config.write_text(json.dumps({"model": {"projector": {
      "type": "cluster", "num_prototypes": PROTOTYPES, "num_iterations": ITERATIONS}}}))
  return dict(root=root, adapter=saved[0], non_lora=saved[1], vit=saved[2], config=config)


def import_cli(released, name, out, *args):
  """`convert import-sqllava` of `name` (a directory of `released`, or a path)."""
  assert run_cli("import-sqllava", "--model", released["root"] / name, *args, "--config",
                 released["config"], "--out", out) == 0
  return load_model(str(out))


@pytest.fixture(scope="module")
def stage1_import(released):
  root = released["root"]
  return import_cli(released, "sqllava-pretrain", root / "imported-stage1", "--base",
                    root / "sharegpt4v-base")


@pytest.fixture(scope="module")
def lora_import(released):
  root = released["root"]
  return import_cli(released, "sqllava-lora-7b", root / "imported-lora", "--base",
                    root / "sharegpt4v-base")


def test_layouts_are_the_originals(released):
  """The saves above really carry the names the facts list (else nothing here tests them)."""
  layer = "encoder.layers.1.self_attn.q_proj.lora_A.weight"
  assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in released["adapter"]
  assert f"base_model.model.model.vision_tower.vision_tower.vision_model.{layer}" in \
      released["adapter"]
  assert f"base_model.model.vision_tower.vision_model.{layer}" in released["vit"]
  assert sorted(released["non_lora"]) == sorted(
      f"base_model.model.model.mm_projector.{n}" for n in (
          "sim_alpha", "sim_beta", *(f"{m}.{p}" for m in ("c", "v", "f", "ln_1", "mlp.0", "mlp.2")
                                     for p in ("weight", "bias"))))
  assert released["adapter"][f"base_model.model.model.vision_tower.vision_tower.vision_model."
                             f"{layer}"].dtype == torch.bfloat16


def test_released_lora_on_its_base(released, lora_import):
  """sqllava-lora on the ShareGPT4V base, Vit-lora/ as lora_pt: the original's model."""
  root = released["root"]
  model, cfg = lora_import
  assert (cfg.model.llm_lora.rank, cfg.model.vit_lora.rank) == (LLM_R, VIT_R)
  reference = original_load(root / "sqllava-lora-7b", root / "sharegpt4v-base",
                            lora_pt=root / "sqllava-lora-7b" / "Vit-lora")
  compare_with_original(model, reference, "released LoRA")


def test_import_lists_what_the_original_ignores_in_one_line(released, tmp_path, capsys):
  root = released["root"]
  capsys.readouterr()
  import_cli(released, "sqllava-lora-novit", tmp_path / "out", "--base", root / "sharegpt4v-base")
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "ignored, as the original does" in line]
  assert len(lines) == 1, err
  line = lines[0]
  with open(root / "sharegpt4v-base" / "pytorch_model.bin.index.json") as f:
    unread = [n for n in json.load(f)["weight_map"] if n.startswith(("model.mm_projector.",
                                                                     "model.vision_tower."))]
  # The base's MLP projector (its names fit no cluster parameter) and its tower.
  assert f"{len(unread)} of {root / 'sharegpt4v-base'} (" in line and len(unread) > 4
  assert "model.mm_projector.N.weight" in line
  assert "model.vision_tower.vision_tower.vision_model.embeddings" in line
  # Every ViT tensor of the adapter (3 layers x 6 modules x A, B), none of the LLM's.
  assert f"36 of {root / 'sqllava-lora-novit' / 'adapter_model.bin'}" in line
  assert "no ViT-LoRA" in err


def test_vit_lora_inside_the_adapter_is_never_applied(released, tmp_path):
  """Without Vit-lora/ the tower is the plain mm_vision_tower, as in the original, although
  adapter_model.bin holds trained ViT tensors; Vit-lora/ (lora_pt) is the one that counts."""
  root = released["root"]
  model, cfg = import_cli(released, "sqllava-lora-novit", tmp_path / "novit", "--base",
                          root / "sharegpt4v-base")
  assert not np.asarray(model.vision.layers.self_attn.q_proj.lora_b[...]).any()
  compare_with_original(model, original_load(root / "sqllava-lora-novit",
                                             root / "sharegpt4v-base"), "LoRA without Vit-lora")
  # --no-vit-lora: the same with MODEL/Vit-lora present (the original without lora_pt).
  model, _ = import_cli(released, "sqllava-lora-7b", tmp_path / "none", "--base",
                        root / "sharegpt4v-base", "--no-vit-lora")
  compare_with_original(model, original_load(root / "sqllava-lora-7b", root / "sharegpt4v-base"),
                        "--no-vit-lora")
  # An explicit --vit-lora (the stage-1 one, other values) replaces MODEL/Vit-lora.
  model, _ = import_cli(released, "sqllava-lora-7b", tmp_path / "explicit", "--base",
                        root / "sharegpt4v-base", "--vit-lora",
                        root / "sqllava-pretrain" / "Vit-lora")
  reference = original_load(root / "sqllava-lora-7b", root / "sharegpt4v-base",
                            lora_pt=root / "sqllava-pretrain" / "Vit-lora")
  compare_with_original(model, reference, "explicit --vit-lora")


def test_stage1_projector_on_a_base(released, stage1_import):
  root = released["root"]
  model, _ = stage1_import
  reference = original_load(root / "sqllava-pretrain", root / "sharegpt4v-base",
                            lora_pt=root / "sqllava-pretrain" / "Vit-lora")
  compare_with_original(model, reference, "stage 1")
  assert not np.asarray(model.llm.layers.self_attn.q_proj.lora_b[...]).any()


def test_non_lora_trainables_replace_what_they_name(released, tmp_path):
  """Whatever non_lora_trainables.bin names is laid over the base as the original's
  load_state_dict(strict=False) lays it (here also a trained embedding table)."""
  root = released["root"]
  gen = torch.Generator().manual_seed(46)
  embed = torch.randn(128, 64, generator=gen).to(torch.bfloat16)
  model_dir = edited_copy(root / "sqllava-lora-novit", tmp_path / "sqllava-lora-embed", {
      "non_lora_trainables.bin": lambda t: {
          **t, "base_model.model.model.embed_tokens.weight": embed}})
  model, _ = import_cli(released, model_dir, tmp_path / "out", "--base", root / "sharegpt4v-base")
  np.testing.assert_array_equal(np.asarray(model.llm.embed_tokens.embedding[...]),
                                embed.float().numpy())
  compare_with_original(model, original_load(model_dir, root / "sharegpt4v-base"),
                        "trained embeddings")


def test_merged_fp16_shards(released, tmp_path):
  """merge_lora_weights.py's output: fp16 .bin shards with the (unread) tower inside."""
  root = released["root"]
  model, _ = import_cli(released, "sqllava-7b-merged", tmp_path / "out")
  compare_with_original(model, original_load(root / "sqllava-7b-merged"), "merged")


# The original's names, written out: what its loading looks up (transformers 4.31 tree).
VIT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")
LLM_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VIT_LORA_NAMES = {f"base_model.model.vision_tower.vision_model.encoder.layers.{i}.{m}.lora_{x}"
                  ".weight" for i in range(3) for m in VIT_MODULES for x in "AB"}
ADAPTER_NAMES = {f"base_model.model.model.layers.{i}.{m}.lora_{x}.weight"
                 for i in range(2) for m in LLM_MODULES for x in "AB"} | {
    n.replace("base_model.model.vision_tower.", "base_model.model.model.vision_tower."
              "vision_tower.") for n in VIT_LORA_NAMES}
PROJECTOR_NAMES = {f"model.mm_projector.{n}" for n in (
    "sim_alpha", "sim_beta", *(f"{m}.{p}" for m in ("c", "v", "f", "ln_1", "mlp.0", "mlp.2")
                               for p in ("weight", "bias")))}


def export_cli(ckpt, out, fmt, *extra):
  assert run_cli("export-hf", "--ckpt", ckpt, "--out", out, "--format", fmt, "--dtype",
                 "float32", "--no-progress", *extra) == 0
  return pathlib.Path(out)


def bin_keys(path):
  return set(torch.load(path, weights_only=True))  # plain tensors only, or this raises


@pytest.fixture(scope="module")
def lora_export(released, lora_import):
  root = released["root"]
  return export_cli(root / "imported-lora", root / "exports" / "sqllava-lora-out", "sqllava-lora",
                    "--vision-tower", root / "clip")


def test_lora_export_loads_through_the_originals_lora_path(released, lora_import, lora_export):
  root = released["root"]
  model, _ = lora_import
  reference = original_load(lora_export, root / "sharegpt4v-base",
                            lora_pt=lora_export / "Vit-lora")
  compare_with_original(model, reference, "sqllava-lora export")
  assert bin_keys(lora_export / "adapter_model.bin") == ADAPTER_NAMES
  assert bin_keys(lora_export / "non_lora_trainables.bin") == {
      "base_model.model." + n for n in PROJECTOR_NAMES}
  assert bin_keys(lora_export / "Vit-lora" / "adapter_model.bin") == VIT_LORA_NAMES
  with open(lora_export / "config.json") as f:
    cfg = json.load(f)
  assert cfg["mm_vision_tower"] == str(root / "clip") and "rope_theta" not in cfg
  for key in ("mm_projector_type", "num_latents", "mm_hidden_size", "mm_vision_select_layer",
              "mm_vision_select_feature", "image_aspect_ratio", "tune_mm_mlp_adapter",
              "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr",
              "vision_tower_lr", "qav_loss"):
    assert key in cfg, key
  with open(lora_export / "Vit-lora" / "adapter_config.json") as f:
    vit = json.load(f)
  assert vit["task_type"] is None and vit["r"] == VIT_R
  assert set(vit) == set(json.load(open(lora_export / "adapter_config.json")))  # 0.4.0's fields


@pytest.mark.parametrize("version", ["4.31.0", "5.24.0"])
def test_exported_names_do_not_depend_on_transformers(released, lora_import, tmp_path,
                                                      monkeypatch, version):
  """transformers 4 and 5 name CLIP's modules differently; the export is pinned to 4.31's."""
  monkeypatch.setattr(transformers, "__version__", version)
  root = released["root"]
  out = export_cli(root / "imported-lora", tmp_path / "sqllava-lora", "sqllava-lora",
                   "--vision-tower", CLIP_HUB_ID)
  assert bin_keys(out / "Vit-lora" / "adapter_model.bin") == VIT_LORA_NAMES
  assert bin_keys(out / "adapter_model.bin") == ADAPTER_NAMES
  peft_out = export_cli(root / "imported-lora", tmp_path / "peft", "peft")
  assert bin_keys(peft_out / "vision" / "adapter_model.bin") == VIT_LORA_NAMES


@pytest.mark.parametrize("tree", ["transformers5", "bare4", "bare5"])
def test_vit_lora_of_either_clip_naming_imports_the_same(released, stage1_import, tmp_path, tree):
  """A Vit-lora/ saved under transformers 5's CLIP tree (no `vision_model` level), or around
  a bare CLIPVisionModel of either version, imports as the original's names do."""
  root = released["root"]
  rename = {"transformers5": lambda n: n.replace("vision_tower.vision_model.", "vision_tower."),
            "bare4": lambda n: n.replace("vision_tower.vision_model.", "vision_model."),
            "bare5": lambda n: n.replace("vision_tower.vision_model.", "")}[tree]
  src = root / "sqllava-pretrain" / "Vit-lora"
  shutil.copytree(src, tmp_path / "vit")
  tensors = torch.load(src / "adapter_model.bin", weights_only=True)
  assert all(rename(n) != n for n in tensors)
  torch.save({rename(n): v for n, v in tensors.items()}, tmp_path / "vit" / "adapter_model.bin")
  want, _ = stage1_import
  got, _ = import_cli(released, "sqllava-pretrain", tmp_path / "out", "--base",
                      root / "sharegpt4v-base", "--vit-lora", tmp_path / "vit")
  for name in ("q_proj", "out_proj"):
    for ab in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(
          np.asarray(getattr(got.vision.layers.self_attn, name).__dict__[ab][...]),
          np.asarray(getattr(want.vision.layers.self_attn, name).__dict__[ab][...]))
  assert np.asarray(want.vision.layers.fc2.lora_b[...]).any()
  np.testing.assert_array_equal(np.asarray(got.vision.layers.fc2.lora_b[...]),
                                np.asarray(want.vision.layers.fc2.lora_b[...]))


def test_stage1_export_starts_the_originals_eval_and_stage2(released, stage1_import, tmp_path):
  import peft  # Slow to import; only the LoRA layouts need it.
  root = released["root"]
  model, _ = stage1_import
  out = export_cli(root / "imported-stage1", tmp_path / "sqllava-stage1", "sqllava-stage1",
                   "--vision-tower", root / "clip")
  # The eval scripts: load_pretrained_model's projector-only path, Vit-lora/ as lora_pt.
  compare_with_original(model, original_load(out, root / "sharegpt4v-base",
                                             lora_pt=out / "Vit-lora"), "sqllava-stage1 export")
  assert bin_keys(out / "mm_projector.bin") == PROJECTOR_NAMES
  assert json.load(open(out / "config.json"))["tune_mm_mlp_adapter"] is True
  # Stage 2: --pretrain_mm_mlp_adapter (initialize_vision_modules: names after
  # `mm_projector.`, strict load) and --pretrain_lora (torch.load + set_peft_model_state_dict).
  weights = torch.load(out / "mm_projector.bin", weights_only=True)
  projector = Clustering(32, 64)
  projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in weights.items()
                             if "mm_projector" in k})
  source = torch.load(root / "sqllava-pretrain" / "mm_projector.bin", weights_only=True)
  for name, value in projector.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), source[f"model.mm_projector.{name}"].numpy())
  tower = original_clip_tree(transformers.CLIPVisionModel.from_pretrained(root / "clip"))
  tower = peft.get_peft_model(tower, peft.LoraConfig(
      r=VIT_R, lora_alpha=VIT_ALPHA, target_modules=find_all_linear_names(tower), lora_dropout=0.2))
  result = peft.set_peft_model_state_dict(
      tower, torch.load(out / "Vit-lora" / "adapter_model.bin", weights_only=True))
  assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
  vit = torch.load(root / "sqllava-pretrain" / "Vit-lora" / "adapter_model.bin",
                   weights_only=True)
  got = {k.replace(".default", ""): v for k, v in tower.named_parameters() if "lora_" in k}
  assert set(got) == set(vit) == VIT_LORA_NAMES
  for name, value in vit.items():
    np.testing.assert_array_equal(got[name].detach().numpy(), value.float().numpy())


def test_mm_vision_tower_is_what_the_user_gave(released, lora_import, stage1_import, tmp_path,
                                               monkeypatch, capsys):
  root = released["root"]
  monkeypatch.chdir(tmp_path)
  shutil.copytree(root / "clip", tmp_path / "clip")
  ckpt = root / "imported-lora"
  merged = export_cli(ckpt, "exports/sqllava-merged", "sqllava")
  assert json.load(open(merged / "config.json"))["mm_vision_tower"] == \
      "exports/sqllava-merged/vision_tower"
  lora = export_cli(ckpt, "exports/sqllava-lora", "sqllava-lora", "--vision-tower", CLIP_HUB_ID)
  assert json.load(open(lora / "config.json"))["mm_vision_tower"] == CLIP_HUB_ID
  stage1 = export_cli(root / "imported-stage1", "exports/sqllava-stage1", "sqllava-stage1",
                      "--vision-tower", "clip")
  assert json.load(open(stage1 / "config.json"))["mm_vision_tower"] == "clip"
  # The original resolves a relative mm_vision_tower from where it runs: here.
  model, _ = lora_import
  compare_with_original(model, original_load(merged), "sqllava export, relative tower")
  err = fails(capsys, tmp_path / "exports" / "sqllava-lora2", "export-hf", "--ckpt", ckpt,
              "--format", "sqllava-lora", "--no-progress")
  assert "pass --vision-tower" in err
  capsys.readouterr()
  export_cli(ckpt, "exports/my-model", "sqllava-lora", "--vision-tower", CLIP_HUB_ID)
  err = capsys.readouterr().err
  assert "needs 'llava' in it, and 'lora' for sqllava-lora" in err and "language-model" in err


def test_stage1_export_refuses_a_trained_llm_lora(released, lora_import, tmp_path, capsys):
  err = fails(capsys, tmp_path / "sqllava-stage1", "export-hf", "--ckpt",
              released["root"] / "imported-lora", "--format", "sqllava-stage1",
              "--vision-tower", CLIP_HUB_ID, "--no-progress")
  assert "LLM LoRA is trained" in err and "sqllava-lora" in err


def edited_copy(src, dst, edits):
  """A copy of directory `src` with {relative file: edit} applied: a .json edit maps the
  parsed dict, a .bin edit the loaded tensors; None deletes the file."""
  shutil.copytree(src, dst)
  for name, edit in edits.items():
    path = dst / name
    if edit is None:
      os.remove(path)
    elif path.suffix == ".json":
      path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    else:
      torch.save(edit(torch.load(path, weights_only=True)), path)
  return dst


def test_bad_input_names_the_file_and_key(released, tmp_path, capsys):
  root = released["root"]
  base = root / "sharegpt4v-base"
  out = tmp_path / "out"

  def import_fails(model, *args):
    return fails(capsys, out, "import-sqllava", "--model", model, "--config",
                 released["config"], *args)

  wide = edited_copy(base, tmp_path / "wide-base",
                     {"config.json": lambda c: {**c, "hidden_size": 48}})
  err = import_fails(root / "sqllava-lora-novit", "--base", wide)
  assert f"{wide / 'config.json'}: hidden_size=48" in err and "another base" in err
  model = edited_copy(root / "sqllava-lora-novit", tmp_path / "sqllava-lora-a",
                      {"non_lora_trainables.bin": None})
  err = import_fails(model, "--base", base)
  assert "no non_lora_trainables.bin" in err
  model = edited_copy(root / "sqllava-lora-novit", tmp_path / "sqllava-lora-b",
                      {"adapter_config.json": lambda c: {**c, "r": LLM_R + 1}})
  err = import_fails(model, "--base", base)
  assert f"{model / 'adapter_model.bin'}: tensor base_model.model.model.layers." in err
  assert f"rank {LLM_R}, but {model / 'adapter_config.json'} says r={LLM_R + 1}" in err
  model = edited_copy(root / "sqllava-pretrain", tmp_path / "sqllava-pretrain-c",
                      {"Vit-lora/adapter_config.json": lambda c: {**c, "r": VIT_R + 2}})
  err = import_fails(model, "--base", base)
  assert "Vit-lora/adapter_model.bin: tensor base_model.model.vision_tower." in err
  assert f"says r={VIT_R + 2}" in err
  model = edited_copy(root / "sqllava-lora-novit", tmp_path / "sqllava-lora-d",
                      {"non_lora_trainables.bin": lambda t: {**t, "epoch": 3}})
  err = import_fails(model, "--base", base)
  assert f"{model / 'non_lora_trainables.bin'}: entry 'epoch' is a int, not a tensor" in err
  model = edited_copy(root / "sqllava-pretrain", tmp_path / "sqllava-pretrain-e", {
      "mm_projector.bin": lambda t: {"base_model.model." + k: v for k, v in t.items()}})
  err = import_fails(model, "--base", base)
  assert f"{model / 'mm_projector.bin'}: no model.mm_projector." in err
  assert "would leave it random" in err
  err = import_fails(root / "sqllava-lora-7b", "--base", base, "--vit-lora",
                     root / "sqllava-lora-7b")
  assert "is the LoRA checkpoint itself" in err
