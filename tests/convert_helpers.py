"""Shared pieces of the conversion tests: tiny configs, checkpoints, simulated training, and
forward passes of our model and of transformers' on the same inputs."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from sqllava_jax import configlib
from sqllava_jax.cli import main as cli
from sqllava_jax.models import lora
from sqllava_jax.training.checkpoint import Checkpointer, load_model

TOKENIZER_VOCAB = 400  # what train_tiny_tokenizer(vocab_size=400) really gives
IMAGE_ID = -200


def write_yaml(path, *, projector: str = "cluster", **data) -> str:
  """A tiny config: the architecture comes from the HF checkpoints, this holds the rest."""
  cfg = {"model": {
      "projector": {"type": projector, "num_prototypes": 8, "num_iterations": 2},
      "vit_lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj",
                                                        "out_proj", "fc1", "fc2"]},
      "llm_lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]}}}
  cfg.update(data)
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  return str(path)


def run_cli(*args) -> int:
  return cli(["convert", *[str(a) for a in args]])


def fails(capsys, out, *args) -> str:
  """Runs a convert command that must fail; checks nothing is left at or beside `out`."""
  assert run_cli(*args, "--out", out) == 2
  assert not os.path.exists(out), f"{out} was written"
  leftovers = [n for n in os.listdir(os.path.dirname(out)) if ".partial-" in n]
  assert not leftovers, leftovers
  return capsys.readouterr().err


def simulate_training(ckpt: str, out: str, seed: int):
  """Stands in for a few LoRA training steps: every adapter (A and B) and every projector
  parameter gets random non-zero values, then the model is saved as a training run saves
  (a later step, with a `train` item beside `params` and `meta`)."""
  model, cfg = load_model(ckpt)
  rng = np.random.default_rng(seed)
  for _, linear in lora.lora_linears(model):
    for p in (linear.lora_a, linear.lora_b):
      p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.1, p[...].dtype)
  for path, p in nnx.to_flat_state(nnx.state(model.projector, nnx.Param)):
    scale = 0.3 if path[-1] in ("sim_alpha", "sim_beta") else 0.1
    p[...] = jnp.asarray(p[...] + rng.normal(size=p.shape) * scale, p[...].dtype)
  ckpt_out = Checkpointer(out, async_save=False)
  ckpt_out.save(3, params=nnx.state(model, nnx.Param).to_pure_dict(), force=True,
                meta={"config": configlib.to_dict(cfg), "step": 3},
                train={"step": np.int32(3), "opt_state": {"count": np.int32(3)}})
  ckpt_out.close()
  if os.path.isfile(os.path.join(ckpt, "tokenizer.model")):
    shutil.copy(os.path.join(ckpt, "tokenizer.model"), out)
  return model, cfg


# Test forwards run once or twice each: XLA's backend optimisation would cost more time
# than it saves, so they compile without it (the numerics stay float32).
_FAST = {"xla_backend_optimization_level": 0}
_COMPILED: dict = {}


def _run(fn, model, *args):
  """`fn(model, *args)` jitted, one compiled executable per (fn, model structure, shapes)."""
  graphdef, state = nnx.split(model)
  key = (fn, graphdef, tuple(None if a is None else (a.shape, str(a.dtype)) for a in args))
  if key not in _COMPILED:
    pure = lambda state, *a: fn(nnx.merge(graphdef, state), *a)
    _COMPILED[key] = jax.jit(pure).lower(state, *args).compile(_FAST)
  return _COMPILED[key](state, *args)


def _forward(model, ids, pixels, positions):
  hidden, _ = model(ids, pixels, positions)
  return model.llm.logits(hidden)


def our_logits(model, ids: np.ndarray, pixels=None) -> np.ndarray:
  """Logits [B, T, V] of our composite model; `ids` hold IMAGE_ID at image positions."""
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  pixels = None if pixels is None else jnp.asarray(pixels, jnp.float32)
  return np.asarray(_run(_forward, model, jnp.asarray(ids, jnp.int32), pixels, positions))


def _forward_assignments(model, ids, pixels, positions):
  hidden, aux = model(ids, pixels, positions)
  return model.llm.logits(hidden), aux["projector/assignments"]


def our_logits_and_assignments(model, ids: np.ndarray, pixels: np.ndarray):
  """(logits [B, T, V], prototype assignments int[B, L]) of our model on one forward."""
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  logits, assignments = _run(_forward_assignments, model, jnp.asarray(ids, jnp.int32),
                             jnp.asarray(pixels, jnp.float32), positions)
  return np.asarray(logits), np.asarray(assignments)


def _vision(model, pixels):
  return model.vision(pixels, all_hidden_states=True)[1]["hidden_states"]


def our_vision_hidden(model, pixels: np.ndarray) -> np.ndarray:
  """[layers run + 1, B, 1 + P, D] hidden states of our vision tower."""
  return np.asarray(_run(_vision, model, jnp.asarray(pixels, jnp.float32)))


def text_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int64)


def pixels_nhwc(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def load_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a (sharded) safetensors directory, as float32 numpy."""
  from safetensors import safe_open
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), framework="pt") as f:
        out.update({k: f.get_tensor(k).float().numpy() for k in f.keys()})
  return out


def assert_close(got, want, atol: float, what: str) -> float:
  """assert_allclose that also returns the max difference (reported by the tests)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
  np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=what)
  return float(np.abs(got - want).max())


def original_clip_tree(clip):
  """The original's `CLIPVisionTower` around `clip` (a transformers CLIPVisionModel), named as
  transformers 4.31 names it: `vision_tower.vision_model.encoder.layers.N...`, whatever
  transformers is installed (5.x dropped the `vision_model` level; it is put back here)."""
  import torch

  class VisionModelLevel(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.vision_model = inner

    def forward(self, *args, **kwargs):
      return self.vision_model(*args, **kwargs)

  class CLIPVisionTower(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.vision_tower = inner if hasattr(inner, "vision_model") else VisionModelLevel(inner)

    def forward(self, pixel_values):  # [B, 3, H, W] -> every hidden state
      return self.vision_tower(pixel_values, output_hidden_states=True).hidden_states

  return CLIPVisionTower(clip)


def peft_load_strict(model, directory: str):
  """`PeftModel.from_pretrained(model, directory).merge_and_unload()` (the original's lora_pt
  step), failing if PEFT reports any adapter key it could not place (it only warns)."""
  import warnings

  import peft
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    merged = peft.PeftModel.from_pretrained(model, directory).merge_and_unload()
  bad = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
  assert not bad, bad
  return merged.eval()
