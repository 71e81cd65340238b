"""A/B timing with each side in its own process.

JAX and PyTorch in one process share the cores through two thread pools that know nothing of
each other; on a small machine the side that runs second pays for the first one's threads
(measured on 2 cores: our train step took 31.7 s interleaved in one process with the
reference, 24.9 s alone). So each side lives in a worker process that blocks on a pipe while
the other runs, and the parent, which imports neither framework, alternates them.

    side = Side(build_ours, shapes)   # build_ours(shapes) -> an object; runs in the worker
    seconds, loss = side.call("timed_step")
    side.close()

Failures in a worker come back as `WorkerError` carrying the worker's traceback.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable


class WorkerError(RuntimeError):
  pass


def _serve(conn, factory: Callable[..., Any], args: tuple) -> None:
  try:
    obj = factory(*args)
    conn.send((True, obj.info() if hasattr(obj, "info") else None))
  except BaseException:  # pylint: disable=broad-except
    conn.send((False, traceback.format_exc()))
    return
  while True:
    method, call_args = conn.recv()
    if method is None:
      return
    try:
      conn.send((True, getattr(obj, method)(*call_args)))
    except BaseException:  # pylint: disable=broad-except
      conn.send((False, traceback.format_exc()))


class Side:
  """`factory(*args)` built in a fresh (spawned) process; `call` runs one of its methods
  there and returns the result. `info` is what the object's `info()` returned, if it has one."""

  def __init__(self, name: str, factory: Callable[..., Any], *args):
    ctx = multiprocessing.get_context("spawn")
    self.name = name
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, factory, args), daemon=True,
                                name=f"ab-{name}")
    self._process.start()
    child.close()
    self.info = self._receive()

  def call(self, method: str, *args):
    self._conn.send((method, args))
    return self._receive()

  def _receive(self):
    try:
      ok, value = self._conn.recv()
    except EOFError as e:
      raise WorkerError(f"{self.name}: the worker process died (exit code "
                        f"{self._process.exitcode})") from e
    if not ok:
      raise WorkerError(f"{self.name} failed in its worker process:\n{value}")
    return value

  def close(self) -> None:
    if self._process.is_alive():
      self._conn.send((None, ()))
      self._process.join(timeout=60)
    self._conn.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
