"""`sqllava-jax check-checkpoint DIR`: checks checkpoint files against their manifests.

DIR is a training run's output_dir, its `checkpoints` directory (or a converted model's), or
one step directory. Every step is checked (or only `--step N`); each gets one line, and each
damaged, missing or unexpected file one more. Exits 0 when every checked step is intact, 1
otherwise. `--write-manifest` adopts steps written before manifests existed: it writes one
for each step that has none (only for files you trust: it records what is there now).
"""

from __future__ import annotations

import argparse
import os

from etils import epath


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("dir", help="output_dir, checkpoint directory or step directory")
  parser.add_argument("--step", type=int, help="check only this step")
  parser.add_argument("--write-manifest", action="store_true",
                      help="write a manifest for each step that has none (trusting its files)")


def step_dirs(directory: str, step: int | None) -> dict[str, str]:
  """{label: step directory} to check in `directory`."""
  from sqllava_jax.training.checkpoint import Checkpointer
  from sqllava_jax.training.integrity import MANIFEST
  if any(os.path.exists(os.path.join(directory, f)) for f in (MANIFEST, "_CHECKPOINT_METADATA")):
    return {directory: directory}
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} is not a directory")
  steps = Checkpointer(directory, read_only=True).all_steps()
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"{directory} has no step {step} (steps: {sorted(steps)})")
    steps = [step]
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint step")
  return {f"step {s}": os.path.join(directory, str(s)) for s in sorted(steps)}


def run(args: argparse.Namespace) -> int:
  from sqllava_jax.training import integrity
  damaged = 0
  for label, path in step_dirs(args.dir, args.step).items():
    if args.write_manifest and not (epath.Path(path) / integrity.MANIFEST).exists():
      manifest = integrity.write_manifest(path)
      print(f"{label}: wrote {integrity.MANIFEST} for {len(manifest['files'])} files ({path})")
    problems = integrity.verify(path)
    if problems:
      damaged += 1
      print(f"{label}: DAMAGED ({path})")
      print("\n".join(f"  {p}" for p in problems))
    else:
      found, _ = integrity.read_manifest(epath.Path(path))
      assert found is not None  # `verify` reports a missing one
      files = found["files"]
      size = sum(f["size"] for f in files.values())
      print(f"{label}: intact, {len(files)} files, {size} bytes ({path})")
  return 1 if damaged else 0
