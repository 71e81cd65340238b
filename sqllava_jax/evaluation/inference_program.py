"""The compiled side of generation, without data: the model graph, the shardings of its
weights, of the batch and of the KV cache over the mesh, and the jitted generation program
(prefill, then a `lax.while_loop` of decode steps), as `TrainProgram` is for training.

    program = InferenceProgram(model, mesh, cfg.mesh.rules)   # or an abstract model
    state, layers = program.place(model)                      # weights onto their shards
    tokens, num_new = program.generate(state, layers, ids, pixels, mask, key, sampling, ...)

Weights shard by their logical axis names under the same rules as training (`mesh.rules`:
`embed` over `fsdp`, heads and MLP over `tensor`, ...), the batch over the axes of logical
`batch` (`data` and `fsdp`), the KV cache over batch and kv heads (`models.llama.CACHE_AXES`).
Without a mesh everything stays on the default device.

The unstacked copy of the decoder layers (`unstack_layers`): one array per layer beside the
stacked weights, which decoding reads in place. On a CPU slicing a layer out of the stacked
(scanned) weights copies it at every step, and the copy makes decoding about twice as fast,
for the decoder layers' memory once more. Accelerators slice in place, so there it would
only cost memory: the default is on for CPU devices and off everywhere else.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sqllava_jax.config import MeshConfig
from sqllava_jax.evaluation.sampling import next_token
from sqllava_jax.models.llama import KVCache, Llama
from sqllava_jax.models.sqllava import SQLLaVA
from sqllava_jax.parallel.logical import Rules, axis_rules, constrain, logical_to_spec
from sqllava_jax.parallel.mesh import state_shardings

DEFAULT_RULES = MeshConfig().rules

def default_unstack(mesh: Optional[Mesh]) -> bool:
  """Whether the program runs on CPU devices, where the unstacked copy pays (see the module
  docstring)."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  return next(iter(devices)).platform == "cpu"


def llm_of(model: nnx.Module) -> Llama:
  if isinstance(model, SQLLaVA):
    return model.llm
  if isinstance(model, Llama):
    return model
  raise TypeError(f"cannot generate with a {type(model).__name__}; pass an SQLLaVA or a Llama")


def _embed(model: nnx.Module, ids, pixels):
  """int[B, T] (+ images) -> [B, T, D]."""
  if isinstance(model, SQLLaVA):
    return model.embed_inputs(ids, pixels)[0]
  return llm_of(model).embed(ids)


# --- the device program -----------------------------------------------------------------------

class SharedHeads(NamedTuple):
  """Prompt heads that several rows continue, each computed once: ids int32[U, P] and mask
  bool[U, P] (left-padded), pixels float32[U, H, W, 3] or None (the images sit in the heads);
  rows int32[B], the head each row of the batch continues."""
  ids: jax.Array
  pixels: Optional[jax.Array]
  mask: jax.Array
  rows: jax.Array


