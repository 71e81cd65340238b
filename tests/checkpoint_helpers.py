"""A finished tiny run with checkpoints, shared by the checkpoint-integrity and save-error
tests (import the fixture into the test module)."""

from __future__ import annotations

import os

import pytest

from sqllava_jax.training.trainer import Trainer
from tests.train_helpers import tiny_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished 4-step run (blocking saves) with checkpoints at steps 2 and 4."""
  out = str(tmp_path_factory.mktemp("trained"))
  Trainer(tiny_cfg(out, data_dir, "train.max_steps=4", "train.save_every=2")).run()
  assert not os.path.exists(os.path.join(out, "run.lock")), "the run must release its lock"
  return out
