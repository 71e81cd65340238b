"""HF -> `convert import-hf` -> checkpoint -> `convert export-hf` gives back identical tensors,
loadable by transformers without missing or unexpected keys."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from sqllava_jax.training.checkpoint import load_model
from tests.convert_helpers import load_safetensors_dir, run_cli, write_yaml
from tests.hf_fixtures import save_clip_vision, save_llama, tiny_llama_config, to_np


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("roundtrip")
  llama = save_llama(root / "llama", tiny_llama_config(num_kv_heads=2), seed=3)
  clip = save_clip_vision(root / "clip", seed=4)
  return root, llama, clip


@pytest.fixture(scope="module")
def ckpt(hf_dirs):
  root, _, _ = hf_dirs
  config = write_yaml(root / "tiny.yaml")
  assert run_cli("import-hf", "--llm", root / "llama", "--vision", root / "clip", "--config",
                 config, "--out", root / "ckpt") == 0
  return root / "ckpt"


@pytest.fixture(scope="module")
def exported(hf_dirs, ckpt):
  root, _, _ = hf_dirs
  for fmt in ("llama", "clip"):
    # A small shard size so the export really is sharded.
    assert run_cli("export-hf", "--ckpt", ckpt, "--out", root / fmt / "out", "--format", fmt,
                   "--dtype", "float32", "--shard-size", "20KB", "--no-progress") == 0
  return root / "llama" / "out", root / "clip" / "out"


def test_import_writes_a_checkpoint_every_command_loads(hf_dirs, ckpt):
  root, llama, clip = hf_dirs
  model, cfg = load_model(str(ckpt))
  assert (cfg.model.llm.hidden_size, cfg.model.llm.num_kv_heads) == (64, 2)
  assert (cfg.model.vision.hidden_size, cfg.model.vision.num_layers) == (32, 3)
  assert cfg.model.llm_lora.rank == 8 and cfg.model.projector.num_prototypes == 8
  np.testing.assert_array_equal(np.asarray(model.llm.embed_tokens.embedding[...]),
                                to_np(llama.model.embed_tokens.weight))
  # Nothing but the checkpoint beside the inputs: the temporary directory was renamed.
  assert sorted(os.listdir(root)) == ["ckpt", "clip", "llama", "tiny.yaml"]


def test_export_gives_back_identical_tensors(hf_dirs, exported):
  _, llama, clip = hf_dirs
  for out, hf in zip(exported, (llama, clip)):
    got = load_safetensors_dir(str(out))
    want = {k: to_np(v) for k, v in hf.state_dict().items()}
    if out.parent.name == "clip":  # transformers 5 keeps no `vision_model.` module level
      want = {("vision_model." + k if not k.startswith("vision_model.") else k): v
              for k, v in want.items()}
    assert sorted(got) == sorted(want), out.parent.name
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_export_is_sharded_with_a_complete_index(exported):
  for out in exported:
    with open(out / "model.safetensors.index.json") as f:
      index = json.load(f)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in load_safetensors_dir(str(out)).values())


def test_transformers_loads_the_export_strictly(hf_dirs, exported):
  _, llama, clip = hf_dirs
  llama_out, clip_out = exported
  ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
  pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
  for cls, out, ref, inputs in ((transformers.LlamaForCausalLM, llama_out, llama,
                                 {"input_ids": ids}),
                                (transformers.CLIPVisionModel, clip_out, clip,
                                 {"pixel_values": pixels})):
    # Eager attention as the fixtures use, so identical weights give identical outputs.
    model, info = cls.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
      got, want = model.eval()(**inputs)[0], ref(**inputs)[0]
    np.testing.assert_array_equal(to_np(got), to_np(want))


def test_projector_file_is_imported(hf_dirs, tmp_path):
  """`--projector mm_projector.bin` with the reference's names fills the projector."""
  root, _, _ = hf_dirs
  rng = np.random.default_rng(0)
  shapes = {"c": (32, 32), "v": (32, 32), "f": (32, 32), "mlp.0": (64, 32), "mlp.2": (64, 64)}
  tensors = {}
  for name, shape in shapes.items():
    tensors[f"model.mm_projector.{name}.weight"] = torch.randn(*shape)
    tensors[f"model.mm_projector.{name}.bias"] = torch.randn(shape[0])
  tensors.update({"model.mm_projector.sim_alpha": torch.full((1, 1, 1), 1.5),
                  "model.mm_projector.sim_beta": torch.full((1, 1, 1), -0.5),
                  "model.mm_projector.ln_1.weight": torch.from_numpy(rng.normal(size=32)).float(),
                  "model.mm_projector.ln_1.bias": torch.zeros(32)})
  torch.save(tensors, tmp_path / "mm_projector.bin")
  config = write_yaml(tmp_path / "tiny.yaml")
  assert run_cli("import-hf", "--llm", root / "llama", "--vision", root / "clip", "--projector",
                 tmp_path / "mm_projector.bin", "--config", config, "--out", tmp_path / "ck") == 0
  model, _ = load_model(str(tmp_path / "ck"))
  p = model.projector
  np.testing.assert_array_equal(np.asarray(p.mlp_in.kernel[...]),
                                tensors["model.mm_projector.mlp.0.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(p.c.bias[...]), tensors["model.mm_projector.c.bias"])
  assert float(p.sim_alpha[...]) == 1.5 and float(p.sim_beta[...]) == -0.5
  np.testing.assert_array_equal(np.asarray(p.ln_1.scale[...]),
                                tensors["model.mm_projector.ln_1.weight"].numpy())


def test_bfloat16_export_loads_in_transformers(hf_dirs, ckpt, tmp_path):
  """`--dtype bfloat16` writes BF16 safetensors that torch reads as the rounded originals."""
  _, _, clip = hf_dirs
  assert run_cli("export-hf", "--ckpt", ckpt, "--out", tmp_path / "bf16", "--format", "clip",
                 "--dtype", "bfloat16", "--no-progress") == 0
  model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  got, want = model.state_dict(), clip.state_dict()
  assert got.keys() == want.keys()
  for name, value in want.items():
    assert got[name].dtype == torch.bfloat16, name
    assert torch.equal(got[name], value.to(torch.bfloat16)), name
