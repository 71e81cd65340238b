"""Memory and cost of a config's real train step (and of its generation program,
`plan_inference`), compiled ahead of time on CPU devices.

The step is `TrainProgram(...).train_step` lowered on abstract (shape-only) state and batch:
nothing is allocated, so a 13B model plans on a laptop. XLA's memory analysis gives the
per-device bytes; FLOPs come three ways (see `plan`).

Accelerator-like compilation (`as_accelerator=True`, the default) undoes two things only
the CPU backend does, each of which would otherwise dominate a bfloat16 plan:
- the CPU computes bfloat16 in float32, and loop-invariant code motion then hoists whole-stack
  widening converts out of the layer loops (float32 copies of every scanned weight and of the
  saved activations); GPU and TPU compute bfloat16 natively, so the pass is switched off;
- attention runs query-blocked (`attention_impl: blocked`) as a stand-in for the fused kernel
  an accelerator runs (cuDNN on GPU, a flash kernel on TPU): neither keeps the [T, T] scores.
(The dropout masks' threefry RNG is lowered unrolled, as on GPU and TPU, when the command
has called `models.layers.unroll_threefry_on_cpu`, as `train` and `plan` do.)
What remains CPU-specific is float32 temporaries between fusions where an accelerator keeps
bfloat16, so a bfloat16 plan is an upper bound.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from sqllava_jax.config import Config, replace
from sqllava_jax.evaluation.inference_program import InferenceProgram
from sqllava_jax.models import lora
from sqllava_jax.models.layers import dtype_of
from sqllava_jax.models.llama import STACKED_CACHE_AXES
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.parallel.mesh import logical_sharding, make_mesh
from sqllava_jax.training import flops, hlo_stats
from sqllava_jax.training.program import TrainProgram

NO_LICM: dict[str, Any] = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
# The plan never runs the program: skip LLVM's optimisation of the CPU code (half the compile
# time; buffer assignment, and so the memory analysis, happens before it).
NO_CODEGEN_OPT: dict[str, Any] = {"xla_backend_optimization_level": 0,
                                  "xla_llvm_disable_expensive_passes": True}


def planning_config(cfg: Config, as_accelerator: bool) -> Config:
  if as_accelerator and cfg.model.attention_impl != "blocked":
    return replace(cfg, **{"model.attention_impl": "blocked"})
  return cfg


def adjustments(as_accelerator: bool, attention_impl: str, rng_unrolled: bool) -> list[str]:
  """What the plan compiled differently from a plain CPU compile of the config, in words."""
  if not as_accelerator:
    return ["none: exactly what the CPU compiles for this config"]
  out = ["loop-invariant code motion off (the CPU's float32 copies of bfloat16 stacks)"]
  if not rng_unrolled:
    out.append("none for the RNG: this JAX has no unrolled threefry rule to borrow, so the "
               "dropout masks keep the CPU's rolled loop and its whole-mask state")
  if attention_impl != "blocked":
    out.append(f"attention_impl blocked for {attention_impl}: stands in for a fused kernel "
               "that keeps no [T, T] scores (cuDNN on GPU, flash on TPU)")
  return out


def compile_step(cfg: Config, devices: int, batch: int, seq_len: int, *, as_accelerator: bool,
                 dump_dir: str | None = None):
  """(program, compiled step, rows per step, seconds to lower and compile, whether the RNG
  was lowered unrolled)."""
  available = jax.devices()
  if len(available) < devices:
    raise ValueError(f"{devices} devices requested, {len(available)} available; start with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.mesh, available[:devices])
  program = TrainProgram(cfg, mesh, total_steps=1000)
  rows = batch * devices * cfg.train.grad_accum_steps
  options = {**NO_CODEGEN_OPT, **(NO_LICM if as_accelerator else {})}
  if dump_dir:
    options.update(xla_dump_to=dump_dir, xla_dump_hlo_as_text=True)
  lowered = program.train_step.lower(program.abstract_state,
                                     program.abstract_batch(rows, seq_len))
  with no_compilation_cache():
    compiled = lowered.compile(compiler_options=options)
  return program, compiled, rows, time.perf_counter() - t0, program.rng_unrolled


@contextlib.contextmanager
def no_compilation_cache() -> Iterator[None]:
  """A cached executable would skip the compile, and with it XLA's dump of the peak. JAX
  decides once per process whether the cache is in use: reset that decision both ways."""
  from jax.experimental.compilation_cache import compilation_cache
  previous = jax.config.jax_enable_compilation_cache  # type: ignore[attr-defined]  # a flag
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


def memory(compiled) -> dict[str, int]:
  """Per-device bytes from XLA's memory analysis. The outputs (new state) alias the donated
  inputs, so the peak is arguments + temporaries + the outputs that are not aliased."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
         "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
         "generated_code_bytes": m.generated_code_size_in_bytes}
  out["peak_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                       - out["alias_bytes"])
  return out


def model_flops(program: TrainProgram, rows: int, seq_len: int) -> dict[str, flops.Flops]:
  return flops.step_flops(program.cfg.model, program.trainable, rows, seq_len)


def plan(cfg: Config, *, devices: int, batch: int, seq_len: int, as_accelerator: bool = True,
         top: int = 0) -> dict:
  """Compiles the train step and returns memory, FLOPs and the biggest buffers at the peak."""
  original, cfg = cfg.model.attention_impl, planning_config(cfg, as_accelerator)
  with tempfile.TemporaryDirectory() as dump:
    program, compiled, rows, seconds, rng_unrolled = compile_step(
        cfg, devices, batch, seq_len, as_accelerator=as_accelerator,
        dump_dir=dump if top else None)
    text = compiled.as_text()
    buffers = hlo_stats.peak_buffers(dump, text, top) if top else []
  compiled_flops, notes = hlo_stats.matmul_flops(text)
  parts = model_flops(program, rows, seq_len)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"config": cfg, "program": program, "rows": rows, "compile_s": seconds,
          "adjustments": adjustments(as_accelerator, original, rng_unrolled),
          "memory": memory(compiled), "model_flops": parts,
          "compiled_matmul_flops": compiled_flops, "compiled_notes": notes,
          "xla_cost_flops": float(cost.get("flops", 0.0)), "buffers": buffers}


