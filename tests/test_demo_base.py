"""The shipped stage-0 base (`sqllava_jax/demo/base/`): it is what its recipe says (the
demo's current stage-0 config, the synthetic set's format, the checksums), it installs as a
checkpoint holding exactly its tensors, it ships with the package, and a base that does not
fit the run is refused with the fix."""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import shutil

import numpy as np
import pytest

from sqllava_jax.demo import base, configs, run, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shipped():
  folder = base.shipped_dir()
  return folder, base.read_recipe(folder)


def test_shipped_base_is_the_current_stage0_recipe(shipped):
  folder, recipe = shipped
  base.verify_files(folder, recipe)  # both sha256 as recorded
  current = base.recipe_config(configs.stage_config("stage0", "anywhere"))
  assert recipe["stage0_config"] == current, (
      "stage0.yaml or model.yaml changed since the shipped base was made: regenerate it "
      "(`sqllava-jax demo --from-scratch`, then copy OUT/base/* into sqllava_jax/demo/base/)")
  assert recipe["synthetic_format_version"] == synthetic.FORMAT_VERSION, (
      "the synthetic set's format changed since the shipped base was made: regenerate it")
  assert recipe["made_by"].startswith("sqllava-jax demo --from-scratch")
  assert recipe["stage0"]["steps"] == current["train"]["max_steps"]
  assert recipe["loss"][-1][0] == current["train"]["max_steps"] and len(recipe["loss"]) > 50
  # Under a million parameters, in a few MB: parameters only, float32, no optimizer state.
  assert recipe["num_parameters"] < 1_000_000
  size = os.path.getsize(os.path.join(folder, base.PARAMS))
  assert size == recipe["files"][base.PARAMS]["bytes"]
  assert 4 * recipe["num_parameters"] <= size < 4 * recipe["num_parameters"] + 64 * 1024


def test_shipped_base_installs_as_a_checkpoint_of_exactly_its_tensors(shipped, tmp_path):
  from flax import nnx
  from safetensors.numpy import load_file

  from sqllava_jax.training.checkpoint import load_model
  from sqllava_jax.tree_paths import flat
  folder, recipe = shipped
  paths = configs.run_paths(str(tmp_path), "stage0", on_base=True)
  cfg = base.base_config(recipe, paths)
  assert cfg.output_dir == str(tmp_path / "stage0")
  assert cfg.data.tokenizer == configs.base_tokenizer(str(tmp_path))
  ckpt = base.install(folder, recipe, cfg, str(tmp_path / "stage0" / "checkpoints"))
  model, loaded_cfg = load_model(ckpt)
  assert loaded_cfg.model == cfg.model
  got = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = load_file(os.path.join(folder, base.PARAMS))
  assert sorted(got) == sorted(want) and sum(v.size for v in want.values()) == recipe[
      "num_parameters"]
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  with open(cfg.data.tokenizer, "rb") as a, open(os.path.join(folder, base.TOKENIZER), "rb") as b:
    assert a.read() == b.read()


def _copy(shipped, tmp_path) -> str:
  folder = str(tmp_path / "base")
  shutil.copytree(shipped[0], folder)
  return folder


@pytest.mark.parametrize("override, named", [
    ("model.llm.num_layers=2", "model.llm.num_layers: base 3, this run 2"),
    ("model.vision.select_layer=-1", "model.vision.select_layer: base -2, this run -1"),
    ("data.synthetic.seed=1", "data.synthetic.seed: base 0, this run 1"),
    ("data.synthetic.num_train=4000", "data.synthetic.num_train"),
])
def test_a_base_for_another_model_or_set_is_refused(shipped, override, named):
  cfg = configs.stage_config("stage0", "out", overrides=[override])
  with pytest.raises(base.BaseMismatch, match="--from-scratch") as e:
    base.check(shipped[0], cfg)
  assert named in str(e.value) and "made for another demo" in str(e.value)


