"""A tiny SQ-LLaVA checkpoint beside a small synthetic set, for the inference command tests."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqllava_jax.config import load_config
from sqllava_jax.demo import synthetic
from sqllava_jax.models.sqllava import SQLLaVA, abstract_model
from sqllava_jax.training.checkpoint import save_model


@dataclasses.dataclass(frozen=True)
class TinyRun:
  ckpt: str
  data: synthetic.SyntheticPaths
  cfg: object

  @property
  def image(self) -> str:
    return os.path.join(self.data.image_folder, "eval_000000.png")


def tiny_config(data_dir: str, *overrides: str):
  return load_config("configs/tiny.yaml", [
      "model.llm.vocab_size=400", "data.source=synthetic", f"data.synthetic.dir={data_dir}",
      "data.synthetic.image_size=32", "data.synthetic.vocab_size=400", "data.max_length=512",
      *overrides])


def random_model(model_cfg, seed: int = 0, scale: float = 0.1) -> SQLLaVA:
  """Every parameter random (norm scales around 1), filled with numpy: initialising the model
  through its own initialisers takes far longer on a shared CPU."""
  graphdef, state = nnx.split(abstract_model(model_cfg))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    noise = rng.normal(0.0, scale, var.shape).astype(np.float32)
    if path[-1] == "scale":
      noise += 1.0
    flat.append((path, var.replace(jnp.asarray(noise, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def make_tiny_run(root: str, seed: int = 0) -> TinyRun:
  """Synthetic set (images 32 px, tokenizer of 400 pieces) + a random tiny checkpoint whose
  config points at the set's tokenizer."""
  data_dir = os.path.join(root, "synthetic")
  paths = synthetic.generate(data_dir, seed=0, num_train=40, num_eval=6, image_size=32,
                             vocab_size=400)
  cfg = tiny_config(data_dir, f"data.tokenizer={paths.tokenizer}")
  model = random_model(cfg.model, seed)
  ckpt = os.path.join(root, "ckpt")
  save_model(ckpt, model, cfg)
  return TinyRun(ckpt, paths, cfg)


def run_processes(argv: list[str], count: int, env: dict, cwd: str) -> list[tuple[str, str]]:
  """Runs `argv` (a `sqllava_jax.cli` command line) as `count` processes of one JAX cluster on
  this machine; asserts each exits 0 and returns each one's (stdout, stderr)."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  argv = [sys.executable, "-m", "sqllava_jax.cli", *argv, "--coordinator", f"localhost:{port}",
          "--num-processes", str(count)]
  procs = [subprocess.Popen([*argv, "--process-id", str(i)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(count)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def spy_prompts(monkeypatch, keep) -> list:
  """Every prompt row `Engine.complete` is given from now on for which `keep(prompt, pixels)`
  holds (e.g. not a padding row), in call order."""
  from sqllava_jax.evaluation.engine import Engine  # pylint: disable=g-import-not-at-top
  seen = []
  complete = Engine.complete

  def spy(self, prompts, pixels, **kwargs):
    seen.extend(p for p, x in zip(prompts, pixels) if keep(p, x))
    return complete(self, prompts, pixels, **kwargs)
  monkeypatch.setattr(Engine, "complete", spy)
  return seen
