"""One run per output directory: `<output_dir>/run.lock`, held by process 0 of the run.

The lock names its holder: {"host", "pid", "started" (the process's start time), "boot_id",
"start_ticks"}. A second run on the same directory reads it and

- refuses at once, naming the holder, while the holder is alive;
- takes the lock over, saying from whom and why, when the holder is gone. On the holder's
  machine (same host name and kernel boot id): no process has that pid any more, or the
  process with that pid started at another time (the pid was reused; start times come from
  `/proc/<pid>/stat`). From another machine, where a pid cannot be looked up: the holder
  touches the lock file every `HEARTBEAT_S` seconds, and a lock untouched for
  `STALE_AFTER_S` is stale (a run killed with SIGKILL, a host that went away).

On a pod the output directory is shared storage and the processes of one run are one
holder: process 0 takes the lock and the others learn its answer (`on_main`), so a refusal
stops every process of the second run before any of them writes. A lock left by a run that
is still alive on this very process (a second `Trainer` in one Python process) is taken
again without a message.

Creating the lock is atomic (the content is written to a private file, then hard-linked to
`run.lock`, which fails if it exists). Taking over moves the stale file aside under a name
of our own and checks that what moved is what was judged stale; if another run got there
first, its lock is put back and we refuse.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class OutputDirLockedError(RuntimeError):
  """Another live run holds the output directory."""


def _read(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.read()
  except (FileNotFoundError, OSError, UnicodeDecodeError):
    return None


def _boot_id() -> Optional[str]:
  text = _read("/proc/sys/kernel/random/boot_id")
  return text.strip() if text else None


def start_ticks(pid: int) -> Optional[int]:
  """Start time of `pid` in clock ticks since boot (Linux), None if unknown or no such pid."""
  text = _read(f"/proc/{pid}/stat")
  if not text:
    return None
  # Field 22; the command name (field 2) is in parentheses and may hold spaces.
  return int(text[text.rindex(")") + 2:].split()[19])


def _started_at(ticks: Optional[int]) -> str:
  """The wall-clock time of a start in ticks since boot, ISO 8601 UTC (now if unknown)."""
  stamp = time.time()
  stat = _read("/proc/stat")
  if ticks is not None and stat:
    btime = next((int(line.split()[1]) for line in stat.splitlines() if line.startswith("btime")),
                 None)
    if btime is not None:
      stamp = btime + ticks / os.sysconf("SC_CLK_TCK")
  return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


def this_process() -> dict:
  ticks = start_ticks(os.getpid())
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started_at(ticks),
          "start_ticks": ticks, "boot_id": _boot_id()}


def describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")


def _pid_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def why_stale(holder: Optional[dict], lock_age_s: float, me: dict) -> Optional[str]:
  """Why the lock's holder is gone, or None while it may be alive."""
  # Without /proc (not Linux) both boot ids are None: the host name alone says "here".
  same_machine = (holder is not None and holder.get("host") == me["host"]
                  and holder.get("boot_id") == me["boot_id"])
  if not same_machine:
    if lock_age_s > STALE_AFTER_S:
      return f"its heartbeat stopped {lock_age_s:.0f} s ago"
    return None
  assert holder is not None  # same_machine says so
  pid = int(holder["pid"])
  if not _pid_exists(pid):
    return f"no process {pid} on this host"
  ticks = start_ticks(pid)
  if holder.get("start_ticks") is not None and ticks is not None and ticks != holder["start_ticks"]:
    return f"pid {pid} now belongs to a process started at {_started_at(ticks)}"
  return None


class RunLock:
  """`acquire()` or raise OutputDirLockedError; `release()` when the run ends."""

  def __init__(self, output_dir: str, *, heartbeat_s: float = HEARTBEAT_S):
    self.output_dir = output_dir
    self.path = os.path.join(output_dir, LOCK_NAME)
    self.me = this_process()
    self.text = json.dumps(self.me, indent=1) + "\n"
    self.heartbeat_s = heartbeat_s
    self._stop = threading.Event()
    self._held = False

  def acquire(self) -> None:
    os.makedirs(self.output_dir, exist_ok=True)
    for _ in range(3):
      if self._create():
        self._start_heartbeat()
        return
      seen = _read(self.path)
      if seen is None:
        continue  # released between our attempt and the read: try again
      holder = self._parse(seen)
      if holder is not None and self._is_me(holder):
        self._replace_own()
        return
      why = why_stale(holder, self._age(), self.me)
      if why is None:
        raise OutputDirLockedError(
            f"{self.output_dir} is in use by another run ({describe(holder or {})}; lock "
            f"{self.path}); wait for it or stop it, or choose another output_dir")
      if self._take_over(seen):
        print(f"{self.output_dir}: taking over the lock of a run that is gone "
              f"({describe(holder or {})}: {why})", file=sys.stderr, flush=True)
    raise OutputDirLockedError(f"{self.path}: could not take the lock (other runs are "
                               "starting on this output_dir at the same time)")

  def release(self) -> None:
    self._stop.set()
    if self._held and _read(self.path) == self.text:
      os.unlink(self.path)
    self._held = False

  # ---- helpers --------------------------------------------------------------------------
  def _create(self) -> bool:
    """Atomically creates the lock with our content; False if one exists."""
    private = f"{self.path}.{self.me['host']}.{self.me['pid']}"
    with open(private, "w") as f:
      f.write(self.text)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(private, self.path)
      self._held = True
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(private)

  def _take_over(self, seen: str) -> bool:
    """Moves the stale lock aside; True if it was the one judged stale (then it is gone)."""
    aside = f"{self.path}.stale.{self.me['host']}.{self.me['pid']}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    if _read(aside) != seen:  # another run took over first: give its lock back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    os.unlink(aside)
    return _read(self.path) is None

  def _replace_own(self) -> None:
    with open(self.path, "w") as f:
      f.write(self.text)
    self._held = True
    self._start_heartbeat()

  def _is_me(self, holder: dict) -> bool:
    return all(holder.get(k) == self.me[k] for k in ("host", "pid", "start_ticks", "boot_id"))

  @staticmethod
  def _parse(text: str) -> Optional[dict]:
    try:
      holder = json.loads(text)
    except ValueError:
      return None
    return holder if isinstance(holder, dict) and "pid" in holder else None

  def _age(self) -> float:
    try:
      return time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return 0.0

  def _start_heartbeat(self) -> None:
    self._stop.clear()

    def beat():
      while not self._stop.wait(self.heartbeat_s):
        try:
          os.utime(self.path)
        except OSError:
          pass

    threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()
