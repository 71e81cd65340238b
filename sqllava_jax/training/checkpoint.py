"""Checkpoints with orbax: parameters, training state, config and the Grain iterator.

A checkpoint directory is an orbax `CheckpointManager` directory; each step holds items

    params   the model parameters (pytree of arrays, our paths)
    train    optimizer state, step, RNG key data, counters (training runs only)
    meta     JSON: the full config, the step, anything the runner records
    data     the Grain iterator state of every process (training runs only)

Orbax writes a step into a temporary directory and renames it when complete, so a
half-written (killed) checkpoint is never listed as the latest. Before that rename each step
gets `integrity.json`, a checksum of every file (`integrity.py`), and nothing is restored
from a step whose files disagree with it. A save that fails (disk full, a write error)
raises `CheckpointSaveError` naming the step's directory and leaves the steps before it as
they were. The same layout serves training runs and converted models (`convert import-hf`
writes step 0 with params + meta), so `train`, `eval`, `generate` and `ask` all take any of
them.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sqllava_jax import configlib
from sqllava_jax.config import Config
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.training import integrity
from sqllava_jax.training.integrity import DamagedCheckpointError
from sqllava_jax.training.on_main import barrier, on_main

PARAMS, TRAIN, META, DATA = "params", "train", "meta", "data"


# What a failing write raises: OSError from Python's own files, ValueError from tensorstore
# ("OUT_OF_RANGE: Error writing ... File too large [os_error_code='27']").
_SAVE_ERRORS = (OSError, ValueError)
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?\}'\]")


class CheckpointSaveError(RuntimeError):
  """A step that could not be written (disk full, a write error). It was never committed, so
  the steps saved before it are intact and restorable."""

  def __init__(self, step: int, step_dir: str, cause: BaseException):
    self.step, self.step_dir = step, step_dir
    why = _TENSORSTORE_SPEC.sub("", str(cause))  # the path and OS error stay, the spec goes
    super().__init__(f"saving step {step} to {step_dir} failed: {type(cause).__name__}: {why}")


class Checkpointer:
  """Save every `save_every` steps (and when forced), keep the last `keep`, async by default."""

  def __init__(self, directory: str, *, save_every: int = 1, keep: Optional[int] = None,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    # The interval alone: orbax's default policy would also save the first step of a fresh
    # run and at preemption sync points; the trainer forces the saves it wants off the interval.
    interval = ocp.checkpoint_managers.FixedIntervalPolicy(max(save_every, 1))
    self.options = ocp.CheckpointManagerOptions(
        save_decision_policy=interval, max_to_keep=keep,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        temporary_path_class=integrity.temporary_path_class(self.directory))
    # A writer starts by removing the temporary directories of saves that were killed.
    self.manager = self._open(cleanup=not read_only)
    self._in_flight: Optional[int] = None  # the step of an async save not yet waited for

  def _open(self, cleanup: bool = False) -> ocp.CheckpointManager:
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler()}
    try:
      import grain
      handlers[DATA] = grain.checkpoint.CheckpointHandler()
    except (ImportError, AttributeError):
      pass
    options = dataclasses.replace(self.options, cleanup_tmp_directories=cleanup)
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    """Whether `step` is one of the interval's (and newer than the latest saved step)."""
    return self.manager.should_save(step)

  def save(self, step: int, *, params: Any, meta: Mapping[str, Any], train: Any = None,
           data_iter: Any = None, force: bool = False) -> bool:
    """Starts (async) or writes the save of `step` if it is one of the interval's or `force`;
    returns whether it did. Raises CheckpointSaveError for this step, or first for an earlier
    async save that failed since the last call."""
    if not force and not self.should_save(step):
      return False
    self.wait()
    items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(dict(meta))}
    if train is not None:
      items[TRAIN] = ocp.args.StandardSave(train)
    if data_iter is not None:
      import grain
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except _SAVE_ERRORS as e:
      raise self._failed(step, e) from e
    if saved and self.options.enable_async_checkpointing:
      self._in_flight = step
    return saved

  def _failed(self, step: int, cause: BaseException) -> CheckpointSaveError:
    """After a failed save orbax's own list of steps is wrong (it has already dropped the
    steps that the new one would have replaced); a fresh manager lists what is on disk. The
    half-written step is removed to give its space back, as far as it goes: writes of the
    failed save may still be landing in it (what is left goes when the next run starts)."""
    try:
      self.manager.close()
    except Exception:  # the same failure again: it is being reported
      pass
    self.manager = self._open()
    if jax.process_index() == 0 and "://" not in self.directory:
      for partial in glob.glob(f"{glob.escape(self.step_dir(step))}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
    return CheckpointSaveError(step, self.step_dir(step), cause)

  # ---- integrity ----------------------------------------------------------------------------
  def verify(self, step: int) -> list[str]:
    """What is wrong with the files of `step` ([] when they match its manifest)."""
    return integrity.verify(self.step_dir(step))

  def check(self, step: int) -> None:
    """Raises DamagedCheckpointError on every process unless `step` is intact (process 0
    reads the files)."""
    def intact() -> int:
      integrity.check(self.step_dir(step))
      return 0

    on_main(intact,
            elsewhere=lambda: DamagedCheckpointError(self.step_dir(step), ["see process 0"]))

  def newest_intact(self) -> tuple[Optional[int], list[tuple[int, list[str]]]]:
    """(the newest intact step, None when there is no step; [(step, problems)] of the newer,
    damaged ones, on process 0). Raises DamagedCheckpointError when no step is intact."""
    damaged: list[tuple[int, list[str]]] = []

    def newest() -> int:
      for step in sorted(self.all_steps(), reverse=True):
        problems = self.verify(step)
        if not problems:
          return step
        damaged.append((step, problems))
      if damaged:
        raise DamagedCheckpointError(
            self.directory, [f"step {s}: " + "; ".join(p) for s, p in damaged] +
            ["no step is intact; move the damaged ones away to start from scratch"])
      return -1

    step = on_main(newest, elsewhere=lambda: DamagedCheckpointError(
        self.directory, ["no step is intact (process 0 names the files)"]))
    return (None if step < 0 else step), damaged

  def set_aside(self, steps: Sequence[int]) -> list[str]:
    """Renames damaged steps to `<step>.damaged` (kept to inspect, ignored by orbax, out of
    the way when that step is saved again); then every process lists the steps anew."""
    moved = []
    if jax.process_index() == 0:
      for step in steps:
        target, n = f"{self.step_dir(step)}.damaged", 1
        while epath.Path(target).exists():
          target, n = f"{self.step_dir(step)}.damaged-{n}", n + 1
        epath.Path(self.step_dir(step)).rename(target)
        moved.append(target)
    barrier("sqllava_checkpoint_set_aside")
    self.manager.reload()
    return moved

  # ---- restore ------------------------------------------------------------------------------
  def restore(self, step: Optional[int] = None, *, params: Any, train: Any = None,
              data_iter: Any = None, verify: bool = True) -> dict:
    """Restores onto the shapes, dtypes and shardings of the abstract `params` / `train`
    (ShapeDtypeStructs with `.sharding`: a different mesh than the saving run is fine),
    after checking the step's files against its manifest unless `verify=False`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    if verify:
      self.check(step)
    items = {PARAMS: ocp.args.StandardRestore(params), META: ocp.args.JsonRestore()}
    if train is not None:
      items[TRAIN] = ocp.args.StandardRestore(train)
    if data_iter is not None:
      import grain
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {name: out[name] for name in items} | {"step": step}

  def read_meta(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
    args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
    return self.manager.restore(step, args=args)[META]

  def wait(self) -> None:
    """Blocks until an async save is committed; raises CheckpointSaveError if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except _SAVE_ERRORS as e:
      if step is None:
        raise
      raise self._failed(step, e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()


def abstract_params(model_cfg, shardings: Any = None) -> Any:
  """Shape/dtype (and sharding) skeleton of the parameters, for restoring without init."""
  state = nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param))
  if shardings is None:
    return state
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                      shardings)


