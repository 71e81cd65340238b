"""One stage-2 train step, ours (jitted JAX) against a PyTorch reference, float32 on CPU.

    python benchmarks/train_step.py [--repeats 3] [--steps 2] [--layers 8] [--skip-torch]

The model is a mid-size SQ-LLaVA: CLIP ViT 512 wide x 4 layers at 224 px (patch 14: 256
patch tokens), the prototype extractor (128 prototypes, 2 iterations), LLaMA 1024 wide x 8
layers (16 heads, MLP 2816, vocab 32000); LoRA r 16 (alpha 32, dropout 0.05) on every LLM
linear, r 8 (alpha 16, dropout 0.2) on every ViT linear. Batch 4 x 1024 tokens, each row
BOS, 256 image positions, then text, the last 700 tokens trained. Stage 2 trains the LLM
adapters, the projector and the ViT adapters; the bases are frozen. Both sides run every
vision layer (features = the last layer's patch tokens), so they do the same work.

The reference is what the reference code trains with: transformers' `CLIPVisionModel` and
`LlamaForCausalLM` (sdpa attention) with PEFT LoRA, a PyTorch prototype extractor written
from docs/design.md section 2.2, image features scattered into `inputs_embeds`, the model's own
loss (full [B, T, V] logits), backward, gradient clipping and AdamW.

Each side runs in a worker process of its own, one side at a time (`ab.py`): in one process
the two frameworks' thread pools slow each other down, and with both models resident the
page faults of each step's fresh temporaries slow ours down (24 GiB machine). Rounds
alternate ours / reference, each a fresh process: build, one warm-up step, an fp32 matmul
probe in that framework ([4096, 1024] x [1024, 2816], the decoder's MLP shape, so the
practical limit is measured under the same conditions), then the timed steps. Ours runs
with `remat_policy: dots` (3.5 GiB of temporaries instead of 5.1, and a little faster here)
and logits chunks of 256 (chunks past each row's last trained position are skipped). Model
FLOPs are analytical (`training.flops`: forward, input gradients through frozen weights,
weight gradients only for trainable ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable

import numpy as np

MATMUL = (4096, 1024, 2816)  # M, K, N of the probe


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=3, help="rounds (fresh processes)")
  p.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--attention", default="auto", help="model.attention_impl of ours")
  p.add_argument("--chunk", type=int, default=256, help="train.logits_chunk_size of ours")
  p.add_argument("--skip-torch", action=argparse.BooleanOptionalAction, default=False)
  return p.parse_args()


@dataclasses.dataclass(frozen=True)
class Shapes:
  batch: int = 4
  seq: int = 1024
  layers: int = 8
  image: int = 224
  patch: int = 14
  vision_width: int = 512
  vision_layers: int = 4
  prototypes: int = 128
  width: int = 1024
  mlp: int = 2816
  heads: int = 16
  vocab: int = 32000
  trained: int = 700  # labelled positions at the end of each row

  @property
  def image_tokens(self) -> int:
    return (self.image // self.patch) ** 2


def make_batch(s: Shapes, image_token_id: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, s.vocab, (s.batch, s.seq)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + s.image_tokens] = image_token_id
  labels = np.full_like(ids, -100)
  labels[:, -s.trained:] = ids[:, -s.trained:]
  return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
          "positions": np.broadcast_to(np.arange(s.seq, dtype=np.int32), ids.shape).copy(),
          "segment_ids": np.ones_like(ids),
          "pixel_values": rng.standard_normal((s.batch, s.image, s.image, 3)).astype(np.float32)}


# --- ours -------------------------------------------------------------------------------------

def our_config(s: Shapes, attention: str, chunk: int):
  from sqllava_jax.config import (
    LLM_LORA_TARGETS,
    STAGE2_PARAM_GROUPS,
    VIT_LORA_TARGETS,
    Config,
    LLMConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    ProjectorConfig,
    TrainConfig,
    VisionConfig,
  )
  # Stage 2's groups, with the frozen bases in float32 (bfloat16 matmuls are slower on CPU).
  groups = tuple(dataclasses.replace(g, param_dtype="float32") for g in STAGE2_PARAM_GROUPS)
  model = ModelConfig(
      vision=VisionConfig(image_size=s.image, patch_size=s.patch, hidden_size=s.vision_width,
                          intermediate_size=4 * s.vision_width, num_layers=s.vision_layers,
                          num_heads=s.vision_width // 64, select_layer=-1),
      llm=LLMConfig(vocab_size=s.vocab, hidden_size=s.width, intermediate_size=s.mlp,
                    num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.heads,
                    max_position_embeddings=s.seq),
      projector=ProjectorConfig(type="cluster", num_prototypes=s.prototypes, num_iterations=2),
      vit_lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.2, targets=VIT_LORA_TARGETS),
      llm_lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.05, targets=LLM_LORA_TARGETS),
      remat_policy="dots", attention_impl=attention)
  train = TrainConfig(param_groups=groups, per_device_batch_size=s.batch,
                      logits_chunk_size=chunk)
  return Config(model=model, train=train, mesh=MeshConfig(data=1))


class Ours:
  """The real jitted train step (`TrainProgram`), state donated from step to step."""

  def __init__(self, s: Shapes, attention: str, chunk: int):
    import jax  # pylint: disable=g-import-not-at-top

    from sqllava_jax.models.layers import unroll_threefry_on_cpu  # pylint: disable=g-import-not-at-top
    from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
    from sqllava_jax.training.program import TrainProgram  # pylint: disable=g-import-not-at-top
    self.cfg = our_config(s, attention, chunk)
    unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
    self.program = TrainProgram(self.cfg, make_mesh(self.cfg.mesh, jax.devices()[:1]), 1000)
    self.state = self.program.fresh_state(0)
    self.batch = self.program.global_batch(make_batch(s, self.cfg.model.image_token_id))
    start = time.perf_counter()
    self.step = self.program.train_step.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start

  def __call__(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    self.state, metrics = self.step(self.state, self.batch)
    return float(jax.block_until_ready(metrics)["loss"])

  def model_flops(self, s: Shapes):
    from sqllava_jax.training import flops  # pylint: disable=g-import-not-at-top
    from sqllava_jax.tree_paths import flat  # pylint: disable=g-import-not-at-top
    parts = flops.step_flops(self.cfg.model, flat(self.program.trainable), s.batch, s.seq)
    return parts, flops.total(parts)


class Worker:
  """One side as `ab.Side` serves it: `step()` -> loss and `probe()` -> matmul seconds,
  set by the subclass."""
  step: Callable[[], float]
  probe: Callable[[], float]

  def timed_step(self) -> tuple[float, float]:
    """(seconds, loss) of one step."""
    start = time.perf_counter()
    loss = self.step()
    return time.perf_counter() - start, loss

  def matmul_rate(self) -> float:
    return matmul_flops() / self.probe()


class OursWorker(Worker):
  """`Ours`, with FLOPs and versions in `info` and a JAX probe."""

  def __init__(self, s: Shapes, attention: str, chunk: int):
    import jax  # pylint: disable=g-import-not-at-top
    self.ours = self.step = Ours(s, attention, chunk)
    self.probe = jax_matmul_probe()
    self.shapes = s
    self.header = (f"jax {jax.__version__} ({jax.devices()[0].platform}, "
                   f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")

  def info(self) -> dict:
    parts, total = self.ours.model_flops(self.shapes)
    return {"header": self.header, "compile_seconds": self.ours.compile_seconds,
            "parts": {k: v.total for k, v in parts.items()},
            "total": {**dataclasses.asdict(total), "total": total.total}}


# --- the PyTorch reference ---------------------------------------------------------------------

def torch_prototype_extractor(d: int, h: int, n: int, iterations: int):
  """docs/design.md section 2.2, in PyTorch: x [B, L, D] -> [B, L, H]."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  class QuickGELU(nn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  class PrototypeExtractor(nn.Module):
    def __init__(self):
      super().__init__()
      self.c, self.v, self.f = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
      self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))
      self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
      self.ln_1 = nn.LayerNorm(d)  # kept in the state, never applied
      self.mlp = nn.Sequential(nn.Linear(d, h), QuickGELU(), nn.Linear(h, h))
      self.pool = nn.AdaptiveAvgPool1d(n)

    def forward(self, x):
      value, feature = self.v(x), self.f(x)
      centers = self.pool(x.transpose(1, 2)).transpose(1, 2)                  # [B, N, D]
      centers_feature = self.pool(feature.transpose(1, 2)).transpose(1, 2)
      value_t = F.normalize(value.transpose(1, 2), dim=-1)  # each channel over the tokens
      for _ in range(iterations):
        centers = self.c(centers)
        sim = torch.softmax(F.normalize(centers, dim=-1) @ value_t, dim=1)  # [B, N, L]
        centers = sim @ feature
      cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
      sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
      onehot = torch.zeros_like(sim).scatter_(1, sim.argmax(dim=1, keepdim=True), 1.0)
      sim = sim * onehot
      proto = (sim @ feature + centers_feature) / (onehot.sum(-1, keepdim=True) + 1.0)
      return self.mlp(x + sim.transpose(1, 2) @ proto)

  return PrototypeExtractor()


