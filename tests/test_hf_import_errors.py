"""Bad checkpoints give errors that name the file or tensor at fault."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from sqllava_jax.config import load_config
from sqllava_jax.convert.hf import llama_from_hf, model_from_hf
from sqllava_jax.convert.hf_io import CheckpointError
from tests.hf_fixtures import save_clip_vision, save_llama, tiny_llama_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  save_llama(path)
  return path


def rewrite(src, dst, edit):
  """Copies a single-file safetensors checkpoint, editing the tensor dict with `edit`."""
  from safetensors import safe_open
  os.makedirs(dst, exist_ok=True)
  with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_wrong_shape_names_the_tensor(llama_dir, tmp_path):
  def edit(t):
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
  rewrite(llama_dir, tmp_path, edit)
  with pytest.raises(ValueError,
                     match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(95, 64\)"):
    llama_from_hf(str(tmp_path))


def test_missing_tensor_is_named(llama_dir, tmp_path):
  rewrite(llama_dir, tmp_path, lambda t: t.pop("model.norm.weight"))
  with pytest.raises(ValueError, match=r"1 tensors missing, e\.g\. model\.norm\.weight"):
    llama_from_hf(str(tmp_path))


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
  rewrite(llama_dir, tmp_path, edit)
  with pytest.raises(ValueError, match=r"unexpected tensors, e\.g\. "
                                       r"model\.layers\.0\.self_attn\.q_proj\.bias"):
    llama_from_hf(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    llama_from_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config().to_dict()))
  with pytest.raises(CheckpointError, match="no weights found"):
    llama_from_hf(str(tmp_path))


def test_truncated_safetensors_names_the_file(llama_dir, tmp_path):
  rewrite(llama_dir, tmp_path, lambda t: None)
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    llama_from_hf(str(tmp_path))


def test_clip_dir_is_not_a_llama(tmp_path):
  save_clip_vision(tmp_path)
  with pytest.raises(CheckpointError, match="not a LLaMA checkpoint"):
    llama_from_hf(str(tmp_path))


def test_full_model_from_both_checkpoints(llama_dir, tmp_path):
  save_clip_vision(tmp_path / "clip")
  base = load_config("configs/tiny.yaml").model
  model, cfg = model_from_hf(base, llm_dir=str(llama_dir), vision_dir=str(tmp_path / "clip"))
  assert cfg.llm.hidden_size == 64 and cfg.vision.hidden_size == 32
  emb = np.asarray(model.llm.embed_tokens.embedding[...])
  assert emb.shape == (128, 64)
  # adapters were initialised (B zero, A random), the projector too
  assert np.abs(np.asarray(model.llm.layers.self_attn.q_proj.lora_b[...])).max() == 0
  assert np.abs(np.asarray(model.llm.layers.self_attn.q_proj.lora_a[...])).max() > 0
  assert np.abs(np.asarray(model.projector.c.kernel[...])).max() > 0
