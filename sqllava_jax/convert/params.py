"""Reading a checkpoint's parameters for export, one tensor at a time.

`load_for_export` restores a checkpoint's parameters onto the host CPU (an export never
needs an accelerator). `ParamSource.get(path)` hands out each parameter as numpy; with
`merge_lora`, a LoRA-carrying kernel comes back as a `MergedKernel` that folds
`(alpha / r) A B` into one layer's kernel when that layer is read, so a merged 7B export
never holds a second merged copy of the model (`lora.merge` on the whole model would).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from sqllava_jax.config import Config
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.models import lora
from sqllava_jax.training import checkpoint
from sqllava_jax.tree_paths import flat_state, path_str


def _has_model_items(ckpt: str, step: int) -> bool:
  step_dir = os.path.join(ckpt, str(step))
  return os.path.isdir(step_dir) and {"params", "meta"} <= set(os.listdir(step_dir))


def load_for_export(ckpt: str, step: Optional[int] = None):
  """(SQLLaVA, Config) of checkpoint directory `ckpt`, parameters on the host CPU."""
  if not os.path.isdir(ckpt):
    raise CheckpointError(f"{ckpt} does not exist or is not a directory; pass --ckpt with a "
                          "sqllava-jax checkpoint (from train or convert import-hf)")
  try:
    manager = checkpoint.Checkpointer(ckpt, read_only=True)
    step = manager.latest_step() if step is None else step
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{ckpt}: cannot read as an orbax checkpoint ({e})") from e
  if step is None or not _has_model_items(ckpt, step):
    hint = (f"; a training run keeps them in {os.path.join(ckpt, 'checkpoints')}"
            if os.path.isdir(os.path.join(ckpt, "checkpoints")) else "")
    raise CheckpointError(f"{ckpt} is not a sqllava-jax checkpoint (no complete step with "
                          f"params and meta); make one with `convert import-hf` or `train`{hint}")
  cfg = checkpoint.config_from_meta(manager.read_meta(step))
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu: restore where JAX puts arrays by default
    return checkpoint.load_model(ckpt, step=step)
  shardings = jax.tree.map(lambda _: cpu, checkpoint.abstract_params(cfg.model))
  return checkpoint.load_model(ckpt, step=step, shardings=shardings)


class MergedKernel:
  """`kernel + scale * a @ b` computed in float32 on access: kernel [L, in, out] (stacked;
  indexing gives one layer) or [in, out] (`np.asarray` gives the whole merged kernel)."""

  def __init__(self, kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float):
    self.kernel, self.a, self.b, self.scale = kernel, a, b, scale
    self.shape = kernel.shape

  @staticmethod
  def _merge(kernel, a, b, scale) -> np.ndarray:
    f32 = np.float32
    return kernel.astype(f32) + np.float32(scale) * (a.astype(f32) @ b.astype(f32))

  def __getitem__(self, i: int) -> np.ndarray:
    return self._merge(self.kernel[i], self.a[i], self.b[i], self.scale)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    merged = self._merge(self.kernel, self.a, self.b, self.scale)
    return merged if dtype is None else merged.astype(dtype)


class ParamSource:
  """Parameters of `model` by path ('llm/layers/self_attn/q_proj/kernel') as numpy arrays."""

  def __init__(self, model: nnx.Module, *, merge_lora: bool):
    state = nnx.state(model, nnx.Param)
    self._params = flat_state(state)
    self._merge = {}
    if merge_lora:
      for path, linear in lora.lora_linears(model):
        if not linear.merged:  # a merged kernel already holds its product
          self._merge[path_str(path) + "/kernel"] = linear

  def get(self, path: str):
    linear = self._merge.get(path)
    if linear is not None:
      return MergedKernel(np.asarray(linear.kernel[...]), np.asarray(linear.lora_a[...]),
                          np.asarray(linear.lora_b[...]), linear.lora_scale)
    if path not in self._params:
      raise KeyError(f"the checkpoint has no parameter {path}")
    return np.asarray(self._params[path][...])


def output_dtype(name: str, cfg: Config) -> np.dtype:
  """numpy dtype for `--dtype` (auto: the checkpoint's `model.param_dtype`)."""
  name = cfg.model.param_dtype if name == "auto" else name
  table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
  if name not in table:
    raise ValueError(f"unknown --dtype {name!r}; choose auto, {', '.join(table)}")
  return np.dtype(table[name])
