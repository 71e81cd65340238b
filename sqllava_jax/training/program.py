"""The compiled side of training, without data: model graph, parameter groups, optimizer,
shardings, the abstract train state and the jitted train step.

`Trainer` builds one for its run; the memory planner and the benchmarks build one from a
config alone (`TrainProgram(cfg, mesh, total_steps)`) and lower it on abstract inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sqllava_jax.config import Config
from sqllava_jax.models.layers import threefry_unrolled_on_cpu
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.parallel.mesh import replicated
from sqllava_jax.training import optimizer
from sqllava_jax.training import state as train_state
from sqllava_jax.training.step import MODEL_INPUTS, make_train_step

DEVICE_KEYS = MODEL_INPUTS + ("attention_mask",)


class TrainProgram:
  def __init__(self, cfg: Config, mesh: Mesh, total_steps: int):
    self.cfg, self.mesh, self.rules, self.total_steps = cfg, mesh, cfg.mesh.rules, total_steps
    # dropout masks fused on CPU (the planner reports it)
    self.rng_unrolled = threefry_unrolled_on_cpu()
    model = abstract_model(cfg.model)
    self.graphdef = nnx.split(model)[0]
    abs_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    self.labels = optimizer.param_labels(abs_params, cfg.train)
    self.trainable = optimizer.trainable_mask(self.labels, cfg.train)
    self.optimizer = optimizer.make_optimizer(cfg.train, self.labels, total_steps)
    self.pshard = train_state.param_shardings(cfg.model, mesh, self.rules)
    dtypes = train_state.group_dtypes(self.labels, cfg)
    abs_params = jax.tree.map(lambda a, d: jax.ShapeDtypeStruct(a.shape, d), abs_params, dtypes)
    abs_opt = jax.eval_shape(self.optimizer.init, abs_params)
    rep = replicated(mesh)
    self.shardings = {"params": self.pshard,
                      "opt_state": train_state.like_params_shardings(abs_opt, self.pshard, mesh),
                      "step": rep, "rng": rep}
    self.abstract_state = train_state.abstract_with_shardings(
        {"params": abs_params, "opt_state": abs_opt, "step": jax.ShapeDtypeStruct((), np.int32),
         "rng": jax.ShapeDtypeStruct(train_state.new_rng(0).shape, np.uint32)}, self.shardings)
    lr_fn = lambda step: optimizer.learning_rates(cfg.train, total_steps, step)
    step = make_train_step(self.graphdef, self.optimizer, self.trainable,
                           chunk=cfg.train.logits_chunk_size, lr_fn=lr_fn, mesh=mesh,
                           rules=self.rules, packed=cfg.data.packing)
    self.batch_shardings = train_state.batch_shardings(mesh, self.rules, DEVICE_KEYS)
    self.train_step = jax.jit(step, in_shardings=(self.shardings, self.batch_shardings),
                              out_shardings=(self.shardings, rep), donate_argnums=0)

  def abstract_batch(self, rows_per_step: int, seq_len: int) -> dict:
    """Shape-only global batch [A, B, ...] for `rows_per_step` rows of `seq_len` tokens."""
    accum = self.cfg.train.grad_accum_steps
    b, size = rows_per_step // accum, self.cfg.model.vision.image_size
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        k: ((accum, b, seq_len), np.int32) for k in DEVICE_KEYS}
    slots = self.cfg.data.image_slots(self.cfg.model.num_image_tokens)
    per_row = (slots,) if self.cfg.data.packing else ()
    shapes["pixel_values"] = ((accum, b, *per_row, size, size, 3), np.float32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k])
            for k, (s, d) in shapes.items()}

  def fresh_state(self, seed: int) -> dict:
    """Initialised parameters (plus `train.init_from`), optimizer state, step 0 and the RNG."""
    cfg = self.cfg
    params = train_state.init_params(cfg, self.labels, self.pshard, seed)
    if cfg.train.init_from:
      params, _ = train_state.copy_from_checkpoint(
          params, cfg.train.init_from, cfg.train.init_from_exclude, self.mesh, self.rules)
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.shardings["opt_state"])(params)
    rep = replicated(self.mesh)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(np.int32(0), rep),
            "rng": jax.device_put(train_state.new_rng(seed), rep)}

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict:
    return train_state.global_batch(local, self.batch_shardings, self.cfg.train.grad_accum_steps)
