"""Disk full or a write error during a save loses nothing: the error names the path, the
previous checkpoint stays intact and restorable, and training stops cleanly (default) or goes
on (`train.on_save_error=continue`). Writes fail for real: RLIMIT_FSIZE makes the kernel
refuse to grow a file past the limit (EFBIG, with SIGXFSZ ignored), as a full disk would."""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from sqllava_jax.training.checkpoint import Checkpointer, CheckpointSaveError, load_model
from sqllava_jax.training.trainer import Trainer
from sqllava_jax.tree_paths import flat
from tests.checkpoint_helpers import trained  # noqa: F401  (a fixture)
from tests.train_helpers import CONFIG, metrics, subprocess_env, tiny_cfg

# Above what training writes between saves (metrics and data-order lines), below the
# checkpoint's larger array files (hundreds of KB for the tiny model).
FILE_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


def limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.RLIM_INFINITY))


@contextlib.contextmanager
def file_size_limit():
  """This process's writes past FILE_LIMIT fail with EFBIG while inside."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def params_of(ckpt_dir, step):
  model, _ = load_model(ckpt_dir, step=step)
  from flax import nnx
  return {k: np.asarray(v) for k, v in flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def test_disk_full_stops_cleanly_and_the_previous_checkpoint_survives(trained, data_dir, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(trained, out)
  ckpt_dir = os.path.join(out, "checkpoints")
  before = params_of(ckpt_dir, 4)
  # Resumes from step 4; the save of step 6 (async, the default) fails.
  proc = subprocess.run([sys.executable, "-m", "sqllava_jax.cli", "train", CONFIG,
                         f"output_dir={out}", f"data.synthetic.dir={data_dir}",
                         "train.max_steps=8", "train.save_every=2"],
                        env=subprocess_env(1), preexec_fn=limit_file_size, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  # (orbax's own log lines of the failed writes may come before or after ours)
  ours = [line for line in proc.stderr.splitlines()
          if line.startswith("sqllava-jax train: error:")]
  assert len(ours) == 1, proc.stderr[-3000:]
  assert ours[0].startswith(f"sqllava-jax train: error: saving step 6 to {ckpt_dir}/6 failed: ")
  assert f"{ckpt_dir}/6.orbax-checkpoint-tmp/" in ours[0] and "File too large" in ours[0]
  assert "resumed from step 4" in proc.stdout
  # It stopped at the failed save (the error of an async save shows at the next one, step 8)
  # and gave back the lock; no step but the two intact ones is listed.
  assert [m["step"] for m in metrics(out)][-1] in (6, 8)
  assert not os.path.exists(os.path.join(out, "run.lock"))
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  assert ckpt.all_steps() == [2, 4] and ckpt.verify(4) == []
  after = params_of(ckpt_dir, 4)
  for k, v in before.items():
    np.testing.assert_array_equal(after[k], v, err_msg=k)
  assert sorted(n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" not in n) == ["2", "4"]


def trainer_failing_at(step, out, data_dir, monkeypatch, *overrides) -> Trainer:
  """A trainer whose save of `step` runs under the file-size limit (and fails)."""
  trainer = Trainer(tiny_cfg(out, data_dir, "train.save_every=2", *overrides))
  save = trainer.ckpt.save

  def limited(at, **kw):
    with file_size_limit() if at == step else contextlib.nullcontext():
      return save(at, **kw)

  monkeypatch.setattr(trainer.ckpt, "save", limited)
  return trainer


def test_continue_goes_on_after_a_failed_save(data_dir, tmp_path, monkeypatch, capsys):
  out = str(tmp_path / "run")
  trainer = trainer_failing_at(4, out, data_dir, monkeypatch, "train.max_steps=8",
                               "train.on_save_error=continue")
  summary = trainer.run()
  err = capsys.readouterr().err
  ckpt_dir = os.path.join(out, "checkpoints")
  assert f"saving step 4 to {ckpt_dir}/4 failed: " in err and "File too large" in err
  assert "training goes on (train.on_save_error=continue); the newest saved step is 2" in err
  assert summary["steps"] == 8 and summary["failed_saves"] == [4]
  assert [m["step"] for m in metrics(out)] == list(range(1, 9))
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  assert ckpt.all_steps() == [2, 6, 8] and all(ckpt.verify(s) == [] for s in (2, 6, 8))


def test_a_failed_last_save_stops_even_with_continue(data_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "run")
  trainer = trainer_failing_at(4, out, data_dir, monkeypatch, "train.max_steps=4",
                               "train.on_save_error=continue")
  with pytest.raises(CheckpointSaveError, match="saving step 4 to .*/4 failed: .*File too large"):
    trainer.run()
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), read_only=True)
  assert ckpt.all_steps() == [2] and ckpt.verify(2) == []
  assert not os.path.exists(os.path.join(out, "run.lock"))
  with open(os.path.join(out, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
