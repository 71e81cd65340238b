"""The planner's result as one JSON-ready dict, and as text for a terminal."""

from __future__ import annotations

import math

from sqllava_jax.training import flops
from sqllava_jax.tree_paths import flat

FLOPS_COUNT = ("model FLOPs of one optimizer step over the whole global batch, counted "
               "analytically (training/flops.py): forward of every weight, input gradients "
               "wherever a gradient flows (through frozen weights too), weight gradients only "
               "for trainable weights; attention scores causal; every position of every row; "
               "no remat recomputation")
COMPILED_COUNT = ("matmul FLOPs of one device's compiled step: every dot in the optimised HLO "
                  "times the trip counts of its loops (remat recomputation and masked attention "
                  "blocks included)")
XLA_COUNT = ("XLA cost analysis as reported: each loop body (the scanned layers, micro-batches, "
             "loss chunks) counted once, so not a per-step figure")


def summary(result: dict, *, config_path: str, devices: int, batch: int, seq_len: int,
            wall_s: float) -> dict:
  cfg, program, mem = result["config"], result["program"], result["memory"]
  parts = result["model_flops"]
  model = flops.total(parts)
  return {
      "config": config_path, "devices": devices,
      "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
      "batch_per_device": batch, "seq_len": seq_len,
      "grad_accum_steps": cfg.train.grad_accum_steps, "rows_per_step": result["rows"],
      "attention_impl": cfg.model.attention_impl, "remat_policy": cfg.model.remat_policy,
      "compute_dtype": cfg.model.compute_dtype,
      "compiled_as": result["adjustments"],
      "memory": mem, "bytes_per_device": mem["peak_bytes"],
      "flops_per_step": model.total, "flops_per_step_counts": FLOPS_COUNT,
      "model_flops": {k: _flops_dict(v) for k, v in parts.items()},
      "model_flops_per_device": model.total / devices,
      "compiled_matmul_flops_per_device": result["compiled_matmul_flops"],
      "compiled_matmul_flops_counts": COMPILED_COUNT,
      "compiled_notes": result["compiled_notes"],
      "xla_cost_analysis_flops": result["xla_cost_flops"],
      "xla_cost_analysis_counts": XLA_COUNT,
      "parameters": _parameters(program),
      "peak_buffers": result["buffers"],
      "compile_s": round(result["compile_s"], 1), "wall_s": round(wall_s, 1),
  }


def _flops_dict(f: flops.Flops) -> dict:
  return {"forward": f.forward, "input_grad": f.input_grad, "weight_grad": f.weight_grad,
          "total": f.total}


def _parameters(program) -> dict:
  """Trainable and frozen parameter counts under the config's groups."""
  sizes = {k: math.prod(v.shape) for k, v in flat(program.abstract_state["params"]).items()}
  trains = flat(program.trainable)
  trainable = sum(n for k, n in sizes.items() if trains[k])
  return {"trainable": trainable, "frozen": sum(sizes.values()) - trainable}


def _buffer_lines(buffers: list[dict]) -> list[str]:
  if not buffers:
    return []
  return ["", "biggest buffers live at the peak"] + [
      f"  {_bytes(b['bytes'])}  {b['shape']:<28} {b['buffer']}  {b['op']}" for b in buffers]


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= size:
      return f"{n / size:7.2f} {unit}"
  return f"{n:7.0f} B  "


def _flop_unit(n: float) -> tuple[str, float]:
  for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if n >= size:
      return unit, size
  return "FLOP", 1.0


def _flop(n: float) -> str:
  unit, size = _flop_unit(n)
  return f"{n / size:.2f} {unit}"


