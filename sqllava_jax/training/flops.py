"""Analytical model FLOPs of one train step: what MFU is measured against.

Only matrix multiplications count (2 FLOPs per multiply-add); norms, activations, softmax
and the optimizer are left out, as in the usual 6N accounting. Per multiplication:

- forward: `2 * tokens * in * out` for every weight, trainable or frozen;
- input gradients: the same again wherever a gradient must flow through the layer, i.e. when
  the layer or anything before it trains (stage 2: through the whole LLM, the projector and
  the vision tower, whose bases are frozen);
- weight gradients: the same again, only for trainable weights (LoRA A and B, the projector);
  frozen bases get none.

So a frozen LLM weight costs 4N per token (not 6N) and a trainable one 6N. Attention scores
(QK^T and PV) carry no weights: forward `4 * q_len * kv_len * heads * head_dim` per sequence
and layer (causal: only the pairs a query sees, T(T+1)/2), backward twice that. The vision
tower is counted per image, the lm_head for every position of the sequence (the loss projects
each one). Recomputation under remat is not model work and is not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from sqllava_jax.config import LLMConfig, LoRAConfig, ModelConfig, ProjectorConfig, VisionConfig
from sqllava_jax.tree_paths import flat

Trains = Callable[[str], bool]


@dataclasses.dataclass(frozen=True)
class Flops:
  forward: float = 0.0
  input_grad: float = 0.0
  weight_grad: float = 0.0

  def __add__(self, other: "Flops") -> "Flops":
    return Flops(self.forward + other.forward, self.input_grad + other.input_grad,
                 self.weight_grad + other.weight_grad)

  def __mul__(self, k: float) -> "Flops":
    return Flops(self.forward * k, self.input_grad * k, self.weight_grad * k)

  @property
  def total(self) -> float:
    return self.forward + self.input_grad + self.weight_grad


def matmul(tokens: float, d_in: int, d_out: int, *, trains: bool, grad_in: bool) -> Flops:
  """`[tokens, d_in] @ [d_in, d_out]` with a weight that trains or not."""
  f = 2.0 * tokens * d_in * d_out
  return Flops(f, f if grad_in else 0.0, f if trains else 0.0)


def linear(tokens: float, d_in: int, d_out: int, path: str, trains: Trains, *, grad_in: bool,
           lora_rank: int = 0) -> Flops:
  """A `layers.Linear` at `path` (its `kernel`, and `lora_a` [in, r] / `lora_b` [r, out])."""
  out = matmul(tokens, d_in, d_out, trains=trains(f"{path}/kernel"), grad_in=grad_in)
  if lora_rank:
    a_trains = trains(f"{path}/lora_a")
    # B's input gradient is needed to reach A whenever A trains.
    out += matmul(tokens, lora_rank, d_out, trains=trains(f"{path}/lora_b"),
                  grad_in=grad_in or a_trains)
    out += matmul(tokens, d_in, lora_rank, trains=a_trains, grad_in=grad_in)
  return out


def attention_scores(sequences: float, q_len: int, kv_len: int, heads: int, head_dim: int, *,
                     causal: bool, grad_in: bool) -> Flops:
  """QK^T and PV: no weights; the backward (dQ, dK, dV, dP) is twice the forward."""
  pairs = q_len * (q_len + 1) / 2 if causal else q_len * kv_len
  f = sequences * 2 * 2.0 * pairs * heads * head_dim
  return Flops(f, 2 * f if grad_in else 0.0, 0.0)


def _rank(lora: LoRAConfig, name: str) -> int:
  return lora.rank if lora.enabled and name in lora.targets else 0


def vision_flops(cfg: VisionConfig, lora: LoRAConfig, images: float, trains: Trains,
                 grad_in: bool) -> dict[str, Flops]:
  """The patch embedding (never an input gradient: pixels need none) and the encoder layers
  up to the selected one. `grad_in`: something in the encoder layers trains."""
  n, d, f = cfg.num_patches + 1, cfg.hidden_size, cfg.intermediate_size
  patch = matmul(images * cfg.num_patches, cfg.patch_size ** 2 * cfg.num_channels, d,
                 trains=trains("vision/patch_embedding"), grad_in=False)
  tok, base = images * n, "vision/layers"
  layer = Flops()
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    layer += linear(tok, d, d, f"{base}/self_attn/{name}", trains, grad_in=grad_in,
                    lora_rank=_rank(lora, name))
  layer += linear(tok, d, f, f"{base}/fc1", trains, grad_in=grad_in, lora_rank=_rank(lora, "fc1"))
  layer += linear(tok, f, d, f"{base}/fc2", trains, grad_in=grad_in, lora_rank=_rank(lora, "fc2"))
  scores = attention_scores(images, n, n, cfg.num_heads, d // cfg.num_heads, causal=False,
                            grad_in=grad_in)
  layers = cfg.feature_layer_count
  return {"vision linears": patch + layer * layers, "vision attention": scores * layers}


def projector_flops(cfg: ProjectorConfig, d: int, h: int, tokens: int, images: float,
                    trains: Trains, grad_in: bool) -> Flops:
  """`cluster` (prototype extractor) or the LLaVA MLPs, per image of `tokens` features.
  `grad_in`: the vision tower trains, so the gradient must reach the projector's input.

  The extractor's weight-free products (two poolings, two per refinement, the cosine and
  two prototype sums: 5 + 2T products of N x L x D per image) are counted with a backward
  of twice their forward.
  """
  pre, x_tok = "projector", images * tokens
  # Past its first layer the projector's inputs depend on its own weights: when any of them
  # trains, gradients flow through all of it.
  inner = grad_in or any(trains(f"{pre}/{name}/kernel")
                         for name in ("v", "f", "c", "mlp_in", "linear_1"))
  if cfg.type != "cluster":
    out = linear(x_tok, d, h, f"{pre}/linear_1", trains, grad_in=grad_in)
    if cfg.type == "mlp2x_gelu":
      out += linear(x_tok, h, h, f"{pre}/linear_2", trains, grad_in=inner)
    return out
  n, t = cfg.num_prototypes, cfg.num_iterations
  out = linear(x_tok, d, d, f"{pre}/v", trains, grad_in=grad_in)
  out += linear(x_tok, d, d, f"{pre}/f", trains, grad_in=grad_in)
  out += linear(images * n * t, d, d, f"{pre}/c", trains, grad_in=inner)
  out += linear(x_tok, d, h, f"{pre}/mlp_in", trains, grad_in=inner)
  out += linear(x_tok, h, h, f"{pre}/mlp_out", trains, grad_in=inner)
  products = images * 2.0 * n * tokens * d * (5 + 2 * t)
  return out + Flops(products, 2 * products if inner else 0.0, 0.0)


def llm_flops(cfg: LLMConfig, lora: LoRAConfig, rows: float, seq_len: int, trains: Trains,
              grad_in: bool) -> dict[str, Flops]:
  """Decoder layers (every position of `rows` sequences), attention scores, and the lm_head.
  `grad_in`: something before the lm_head trains, so gradients flow through every layer."""
  d, hd, f = cfg.hidden_size, cfg.effective_head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  tok, base = rows * seq_len, "llm/layers"
  shapes = {"self_attn/q_proj": (d, q), "self_attn/k_proj": (d, kv), "self_attn/v_proj": (d, kv),
            "self_attn/o_proj": (q, d), "mlp/gate_proj": (d, f), "mlp/up_proj": (d, f),
            "mlp/down_proj": (f, d)}
  layer = Flops()
  for name, (i, o) in shapes.items():
    layer += linear(tok, i, o, f"{base}/{name}", trains, grad_in=grad_in,
                    lora_rank=_rank(lora, name.split("/")[1]))
  scores = attention_scores(rows, seq_len, seq_len, cfg.num_heads, hd, causal=True,
                            grad_in=grad_in)
  head = "llm/embed_tokens/embedding" if cfg.tie_word_embeddings else "llm/lm_head"
  lm_head = matmul(tok, d, cfg.vocab_size, trains=trains(head), grad_in=grad_in)
  n = cfg.num_layers
  return {"LLM linears": layer * n, "LLM attention": scores * n, "lm_head": lm_head}


def step_flops(cfg: ModelConfig, trainable: Mapping[str, bool], rows: int,
               seq_len: int) -> dict[str, Flops]:
  """Model FLOPs of one optimizer step over `rows` sequences of `seq_len` tokens, one image
  each, by component. `trainable`: parameter path -> trains, nested (`TrainProgram.trainable`)
  or flat ('llm/lm_head'). MFU = total(...).total / (step seconds x devices x peak FLOP/s)."""
  trainable = flat(trainable)
  trains = lambda path: bool(trainable.get(path, False))
  under = lambda *prefixes: any(v for k, v in trainable.items() if k.startswith(prefixes))
  out = vision_flops(cfg.vision, cfg.vit_lora, rows, trains, under("vision/layers/"))
  out["projector"] = projector_flops(cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                     cfg.vision.num_features, rows, trains, under("vision/"))
  below_head = under("vision/", "projector/", "llm/layers/", "llm/embed_tokens/")
  out.update(llm_flops(cfg.llm, cfg.llm_lora, rows, seq_len, trains, below_head))
  return out


def total(parts: Mapping[str, Flops]) -> Flops:
  out = Flops()
  for v in parts.values():
    out += v
  return out
