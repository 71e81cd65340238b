"""Bad input to `convert`: a clear error naming the file and tensor, and nothing at --out."""

import argparse
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sqllava_jax.convert import export as E
from sqllava_jax.convert.safetensors_writer import ShardedWriter
from tests.convert_helpers import fails, run_cli, write_yaml
from tests.hf_fixtures import save_clip_vision, save_llama


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("errors")
  save_llama(root / "llama", seed=31)
  save_clip_vision(root / "clip", seed=32)
  config = write_yaml(root / "tiny.yaml")
  assert run_cli("import-hf", "--llm", root / "llama", "--vision", root / "clip", "--config",
                 config, "--out", root / "ckpt") == 0
  return root, config


def edited_copy(src, dst, edit):
  """A copy of an HF directory with its single safetensors file edited by `edit(tensors)`."""
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


def import_hf(dirs, tmp_path, capsys, llm=None, vision=None, *extra):
  root, config = dirs
  return fails(capsys, tmp_path / "out", "import-hf", "--llm", llm or root / "llama", "--vision",
               vision or root / "clip", "--config", config, *extra)


def test_export_of_a_directory_that_is_not_a_checkpoint(dirs, tmp_path, capsys):
  root, _ = dirs
  err = fails(capsys, tmp_path / "out", "export-hf", "--ckpt", root / "llama", "--format", "llama")
  assert "llama is not a sqllava-jax checkpoint" in err and "import-hf" in err
  err = fails(capsys, tmp_path / "out", "export-hf", "--ckpt", tmp_path / "nowhere", "--format",
              "llama")
  assert "nowhere does not exist" in err


def test_import_of_a_directory_that_is_not_a_checkpoint(dirs, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  err = import_hf(dirs, tmp_path, capsys, tmp_path / "empty")
  assert "empty is not a Hugging Face checkpoint: no config.json" in err
  err = fails(capsys, tmp_path / "out", "import-sqllava", "--model", dirs[0] / "llama")
  assert "not an SQ-LLaVA / LLaVA checkpoint" in err


def test_wrong_shape_names_the_tensor(dirs, tmp_path, capsys):
  def edit(t):
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
  bad = edited_copy(dirs[0] / "llama", tmp_path / "bad", edit)
  err = import_hf(dirs, tmp_path, capsys, bad)
  assert "model.layers.1.mlp.up_proj.weight has shape (95, 64)" in err
  assert "does the config match the weights?" in err


def test_wrong_dtype_names_the_tensor(dirs, tmp_path, capsys):
  def edit(t):
    t["vision_model.post_layernorm.bias" if "vision_model.post_layernorm.bias" in t
      else "post_layernorm.bias"] = np.zeros(32, np.int64)
  bad = edited_copy(dirs[0] / "clip", tmp_path / "bad", edit)
  err = import_hf(dirs, tmp_path, capsys, None, bad)
  # int64 comes back as int32 without jax x64; either way it is no weight.
  assert re.search(r"bad: tensor \S*post_layernorm\.bias has dtype int(32|64)", err), err


def test_truncated_safetensors_names_the_file(dirs, tmp_path, capsys):
  bad = shutil.copytree(dirs[0] / "clip", tmp_path / "bad")
  data = (bad / "model.safetensors").read_bytes()
  (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
  err = import_hf(dirs, tmp_path, capsys, None, bad)
  assert str(bad / "model.safetensors") in err and "truncated" in err


def test_pickles_are_loaded_weights_only(dirs, tmp_path, capsys):
  """A .bin that unpickles anything but tensors is refused, not executed."""
  bad = shutil.copytree(dirs[0] / "llama", tmp_path / "bad")
  os.remove(bad / "model.safetensors")
  torch.save({"model.norm.weight": argparse.Namespace(payload="not a tensor")},
             bad / "pytorch_model.bin")
  err = import_hf(dirs, tmp_path, capsys, bad)
  assert "pytorch_model.bin: cannot load with torch.load(weights_only=True)" in err


def test_config_that_does_not_match_the_weights(dirs, tmp_path, capsys):
  root, _ = dirs
  # The projector file is a cluster projector; the config asks for LLaVA's MLP.
  proj = {f"model.mm_projector.{n}.{p}": torch.zeros(32, 32) if p == "weight" else torch.zeros(32)
          for n in ("c", "v", "f") for p in ("weight", "bias")}
  torch.save(proj, tmp_path / "mm_projector.bin")
  mlp = write_yaml(tmp_path / "mlp.yaml", projector="mlp2x_gelu")
  err = fails(capsys, tmp_path / "out", "import-hf", "--llm", root / "llama", "--vision",
              root / "clip", "--projector", tmp_path / "mm_projector.bin", "--config", mlp)
  assert "mm_projector.bin: 4 tensors missing, e.g. model.mm_projector.0.weight" in err
  # A reference config.json whose LLM width disagrees with the weights.
  model = shutil.copytree(root / "llama", tmp_path / "ref")
  cfg = json.loads((model / "config.json").read_text())
  cfg.update(hidden_size=48, mm_projector_type="cluster", mm_vision_tower=str(root / "clip"),
             mm_hidden_size=32)
  (model / "config.json").write_text(json.dumps(cfg))
  proj = {f"model.mm_projector.{n}.weight": np.zeros(s, np.float32) for n, s in (
      ("c", (32, 32)), ("v", (32, 32)), ("f", (32, 32)), ("mlp.0", (48, 32)), ("mlp.2", (48, 48)))}
  proj.update({k.replace("weight", "bias"): np.zeros(v.shape[0], np.float32)
               for k, v in proj.items()})
  proj.update({"model.mm_projector.sim_alpha": np.ones((1, 1, 1), np.float32),
               "model.mm_projector.sim_beta": np.zeros((1, 1, 1), np.float32),
               "model.mm_projector.ln_1.weight": np.ones(32, np.float32),
               "model.mm_projector.ln_1.bias": np.zeros(32, np.float32)})
  save_file(proj, model / "model-projector.safetensors", metadata={"format": "pt"})
  err = fails(capsys, tmp_path / "out", "import-sqllava", "--model", model, "--config",
              write_yaml(tmp_path / "c.yaml"))
  assert "tensor model.embed_tokens.weight has shape (128, 64)" in err


def test_reference_checkpoints_that_cannot_import(dirs, tmp_path, capsys):
  root, _ = dirs
  model = shutil.copytree(root / "llama", tmp_path / "ref")
  cfg = json.loads((model / "config.json").read_text())
  cfg.update(mm_projector_type="cluster", mm_vision_tower="openai/clip-vit-large-patch14-336")
  (model / "config.json").write_text(json.dumps(cfg))
  err = fails(capsys, tmp_path / "out", "import-sqllava", "--model", model)
  assert "'openai/clip-vit-large-patch14-336', which is not a local directory" in err
  assert "--vision" in err
  (model / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
       "use_rslora": True}))
  err = fails(capsys, tmp_path / "out", "import-sqllava", "--model", model, "--vision",
              root / "clip")
  assert "holds a LoRA checkpoint; pass --base" in err
  err = fails(capsys, tmp_path / "out", "import-sqllava", "--model", model, "--vision",
              root / "clip", "--base", root / "llama")
  assert "adapter_config.json: unsupported LoRA settings use_rslora=True" in err