# --- inference ----------------------------------------------------------------------------------

def inference_program(cfg: Config, devices: int, *, unstack_layers: bool = False):
  """The generation program of `cfg` on its mesh over `devices` CPU devices, on shape-only
  weights with the adapters merged (as the inference commands load them)."""
  available = jax.devices()
  if len(available) < devices:
    raise ValueError(f"{devices} devices requested, {len(available)} available; start with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
  model = abstract_model(cfg.model)
  for _, linear in lora.lora_linears(model):
    linear.merged = True  # what `load_for_inference` does to the real weights
  mesh = make_mesh(cfg.mesh, available[:devices])
  return InferenceProgram(model, mesh, cfg.mesh.rules, unstack_layers=unstack_layers)


def sharded_bytes(tree) -> int:
  """Per-device bytes of shape-only arrays with shardings (the first device's shards)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def kv_cache_bytes(cfg: Config, program, batch: int, slots: int) -> int:
  """Per-device bytes of the KV cache: k and v [layers, B, kv heads, slots, head dim] in the
  compute dtype, sharded like `models.llama.STACKED_CACHE_AXES`."""
  llm = cfg.model.llm
  shape = (llm.num_layers, batch, llm.num_kv_heads, slots, llm.effective_head_dim)
  sharding = logical_sharding(STACKED_CACHE_AXES, shape, program.mesh, program.rules)
  itemsize = jnp.dtype(dtype_of(cfg.model.compute_dtype)).itemsize
  return 2 * math.prod(sharding.shard_shape(shape)) * itemsize


def plan_inference(cfg: Config, *, devices: int, batch: int, prompt_len: int, new_tokens: int,
                   as_accelerator: bool = True, unstack_layers: bool = False,
                   top: int = 0) -> dict:
  """Compiles the generation program (prefill and decode loop, one image per row) for a
  global `batch` of `prompt_len`-token prompts and `new_tokens` new tokens; returns its
  per-device memory: weights, inputs, KV cache and the other temporaries."""
  original, cfg = cfg.model.attention_impl, planning_config(cfg, as_accelerator)
  t0 = time.perf_counter()
  program = inference_program(cfg, devices, unstack_layers=unstack_layers)
  if batch % program.batch_ways():
    raise ValueError(f"--batch {batch} is not divisible by the mesh's {program.batch_ways()} "
                     "batch slices (data x fsdp)")
  lowered = program.lower(batch, prompt_len, new_tokens, image_size=cfg.model.vision.image_size)
  options = {**NO_CODEGEN_OPT, **(NO_LICM if as_accelerator else {})}
  with tempfile.TemporaryDirectory() as dump:
    if top:
      options.update(xla_dump_to=dump, xla_dump_hlo_as_text=True)
    with no_compilation_cache():
      compiled = lowered.compile(compiler_options=options)
    buffers = hlo_stats.peak_buffers(dump, compiled.as_text(), top) if top else []
  seconds = time.perf_counter() - t0
  mem = memory(compiled)
  # Everything the process holds on the devices, read by the program or not (merged
  # adapter factors, and the stacked layers beside an unstacked copy, are held but unread:
  # jit drops them from the program's arguments).
  weights = sharded_bytes([program.abstract_state, program.abstract_layer_states()])
  inputs = sharded_bytes([a for a in program.abstract_inputs(batch, prompt_len,
                                                             cfg.model.vision.image_size)
                          if a is not None])
  cache = kv_cache_bytes(cfg, program, batch, prompt_len + new_tokens)
  mem.update({"weight_bytes": weights, "input_bytes": inputs, "kv_cache_bytes": cache,
              "other_temp_bytes": mem["temp_bytes"] - cache,
              "peak_bytes": weights + inputs + mem["temp_bytes"] + mem["output_bytes"]})
  return {"config": cfg, "program": program, "compile_s": seconds,
          "adjustments": adjustments(as_accelerator, original, rng_unrolled=True),
          "memory": mem, "buffers": buffers}