def torch_towers(s: Shapes):
  """(vision tower, projector, LLM) with PEFT LoRA, bases frozen."""
  import peft  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=s.vision_width, intermediate_size=4 * s.vision_width,
      num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_width // 64,
      image_size=s.image, patch_size=s.patch, attn_implementation="sdpa"))
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=s.vocab, hidden_size=s.width, intermediate_size=s.mlp,
      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
      max_position_embeddings=s.seq, tie_word_embeddings=False, attn_implementation="sdpa"))
  vision = peft.get_peft_model(vision, peft.LoraConfig(
      r=8, lora_alpha=16, lora_dropout=0.2,
      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
  llm = peft.get_peft_model(llm, peft.LoraConfig(
      r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[
          "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
  projector = torch_prototype_extractor(s.vision_width, s.width, s.prototypes, 2)
  return vision.train(), projector.train(), llm.train()


class Reference:
  """Forward, loss, backward, clipping and AdamW over the trainable set, as the reference."""

  def __init__(self, s: Shapes, image_token_id: int):
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    self.vision, self.projector, self.llm = torch_towers(s)
    batch = make_batch(s, image_token_id)
    self.ids = torch.from_numpy(batch["input_ids"]).long()
    self.image_mask = self.ids == image_token_id
    self.text_ids = self.ids.masked_fill(self.image_mask, 0)
    self.labels = torch.from_numpy(batch["labels"]).long()
    self.pixels = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous()
    modules = (self.vision, self.projector, self.llm)
    self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=2e-5, weight_decay=0.0)

  def __call__(self) -> float:
    import torch  # pylint: disable=g-import-not-at-top
    hidden = self.vision(pixel_values=self.pixels, output_hidden_states=True).hidden_states[-1]
    features = self.projector(hidden[:, 1:])  # patch tokens only
    embeds = self.llm.get_input_embeddings()(self.text_ids)
    embeds = embeds.masked_scatter(self.image_mask[..., None], features.to(embeds.dtype))
    loss = self.llm(inputs_embeds=embeds, labels=self.labels).loss
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()
    return loss.item()

  def trainable_count(self) -> int:
    return sum(p.numel() for p in self.params)


class ReferenceWorker(Worker):
  """`Reference`, with a torch probe."""

  def __init__(self, s: Shapes, image_token_id: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.reference = self.step = Reference(s, image_token_id)
    self.probe = torch_matmul_probe()
    self.header = f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads"

  def info(self) -> dict:
    return {"header": self.header, "trainable": self.reference.trainable_count()}


# --- the practical limit: fp32 matmul ---------------------------------------------------------

def _probe_operands():
  m, k, n = MATMUL
  rng = np.random.default_rng(0)
  return rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)


def _median_seconds(fn, reps: int = 5) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_matmul_probe():
  """run() -> seconds of one [M, K] x [K, N] float32 matmul in JAX (median of a few)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a, b = (jnp.asarray(x) for x in _probe_operands())
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  return lambda: _median_seconds(lambda: mm(a, b).block_until_ready())


def torch_matmul_probe():
  """The same in torch."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = (torch.from_numpy(x) for x in _probe_operands())
  torch.matmul(a, b)
  return lambda: _median_seconds(lambda: torch.matmul(a, b))


def matmul_flops() -> float:
  m, k, n = MATMUL
  return 2.0 * m * k * n


# --- the run -----------------------------------------------------------------------------------

def measure(sides: dict, rounds: int, steps: int) -> tuple[dict, dict, dict]:
  """`rounds` rounds; in each, every side in turn gets a fresh worker process (built, one
  warm-up step, a matmul probe, `steps` timed steps, then closed), so only one side's
  memory is resident while it runs. Returns ({side: [seconds]}, {side: [probe FLOP/s]},
  {side: its worker's info})."""
  import ab  # pylint: disable=g-import-not-at-top
  seconds = {name: [] for name in sides}
  rates = {name: [] for name in sides}
  infos = {}
  for r in range(rounds):
    for name, (factory, args) in sides.items():
      with ab.Side(name, factory, *args) as side:
        infos.setdefault(name, side.info)
        side.call("timed_step")
        rates[name].append(side.call("matmul_rate"))
        for _ in range(steps):
          took, loss = side.call("timed_step")
          seconds[name].append(took)
          print(f"  round {r}: {name:<12} {took:7.2f} s  loss {loss:.4f}  "
                f"load {os.getloadavg()[0]:.1f}", flush=True)
  return seconds, rates, infos


def report(seconds: dict, rates: dict, flops: dict) -> None:
  total = flops["total"]
  print(f"\nmodel FLOPs per step (analytical): {total['total'] / 1e12:.3f} TFLOP = forward "
        f"{total['forward'] / 1e12:.3f} + input gradients {total['input_grad'] / 1e12:.3f} + "
        f"weight gradients {total['weight_grad'] / 1e12:.3f} (trainable only)")
  for name, f in flops["parts"].items():
    print(f"  {name:<18} {f / 1e9:9.1f} GFLOP")
  limit = {FRAMEWORK[k]: statistics.median(v) for k, v in rates.items()}
  print(f"fp32 matmul {MATMUL[0]}x{MATMUL[1]} @ {MATMUL[1]}x{MATMUL[2]}, median over the "
        f"run: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in limit.items()))
  best = max(limit.values())
  for name, xs in seconds.items():
    med = statistics.median(xs)
    print(f"{name:<12} median {med:7.2f} s/step  (runs: {', '.join(f'{x:.1f}' for x in xs)})  "
          f"{total['total'] / med / 1e9:6.1f} GFLOP/s = {total['total'] / med / best:.0%} of "
          f"the matmul limit")
  if "reference" in seconds:
    ratio = statistics.median(seconds["sqllava-jax"]) / statistics.median(seconds["reference"])
    print(f"ours / reference step time: {ratio:.2f}x (goal <= 0.80x)")


FRAMEWORK = {"sqllava-jax": "jax", "reference": "torch"}


def main() -> None:
  args = parse_args()
  s = Shapes(batch=args.batch, seq=args.seq, layers=args.layers)
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; each side in its own "
        f"process, one at a time; {args.repeats} rounds of {args.steps} steps", flush=True)
  sides = {"sqllava-jax": (OursWorker, (s, args.attention, args.chunk))}
  if not args.skip_torch:
    from sqllava_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
    sides["reference"] = (ReferenceWorker, (s, ModelConfig().image_token_id))
  seconds, rates, infos = measure(sides, args.repeats, args.steps)
  ours = infos["sqllava-jax"]
  print(f"ours: {ours['header']}; attention {args.attention}, logits chunk {args.chunk}, "
        f"remat dots, compiled in {ours['compile_seconds']:.0f} s")
  if "reference" in infos:
    print(f"reference: {infos['reference']['header']}; "
          f"{infos['reference']['trainable'] / 1e6:.2f} M trainable parameters")
  report(seconds, rates, ours)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
