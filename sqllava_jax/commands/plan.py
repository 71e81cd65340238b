"""`sqllava-jax plan CONFIG [key=value ...] --devices N`: per-device memory and FLOPs of the
config's real train step, compiled ahead of time on N simulated CPU devices with abstract
parameters (nothing is allocated).

`sqllava-jax plan --inference CONFIG --devices N --batch B --prompt-len P --new-tokens T`:
the same for the generation program (global batch B, prompts of P tokens, T new tokens):
per-device weights, KV cache and temporaries.

JAX fixes its device count when its backend starts, so when this process cannot provide N
CPU devices the command runs itself again in a child process that can.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from sqllava_jax.config import ConfigError, load_config, parse_mesh_spec, replace

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  parser.add_argument("--devices", type=int, required=True, help="simulated devices (the mesh)")
  parser.add_argument("--mesh", help="data=..,fsdp=..,tensor=.. (default: the config's mesh)")
  parser.add_argument("--batch", type=int, help="per-device micro-batch "
                      "(default: train.per_device_batch_size); with --inference the global "
                      "batch (default: one row per batch slice)")
  parser.add_argument("--seq-len", type=int, help="tokens per row (default: data.max_length)")
  parser.add_argument("--inference", action="store_true",
                      help="plan the generation program instead of the train step")
  parser.add_argument("--prompt-len", type=int, default=None,
                      help="--inference: prompt tokens per row, images' included "
                           "(default: data.max_length)")
  parser.add_argument("--new-tokens", type=int, default=128, help="--inference: new tokens")
  parser.add_argument("--unstack-layers", action=argparse.BooleanOptionalAction, default=None,
                      help="--inference: plan with the unstacked layer copy (default: only "
                           "with --no-as-accelerator, as the CPU runs it)")
  parser.add_argument("--top", type=int, default=10,
                      help="list this many of the biggest buffers live at the peak (0: none)")
  parser.add_argument("--as-accelerator", action=argparse.BooleanOptionalAction, default=True,
                      help="compile as GPU/TPU would (no CPU-only float32 hoisting, fused RNG, "
                           "blocked attention standing in for the fused kernel); "
                           "--no-as-accelerator plans exactly what the CPU compiles")
  parser.add_argument("--json", action="store_true", help="print one JSON object")


def _set_device_env(n: int) -> None:
  """Before JAX starts: n CPU devices, and CPU only (planning never touches an accelerator)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_FLAG}={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def _has_devices(n: int) -> bool:
  """Whether this process's running JAX offers n CPU devices as its default backend."""
  import jax
  try:
    cpus = jax.devices("cpu")
  except RuntimeError:
    return False
  return jax.default_backend() == "cpu" and len(cpus) >= n


def _child(args: argparse.Namespace) -> int:
  argv = [args.config, *args.overrides, "--devices", str(args.devices), "--top", str(args.top)]
  for flag, value in (("--mesh", args.mesh), ("--batch", args.batch), ("--seq-len", args.seq_len),
                      ("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens)):
    if value is not None:
      argv += [flag, str(value)]
  argv += ["--as-accelerator" if args.as_accelerator else "--no-as-accelerator"]
  argv += ["--inference"] if args.inference else []
  if args.unstack_layers is not None:
    argv += ["--unstack-layers" if args.unstack_layers else "--no-unstack-layers"]
  argv += ["--json"] if args.json else []
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(flags + [f"{DEVICE_FLAG}={args.devices}"])}
  return subprocess.call([sys.executable, "-m", "sqllava_jax.cli", "plan", *argv], env=env)


def run(args: argparse.Namespace) -> int:
  start = time.perf_counter()
  if args.devices < 1:
    raise ConfigError(f"--devices={args.devices} must be >= 1")
  fresh = "jax" not in sys.modules
  if fresh:
    _set_device_env(args.devices)
  # JAX is imported from here on, after the device flags are set: it reads them when it starts.
  from sqllava_jax.parallel.mesh import resolve_shape
  mesh = parse_mesh_spec(args.mesh) if args.mesh else {}
  cfg = replace(load_config(args.config, args.overrides),
                **{f"mesh.{axis}": size for axis, size in mesh.items()})
  resolve_shape(cfg.mesh, args.devices)  # a bad mesh fails here, before any compile
  if not fresh and not _has_devices(args.devices):
    return _child(args)
  from sqllava_jax.models.layers import unroll_threefry_on_cpu
  from sqllava_jax.training import plan_report, planner
  unroll_threefry_on_cpu()  # as training lowers its dropout masks (process-wide: see there)
  if args.inference:
    return _run_inference(args, cfg, start)
  batch = args.batch or cfg.train.per_device_batch_size
  seq_len = args.seq_len or cfg.data.max_length
  result = planner.plan(cfg, devices=args.devices, batch=batch, seq_len=seq_len,
                        as_accelerator=args.as_accelerator, top=args.top)
  summary = plan_report.summary(result, config_path=args.config, devices=args.devices,
                                batch=batch, seq_len=seq_len,
                                wall_s=time.perf_counter() - start)
  print(json.dumps(summary) if args.json else plan_report.text(summary), flush=True)
  return 0


def _run_inference(args: argparse.Namespace, cfg, start: float) -> int:
  from sqllava_jax.parallel.mesh import resolve_shape
  from sqllava_jax.training import plan_report, planner
  data, fsdp, _ = resolve_shape(cfg.mesh, args.devices)
  batch = args.batch or data * fsdp
  prompt_len = args.prompt_len or cfg.data.max_length
  if args.new_tokens < 1 or prompt_len < 1:
    raise ConfigError(f"--prompt-len {prompt_len} and --new-tokens {args.new_tokens} must be >= 1")
  unstack = (not args.as_accelerator) if args.unstack_layers is None else args.unstack_layers
  try:
    result = planner.plan_inference(cfg, devices=args.devices, batch=batch,
                                    prompt_len=prompt_len, new_tokens=args.new_tokens,
                                    as_accelerator=args.as_accelerator, unstack_layers=unstack,
                                    top=args.top)
  except ValueError as e:  # a batch the mesh cannot split
    raise ConfigError(str(e)) from None
  summary = plan_report.inference_summary(result, config_path=args.config, devices=args.devices,
                                          batch=batch, prompt_len=prompt_len,
                                          new_tokens=args.new_tokens,
                                          wall_s=time.perf_counter() - start)
  print(json.dumps(summary) if args.json else plan_report.inference_text(summary), flush=True)
  return 0
