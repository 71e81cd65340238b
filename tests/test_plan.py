"""`sqllava-jax plan`: the train step compiled ahead of time on simulated CPU devices, its
per-device memory, and the analytical FLOP count that MFU figures divide by."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sqllava_jax import cli
from sqllava_jax.config import load_config
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.training import flops as fl
from sqllava_jax.training import hlo_stats
from sqllava_jax.training import optimizer as opt
from sqllava_jax.tree_paths import flat

TINY = "configs/tiny.yaml"


def plan_json(*extra: str) -> dict:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(["plan", TINY, "--devices", "2", "--seq-len", "64", "--json", *extra])
  assert code == 0, out.getvalue()
  return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def batch_1() -> dict:
  return plan_json("--batch", "1", "--top", "3")


def test_json_has_memory_and_flops(batch_1):
  s = batch_1
  for key in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes"):
    assert s["memory"][key] > 0, key
  assert s["bytes_per_device"] == s["memory"]["peak_bytes"] > s["memory"]["argument_bytes"]
  assert s["flops_per_step"] > 0 and "analytically" in s["flops_per_step_counts"]
  assert s["compiled_matmul_flops_per_device"] > 0 and s["xla_cost_analysis_flops"] > 0
  assert s["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and s["rows_per_step"] == 2
  assert s["parameters"]["trainable"] > 0 and s["parameters"]["frozen"] > 0
  assert len(s["peak_buffers"]) == 3 and all(b["bytes"] > 0 for b in s["peak_buffers"])
  # Two independent counts. The compiled program runs the model count plus work that is not
  # model work: at most the masked upper half of the causal scores (attention computes whole
  # blocks on the diagonal) and one more lm_head forward (a loss that recomputes its logits
  # in the backward); the tiny config has no other remat. XLA turns some small products
  # into elementwise code, or not, depending on matmul precision: 3 % either way.
  m, t = s["model_flops"], s["seq_len"]
  low = s["flops_per_step"]
  high = low + m["lm_head"]["forward"] + m["LLM attention"]["total"] * (t / ((t + 1) / 2) - 1)
  compiled = s["compiled_matmul_flops_per_device"] * s["devices"]
  assert 0.97 * low <= compiled <= 1.03 * high, (low, compiled, high)


def test_memory_grows_with_the_batch(batch_1):
  big = plan_json("--batch", "4", "--top", "0")
  assert big["memory"]["temp_bytes"] > batch_1["memory"]["temp_bytes"]
  assert big["bytes_per_device"] > batch_1["bytes_per_device"]
  assert big["flops_per_step"] == pytest.approx(4 * batch_1["flops_per_step"])


@pytest.mark.parametrize("mesh,message", [
    ("data=3,fsdp=1,tensor=1", "needs 3 devices; 2 are available"),
    ("data=2,fsdp=x", "expected data=N,fsdp=N,tensor=N"),
    ("pipeline=2", "expected data=N,fsdp=N,tensor=N"),
])
def test_bad_mesh_is_refused_before_compiling(capsys, mesh, message):
  assert cli.main(["plan", TINY, "--devices", "2", "--mesh", mesh]) == 2
  assert message in capsys.readouterr().err


def trainable(cfg) -> dict:
  """Flat parameter path -> trains, under the config's parameter groups."""
  params = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param))
  labels = opt.param_labels(params, cfg.train)
  return flat(opt.trainable_mask(labels, cfg.train))


def test_model_flops_match_a_hand_count():
  """Stage 2 on the tiny model: LoRA everywhere and the projector train, the bases are frozen.
  Every weight costs 2 FLOPs per token and parameter forward, 2 more for the input gradient
  (gradients flow down to the vision tower's LoRA), 2 more only if it trains."""
  cfg = load_config(TINY)
  rows, t = 3, 64
  # Vision tower, per image: 16 patches + the class token, 2 of its 3 layers run (select -2).
  n, d, f, r = 17, 32, 64, 4
  base = 2 * n * (4 * d * d + 2 * d * f)                # q, k, v, out, fc1, fc2
  lora = 2 * n * r * (4 * (d + d) + 2 * (d + f))        # A [in, r] and B [r, out] of each
  scores = 2 * 2 * n * n * d                            # QK^T and PV over 4 heads of 8
  layer = 2 * (base + lora) + lora + 3 * scores         # fwd + input grad; LoRA weight grads
  patch = 2 * 16 * (8 * 8 * 3) * d                      # frozen, and pixels need no gradient
  vision = rows * (patch + 2 * layer)
  # Projector (cluster): 16 features, 8 prototypes, 2 iterations, width 32 -> 64; it trains.
  feats, protos, iters, h = 16, 8, 2, 64
  weights = 2 * (2 * feats * d * d + protos * iters * d * d + feats * d * h + feats * h * h)
  products = 2 * protos * feats * d * (5 + 2 * iters)   # pools, similarities, prototype sums
  projector = rows * 3 * (weights + products)
  # LLM, per token: q and o 64x64, k and v 64x32 (2 kv heads), gate/up 64x96, down 96x64.
  dm, ff, kv, r2 = 64, 96, 32, 8
  base2 = 2 * (2 * dm * dm + 2 * dm * kv + 3 * dm * ff)
  lora2 = 2 * r2 * (2 * (dm + dm) + 2 * (dm + kv) + 3 * (dm + ff))
  llm = rows * t * 2 * (2 * (base2 + lora2) + lora2)    # 2 layers
  causal = rows * 2 * 2 * 2 * (t * (t + 1) / 2) * 64 * 3  # 2 layers, 4 heads x 16, fwd + 2x bwd
  lm_head = rows * t * 2 * dm * 512 * 2                 # frozen: forward and input gradient
  expected = vision + projector + llm + causal + lm_head
  parts = fl.step_flops(cfg.model, trainable(cfg), rows, t)
  assert fl.total(parts).total == pytest.approx(expected, rel=1e-12)
  assert parts["lm_head"].weight_grad == 0
  assert parts["LLM linears"].weight_grad == rows * t * 2 * lora2


