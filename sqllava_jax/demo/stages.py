"""What each demo stage is, read from its config (for the report), and its loss record."""

from __future__ import annotations

import json
import os

from sqllava_jax.commands.info import parameter_table


def describe_stage(cfg) -> dict:
  """Template, data, schedule and the trainable / frozen parameters of a stage config."""
  table = parameter_table(cfg)
  groups = [{"name": g.name, "lr": g.lr, "frozen": g.frozen} for g in cfg.train.param_groups]
  return {
      "template": cfg.data.template, "sq_r": cfg.data.sq_r,
      "data_file": f"stage{cfg.data.synthetic.stage}_train.json",
      "batch_size": cfg.train.per_device_batch_size * cfg.train.grad_accum_steps,
      "max_length": cfg.data.max_length, "groups": groups, "optimizer": cfg.train.optimizer,
      "trainable": {k: v["trainable"] for k, v in table.items() if v["trainable"]},
      "frozen": {k: v["frozen"] for k, v in table.items() if v["frozen"]},
      "init_from": cfg.train.init_from, "init_from_exclude": list(cfg.train.init_from_exclude),
      "output_dir": cfg.output_dir,
  }


def loss_record(output_dir: str) -> list[tuple[int, float]]:
  """(step, loss) of every logged step of a training run."""
  path = os.path.join(output_dir, "metrics.jsonl")
  with open(path) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if r.get("loss") is not None]


def loss_summary(output_dir: str, window: int = 10) -> dict:
  """First and final loss, and the mean of the last `window` steps (less noisy than one)."""
  losses = [v for _, v in loss_record(output_dir)]
  if not losses:
    return {"first_loss": None, "final_loss": None, "final_mean": None}
  tail = losses[-window:]
  return {"first_loss": losses[0], "final_loss": losses[-1], "final_mean": sum(tail) / len(tail)}