def text(s: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in s["mesh"].items())
  mem = s["memory"]
  lines = [
      f"plan: {s['config']} on {s['devices']} simulated CPU devices (mesh {mesh})",
      f"  per device: {s['batch_per_device']} rows x {s['seq_len']} tokens per micro-batch, "
      f"{s['grad_accum_steps']} micro-batches per step ({s['rows_per_step']} rows per step)",
      f"  attention {s['attention_impl']}, remat {s['remat_policy']}, "
      f"compute {s['compute_dtype']}; compiled in {s['compile_s']} s",
      *[f"  compiled with: {a}" for a in s["compiled_as"]],
      "",
      "memory per device (XLA memory analysis)",
      f"  arguments    {_bytes(mem['argument_bytes'])}  parameters, optimizer state, batch",
      f"  temporaries  {_bytes(mem['temp_bytes'])}",
      f"  output       {_bytes(mem['output_bytes'])}  of which aliased to donated arguments "
      f"{_bytes(mem['alias_bytes']).strip()}",
      f"  peak         {_bytes(mem['peak_bytes'])}  arguments + temporaries + unaliased output",
  ]
  lines += _buffer_lines(s["peak_buffers"])
  unit, size = _flop_unit(s["flops_per_step"])
  cell = lambda v: f"{v / size:12.2f}"
  lines += ["", f"model FLOPs per step, analytical ({unit}; every row of the global batch)",
            f"  {'':<18}{'forward':>12}{'input-grad':>12}{'weight-grad':>12}{'total':>12}"]
  for name, f in s["model_flops"].items():
    lines.append(f"  {name:<18}{cell(f['forward'])}{cell(f['input_grad'])}"
                 f"{cell(f['weight_grad'])}{cell(f['total'])}")
  p = s["parameters"]
  lines += [f"  {'total':<18}{'':>36}{cell(s['flops_per_step'])}",
            f"  parameters: {p['trainable']:,} trainable (weight gradients), "
            f"{p['frozen']:,} frozen (forward and input gradients only)",
            f"  flops_per_step = {_flop(s['flops_per_step'])}: this analytical count, "
            f"{_flop(s['model_flops_per_device'])} per device",
            f"  compiled step per device, every dot x its loops' trip counts: "
            f"{_flop(s['compiled_matmul_flops_per_device'])} (remat recomputation included)",
            f"  XLA cost analysis per device: {_flop(s['xla_cost_analysis_flops'])}, each loop "
            "body counted once (not a per-step figure)"]
  lines += [f"  note: {n}" for n in s["compiled_notes"]]
  return "\n".join(lines)


def inference_summary(result: dict, *, config_path: str, devices: int, batch: int,
                      prompt_len: int, new_tokens: int, wall_s: float) -> dict:
  cfg, program, mem = result["config"], result["program"], result["memory"]
  return {
      "config": config_path, "devices": devices, "inference": True,
      "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
      "batch": batch, "batch_per_device": batch // program.batch_ways(),
      "prompt_len": prompt_len, "new_tokens": new_tokens,
      "attention_impl": cfg.model.attention_impl, "compute_dtype": cfg.model.compute_dtype,
      "param_dtype": cfg.model.param_dtype, "unstacked_layers": program.unstack,
      "compiled_as": result["adjustments"],
      "memory": mem, "bytes_per_device": mem["peak_bytes"],
      "peak_buffers": result["buffers"],
      "compile_s": round(result["compile_s"], 1), "wall_s": round(wall_s, 1),
  }


def inference_text(s: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in s["mesh"].items())
  mem = s["memory"]
  lines = [
      f"inference plan: {s['config']} on {s['devices']} simulated CPU devices (mesh {mesh})",
      f"  global batch {s['batch']} ({s['batch_per_device']} rows per device), prompt "
      f"{s['prompt_len']} + {s['new_tokens']} new tokens, one image per row",
      f"  attention {s['attention_impl']}, compute {s['compute_dtype']}, parameters "
      f"{s['param_dtype']}, unstacked layer copy: {'yes' if s['unstacked_layers'] else 'no'}; "
      f"compiled in {s['compile_s']} s",
      *[f"  compiled with: {a}" for a in s["compiled_as"]],
      "",
      "memory per device (XLA memory analysis)",
      f"  weights      {_bytes(mem['weight_bytes'])}  sharded by mesh.rules (adapters merged)",
      f"  inputs       {_bytes(mem['input_bytes'])}  ids, mask, pixels",
      f"  KV cache     {_bytes(mem['kv_cache_bytes'])}  k and v of every layer, sharded over "
      "batch and kv heads (part of the temporaries)",
      f"  temporaries  {_bytes(mem['other_temp_bytes'])}  besides the KV cache "
      f"({_bytes(mem['temp_bytes']).strip()} in all)",
      f"  output       {_bytes(mem['output_bytes'])}",
      f"  peak         {_bytes(mem['peak_bytes'])}  weights + inputs + temporaries + output "
      f"(the program reads {_bytes(mem['argument_bytes']).strip()} of its arguments)",
  ]
  lines += _buffer_lines(s["peak_buffers"])
  return "\n".join(lines)