def _positions(mask, start=0):
  """Each real token's position, counted from `start` (int[B, 1] or 0) over `mask` [B, T]."""
  return jnp.maximum(start + jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _prefill(llm: Llama, layers, embeds, mask, max_new_tokens: int):
  """embeds [B, T, D], mask bool[B, T] -> (last-position logits [B, V], cache, lengths int[B])."""
  b, t, _ = embeds.shape
  cache = KVCache.init(llm.cfg, b, t + max_new_tokens, dtype=llm.dtype,
                       per_layer=layers is not None)
  hidden, filled = llm.decode(embeds, _positions(mask), cache=cache, token_valid=mask,
                              layers=layers, fresh_cache=True)
  # Prompts are left-padded, so the last position is real in every row.
  return llm.logits(hidden[:, -1:])[:, 0], filled, mask.sum(axis=1).astype(jnp.int32)


def _prefill_shared(model: nnx.Module, layers, heads: SharedHeads, ids, mask,
                    max_new_tokens: int):
  """The heads' prefill (U rows), their cache rows copied to the B rows that continue them,
  then each row's tail `ids` [B, S] (mask bool[B, S], left-padded) over it. The cache of a row
  holds its head's slots, padding, its tail's slots: the valid mask hides the padding."""
  llm = llm_of(model)
  u, p = heads.ids.shape
  empty = KVCache.init(llm.cfg, u, p, dtype=llm.dtype, per_layer=layers is not None)
  _, head_cache = llm.decode(_embed(model, heads.ids, heads.pixels), _positions(heads.mask),
                             cache=empty, token_valid=heads.mask, layers=layers,
                             fresh_cache=True)
  assert head_cache is not None  # decoding with a cache returns it
  start = heads.mask.sum(axis=1).astype(jnp.int32)[heads.rows]
  # The tails attend over the head and tail slots only, then the cache grows for decoding.
  hidden, filled = llm.decode(llm.embed(ids), _positions(mask, start[:, None]),
                              cache=head_cache.take_rows(heads.rows).grow(p + ids.shape[1]),
                              token_valid=mask, layers=layers)
  assert filled is not None
  return (llm.logits(hidden[:, -1:])[:, 0], filled.grow(p + ids.shape[1] + max_new_tokens),
          start + mask.sum(axis=1).astype(jnp.int32))


def _decode_loop(llm: Llama, layers, cache, first, lengths, key, params, *,
                 max_new_tokens: int, greedy: bool, eos_id: jax.Array, pad_id: jax.Array):
  """Feeds each new token back until every row has produced `eos_id` or the budget is spent.

  first, lengths: int32[B]; eos_id, pad_id: int32 scalars (traced: no recompile per
  tokenizer). Returns (tokens int32[B, N], num_new int32[B]).
  """
  b = first.shape[0]
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = first == eos_id
  num_new = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, out, done, num_new = carry
    positions = (lengths + step - 1)[:, None]
    hidden, cache = llm.decode(llm.embed(token[:, None]), positions, cache=cache, layers=layers)
    logits = llm.logits(hidden)[:, 0]
    token = next_token(logits, jax.random.fold_in(key, step), params, greedy=greedy)
    token = jnp.where(done, pad_id, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    num_new = num_new + (~done).astype(jnp.int32)
    return step + 1, token, cache, out, done | (token == eos_id), num_new

  carry = (jnp.int32(1), first, cache, out, done, num_new)
  _, _, _, out, _, num_new = jax.lax.while_loop(cond, body, carry)
  return out, num_new


def _generate(graphdef, state, layer_def, layer_states, ids, pixels, mask, key, params,
              heads=None, *, max_new_tokens: int, greedy: bool, eos_id: jax.Array,
              pad_id: jax.Array, layout: Optional[tuple[Mesh, Rules]]):
  if layout is None:
    return _generate_body(graphdef, state, layer_def, layer_states, ids, pixels, mask, key,
                          params, heads, max_new_tokens, greedy, eos_id, pad_id)
  with axis_rules(*layout):
    tokens, num_new = _generate_body(graphdef, state, layer_def, layer_states, ids, pixels,
                                     mask, key, params, heads, max_new_tokens, greedy, eos_id,
                                     pad_id)
    return constrain(tokens, ("batch", None)), constrain(num_new, ("batch",))


def _generate_body(graphdef, state, layer_def, layer_states, ids, pixels, mask, key, params,
                   heads, max_new_tokens, greedy, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  llm = llm_of(model)
  layers = None if layer_states is None else [nnx.merge(layer_def, s) for s in layer_states]
  if heads is None:
    logits, cache, lengths = _prefill(llm, layers, _embed(model, ids, pixels), mask,
                                      max_new_tokens)
  else:  # `ids` are the tails of `heads`, which carry the images
    logits, cache, lengths = _prefill_shared(model, layers, heads, ids, mask, max_new_tokens)
  first = next_token(logits, jax.random.fold_in(key, 0), params, greedy=greedy)
  return _decode_loop(llm, layers, cache, first, lengths, key, params,
                      max_new_tokens=max_new_tokens, greedy=greedy, eos_id=eos_id, pad_id=pad_id)


# The mesh and rules are static: the sharding constraints are read while tracing, so a
# program traced without them must never serve a mesh (and the other way round). XLA's own
# compiler options throughout: on CPU its YNNPACK fusions ran a batch-8 decode step 13 %
# faster than its Eigen dots (benchmarks/RESULTS.md, Generation).
_generate_jit = jax.jit(_generate, static_argnums=(0, 2),
                        static_argnames=("max_new_tokens", "greedy", "layout"))


# --- shardings ----------------------------------------------------------------------------------

def _drop_leading(sharding: NamedSharding) -> NamedSharding:
  """The sharding of one layer's slice of a stacked parameter."""
  return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


class InferenceProgram:
  """Shardings and the jitted generation of one model graph on one mesh (or on the default
  device when `mesh` is None). `model` may be concrete or abstract (`nnx.eval_shape`)."""

  def __init__(self, model: nnx.Module, mesh: Optional[Mesh] = None,
               rules: Optional[Rules] = None, *, unstack_layers: Optional[bool] = None):
    llm = llm_of(model)  # fails early for a model we cannot generate with
    self.mesh, self.rules = mesh, tuple(rules if rules is not None else DEFAULT_RULES)
    self.unstack = default_unstack(mesh) if unstack_layers is None else unstack_layers
    self._jit = _generate_jit
    self.graphdef, abstract = nnx.split(model)
    self.num_layers = llm.cfg.num_layers
    self.layer_def, abstract_layers = nnx.split(llm.layers)
    self.state_shardings = self.layer_shardings = None
    if mesh is not None:
      self.state_shardings = state_shardings(abstract, mesh, self.rules)
      stacked = state_shardings(abstract_layers, mesh, self.rules)
      self.layer_shardings = jax.tree.map(_drop_leading, stacked)
    self.abstract_state = _shape_only(abstract, self.state_shardings)
    self._abstract_layers = _shape_only(abstract_layers, None)

  @property
  def layout(self) -> Optional[tuple[Mesh, Rules]]:
    return None if self.mesh is None else (self.mesh, self.rules)

  # ---- weights ----------------------------------------------------------------------------
  def place(self, model: nnx.Module) -> tuple[nnx.State, Optional[list[nnx.State]]]:
    """(the model's state on its shards, the unstacked layer copies or None). Arrays already
    where they belong (a sharded restore) are not moved; the copies are made on device."""
    state = nnx.split(model)[1]
    if self.mesh is not None:
      state = _reshard(state, self.state_shardings)
    if not self.unstack:
      return state, None
    stacked = nnx.split(llm_of(nnx.merge(self.graphdef, state)).layers)[1]
    n, out = self.num_layers, None
    if self.mesh is not None:
      out = [self.layer_shardings] * n
    copies = jax.jit(lambda s: [jax.tree.map(lambda a: a[i], s) for i in range(n)],
                     out_shardings=out)(stacked)
    return state, copies

  # ---- batch ------------------------------------------------------------------------------
  def batch_sharding(self, ndim: int) -> Optional[NamedSharding]:
    if self.mesh is None:
      return None
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules)
    return NamedSharding(self.mesh, spec)

  def batch_ways(self) -> int:
    """How many slices the batch is split into (1 without a mesh)."""
    if self.mesh is None:
      return 1
    axes = tuple(logical_to_spec(("batch",), self.rules))[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(self.mesh.shape[a] for a in axes)

  def rows_multiple(self) -> int:
    """What each process's row count must be a multiple of for the batch to split evenly."""
    ways = self.batch_ways()
    return ways // math.gcd(ways, jax.process_count())

  def _local_row_blocks(self, local_rows: int) -> list[tuple[int, int]]:
    """The (start, stop) row ranges of this process's devices in a global batch of
    `local_rows` rows per process."""
    sharding = self.batch_sharding(1)
    assert sharding is not None and self.mesh is not None
    index = sharding.devices_indices_map((local_rows * jax.process_count(),))
    return sorted({index[d][0].indices(local_rows * jax.process_count())[:2]
                   for d in self.mesh.local_devices})

  def rows_contiguous(self) -> bool:
    """Whether each process's rows of a global batch are one block (a row can then name
    another row of the same batch by its global index: `first_global_row` + its own)."""
    if self.mesh is None or jax.process_count() == 1:
      return True
    blocks = self._local_row_blocks(self.rows_multiple())
    return blocks[-1][1] - blocks[0][0] == sum(b - a for a, b in blocks)

  def first_global_row(self, local_rows: int) -> int:
    """Where this process's rows start in a global batch of `local_rows` rows per process
    (rows contiguous: `rows_contiguous`)."""
    if self.mesh is None or jax.process_count() == 1:
      return 0
    return self._local_row_blocks(local_rows)[0][0]

  def global_batch(self, arrays) -> tuple:
    """This process's rows of each array (None passes through) -> global arrays split over
    the batch axes (as they are without a mesh)."""
    if self.mesh is None:
      return tuple(arrays)
    out: list[Optional[jax.Array]] = []
    for a in arrays:
      if a is None:
        out.append(None)
        continue
      a = np.asarray(a)
      rows = a.shape[0] * jax.process_count()
      if rows % self.batch_ways():
        raise ValueError(f"batch size {rows} is not divisible by the {self.batch_ways()} "
                         f"data-parallel slices of the mesh; choose a multiple of "
                         f"{self.batch_ways()}")
      out.append(jax.make_array_from_process_local_data(self.batch_sharding(a.ndim), a,
                                                        (rows,) + a.shape[1:]))
    return tuple(out)

  # ---- the program ------------------------------------------------------------------------
  def generate(self, state, layer_states, ids, pixels, mask, key, params,
               heads: Optional[SharedHeads] = None, *, max_new_tokens: int, greedy: bool,
               eos_id: int, pad_id: int):
    """ids int32[B, T], mask bool[B, T] (left-padded), pixels float32[B, H, W, 3] or None;
    params: `Sampling.arrays()`. With `heads`, `ids` are the rest of each row's prompt after
    its head and `pixels` is None (the heads carry the images). Returns (tokens int32[B, N],
    num_new int32[B]), global."""
    return self._jit(self.graphdef, state, self.layer_def, layer_states, ids, pixels, mask,
                     key, params, heads, max_new_tokens=max_new_tokens, greedy=greedy,
                     eos_id=jnp.int32(eos_id), pad_id=jnp.int32(pad_id), layout=self.layout)

  def abstract_inputs(self, batch: int, prompt_len: int, image_size: Optional[int]) -> tuple:
    """Shape-only (ids, pixels, mask) of a global batch, sharded like real ones."""
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                     sharding=self.batch_sharding(len(shape)))
    pixels = None if image_size is None else spec((batch, image_size, image_size, 3),
                                                  jnp.float32)
    return (spec((batch, prompt_len), jnp.int32), pixels, spec((batch, prompt_len), jnp.bool_))

  def abstract_layer_states(self) -> Optional[list[nnx.State]]:
    """Shape-only unstacked layer copies (None without them), sharded like `place` puts them."""
    if not self.unstack:
      return None
    return [_shape_only(self._abstract_layers, self.layer_shardings, drop_leading=True)
            for _ in range(self.num_layers)]

  def lower(self, batch: int, prompt_len: int, new_tokens: int, *,
            image_size: Optional[int] = None, greedy: bool = True):
    """The generation program lowered on shape-only weights and inputs (nothing allocated)."""
    layers = self.abstract_layer_states()
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
              jax.ShapeDtypeStruct((), jnp.float32))
    return self._jit.lower(
        self.graphdef, self.abstract_state, self.layer_def, layers,
        *self.abstract_inputs(batch, prompt_len, image_size), key, params,
        max_new_tokens=new_tokens, greedy=greedy, eos_id=jax.ShapeDtypeStruct((), jnp.int32),
        pad_id=jax.ShapeDtypeStruct((), jnp.int32), layout=self.layout)


def _shape_only(state: nnx.State, shardings: Any, *, drop_leading: bool = False) -> nnx.State:
  """ShapeDtypeStructs (with `shardings` where given) in the place of a state's values;
  `drop_leading`: one layer's slice of stacked values."""

  def one(var, sharding=None):
    shape = tuple(var.shape)[1:] if drop_leading else tuple(var.shape)
    return var.replace(jax.ShapeDtypeStruct(shape, var.dtype, sharding=sharding))

  is_var = lambda x: isinstance(x, nnx.Variable)
  if shardings is None:
    return jax.tree.map(one, state, is_leaf=is_var)
  return jax.tree.map(one, state, shardings, is_leaf=is_var)


def _reshard(state: nnx.State, shardings: Any) -> nnx.State:
  """`state` on `shardings`; arrays already there stay as they are. Arrays spread over
  several processes move by a jitted identity, the others by `device_put`."""
  leaves = jax.tree.leaves(state)
  if all(getattr(a, "sharding", None) == s for a, s in zip(leaves, jax.tree.leaves(shardings))):
    return state
  if all(getattr(a, "is_fully_addressable", True) for a in leaves):
    return jax.device_put(state, shardings)
  return jax.jit(lambda s: s, out_shardings=shardings)(state)