def test_existing_output_is_left_alone(dirs, tmp_path, capsys):
  root, _ = dirs
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep").write_text("mine")
  assert run_cli("export-hf", "--ckpt", root / "ckpt", "--format", "clip", "--out", out,
                 "--no-progress") == 2
  assert "already exists" in capsys.readouterr().err and (out / "keep").read_text() == "mine"
  assert run_cli("export-hf", "--ckpt", root / "ckpt", "--format", "clip", "--out", out,
                 "--no-progress", "--overwrite") == 0
  assert not (out / "keep").exists() and (out / "config.json").exists()


def test_format_the_model_cannot_take_is_refused_before_writing(dirs, tmp_path, capsys):
  err = fails(capsys, tmp_path / "out", "export-hf", "--ckpt", dirs[0] / "ckpt", "--format",
              "llava")
  assert "mlp2x_gelu projector; this checkpoint's projector is 'cluster'" in err


def test_failure_while_writing_leaves_nothing(dirs, tmp_path, monkeypatch):
  """A write that fails half way (a full disk) leaves neither --out nor a temporary dir."""
  calls = []
  original = ShardedWriter.add

  def add(self, name, array):
    calls.append(name)
    if len(calls) == 5:
      raise OSError(28, "No space left on device")
    original(self, name, array)

  monkeypatch.setattr(ShardedWriter, "add", add)
  with pytest.raises(OSError, match="No space left"):
    E.export_checkpoint(str(dirs[0] / "ckpt"), str(tmp_path / "out"), "llama",
                        E.ExportOptions(progress=False))
  assert len(calls) == 5 and os.listdir(tmp_path) == []
