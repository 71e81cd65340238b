"""Checkpoints with orbax: parameters, training state, config and the Grain iterator.

A checkpoint directory is an orbax `CheckpointManager` directory; each step holds items

    params   the model parameters (pytree of arrays, our paths)
    train    optimizer state, step, RNG key data, counters (training runs only)
    meta     JSON: the full config, the step, anything the runner records
    data     the Grain iterator state of every process (training runs only)

Orbax writes a step into a temporary directory and renames it when complete, so a
half-written (killed) checkpoint is never listed as the latest. The same layout serves
training runs and converted models (`convert import-hf` writes step 0 with params + meta),
so `train`, `eval`, `generate` and `ask` all take any of them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sqllava_jax import configlib
from sqllava_jax.config import Config

PARAMS, TRAIN, META, DATA = "params", "train", "meta", "data"


class Checkpointer:
  """Save every `save_every` steps (and when forced), keep the last `keep`, async by default."""

  def __init__(self, directory: str, *, save_every: int = 1, keep: Optional[int] = None,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler()}
    try:
      import grain
      handlers[DATA] = grain.checkpoint.CheckpointHandler()
    except (ImportError, AttributeError):
      pass
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def save(self, step: int, *, params: Any, meta: Mapping[str, Any], train: Any = None,
           data_iter: Any = None, force: bool = False) -> bool:
    items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(dict(meta))}
    if train is not None:
      items[TRAIN] = ocp.args.StandardSave(train)
    if data_iter is not None:
      import grain
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def item_names(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    return {name for name in os.listdir(path)} if os.path.isdir(path) else set()

  def restore(self, step: Optional[int] = None, *, params: Any, train: Any = None,
              data_iter: Any = None) -> dict:
    """Restores onto the shapes, dtypes and shardings of the abstract `params` / `train`
    (ShapeDtypeStructs with `.sharding`: a different mesh than the saving run is fine)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
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
    return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def is_checkpoint_dir(directory: str) -> bool:
  try:
    return Checkpointer(directory, read_only=True).latest_step() is not None
  except (FileNotFoundError, ValueError):
    return False


def abstract_params(model_cfg, shardings: Any = None) -> Any:
  """Shape/dtype (and sharding) skeleton of the parameters, for restoring without init."""
  from sqllava_jax.models.sqllava import abstract_model
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
  from sqllava_jax.models.sqllava import abstract_model
  ckpt = Checkpointer(directory, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint (no step directory)")
  cfg = config_from_meta(ckpt.read_meta(step), overrides)
  model = abstract_model(cfg.model)
  graphdef, state = nnx.split(model)
  restored = ckpt.restore(step, params=abstract_params(cfg.model, shardings))[PARAMS]
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), cfg
