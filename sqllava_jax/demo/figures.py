"""The report's figures (matplotlib, PNG): the loss curves of the three stages, one held-out
image beside the questions the model asked about it and its answers, and a grid of held-out
images with the model's answers marked right or wrong.

The images are 32 pixels a side: they are drawn with nearest-neighbour scaling, so each
pixel the model saw stays a visible square.
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import numpy as np

RIGHT, WRONG = "#1a7f37", "#cf222e"
RIGHT_MARK, WRONG_MARK = "\u2713", "\u2717"  # DejaVu Sans, matplotlib's default font, has both


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _image(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)
  return path


def loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], titles: Mapping[str, str],
                path: str) -> str:
  """One panel per stage (their scales differ), loss against the step; on a log axis where
  it falls by more than 10x (stage 0 from nothing), else linear."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
  for ax, (name, points) in zip(axes[0], curves.items()):
    if points:
      values = [p[1] for p in points]
      ax.plot([p[0] for p in points], values, lw=1.5, color="#0969da")
      if min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    else:
      ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
      ax.set_yticks([])
    ax.set_title("\n".join(textwrap.wrap(titles[name], 40)), fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel("training loss")
  fig.tight_layout()
  return _save(fig, path)


def _mark(ok: bool) -> tuple[str, str]:
  return (RIGHT_MARK, RIGHT) if ok else (WRONG_MARK, WRONG)


def asked(image: str, truth: str, turns: Sequence[Mapping], path: str) -> str:
  """The image on the left; on the right each sampled question, marked valid (about a shape
  that is in the image) or not, and the greedy answer, marked right or wrong."""
  plt = _pyplot()
  fig = plt.figure(figsize=(9.5, 3.4))
  ax = fig.add_axes((0.02, 0.1, 0.27, 0.8))
  ax.imshow(_image(image), interpolation="nearest")
  ax.set_axis_off()
  ax.set_title("held-out image", fontsize=10)
  y = 0.92
  fig.text(0.33, y, "\n".join(textwrap.wrap(f"truth: {truth}", 80)), fontsize=8.5,
           color="#57606a", va="top")
  y -= 0.17
  for i, t in enumerate(turns, 1):
    mark, color = _mark(t["valid"])
    fig.text(0.33, y, f"{mark} Q{i}: {_clip(t['question'], 70)}", fontsize=10.5, color=color,
             va="top", weight="bold")
    mark, color = _mark(t["correct"])
    truth_note = "" if t["correct"] or t["gold"] is None else f"   (truth: {t['gold']})"
    fig.text(0.36, y - 0.075, f"{mark} A: {_clip(t['answer'], 60)}{truth_note}", fontsize=10,
             color=color, va="top")
    y -= 0.23
  return _save(fig, path)


def _clip(text: str, width: int) -> str:
  text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
  return text if len(text) <= width else text[:width - 1] + "\u2026"


def answer_grid(examples: Sequence[Mapping], path: str, columns: int = 4) -> str:
  """`examples`: {"image": path, "question", "answer", "gold", "correct"}; each image with its
  question above and the model's answer below, green and ticked when right, red and crossed
  with the truth when wrong."""
  plt = _pyplot()
  rows = max(1, -(-len(examples) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(2.5 * columns, 3.3 * rows), squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for ax, ex in zip(axes.flat, examples):
    ax.imshow(_image(ex["image"]), interpolation="nearest")
    ax.set_title("\n".join(textwrap.wrap(ex["question"], 30)), fontsize=8)
    mark, color = _mark(ex["correct"])
    lines = textwrap.wrap(f"{mark} {_clip(ex['answer'], 64)}", 32)
    if not ex["correct"]:
      lines += textwrap.wrap(f"truth: {ex['gold']}", 32)
    ax.text(0.5, -0.04, "\n".join(lines), transform=ax.transAxes, ha="center", va="top",
            fontsize=8, color=color, weight="bold")
  fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.08, wspace=0.15, hspace=0.55)
  return _save(fig, path)
