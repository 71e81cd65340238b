"""Two runs never write one output directory: a second `train` on a held output_dir refuses
at once naming the holder; a lock left by a killed run, by a process whose pid was reused or
by another host whose heartbeat stopped is taken over with a message."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sqllava_jax.training import run_lock
from sqllava_jax.training.run_lock import OutputDirLockedError, RunLock
from tests.train_helpers import CONFIG, subprocess_env

HOLDER = """
import sys, time
from sqllava_jax.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process (not this one) that holds the lock of tmp_path/out."""
  out = str(tmp_path / "out")
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.strip() == "held", proc.stderr.read()
  yield out, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def read_lock(out):
  with open(os.path.join(out, run_lock.LOCK_NAME)) as f:
    return json.load(f)


def write_lock(out, **fields):
  os.makedirs(out, exist_ok=True)
  holder = run_lock.this_process() | fields
  with open(os.path.join(out, run_lock.LOCK_NAME), "w") as f:
    json.dump(holder, f)
  return holder


def test_second_train_refuses_naming_the_live_holder(holder, tmp_path):
  out, proc = holder
  held = read_lock(out)
  assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
  second = subprocess.run([sys.executable, "-m", "sqllava_jax.cli", "train", CONFIG,
                           f"output_dir={out}", f"data.synthetic.dir={tmp_path / 'data'}"],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert second.returncode == 1, second.stderr[-2000:]
  last = [line for line in second.stderr.splitlines()
          if line.startswith("sqllava-jax train: error:")][-1]
  assert last.startswith(f"sqllava-jax train: error: {out} is in use by another run")
  assert f"host {held['host']}, pid {proc.pid}, started {held['started']}" in last
  # It refused before writing anything: no checkpoint directory, the holder's lock untouched.
  assert sorted(os.listdir(out)) == [run_lock.LOCK_NAME]
  assert read_lock(out) == held and proc.poll() is None


def test_lock_of_a_killed_run_is_taken_over(holder, capsys):
  out, proc = holder
  held = read_lock(out)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = RunLock(out)
  lock.acquire()
  err = capsys.readouterr().err
  assert f"{out}: taking over the lock of a run that is gone" in err
  assert (f"pid {held['pid']}, started {held['started']}: "
          f"no process {held['pid']} on this host") in err
  assert read_lock(out)["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(os.path.join(out, run_lock.LOCK_NAME))


def test_a_reused_pid_is_told_apart_by_its_start_time(holder, capsys):
  out, proc = holder
  held = read_lock(out)
  # The same pid, alive, but the lock says it started earlier: that run is gone.
  write_lock(out, pid=proc.pid, start_ticks=held["start_ticks"] - 100, started="earlier")
  lock = RunLock(out)
  lock.acquire()
  err = capsys.readouterr().err
  assert f"pid {proc.pid}, started earlier: pid {proc.pid} now belongs to a process started at " \
         f"{held['started']}" in err
  lock.release()


def test_another_hosts_lock_is_live_until_its_heartbeat_stops(tmp_path, capsys):
  out = str(tmp_path / "out")
  write_lock(out, host="node-7", pid=4242, boot_id="other", started="2026-01-01T00:00:00+00:00")
  with pytest.raises(OutputDirLockedError, match="host node-7, pid 4242, started 2026-01-01"):
    RunLock(out).acquire()
  past = time.time() - run_lock.STALE_AFTER_S - 5
  os.utime(os.path.join(out, run_lock.LOCK_NAME), (past, past))
  lock = RunLock(out)
  lock.acquire()
  assert "(host node-7, pid 4242, started 2026-01-01T00:00:00+00:00: its heartbeat stopped" in \
      capsys.readouterr().err
  lock.release()


def test_the_holder_keeps_its_heartbeat(tmp_path):
  out = str(tmp_path / "out")
  lock = RunLock(out, heartbeat_s=0.05)
  lock.acquire()
  path = os.path.join(out, run_lock.LOCK_NAME)
  past = time.time() - 3600
  os.utime(path, (past, past))
  deadline = time.time() + 30
  while os.stat(path).st_mtime < past + 60 and time.time() < deadline:
    time.sleep(0.05)
  assert os.stat(path).st_mtime > past + 60, "the heartbeat did not touch the lock"
  lock.release()


def test_release_leaves_another_runs_lock_alone(tmp_path):
  out = str(tmp_path / "out")
  lock = RunLock(out)
  lock.acquire()
  theirs = write_lock(out, host="node-7", pid=4242, boot_id="other")
  lock.release()
  assert read_lock(out) == theirs