def test_a_base_of_another_set_format_is_refused(shipped, monkeypatch):
  cfg = configs.stage_config("stage0", "out")
  assert base.check(shipped[0], cfg)["base_format"] == base.BASE_FORMAT  # fits as it is
  monkeypatch.setattr(synthetic, "FORMAT_VERSION", synthetic.FORMAT_VERSION + 1)
  with pytest.raises(base.BaseMismatch, match=r"synthetic format version: base \d+, this run "
                                               r"\d+.*regenerate the base"):
    base.check(shipped[0], cfg)


def test_a_changed_or_missing_file_is_refused(shipped, tmp_path):
  cfg = configs.stage_config("stage0", "out")
  folder = _copy(shipped, tmp_path)
  path = os.path.join(folder, base.PARAMS)
  with open(path, "r+b") as f:
    f.seek(-3, os.SEEK_END)
    f.write(b"\x00\x01\x02")
  with pytest.raises(base.BaseMismatch, match=f"{path} has sha256 .* damaged or was changed"):
    base.check(folder, cfg)
  shutil.copyfile(os.path.join(shipped[0], base.PARAMS), path)
  base.check(folder, cfg)  # intact again
  os.remove(os.path.join(folder, base.TOKENIZER))
  with pytest.raises(base.BaseMismatch, match="lacks tokenizer.model"):
    base.check(folder, cfg)
  with open(os.path.join(folder, base.RECIPE), "w") as f:
    json.dump({"base_format": 99}, f)
  with pytest.raises(base.BaseMismatch, match="base_format 99"):
    base.check(folder, cfg)
  with pytest.raises(base.BaseMismatch, match="recipe.json is missing"):
    base.check(str(tmp_path), cfg)


def test_which_base_a_run_starts_from():
  assert run.base_dir(run.DemoOptions()) == base.shipped_dir()
  assert run.base_dir(run.DemoOptions(from_scratch=True)) is None
  assert run.base_dir(run.DemoOptions(fast=True)) is None  # --fast's narrower model
  assert run.base_dir(run.DemoOptions(fast=True, base="b")) == os.path.abspath("b")
  with pytest.raises(ValueError, match="exclude each other"):
    run.base_dir(run.DemoOptions(from_scratch=True, base="b"))
  with pytest.raises(ValueError, match="stage0.train.max_steps=5: stage 0 is the shipped base"
                                       ".*--from-scratch"):
    configs.check_overrides(["stage1.train.max_steps=5", "stage0.train.max_steps=5"],
                            on_base=True)
  configs.check_overrides(["stage0.train.max_steps=5"], on_base=False)


def test_the_base_ships_as_package_data():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  patterns = cfg["options.package_data"]["sqllava_jax.demo"].replace(",", " ").split()
  package = os.path.join(ROOT, "sqllava_jax", "demo")
  shipped = sorted(os.listdir(os.path.join(package, "base")))
  assert shipped == sorted([base.PARAMS, base.RECIPE, base.TOKENIZER])
  for name in shipped:
    assert any(fnmatch.fnmatch(f"base/{name}", p) for p in patterns), (name, patterns)
  assert os.path.samefile(base.shipped_dir(), os.path.join(package, "base"))


def test_a_base_whose_tensors_do_not_fit_its_model_is_refused(shipped):
  from safetensors.numpy import load_file
  folder, recipe = shipped
  cfg = base.base_config(recipe, [])
  tensors = load_file(os.path.join(folder, base.PARAMS))
  name = sorted(tensors)[0]
  fewer = {k: v for k, v in tensors.items() if k != name}
  with pytest.raises(base.BaseMismatch, match=f"missing \\['{name}'\\], unexpected none"):
    base._param_arrays(cfg, fewer, "params.safetensors")
  wrong = {**tensors, name: tensors[name][None]}  # one more axis
  with pytest.raises(base.BaseMismatch, match=f"tensor {name} is float32.*the model wants"):
    base._param_arrays(cfg, wrong, "params.safetensors")
  assert len(base._param_arrays(cfg, tensors, "params.safetensors")) == len(tensors)
