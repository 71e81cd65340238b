"""The optimizer: AdamW (or Muon for the weight matrices) per parameter group, frozen groups
masked out, global-norm clipping, cosine decay with linear warmup, and a guard that skips
non-finite updates.

Frozen groups use `optax.set_to_zero()` inside `optax.multi_transform`, so they carry no
optimizer state at all (MaxText's `optimizers.py` explains why not `optax.masked`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

from sqllava_jax.config import ParamGroup, TrainConfig
from sqllava_jax.training.param_groups import assign_groups_flat
from sqllava_jax.tree_paths import flat, unflat

FROZEN_VIT_LORA = "vit_lora_frozen"
_VIT_LORA = re.compile(r"^vision/.*/lora_[ab]$")


def param_labels(params: Mapping, cfg: TrainConfig) -> dict:
  """Group name per parameter (same tree as `params`); every parameter in exactly one group."""
  names = assign_groups_flat(list(flat(params)), cfg.param_groups)
  if cfg.freeze_vit_lora:
    names = {p: (FROZEN_VIT_LORA if _VIT_LORA.search(p) else g) for p, g in names.items()}
  return unflat(names)


def frozen_names(cfg: TrainConfig) -> set[str]:
  names = {g.name for g in cfg.param_groups if g.frozen}
  return names | ({FROZEN_VIT_LORA} if cfg.freeze_vit_lora else set())


def trainable_mask(labels: Mapping, cfg: TrainConfig) -> dict:
  frozen = frozen_names(cfg)
  return jax.tree.map(lambda g: g not in frozen, labels)


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warmup from 0 over ceil(ratio x steps), then cosine to 0 (transformers' cosine)."""
  warmup = int(-(-warmup_ratio * total_steps // 1))
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1), 0.0)


def group_schedule(cfg: TrainConfig, group: ParamGroup, total_steps: int) -> optax.Schedule:
  """The schedule of a trainable group (which has an lr: `ParamGroup` checks)."""
  assert group.lr is not None, group.name
  return schedule(group.lr, total_steps, cfg.warmup_ratio)


# Muon orthogonalises the dense layers' weight matrices, the parameters named `kernel`: the
# attention and MLP projections of both towers (scanned, so [layers, in, out]) and the
# projector's. Embeddings, the LM head, the patch and position embeddings, norms, biases and
# LoRA factors stay with AdamW, as in Muon's recipe.
# Muon's updates are rescaled to this RMS (Moonlight's match to AdamW's typical update), so a
# group's AdamW learning rate serves both halves.
MUON_UPDATE_RMS = 0.2


def muon_dimensions(params: Mapping) -> Any:
  """Per parameter: its (reduction, output) axes when Muon updates it, else None (AdamW)."""
  def dims(path, leaf):
    if not jax.tree_util.keystr(path, simple=True, separator="/").endswith("/kernel"):
      return None
    ndim = len(leaf.shape)
    return optax.contrib.MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)
  return jax.tree_util.tree_map_with_path(dims, params)


def group_transform(cfg: TrainConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  """The update rule of one trainable group (`train.optimizer`)."""
  if cfg.optimizer == "muon":
    return optax.contrib.muon(
        lr, beta=cfg.adam_b1, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        consistent_rms=MUON_UPDATE_RMS, muon_weight_dimension_numbers=muon_dimensions,
        adam_learning_rate=lr, adam_b1=cfg.adam_b1, adam_b2=cfg.adam_b2,
        adam_weight_decay=cfg.weight_decay)
  return optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay)


def make_optimizer(cfg: TrainConfig, labels: Mapping,
                   total_steps: int) -> optax.GradientTransformation:
  transforms = {}
  for group in cfg.param_groups:
    transforms[group.name] = (optax.set_to_zero() if group.frozen else group_transform(
        cfg, group_schedule(cfg, group, total_steps)))
  if cfg.freeze_vit_lora:
    transforms[FROZEN_VIT_LORA] = optax.set_to_zero()
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                   optax.multi_transform(transforms, labels))
  # Non-finite gradients leave parameters and moments untouched and are counted.
  return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)


def learning_rates(cfg: TrainConfig, total_steps: int, step) -> dict[str, Any]:
  """The learning rate of every trainable group at `step` (for logging)."""
  return {g.name: group_schedule(cfg, g, total_steps)(step)
          for g in cfg.param_groups if not g.frozen}


def skipped_updates(opt_state) -> Any:
  """How many updates `apply_if_finite` has skipped so far."""
  return opt_state.total_notfinite
