"""Exact resume after SIGKILL, SIGTERM saves and exits 0: real `sqllava-jax train` processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sqllava_jax.training.checkpoint import Checkpointer
from tests.train_helpers import CONFIG, subprocess_env

STEPS, SAVE_EVERY = 24, 4


def train_cmd(out, data, *overrides):
  return [sys.executable, "-m", "sqllava_jax.cli", "train", CONFIG, f"output_dir={out}",
          f"data.synthetic.dir={data}", f"train.max_steps={STEPS}",
          f"train.save_every={SAVE_EVERY}", "train.log_every=1", *overrides]


def env(devices=1):
  return subprocess_env(devices)


def wait_for_step(ckpt_dir, step, proc, timeout=600):
  """Blocks until orbax has committed `step` (its directory appears only when complete)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(os.path.join(ckpt_dir, str(step))):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited with {proc.returncode} before step {step}: "
                           f"{proc.stderr.read()[-2000:]}")
    time.sleep(0.02)
  raise AssertionError(f"no checkpoint for step {step} after {timeout} s")


def final_params(out):
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  from flax import nnx

  from sqllava_jax.training.checkpoint import load_model
  from sqllava_jax.tree_paths import flat
  model, _ = load_model(os.path.join(out, "checkpoints"))
  params = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return step, {k: np.asarray(v) for k, v in params.items()}


def order(out):
  with open(os.path.join(out, "data_order.p0.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  out = str(tmp_path_factory.mktemp("straight"))
  subprocess.run(train_cmd(out, data_dir), env=env(), check=True, capture_output=True, text=True)
  return out


def test_sigkill_after_a_checkpoint_then_resume_is_exact(tmp_path, data_dir, uninterrupted):
  out = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(out, data_dir), env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(os.path.join(out, "checkpoints"), SAVE_EVERY, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = Checkpointer(os.path.join(out, "checkpoints"), read_only=True).latest_step()
  assert killed_at is not None and killed_at < STEPS
  resumed = subprocess.run(train_cmd(out, data_dir), env=env(), check=True, capture_output=True,
                           text=True)
  assert f"resumed from step {killed_at}" in resumed.stdout
  step_a, params_a = final_params(uninterrupted)
  step_b, params_b = final_params(out)
  assert step_a == step_b == STEPS
  for k, v in params_a.items():
    np.testing.assert_array_equal(params_b[k], v, err_msg=k)
  seen_a, seen_b = order(uninterrupted), order(out)
  assert [r["step"] for r in seen_b] == list(range(1, STEPS + 1))
  assert seen_a == seen_b


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, data_dir):
  out = str(tmp_path / "preempted")
  proc = subprocess.Popen(train_cmd(out, data_dir), env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(os.path.join(out, "checkpoints"), SAVE_EVERY, proc)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-2000:]
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["stopped_early"] is True and summary["steps"] < STEPS
  latest = Checkpointer(os.path.join(out, "checkpoints"), read_only=True).latest_step()
  assert latest == summary["steps"], "the step reached at SIGTERM must be saved"
