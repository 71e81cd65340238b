"""Training metrics: `metrics.jsonl`, TensorBoard event files, and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence


class MetricsLogger:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard (process 0)."""

  def __init__(self, output_dir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(output_dir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(output_dir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  try:
    return v.item()
  except AttributeError:
    return v


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(records: Sequence[Mapping], path: str, *, title: str = "training loss",
                    key: str = "loss") -> Optional[str]:
  """Writes a PNG of `key` against `step`; returns the path (None without records)."""
  points = [(r["step"], r[key]) for r in records if key in r]
  if not points:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
