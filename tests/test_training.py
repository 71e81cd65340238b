"""Training: parameter groups, optimizer state, loss, gradients, accumulation, sharding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqllava_jax.config import MeshConfig, ParamGroup
from sqllava_jax.data.labels import IGNORE_INDEX
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training import optimizer as opt
from sqllava_jax.training.loss import chunked_cross_entropy, fused_cross_entropy
from sqllava_jax.training.step import forward_loss
from sqllava_jax.training.trainer import NonFiniteError, Trainer
from sqllava_jax.tree_paths import flat
from tests.train_helpers import host_params, metrics, tiny_cfg, trainable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


def one_device():
  return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def abstract_params(cfg):
  return nnx.state(abstract_model(cfg.model), nnx.Param).to_pure_dict()


def test_frozen_parameters_have_no_optimizer_state(tmp_path, data_dir):
  cfg = tiny_cfg(tmp_path, data_dir)
  params = abstract_params(cfg)
  labels = opt.param_labels(params, cfg.train)
  state = jax.eval_shape(opt.make_optimizer(cfg.train, labels, 10).init, params)
  paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  frozen = [p for p, g in flat(labels).items() if g == "frozen_bases"]
  assert "llm/layers/mlp/down_proj/kernel" in frozen and "vision/patch_embedding" in frozen
  for name in frozen:
    assert not any(p.endswith(name) for p in paths), f"optimizer state holds frozen {name}"
  moments = [p for p in paths if p.endswith("llm/layers/self_attn/q_proj/lora_b")]
  assert len(moments) == 2, f"expected Adam mu and nu for a LoRA weight, got {moments}"


def newton_schulz_reference(g: np.ndarray, steps: int = 5) -> np.ndarray:
  """Muon's orthogonalisation written out: Frobenius-normalise, then the quintic iteration
  X <- a X + (b A + c A^2) X with A = X X^T (on the wide orientation), as modded-nanogpt."""
  a, b, c = 3.4445, -4.775, 2.0315
  x = g.astype(np.float64)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  x = x / (np.linalg.norm(x) + 1e-8)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def test_muon_orthogonalises_the_weight_matrices_and_adamw_the_rest(tmp_path, data_dir):
  cfg = tiny_cfg(tmp_path, data_dir)
  lr = 1e-2
  train = dataclasses.replace(cfg.train, optimizer="muon", warmup_ratio=0.0, max_grad_norm=1e9,
                              param_groups=(ParamGroup("everything", (".",), lr=lr),))
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract_params(cfg))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  tx = opt.make_optimizer(train, opt.param_labels(params, train), 100)
  updates, _ = tx.update(grads, tx.init(params), params)
  updates, grads = host_params(updates), host_params(grads)

  def is_matrix(name):  # the transformer blocks' projections and the projector's kernels
    return name.endswith("/kernel") and ("/layers/" in name or name.startswith("projector/"))
  matrices = sorted(n for n in grads if is_matrix(n))
  assert "llm/layers/mlp/gate_proj/kernel" in matrices and "vision/layers/fc1/kernel" in matrices
  assert "projector/mlp_in/kernel" in matrices
  for name, g in grads.items():
    if name in matrices:
      fan_in, fan_out = g.shape[-2:]
      per_layer = g.reshape(-1, fan_in, fan_out)
      expected = np.stack([newton_schulz_reference(m) for m in per_layer]).reshape(g.shape)
      expected *= -lr * 0.2 * np.sqrt(max(fan_in, fan_out))
    else:  # Nesterov AdamW's first step (optax pairs it with Muon): m = g (1 + 2 b1) / (1 + b1)
      b1 = train.adam_b1
      expected = -lr * (1 + 2 * b1) / (1 + b1) * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(updates[name], expected, rtol=2e-3, atol=1e-6, err_msg=name)


def test_every_parameter_must_match_exactly_one_group(tmp_path, data_dir):
  cfg = tiny_cfg(tmp_path, data_dir)
  params = abstract_params(cfg)
  groups = tuple(g for g in cfg.train.param_groups if g.name != "projector")
  with pytest.raises(ValueError, match=r"parameters match no group: projector/"):
    opt.param_labels(params, cfg.train.__class__(param_groups=groups))
  overlapping = cfg.train.param_groups + (ParamGroup("all", (".*",), frozen=True),)
  with pytest.raises(ValueError, match="match several groups"):
    opt.param_labels(params, cfg.train.__class__(param_groups=overlapping))


def test_schedule_is_linear_warmup_then_cosine():
  total, ratio, peak = 100, 0.03, 2e-4
  sched = opt.schedule(peak, total, ratio)
  warmup = 3
  for step in range(total):
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), step


def test_chunked_cross_entropy_equals_the_full_computation():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 13, 8)).astype(np.float32)
  kernel = rng.normal(size=(8, 50)).astype(np.float32)
  targets = rng.integers(0, 50, size=(2, 13))
  targets[0, :4] = IGNORE_INDEX
  targets[1, -3:] = IGNORE_INDEX
  logits = hidden @ kernel
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  valid = targets != IGNORE_INDEX
  picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  expected = -picked[valid].sum()
  for chunk in (1, 4, 5, 13, 64):
    total, count = chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel),
                                         jnp.asarray(targets), chunk)
    assert float(count) == valid.sum()
    np.testing.assert_allclose(float(total), expected, rtol=1e-5, err_msg=f"chunk {chunk}")


@pytest.mark.parametrize("kernel_grad", [True, False])
def test_fused_cross_entropy_equals_the_chunked_one_with_gradients(kernel_grad):
  """The loss that forms its gradient in the forward pass (no second vocabulary projection)
  against the plain chunked loss under autodiff."""
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  targets = rng.integers(0, 50, size=(3, 13))
  targets[0, :4] = IGNORE_INDEX
  # scattered targets (moved to the front before chunking) and a row with none
  targets[1, rng.permutation(13)[:9]] = IGNORE_INDEX
  targets[2] = IGNORE_INDEX
  targets = jnp.asarray(targets)
  hidden = jnp.concatenate([hidden, hidden[:1] * 0.5], axis=0)
  argnums = (0, 1) if kernel_grad else 0
  for chunk in (1, 3, 5, 13, 64):
    plain = jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, targets, chunk)[0],
                               argnums=argnums)(hidden, kernel)
    fused = jax.value_and_grad(
        lambda h, w: fused_cross_entropy(h, w, targets, chunk, kernel_grad)[0],
        argnums=argnums)(hidden, kernel)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6, err_msg=f"chunk {chunk}")
    for got, want in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(plain[1])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk}")


def first_batch(trainer):
  batch = next(iter(trainer.pipeline))
  return {k: jnp.asarray(v) for k, v in batch.items() if k in (
      "input_ids", "labels", "positions", "segment_ids", "pixel_values", "attention_mask")}


def test_gradients_reach_the_vit_lora_of_every_used_layer(tmp_path, data_dir):
  trainer = Trainer(tiny_cfg(tmp_path, data_dir), mesh=one_device())
  state = trainer.fresh_state()
  batch = first_batch(trainer)
  graphdef = trainer.program.graphdef
  grads = jax.jit(jax.grad(lambda p: forward_loss(graphdef, p, batch, None, 16)[0]))(
      state["params"])
  g = host_params(grads)
  used = trainer.cfg.model.vision.feature_layer_count
  assert used == 2 and trainer.cfg.model.vision.num_layers == 3
  for name in ("self_attn/q_proj", "self_attn/out_proj", "fc1", "fc2"):
    per_layer = np.abs(g[f"vision/layers/{name}/lora_b"]).reshape(3, -1).max(axis=1)
    assert (per_layer[:used] > 0).all(), f"{name}: no gradient in a used layer: {per_layer}"
    assert per_layer[used] == 0, f"{name}: gradient in the unused last layer"


def run_steps(tmp_path, data_dir, *overrides, mesh=None):
  trainer = Trainer(tiny_cfg(tmp_path, data_dir, "train.save_every=1000", *overrides),
                    mesh=mesh or one_device())
  trainer.run()
  return trainer, metrics(tmp_path), host_params(trainer.state["params"])


def test_freeze_vit_lora_reproduces_the_reference(tmp_path, data_dir):
  cfg = tiny_cfg(tmp_path, data_dir, "train.freeze_vit_lora=true", "train.warmup_ratio=0")
  params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract_params(cfg))
  labels = opt.param_labels(params, cfg.train)
  assert flat(labels)["vision/layers/fc1/lora_b"] == opt.FROZEN_VIT_LORA
  assert flat(labels)["llm/layers/mlp/up_proj/lora_b"] == "llm_lora"
  tx = opt.make_optimizer(cfg.train, labels, 10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  upd = flat(updates)
  assert float(jnp.abs(upd["vision/layers/fc1/lora_b"]).max()) == 0
  assert float(jnp.abs(upd["vision/layers/self_attn/q_proj/lora_a"]).max()) == 0
  assert float(jnp.abs(upd["projector/c/kernel"]).max()) > 0
  state_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not any("'vision'" in p for p in state_paths), "frozen ViT-LoRA must carry no state"


def test_accumulation_equals_one_big_batch(tmp_path, data_dir):
  _, m1, p1 = run_steps(tmp_path / "a", data_dir, "train.per_device_batch_size=2",
                        "train.grad_accum_steps=1")
  _, m2, p2 = run_steps(tmp_path / "b", data_dir, "train.per_device_batch_size=1",
                        "train.grad_accum_steps=2")
  for a, b in zip(m1, m2):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["trained_tokens"] == b["trained_tokens"]
  t1, t2 = trainable(p1), trainable(p2)
  for k in t1:
    np.testing.assert_allclose(t1[k], t2[k], atol=1e-6, rtol=0, err_msg=k)


def test_nonfinite_update_is_skipped_and_counted(tmp_path, data_dir):
  trainer = Trainer(tiny_cfg(tmp_path, data_dir), mesh=one_device())
  state = trainer.fresh_state()
  before = host_params(state["params"])
  state["params"]["llm"]["norm"]["scale"] = state["params"]["llm"]["norm"]["scale"] * jnp.nan
  batch = next(iter(trainer.pipeline))
  from sqllava_jax.training.state import global_batch
  program = trainer.program
  state, m = program.train_step(state, global_batch(batch, program.batch_shardings, 1))
  assert not math.isfinite(float(m["loss"]))
  assert float(m["skipped_updates"]) == 1
  after = host_params(state["params"])
  for k, v in trainable(before).items():
    np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_nonfinite_stop_saves_then_raises(tmp_path, data_dir, monkeypatch):
  trainer = Trainer(tiny_cfg(tmp_path, data_dir, "train.nonfinite=stop"), mesh=one_device())
  fresh = trainer.fresh_state

  def poisoned():
    s = fresh()
    s["params"]["llm"]["norm"]["scale"] = s["params"]["llm"]["norm"]["scale"] * jnp.inf
    return s

  monkeypatch.setattr(trainer, "fresh_state", poisoned)
  with pytest.raises(NonFiniteError, match="step 1: loss=nan"):
    trainer.run()
  assert trainer.ckpt.latest_step() == 1


MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (1, 8, 1)]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("single")
  return run_steps(out, data_dir, "train.per_device_batch_size=8")


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_run_equals_single_device(tmp_path, data_dir, single_device_run, shape):
  data, fsdp, tensor = shape
  mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices=jax.devices()[:8])
  trainer, m, params = run_steps(tmp_path, data_dir, "train.per_device_batch_size=1", mesh=mesh)
  _, m1, p1 = single_device_run
  assert [r["loss"] for r in m] == pytest.approx([r["loss"] for r in m1], abs=1e-5)
  for k, v in trainable(p1).items():
    np.testing.assert_allclose(params[k], v, atol=1e-5, rtol=0, err_msg=k)
  # The parameters really are laid out as the rules say.
  p = trainer.state["params"]
  q = p["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]    # [layers, embed, heads]
  emb = p["llm"]["embed_tokens"]["embedding"]                  # [vocab, embed]
  up = p["llm"]["layers"]["mlp"]["up_proj"]["lora_b"]          # [layers, lora, mlp]
  assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // fsdp,
                                                 up.shape[2] // tensor)
  P = jax.sharding.PartitionSpec
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // tensor, emb.shape[1] // fsdp)
  shard_shape = q.addressable_shards[0].data.shape
  assert shard_shape == (q.shape[0], q.shape[1] // fsdp, q.shape[2] // tensor)


def test_muon_sharded_run_equals_single_device(tmp_path, data_dir):
  """Muon's orthogonalisation of fsdp- and tensor-sharded matrices gives the same run."""
  muon = "train.optimizer=muon"
  _, m1, p1 = run_steps(tmp_path / "one", data_dir, "train.per_device_batch_size=8", muon)
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
  _, m, params = run_steps(tmp_path / "mesh", data_dir, "train.per_device_batch_size=1", muon,
                           mesh=mesh)
  assert [r["loss"] for r in m] == pytest.approx([r["loss"] for r in m1], abs=1e-5)
  for k, v in trainable(p1).items():
    np.testing.assert_allclose(params[k], v, atol=1e-5, rtol=0, err_msg=k)


