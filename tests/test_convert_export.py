"""After (simulated) LoRA training, every export format computes in transformers / peft / a
PyTorch projector what our JAX model computes (fp32, <= 1e-4)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sqllava_jax.cli import main as cli
from sqllava_jax.data.images import normalize, preprocess_image
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation.prompts import question_prompt
from sqllava_jax.training.checkpoint import load_model
from tests.convert_helpers import (
  IMAGE_ID,
  TOKENIZER_VOCAB,
  assert_close,
  load_safetensors_dir,
  nchw,
  original_clip_tree,
  our_logits,
  our_vision_hidden,
  peft_load_strict,
  pixels_nhwc,
  run_cli,
  simulate_training,
  text_ids,
  write_yaml,
)
from tests.data_helpers import train_tiny_tokenizer
from tests.hf_fixtures import save_clip_vision, save_llama, tiny_llama_config, to_np
from tests.test_projector_parity import torch_prototype_extractor

ATOL = 1e-4
SEQ = 96  # text positions for logits checks; long enough for rotary mistakes to show


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  tokenizer = train_tiny_tokenizer(str(root), vocab_size=TOKENIZER_VOCAB)
  assert Tokenizer(tokenizer).vocab_size == TOKENIZER_VOCAB
  save_llama(root / "llama", tiny_llama_config(vocab_size=TOKENIZER_VOCAB), seed=5)
  # As a Vicuna directory ships it: import-hf copies it beside the checkpoint.
  shutil.copy(tokenizer, root / "llama" / "tokenizer.model")
  save_clip_vision(root / "clip", seed=6)
  return root, tokenizer


def _trained(sources, projector):
  root, tokenizer = sources
  config = write_yaml(root / f"{projector}.yaml", projector=projector,
                      data={"image_aspect_ratio": "pad"})
  imported = root / f"imported_{projector}"
  assert run_cli("import-hf", "--llm", root / "llama", "--vision", root / "clip", "--config",
                 config, "--out", imported) == 0
  assert (imported / "tokenizer.model").is_file()
  model, cfg = simulate_training(str(imported), str(root / f"trained_{projector}"), seed=7)
  return model, cfg, root / f"trained_{projector}", config


@pytest.fixture(scope="module")
def cluster(sources):
  return _trained(sources, "cluster")


@pytest.fixture(scope="module")
def mlp(sources):
  return _trained(sources, "mlp2x_gelu")


def export(ckpt, out, fmt, *extra):
  assert run_cli("export-hf", "--ckpt", ckpt, "--out", out, "--format", fmt, "--dtype",
                 "float32", "--no-progress", *extra) == 0
  return out


@pytest.fixture(scope="module")
def exports(cluster, tmp_path_factory):
  """Merged, unmerged-base and adapter-only exports of the trained cluster checkpoint."""
  root = tmp_path_factory.mktemp("exports")
  _, _, ckpt, _ = cluster
  out = {fmt: export(ckpt, root / fmt, fmt) for fmt in ("llama", "clip", "peft", "sqllava")}
  for fmt in ("llama", "clip"):
    out[f"{fmt}_base"] = export(ckpt, root / f"{fmt}_base", fmt, "--no-merge-lora")
  return out


def hf_logits(model, ids):
  with torch.no_grad():
    return to_np(model(torch.from_numpy(ids)).logits)


def llama(path):
  return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def clip(path):
  return transformers.CLIPVisionModel.from_pretrained(path, attn_implementation="eager").eval()


def test_llama_export_logits_match_jax(cluster, exports):
  model, _, _, _ = cluster
  ids = text_ids(2, SEQ, TOKENIZER_VOCAB)
  ours, merged = our_logits(model, ids), hf_logits(llama(exports["llama"]), ids)
  diff = assert_close(merged, ours, ATOL, "merged llama export vs JAX")
  base = hf_logits(llama(exports["llama_base"]), ids)
  assert np.abs(base - ours).max() > 100 * ATOL, "the adapters should change the logits"
  print(f"llama logits max diff {diff:.2e}")


def test_exported_tokenizer_gives_the_training_ids(cluster, exports):
  """The fast tokenizer of the llama export splits at special tokens as training did (one
  dummy-prefix `▁` per piece, also after `</s>`), so prompts map to the same ids."""
  _, _, ckpt, _ = cluster
  ours = Tokenizer(ckpt / "tokenizer.model")
  prompt = ("A chat. USER: What is in the picture? ASSISTANT: A cat sleeping on a red sofa.</s>"
            "VUSER: What colour is the sofa? ASSISTANT: The sofa is red.</s>")
  hf = transformers.AutoTokenizer.from_pretrained(exports["llama"])
  assert hf(prompt).input_ids == [ours.bos_id] + ours.encode(prompt)
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id,
                                                                ours.pad_id)
  with open(exports["sqllava"] / "tokenizer_config.json") as f:  # the reference's slow one
    assert json.load(f)["tokenizer_class"] == "LlamaTokenizer"
  assert (exports["sqllava"] / "tokenizer.model").read_bytes() == (
      ckpt / "tokenizer.model").read_bytes()


def test_clip_export_hidden_states_match_jax(cluster, exports):
  model, cfg, _, _ = cluster
  pixels = pixels_nhwc(2, 32, seed=1)
  ours = our_vision_hidden(model, pixels)
  with torch.no_grad():
    theirs = clip(exports["clip"])(pixel_values=nchw(pixels), output_hidden_states=True)
  for i in range(ours.shape[0]):  # ours runs only up to the selected layer
    diff = assert_close(ours[i], to_np(theirs.hidden_states[i]), ATOL, f"hidden state {i}")
  print(f"clip hidden states max diff {diff:.2e}")
  with torch.no_grad():
    base = clip(exports["clip_base"])(pixel_values=nchw(pixels), output_hidden_states=True)
  assert np.abs(to_np(base.hidden_states[-2]) - ours[-1]).max() > 100 * ATOL


def test_peft_adapters_on_the_base_export_equal_the_merged_export(exports):
  import peft  # Slow to import; only the LoRA layouts need it.
  ids = text_ids(2, SEQ, TOKENIZER_VOCAB, seed=2)
  merged = hf_logits(llama(exports["llama"]), ids)
  with_adapters = peft.PeftModel.from_pretrained(llama(exports["llama_base"]),
                                                 exports["peft"] / "llm").eval()
  diff = assert_close(hf_logits(with_adapters, ids), merged, ATOL, "peft llm vs merged")
  # vision/ is the original's Vit-lora/: it loads onto the original's CLIPVisionTower tree.
  pixels = nchw(pixels_nhwc(2, 32, seed=3))
  vit = peft_load_strict(original_clip_tree(clip(exports["clip_base"])), exports["peft"] / "vision")
  with torch.no_grad():
    got = vit(pixels)[-1]
    want = clip(exports["clip"])(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
  diff_v = assert_close(to_np(got), to_np(want), ATOL, "peft vision vs merged")
  with open(exports["peft"] / "llm" / "adapter_config.json") as f:
    assert json.load(f)["r"] == 8
  print(f"peft vs merged max diff: llm {diff:.2e}, vision {diff_v:.2e}")


def test_sqllava_export_is_the_reference_layout(cluster, exports):
  model, cfg, _, _ = cluster
  out = exports["sqllava"]
  with open(out / "config.json") as f:
    ref_cfg = json.load(f)
  assert ref_cfg["model_type"] == "llava" and ref_cfg["mm_projector_type"] == "cluster"
  assert ref_cfg["mm_hidden_size"] == 32 and ref_cfg["mm_vision_select_layer"] == -2
  # --out as the test gave it (absolute here) + vision_tower/: what the original resolves.
  assert ref_cfg["mm_vision_tower"] == str(out / "vision_tower")
  assert "rope_theta" not in ref_cfg and ref_cfg["transformers_version"] == "4.31.0"
  tensors = load_safetensors_dir(str(out))
  prefix = "model.mm_projector."
  proj = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
  assert sorted(proj) == sorted([f"{n}.{p}" for n in ("c", "v", "f", "ln_1", "mlp.0", "mlp.2")
                                 for p in ("weight", "bias")] + ["sim_alpha", "sim_beta"])
  x = np.random.default_rng(4).normal(size=(2, 16, 32)).astype(np.float32)
  want = torch_prototype_extractor(torch.from_numpy(x), proj, 8, 2).numpy()
  diff = assert_close(np.asarray(model.projector(x)[0]), want, ATOL, "projector vs torch")
  # The LLM part is exactly a LlamaForCausalLM state dict (strict load).
  fields = {k: v for k, v in ref_cfg.items() if not k.startswith("mm_") and k not in (
      "architectures", "model_type", "transformers_version")}
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields,
                                                              attn_implementation="eager"))
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()
                      if not k.startswith(prefix)}, strict=True)
  ids = text_ids(1, SEQ, TOKENIZER_VOCAB, seed=5)
  diff_llm = assert_close(hf_logits(hf.eval(), ids), our_logits(model, ids), ATOL, "llm")
  print(f"sqllava export: projector {diff:.2e}, llm logits {diff_llm:.2e}")


def test_sqllava_export_imports_back(cluster, exports, tmp_path):
  """import-sqllava reads the reference layout our export writes: same multimodal logits."""
  model, cfg, _, config = cluster
  assert run_cli("import-sqllava", "--model", exports["sqllava"], "--config", config,
                 "--out", tmp_path / "back") == 0
  back, back_cfg = load_model(str(tmp_path / "back"))
  # The original's transformers-4.31 config.json has no head_dim (it is hidden / heads).
  assert back_cfg.model.llm.effective_head_dim == cfg.model.llm.effective_head_dim
  llm = dataclasses.replace(cfg.model.llm, head_dim=None)
  assert back_cfg.model == dataclasses.replace(cfg.model, llm=llm)
  n = cfg.model.num_image_tokens
  ids = np.concatenate([[[1]], np.full((1, n), IMAGE_ID), text_ids(1, 20, TOKENIZER_VOCAB)], 1)
  pixels = pixels_nhwc(1, 32, seed=6)
  diff = assert_close(our_logits(back, ids, pixels), our_logits(model, ids, pixels), ATOL,
                      "re-imported vs trained")
  print(f"sqllava round trip logits max diff {diff:.2e}")


def test_llava_export_generates_like_sqllava_jax_generate(mlp, tmp_path, capsys):
  """transformers' LLaVA + AutoProcessor on the export, and `sqllava-jax generate` on the
  checkpoint, given the same question and image file: the same ids, pixels, logits and
  greedy answer."""
  model, cfg, ckpt, _ = mlp
  out = export(ckpt, tmp_path / "llava", "llava")
  processor = transformers.AutoProcessor.from_pretrained(out)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager").eval()
  image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (40, 56, 3), np.uint8))
  image.save(tmp_path / "image.png")
  question = "What is in the picture?"
  prompt = question_prompt(question, template="vicuna_v1", image=True)
  inputs = processor(images=image, text=prompt, return_tensors="pt")
  # Our tokenizer and image pipeline (pad to square, CLIP) give the same ids and pixels.
  ids = Tokenizer(ckpt / "tokenizer.model").encode_prompt(
      prompt, num_image_tokens=cfg.model.num_image_tokens)
  hf_ids = inputs.input_ids[0].numpy()
  assert np.where(hf_ids == TOKENIZER_VOCAB, IMAGE_ID, hf_ids).tolist() == ids
  pixels = normalize(preprocess_image(image, size=32, aspect_ratio="pad"))[None]
  assert_close(inputs.pixel_values.permute(0, 2, 3, 1).numpy(), pixels, 1e-5, "pixels")
  with torch.no_grad():
    theirs = to_np(hf(**inputs).logits)[..., :TOKENIZER_VOCAB]
  diff = assert_close(theirs, our_logits(model, np.asarray([ids]), pixels), ATOL, "llava logits")
  with torch.no_grad():
    generated = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
  capsys.readouterr()
  assert cli(["generate", "--ckpt", str(ckpt), "--prompt", question, "--image",
              str(tmp_path / "image.png"), "--template", "vicuna_v1", "--max-new-tokens", "12",
              "--json"]) == 0
  ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
  assert ours == generated and len(generated) >= 4, (ours, generated)
  print(f"llava logits max diff {diff:.2e}; greedy tokens {generated}")
