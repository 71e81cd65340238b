"""Creating, sharding and seeding the train state.

Parameters are initialised directly into their shardings (one jit with `out_shardings`), cast
per parameter group (bf16 frozen bases, fp32 trainables), optionally overwritten from an
earlier checkpoint (`train.init_from`), and the optimizer state is created with the same
shardings as the parameters it mirrors.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sqllava_jax.config import Config, ModelConfig
from sqllava_jax.models.layers import dtype_of
from sqllava_jax.models.sqllava import SQLLaVA, abstract_model
from sqllava_jax.parallel.logical import Rules, logical_to_spec
from sqllava_jax.parallel.mesh import replicated, state_shardings
from sqllava_jax.training.checkpoint import Checkpointer, abstract_params, config_from_meta
from sqllava_jax.tree_paths import flat, unflat

log = logging.getLogger(__name__)


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict:
  """NamedSharding per parameter (nested dict), from each parameter's logical axis names."""
  params = nnx.state(abstract_model(model_cfg), nnx.Param)
  return nnx.to_pure_dict(state_shardings(params, mesh, rules))


def like_params_shardings(tree: Any, pshard: Mapping, mesh: Mesh) -> Any:
  """Shardings for a tree that mirrors the parameters somewhere inside (optimizer moments):
  a leaf whose path ends with a parameter's path and has its shape gets that parameter's
  sharding; everything else (counts, scalars) is replicated."""
  by_path = {tuple(k.split("/")): s for k, s in flat(pshard).items()}

  def one(path, leaf):
    keys = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    for i in range(len(keys)):
      s = by_path.get(keys[i:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def group_dtypes(labels: Mapping, cfg: Config) -> dict:
  by_name = {g.name: dtype_of(g.param_dtype) for g in cfg.train.param_groups}
  return jax.tree.map(lambda g: by_name.get(g, jnp.float32), labels)


def init_params(cfg: Config, labels: Mapping, pshard: Mapping, seed: int) -> dict:
  """Fresh parameters, created sharded and cast to their group's dtype."""
  dtypes = group_dtypes(labels, cfg)

  def init():
    params = nnx.to_pure_dict(nnx.state(SQLLaVA(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param))
    return jax.tree.map(lambda p, d: p.astype(d), params, dtypes)

  return jax.jit(init, out_shardings=pshard)()


def copy_from_checkpoint(params: Mapping, path: str, exclude: Sequence[str], mesh: Mesh,
                         rules: Rules) -> tuple[dict, dict[str, int]]:
  """Overwrites parameters with the same path and shape from the checkpoint at `path`,
  except those matching `exclude`; returns (params, counts of copied/kept/ignored)."""
  ckpt = Checkpointer(path, read_only=True)
  source_cfg = config_from_meta(ckpt.read_meta())
  src_shard = param_shardings(source_cfg.model, mesh, rules)
  source = flat(ckpt.restore(params=abstract_params(source_cfg.model, src_shard))["params"])
  patterns = [re.compile(p) for p in exclude]
  ours = flat(params)
  counts = {"copied": 0, "kept_fresh": 0, "ignored_from_checkpoint": 0}
  for name, value in ours.items():
    src = source.get(name)
    if src is None or src.shape != value.shape or any(p.search(name) for p in patterns):
      counts["kept_fresh"] += 1
      continue
    ours[name] = jax.device_put(src.astype(value.dtype), value.sharding)
    counts["copied"] += 1
  counts["ignored_from_checkpoint"] = len(set(source) - set(ours))
  log.info("init_from %s: %s", path, counts)
  return unflat(ours), counts


def new_rng(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def batch_shardings(mesh: Mesh, rules: Rules, keys: Iterable[str]) -> dict:
  """[A, B, ...] batch arrays: the micro-batch axis replicated, B sharded like logical
  `batch`."""
  spec = logical_to_spec(("batch",), rules)
  return {k: NamedSharding(mesh, PartitionSpec(None, *spec)) for k in keys}


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                 accum: int) -> dict:
  """Host rows [A * b, ...] of this process -> global arrays [A, B, ...] on the mesh."""
  out = {}
  for k, v in local.items():
    if k not in shardings:
      continue
    v = np.asarray(v)
    v = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
    global_shape = (accum, v.shape[1] * jax.process_count()) + v.shape[2:]
    out[k] = jax.make_array_from_process_local_data(shardings[k], v, global_shape)
  return out
