"""The jitted train step.

The train state is a plain pytree: {'params', 'opt_state', 'step', 'rng'}; parameters are a
nested dict (our paths) that `nnx.merge` turns back into the model inside the step. Only
trainable parameters are differentiated; frozen ones enter the optimizer as zero gradients
(XLA folds the zero updates away), so `multi_transform` sees the whole tree.

A batch holds `grad_accum_steps` micro-batches on its leading axis: [A, B, ...]. The loss is
the sum of token losses over the whole global batch divided by its number of trained tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sqllava_jax.data.labels import IGNORE_INDEX
from sqllava_jax.parallel.logical import Rules, axis_rules
from sqllava_jax.training.loss import next_token_loss, shift_targets
from sqllava_jax.training.optimizer import skipped_updates
from sqllava_jax.tree_paths import flat, unflat

# The batch arrays the model and its loss read (training and the held-out loss).
MODEL_INPUTS = ("input_ids", "labels", "positions", "segment_ids", "pixel_values")


def forward_loss(graphdef, params: Mapping, batch: Mapping[str, jax.Array],
                 rng: Optional[jax.Array], chunk: int, *, packed: bool = True,
                 head_trains: bool = True) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, trained tokens) of one micro-batch [B, ...].

  packed: rows may hold several examples, so attention and targets follow `segment_ids`.
  Unpacked rows are one example then right padding, where causal attention alone gives the
  same result for every real token: no segment mask is built. head_trains: the output
  kernel receives a gradient (else the loss never forms its [D, V] weight gradient)."""
  model = nnx.merge(graphdef, params)
  segment_ids = batch["segment_ids"] if packed else None
  hidden, _ = model(batch["input_ids"], batch["pixel_values"], batch["positions"],
                    segment_ids=segment_ids, rng=rng)
  return next_token_loss(hidden, model.llm.output_kernel(), batch["labels"], chunk,
                         segment_ids=segment_ids, kernel_grad=head_trains)


def head_trains(trainable: Mapping[str, bool]) -> bool:
  """Whether the vocabulary projection (lm_head, or the tied embedding) trains."""
  return any(trainable.get(k, False) for k in ("llm/lm_head", "llm/embed_tokens/embedding"))


def _split(params: Mapping, trainable: Mapping[str, bool]) -> tuple[dict, dict]:
  items = flat(params)
  train = {k: v for k, v in items.items() if trainable[k]}
  frozen = {k: v for k, v in items.items() if not trainable[k]}
  return train, frozen


def make_train_step(graphdef, optimizer: optax.GradientTransformation, trainable: Mapping,
                    *, chunk: int, lr_fn: Callable[[Any], Mapping[str, Any]],
                    mesh=None, rules: Rules = (), packed: bool = True) -> Callable:
  """`step(state, batch) -> (state, metrics)`; wrap with `jax.jit` (see `jit_train_step`).
  packed: batches come from a packing pipeline (see `forward_loss`)."""
  trainable = flat(trainable)
  loss_kwargs = dict(packed=packed, head_trains=head_trains(trainable))

  def step(state, batch):
    ctx = axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
      return _train_step(state, batch)

  def _train_step(state, batch):
    train_params, frozen = _split(state["params"], trainable)
    base_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    targets = shift_targets_all(batch["labels"], batch["segment_ids"] if packed else None)
    denom = jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(jnp.float32)

    def micro_loss(tp, micro, rng):
      s, c = forward_loss(graphdef, unflat({**tp, **frozen}), micro, rng, chunk, **loss_kwargs)
      return s / denom, (s, c)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
      g_acc, s_acc, c_acc = carry
      micro, i = xs
      g, (s, c) = grad_fn(train_params, micro, jax.random.fold_in(base_rng, i))
      return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, c_acc + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
    micro_batches = {k: batch[k] for k in MODEL_INPUTS}
    n_micro = batch["input_ids"].shape[0]
    zero = jnp.zeros((), jnp.float32)
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, zero, zero),
                                               (micro_batches, jnp.arange(n_micro)))
    grads = {k: g.astype(train_params[k].dtype) for k, g in grads.items()}
    full = unflat({**grads, **{k: jnp.zeros_like(v) for k, v in frozen.items()}})
    updates, opt_state = optimizer.update(full, state["opt_state"], state["params"])
    # Frozen parameters are passed through, not `p + 0`: adding their (zero) updates made XLA
    # materialise a zero tensor the size of every frozen weight.
    updates = flat(updates)
    new_train = optax.apply_updates(train_params, {k: updates[k] for k in train_params})
    params = unflat({**frozen, **new_train})
    metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "grad_norm": optax.global_norm(grads),
               "trained_tokens": count, "tokens": jnp.sum(batch["attention_mask"]),
               "skipped_updates": skipped_updates(opt_state),
               **{f"lr/{k}": v for k, v in lr_fn(state["step"]).items()}}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics

  return step


def shift_targets_all(labels: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """shift_targets over [A, B, T] micro-batches."""
  if segment_ids is None:
    return jax.vmap(shift_targets)(labels)
  return jax.vmap(shift_targets)(labels, segment_ids)

