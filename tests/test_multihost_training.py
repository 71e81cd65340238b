"""Two CPU processes against a local coordinator train exactly like one process with the
same global batch, and both write their part of the checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.train_helpers import CONFIG, subprocess_env

STEPS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cmd(out, data, *extra):
  return [sys.executable, "-m", "sqllava_jax.cli", "train", CONFIG, f"output_dir={out}",
          f"data.synthetic.dir={data}", f"train.max_steps={STEPS}", "train.save_every=2",
          "train.per_device_batch_size=1", *extra]


def env(devices):
  return subprocess_env(devices)


def losses(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


def test_two_processes_equal_one(tmp_path, data_dir):
  single = str(tmp_path / "single")
  subprocess.run(cmd(single, data_dir), env=env(2), check=True, capture_output=True, text=True)
  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [subprocess.Popen(cmd(multi, data_dir, "--coordinator", f"localhost:{port}",
                                "--num-processes", "2", "--process-id", str(i)),
                            env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert losses(multi) == pytest.approx(losses(single), abs=1e-5)
  assert len(losses(multi)) == STEPS
  # Both processes recorded their own shard of the data, and the shards are disjoint.
  seen = []
  for i in range(2):
    with open(os.path.join(multi, f"data_order.p{i}.jsonl")) as f:
      seen.append([r["example_index"] for r in map(json.loads, f)])
  flat = [x for rows in seen for step in rows for x in step]
  assert len(flat) == len(set(flat)) == 2 * STEPS
  # The checkpoint holds the data-iterator state of each process and resumes in both.
  step_dir = os.path.join(multi, "checkpoints", str(STEPS))
  data_files = os.listdir(os.path.join(step_dir, "data"))
  assert (any("process_0" in f for f in data_files)
          and any("process_1" in f for f in data_files)), data_files
