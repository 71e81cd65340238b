"""Wall time, CPU time and machine load of each demo step.

On a shared machine wall time says as much about the neighbours as about the demo, so
every step also records the CPU seconds this process spent and the load average around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import threading
import time
from typing import Iterator, Optional


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its waited-for children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclasses.dataclass
class StepTime:
  name: str
  wall_s: float
  cpu_s: float
  load_mean: Optional[float]  # mean 1-minute load average sampled during the step


class LoadSampler:
  """Samples the 1-minute load average every `every` seconds in a daemon thread."""

  def __init__(self, every: float = 5.0):
    self.samples: list[tuple[float, float]] = []
    self._every, self._stop = every, threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True, name="load-sampler")

  def _loop(self) -> None:
    while True:
      self.samples.append((time.time(), os.getloadavg()[0]))
      if self._stop.wait(self._every):
        return

  def start(self) -> "LoadSampler":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()

  def mean(self, since: float = 0.0, until: float = float("inf")) -> Optional[float]:
    window = [v for t, v in list(self.samples) if since <= t <= until]
    return sum(window) / len(window) if window else None

  def peak(self) -> Optional[float]:
    return max((v for _, v in list(self.samples)), default=None)


class Timings:
  """`with timings.step("stage 1"): ...` records that step; `total()` the whole run."""

  def __init__(self, sampler: Optional[LoadSampler] = None):
    self.steps: list[StepTime] = []
    self.sampler = sampler or LoadSampler()
    self.start_wall, self.start_cpu = time.time(), cpu_seconds()
    self.start_load = os.getloadavg()

  @contextlib.contextmanager
  def step(self, name: str) -> Iterator[None]:
    wall, cpu = time.time(), cpu_seconds()
    try:
      yield
    finally:
      now = time.time()
      self.steps.append(StepTime(name, now - wall, cpu_seconds() - cpu,
                                 self.sampler.mean(wall, now)))

  def total(self) -> StepTime:
    return StepTime("total", time.time() - self.start_wall, cpu_seconds() - self.start_cpu,
                    self.sampler.mean())
