"""Config loading: YAML + overrides into typed dataclasses; unknown keys and bad types named."""

import subprocess
import sys

import pytest

from sqllava_jax.config import Config, ConfigError, load_config


def test_tiny_and_paper_configs_load():
  tiny = load_config("configs/tiny.yaml")
  assert tiny.model.vision.num_patches == 16 and tiny.model.num_image_tokens == 16
  seven = load_config("configs/sqllava_7b.yaml")
  assert seven.model.num_image_tokens == 576
  assert (seven.model.llm_lora.rank, seven.model.vit_lora.rank) == (128, 64)
  thirteen = load_config("configs/sqllava_13b.yaml")
  assert thirteen.model.llm.hidden_size == 5120 and thirteen.model.vision.hidden_size == 1024


def test_overrides_are_typed():
  cfg = load_config("configs/tiny.yaml", ["model.llm.num_layers=3", "train.warmup_ratio=1e-2",
                                          "data.length_buckets=[16, 32]", "data.strict=true"])
  assert cfg.model.llm.num_layers == 3
  assert cfg.train.warmup_ratio == 0.01
  assert cfg.data.length_buckets == (16, 32)
  assert cfg.data.strict is True


@pytest.mark.parametrize("override,message", [
    ("model.llm.num_layrs=3", "unknown key model.llm.num_layrs"),
    ("model.llm.num_layers=three", "model.llm.num_layers: expected an integer"),
    ("data.strict=3", "data.strict: expected true/false"),
    ("model.projector.type=mlp3", "model.projector.type: 'mlp3' is not one of"),
    ("model.llm.num_kv_heads=3", "num_heads=4 not divisible by llm.num_kv_heads=3"),
    ("nonsense", "not of the form key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
    load_config("configs/tiny.yaml", [override])


def test_unknown_key_in_yaml(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  vision:\n    hidden: 3\n")
  with pytest.raises(ConfigError, match="unknown key model.vision.hidden"):
    load_config(path)


def test_defaults_without_file():
  assert isinstance(load_config(None), Config)


def test_info_command_counts_the_7b_model():
  out = subprocess.run([sys.executable, "-m", "sqllava_jax.cli", "info", "configs/sqllava_7b.yaml"],
                       capture_output=True, text=True, check=True).stdout
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
  assert rows["projector"][1] == "24,130,562"
  assert rows["LLM"][1] == "6,738,415,616"
  assert rows["vision"][2] == "303,507,456"
  assert "without adapters: 7,066,053,634" in out


def test_info_command_reports_bad_override():
  proc = subprocess.run([sys.executable, "-m", "sqllava_jax.cli", "info", "configs/tiny.yaml",
                         "model.llm.nope=1"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert "unknown key model.llm.nope" in proc.stderr
