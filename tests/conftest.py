"""Shared pytest set-up: CPU only, 8 simulated devices (for the sharding tests; everything
else runs on device 0), float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLVM's optimisation level 0 halves XLA's CPU compile time, which dominates the tests
# (their programs are tiny); tests compare runs compiled the same way.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS +
                             " --xla_force_host_platform_device_count=8").strip()

# Compiled programs are cached on disk, so tests (and subprocess runs) that build the same
# train step compile it once; the cache lives beside pytest's own.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from sqllava_jax.models.layers import unroll_threefry_on_cpu  # noqa: E402

# The train command lowers dropout's RNG unrolled (process-wide; see there): so does the
# suite, whose tests train in process, so they train as the command does, as fast.
unroll_threefry_on_cpu()
