"""The demo command: its plumbing end to end (`--fast`), its configs and its output folder.

The smoke test runs `sqllava-jax demo --fast` in a fresh process from a folder outside the
repository, so the packaged stage configs, the one-JSON-line stdout contract and every file
the README promises (report, figures, Hugging Face exports) are checked as a user sees
them. `--fast` trains its own (narrower) stage 0 and writes it as a base folder; a second
run starts from that base with `--base`, as the default demo starts from the shipped one.
What the full demo learns is measured by the demo itself (its report), not here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from sqllava_jax.demo import configs, run

SUMMARY_KEYS = {"synthetic_vqa_accuracy", "synthetic_sq_valid", "stage1_final_loss",
                "stage2_final_loss", "export_dir", "wall_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _last_loss(stage_dir) -> float:
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()][-1]["loss"]


def _demo(cwd, out, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "sqllava_jax.cli", "demo", "--out", str(out),
                         "--fast", *flags], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, proc


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
  cwd = tmp_path_factory.mktemp("elsewhere")
  return _demo(cwd, cwd / "demo")


@pytest.fixture(scope="module")
def fast_demo_on_base(fast_demo):
  out, _ = fast_demo
  return _demo(out.parent, out.parent / "on-base", "--base", str(out / "base"))


def test_fast_demo_prints_one_json_line(fast_demo):
  out, proc = fast_demo
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout[:2000]}"
  summary = json.loads(lines[0])
  assert SUMMARY_KEYS <= set(summary)
  for key in ("synthetic_vqa_accuracy", "synthetic_sq_valid"):
    assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
  assert summary["stage1_final_loss"] == pytest.approx(_last_loss(out / "stage1"))
  assert summary["stage2_final_loss"] == pytest.approx(_last_loss(out / "stage2"))
  assert math.isfinite(summary["stage2_final_loss"]) and summary["wall_s"] > 0
  assert summary["export_dir"] == str(out / "export")
  assert "[demo]" in proc.stderr  # progress goes to stderr


def test_fast_demo_writes_report_curves_and_exports(fast_demo):
  out, _ = fast_demo
  report = (out / "report.md").read_text()
  for needle in ("stage 0", "stage 1", "stage 2", "chance", "synthetic_vqa", "synthetic_sq",
                 "Timings", str(out / "export"), "parameter groups (muon)",
                 "parameter groups (adamw)", f"written as a base folder to `{out / 'base'}`"):
    assert needle in report, needle
  lines = report.splitlines()
  start = lines.index("| question (sampled) | answer (greedy) | valid question | correct answer |")
  end = lines.index("", start)
  asked = lines[start + 2:end]  # after the header and its |---| rule
  assert len(asked) == 3 and all(row.startswith("| ") for row in asked), lines[start:end]
  for name in ("asked", "answers", "loss"):
    assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    assert f"(figures/{name}.png)" in report
  assert "data:image/png;base64," in (out / "report.html").read_text()
  for fmt in run.EXPORT_FORMATS:
    config = json.loads((out / "export" / fmt / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM",
                                        "clip": "CLIPVisionModel"}[fmt]]
    assert list((out / "export" / fmt).glob("*.safetensors")), fmt


def _params(stage_dir):
  from flax import nnx

  from sqllava_jax.training.checkpoint import load_model
  from sqllava_jax.tree_paths import flat
  model, cfg = load_model(str(stage_dir / "checkpoints"))
  params = {k: np.asarray(v)
            for k, v in flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
  return params, cfg


def test_fast_demo_stages_chain_and_freeze(fast_demo):
  out, _ = fast_demo
  (p0, c0), (p1, c1), (p2, c2) = (_params(out / s) for s in configs.STAGES)
  assert (c1.train.init_from, c2.train.init_from) == (str(out / "stage0" / "checkpoints"),
                                                      str(out / "stage1" / "checkpoints"))
  bases = [k for k in p0 if k.startswith(("llm/", "vision/"))]
  assert bases and all(k in p1 and k in p2 for k in bases)
  for k in bases:  # frozen in stages 1 and 2: the stage-0 weights, bit for bit
    np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)
    np.testing.assert_array_equal(p2[k], p0[k], err_msg=k)
  # Stage 1 trains the projector further; stage 2 adds LLM adapters.
  proj = [k for k in p0 if k.startswith("projector/") and p0[k].size > 1]
  assert any(not np.array_equal(p1[k], p0[k]) for k in proj)
  assert not any(k.startswith("llm/") and "lora" in k for k in p1)
  assert any(k.startswith("llm/") and "lora" in k for k in p2)


def test_stage_configs_follow_the_paper():
  s0, s1, s2 = (configs.stage_config(s, "unused") for s in configs.STAGES)
  assert [g.frozen for g in s0.train.param_groups] == [False]
  # Stage 0 (the demo's stand-in for pretraining) uses Muon; the paper's stages AdamW.
  assert (s0.train.optimizer, s1.train.optimizer, s2.train.optimizer) == ("muon", "adamw", "adamw")
  assert (s1.data.template, s1.data.sq_r, s1.model.llm_lora.rank) == ("plain", 0.0, 0)
  assert {g.name for g in s1.train.param_groups if not g.frozen} == {"projector", "vit_lora"}
  assert (s2.data.template, s2.data.sq_r) == ("v1_sq", 0.5)
  assert {g.name for g in s2.train.param_groups if not g.frozen} == {
      "llm_lora", "projector", "vit_lora"}
  assert s2.train.init_from_exclude == ("^llm/.*/lora_[ab]$",)
  assert s0.model.vision == s1.model.vision == s2.model.vision
  assert s0.model.llm == s1.model.llm == s2.model.llm


def test_overrides_reach_every_stage_or_one():
  items = ["train.log_every=3", "stage1.train.max_steps=7"]
  s0, s1 = (configs.stage_config(s, "x", overrides=items) for s in ("stage0", "stage1"))
  assert s0.train.log_every == s1.train.log_every == 3
  assert s1.train.max_steps == 7 and s0.train.max_steps != 7
  assert configs.split_overrides(items, "stage2") == ["train.log_every=3"]
  with pytest.raises(ValueError, match="unknown demo stage"):
    configs.stage_config("stage3", "x")


def test_output_folder_is_replaced_only_when_it_is_a_demo_run(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a demo output"):
    run.prepare_output(str(theirs), True, [])
  assert (theirs / "notes.txt").read_text() == "keep me"
  ours = tmp_path / "ours"
  run.prepare_output(str(ours), False, ["--fast"])
  (ours / "stale").write_text("old")
  with pytest.raises(FileExistsError, match="--overwrite"):
    run.prepare_output(str(ours), False, [])
  run.prepare_output(str(ours), True, [])
  assert not (ours / "stale").exists() and (ours / run.MARKER).is_file()


def test_fast_demo_writes_its_stage0_as_a_base(fast_demo):
  from sqllava_jax.demo import base
  out, _ = fast_demo
  cfg = configs.stage_config("stage0", str(out), fast=True)
  recipe = base.check(str(out / "base"), cfg)  # the checksums and the fields that matter
  assert recipe["made_by"] == "sqllava-jax demo --from-scratch --fast"
  assert recipe["stage0_config"] == base.recipe_config(cfg)
  assert recipe["loss"] == base.thin_curve(_records(out / "stage0"))
  p0, _ = _params(out / "stage0")
  from safetensors.numpy import load_file
  shipped = load_file(str(out / "base" / base.PARAMS))
  assert sorted(shipped) == sorted(p0)
  for k, v in shipped.items():
    np.testing.assert_array_equal(v, p0[k], err_msg=k)


def _records(stage_dir):
  from sqllava_jax.demo.stages import loss_record
  return loss_record(str(stage_dir))


def test_fast_demo_on_a_base_trains_stages_1_and_2_on_it(fast_demo, fast_demo_on_base):
  from safetensors.numpy import load_file

  from sqllava_jax.demo import base
  made, _ = fast_demo
  out, proc = fast_demo_on_base
  assert json.loads(proc.stdout)["export_dir"] == str(out / "export")
  assert not (out / "stage0" / "metrics.jsonl").exists()  # stage 0 did not train
  report = (out / "report.md").read_text()
  assert f"**not trained in this run**: the stage-0 base in `{made / 'base'}`" in report
  shipped = load_file(str(made / "base" / base.PARAMS))
  p2, c2 = _params(out / "stage2")
  assert c2.data.tokenizer == str(out / "stage0" / "tokenizer.model")
  for k, v in shipped.items():  # frozen in stages 1 and 2: the base's weights, bit for bit
    if k.startswith(("llm/", "vision/")):
      np.testing.assert_array_equal(p2[k], v, err_msg=k)
  assert any(k.startswith("llm/") and "lora" in k for k in p2)


def test_a_stage_stopped_by_sigterm_stops_the_demo(monkeypatch, capsys):
  from sqllava_jax.commands import demo as demo_command
  from sqllava_jax.training import trainer

  class Preempted:
    def __init__(self, cfg):
      self.cfg = cfg

    def run(self):
      return {"steps": 670, "total_steps": 1000, "stopped_early": True}

  monkeypatch.setattr(trainer, "Trainer", Preempted)
  cfg = configs.stage_config("stage0", "demo-out")
  with pytest.raises(run.StageInterrupted, match=r"stopped at step 670 of 1000 \(SIGTERM\)"):
    run.train_stage(cfg)

  def interrupted(*args, **kwargs):
    raise run.StageInterrupted("training in demo-out/stage0 stopped at step 3 of 9 (SIGTERM)")

  monkeypatch.setattr(run, "run_demo", interrupted)
  args = demo_command.argparse.Namespace(out="demo-out", fast=True, overwrite=False,
                                         sq_images=None, vqa_limit=None, seed=0, overrides=[],
                                         from_scratch=False, base=None)
  assert demo_command.run(args) == 143
  captured = capsys.readouterr()
  assert captured.out == "" and "stopped at step 3 of 9" in captured.err