def test_restore_onto_a_different_mesh(tmp_path, data_dir):
  eight = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1), devices=jax.devices()[:8])
  _, _, saved = run_steps(tmp_path, data_dir, "train.per_device_batch_size=1", mesh=eight)
  four = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
  trainer = Trainer(tiny_cfg(tmp_path, data_dir, "train.per_device_batch_size=1"), mesh=four)
  state, _ = trainer.init_or_restore()
  assert int(state["step"]) == trainer.total_steps == 4
  restored = host_params(state["params"])
  for k, v in saved.items():
    np.testing.assert_array_equal(restored[k], v, err_msg=k)
  q = state["params"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2}
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
  up = state["params"]["llm"]["layers"]["mlp"]["up_proj"]["lora_b"]
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", ()) == up.shape]
  # gate and up: mu, nu
  assert len(moments) == 4 and all(m.sharding == up.sharding for m in moments)


def test_stage2_starts_from_stage1(tmp_path, data_dir):
  """Projector and ViT-LoRA come from the stage-1 checkpoint; the LLM-LoRA starts fresh."""
  from sqllava_jax.models.sqllava import SQLLaVA
  from sqllava_jax.training.checkpoint import save_model
  stage1_cfg = tiny_cfg(tmp_path, data_dir, "model.llm_lora.rank=0")
  stage1 = SQLLaVA(stage1_cfg.model, rngs=nnx.Rngs(7))
  stage1.vision.layers.fc1.lora_b[...] = jnp.full(stage1.vision.layers.fc1.lora_b.shape, 0.25)
  save_model(str(tmp_path / "stage1"), stage1, stage1_cfg)
  cfg = tiny_cfg(tmp_path, data_dir, f"train.init_from={tmp_path / 'stage1'}",
                 'train.init_from_exclude=["^llm/.*/lora_[ab]$"]')
  params = host_params(Trainer(cfg, mesh=one_device()).fresh_state()["params"])
  s1 = host_params(nnx.to_pure_dict(nnx.state(stage1, nnx.Param)))
  for k in s1:
    np.testing.assert_array_equal(params[k], s1[k], err_msg=k)
  assert (params["vision/layers/fc1/lora_b"] == 0.25).all()
  assert (params["llm/layers/mlp/up_proj/lora_b"] == 0).all()
  assert np.abs(params["llm/layers/mlp/up_proj/lora_a"]).max() > 0


def test_paper_stage_configs():
  from sqllava_jax.config import load_config
  for size in ("7b", "13b"):
    s1 = load_config(f"configs/sqllava_{size}_stage1.yaml")
    s2 = load_config(f"configs/sqllava_{size}_stage2.yaml")
    lr1 = {g.name: g.lr for g in s1.train.param_groups if not g.frozen}
    lr2 = {g.name: g.lr for g in s2.train.param_groups if not g.frozen}
    assert lr1 == {"projector": 1e-3, "vit_lora": 2e-4}
    assert lr2 == {"llm_lora": 2e-4, "projector": 2e-5, "vit_lora": 2e-5}
    assert (s1.data.template, s2.data.template, s2.data.sq_r) == ("plain", "v1_sq", 0.5)
    assert s1.model.llm_lora.rank == 0 and s2.model.llm_lora.rank == 128
    assert s1.train.per_device_batch_size * 8 * s1.train.grad_accum_steps == 256
    assert s2.train.per_device_batch_size * 8 * s2.train.grad_accum_steps == 128