def test_frozen_vision_tower_gets_no_backward():
  """The reference's behaviour (ViT-LoRA frozen): no gradient enters the vision tower."""
  cfg = load_config(TINY, ["train.freeze_vit_lora=true"])
  parts = fl.step_flops(cfg.model, trainable(cfg), 2, 64)
  assert parts["vision linears"].input_grad == parts["vision linears"].weight_grad == 0
  assert parts["vision attention"].input_grad == 0
  assert parts["projector"].weight_grad > 0 and parts["LLM linears"].input_grad > 0


def test_compiled_matmuls_count_every_loop_trip():
  """XLA's cost analysis counts a loop body once; the HLO count multiplies by trip counts."""

  def layers(x):
    def outer(c, _):
      return jax.lax.scan(lambda c2, _: (jnp.tanh(c2 @ c2), None), c, None, length=3)[0], None
    return jax.lax.scan(outer, x, None, length=5)[0]

  compiled = jax.jit(layers).lower(jnp.ones((32, 32))).compile()
  one = 2 * 32 ** 3
  counted, notes = hlo_stats.matmul_flops(compiled.as_text())
  assert counted == 15 * one and notes == []
  assert compiled.cost_analysis()["flops"] < 2 * one



def attention_grad_temp_bytes(impl: str, t: int = 1024) -> int:
  """XLA's temporaries for the gradient of a 1-layer decoder's output over t positions."""
  from sqllava_jax.config import LLMConfig, LoRAConfig
  from sqllava_jax.models.llama import Llama
  cfg = LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=4, max_position_embeddings=t)
  model = Llama(cfg, LoRAConfig(), attention_impl=impl, attention_block_size=64,
                rngs=nnx.Rngs(0))
  positions = jnp.broadcast_to(jnp.arange(t), (2, t))
  segments = jnp.ones((2, t), jnp.int32)
  loss = lambda x: jnp.sum(model.decode(x, positions, segment_ids=segments)[0])
  x = jax.ShapeDtypeStruct((2, t, 64), jnp.float32)
  return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes


def test_blocked_attention_keeps_no_score_matrix_for_the_backward():
  """What the planner assumes of `blocked`, its stand-in for a fused kernel: under autodiff
  it does not keep the [T, T] probabilities of the whole sequence (32 MiB of float32 scores
  here) as dense attention does. Measured: 130 MiB dense, 20-55 MiB blocked (by version);
  a backward that kept every block's probabilities needed 90 MiB."""
  dense, blocked = attention_grad_temp_bytes("xla"), attention_grad_temp_bytes("blocked")
  assert blocked < dense / 2, (blocked, dense)


def inference_plan_json(*extra: str) -> dict:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(["plan", "--inference", TINY, "--prompt-len", "64", "--new-tokens", "32",
                     "--json", "--top", "0", *extra])
  assert code == 0, out.getvalue()
  return json.loads(out.getvalue().strip().splitlines()[-1])


def test_inference_plan_shards_weights_and_kv_cache():
  """The generation program on 1 and on 2 devices (fsdp): the tiny LLM's cache, 2 layers x
  k and v x 4 rows x 2 kv heads x 96 slots x 16 dims in float32, splits over the batch; the
  weights split over fsdp (what does not divide stays whole, so a little more than half)."""
  one = inference_plan_json("--devices", "1", "--batch", "4")
  two = inference_plan_json("--devices", "2", "--batch", "4", "--mesh", "data=1,fsdp=2")
  cache = 2 * 2 * 4 * 2 * 96 * 16 * 4
  assert one["memory"]["kv_cache_bytes"] == cache
  assert two["memory"]["kv_cache_bytes"] == cache // 2
  assert two["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and two["batch_per_device"] == 2
  w1, w2 = one["memory"]["weight_bytes"], two["memory"]["weight_bytes"]
  assert 0.5 * w1 <= w2 < 0.6 * w1, (w1, w2)
  for s in (one, two):
    m = s["memory"]
    assert m["temp_bytes"] >= m["kv_cache_bytes"], m  # the cache lives inside the program
    # jit drops the merged adapter factors from the arguments; the process still holds them.
    assert m["argument_bytes"] < m["weight_bytes"] + m["input_bytes"], m
    assert s["bytes_per_device"] == m["peak_bytes"] == (
        m["weight_bytes"] + m["input_bytes"] + m["temp_bytes"] + m["output_bytes"])
  assert two["memory"]["temp_bytes"] < one["memory"]["temp_bytes"]


def test_inference_plan_refuses_a_batch_the_mesh_cannot_split(capsys):
  assert cli.main(["plan", "--inference", TINY, "--devices", "2", "--batch", "3"]) == 2
  assert "not divisible by the mesh's 2 batch slices" in capsys.readouterr().err