def config_from_meta(meta: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
  data = configlib.apply_overrides(meta["config"], overrides, Config)
  return configlib.from_dict(Config, data)


def save_model(directory: str, model: nnx.Module, cfg: Config, *, step: int = 0,
               extra_meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a model-only checkpoint (params + meta) that every command accepts."""
  ckpt = Checkpointer(directory, async_save=False)
  meta = {"config": configlib.to_dict(cfg), "step": step, **(extra_meta or {})}
  ckpt.save(step, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta=meta, force=True)
  ckpt.close()


def load_model(directory: str, *, step: Optional[int] = None, overrides: Sequence[str] = (),
               shardings: Any = None):
  """(SQLLaVA, Config) from any checkpoint directory (training run or converted model).

  The config is the one saved with the checkpoint; `overrides` (`key.sub=value`) may change
  runtime fields such as `model.compute_dtype` or `model.attention_impl`."""
  ckpt = Checkpointer(directory, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint (no step directory)")
  ckpt.check(step)  # before its config is read: a damaged meta is reported as damage
  cfg = config_from_meta(ckpt.read_meta(step), overrides)
  model = abstract_model(cfg.model)
  graphdef, state = nnx.split(model)
  restored = ckpt.restore(step, params=abstract_params(cfg.model, shardings),
                          verify=False)[PARAMS]
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), cfg
