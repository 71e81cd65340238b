"""Sharded decoding on 8 simulated CPU devices: weights over fsdp and tensor, the batch over
data and fsdp, the KV cache over batch and kv heads. Greedy tokens must be those of one
device and of transformers' `generate` on the same weights; a sharded restore must leave
each device only its shards."""

import json

import jax
import numpy as np
import pytest

from sqllava_jax.config import MeshConfig
from sqllava_jax.convert.hf import llama_from_hf
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.generate import Generator
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training.checkpoint import load_model
from tests.eval_helpers import make_tiny_run
from tests.hf_fixtures import save_llama, tiny_llama_config
from tests.test_generate import hf_greedy

NEW = 12
LENGTHS = (5, 30, 17, 9, 22, 3, 12, 26)  # 8 rows: every batch slice gets one
MESHES = {"fsdp": "data=1,fsdp=8,tensor=1", "tensor": "data=2,fsdp=2,tensor=2",
          "tensor4": "data=1,fsdp=2,tensor=4"}

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def mesh(spec: str):
  return make_mesh(loading.mesh_config(spec), jax.devices()[:8])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  path = tmp_path_factory.mktemp("shard_llama")
  # 4 kv heads: tensor=4 shards them too (2 kv heads would leave them whole there).
  hf = save_llama(path, tiny_llama_config(num_kv_heads=4), seed=13)
  return hf, llama_from_hf(str(path))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(3)
  return [[1] + rng.integers(3, 128, size=n - 1).tolist() for n in LENGTHS]


@needs_8
@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_greedy_is_one_device_and_transformers(pair, prompts, name):
  hf, ours = pair
  want = hf_greedy(hf, prompts, eos_id=-1, max_new_tokens=NEW)  # no row stops early
  one = Generator(ours, eos_id=2, pad_id=0, unstack_layers=False).generate(
      prompts, max_new_tokens=NEW)
  sharded = Generator(ours, eos_id=2, pad_id=0, mesh=mesh(MESHES[name]), unstack_layers=False)
  got = sharded.generate(prompts, max_new_tokens=NEW)
  assert len({tuple(r) for r in want}) == len(prompts), "rows should differ"
  np.testing.assert_array_equal(got.tokens, one.tokens, err_msg=f"{name} mesh vs one device")
  for i, row in enumerate(want):
    assert got.new_tokens(i) == row, f"row {i} (prompt length {LENGTHS[i]}) on the {name} mesh"


@needs_8
def test_weights_and_cache_are_sharded(pair):
  """What the program holds per device: a kernel split 8 ways over fsdp (embed) and tensor
  (heads), and a KV cache split over batch and kv heads (read from the compiled program's
  memory: the 8-device program's temporaries are far under one device's)."""
  _, ours = pair
  gen = Generator(ours, eos_id=2, pad_id=0, mesh=mesh(MESHES["tensor"]), unstack_layers=False)
  q = gen.state["layers"]["self_attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
  assert q.addressable_shards[0].data.shape == (2, 32, 32)
  one = Generator(ours, eos_id=2, pad_id=0, unstack_layers=False).program
  eight = gen.program
  temp = lambda p: p.lower(8, 64, 448).compile().memory_analysis().temp_size_in_bytes
  cache_bytes = 2 * 2 * 8 * 4 * 512 * 16 * 4  # k and v, layers, rows, kv heads, slots, dim
  t1, t8 = temp(one), temp(eight)
  assert t1 > cache_bytes, (t1, cache_bytes)
  assert t8 < t1 / 3, (t8, t1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("shard_sqllava")))


@needs_8
def test_sharded_restore_and_composite_decoding(run):
  """`--mesh` restores each parameter onto its shards and decodes image prompts as one
  device does (unstacked copies sharded the same way)."""
  model_one, cfg = load_model(run.ckpt)
  model, cfg8 = loading.load_for_inference(run.ckpt, mesh=MESHES["tensor"])
  assert cfg8.mesh == MeshConfig(data=2, fsdp=2, tensor=2, rules=cfg.mesh.rules)
  kernel = model.llm.layers.mlp.up_proj.kernel[...]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  assert kernel.addressable_shards[0].data.shape[1:] == (kernel.shape[1] // 2,
                                                        kernel.shape[2] // 2)
  tok = Tokenizer(run.data.tokenizer)
  rng = np.random.default_rng(0)
  image = [cfg.model.image_token_id] * cfg.model.num_image_tokens
  prompts = [[1] + image + rng.integers(3, 400, size=10 + 5 * i).tolist() for i in range(4)]
  pixels = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  from sqllava_jax.models import lora  # pylint: disable=g-import-not-at-top
  lora.merge(model_one)
  want = Generator(model_one, eos_id=tok.eos_id, pad_id=tok.pad_id).generate(
      prompts, pixels, max_new_tokens=6)
  args = loading.ModelOptions(run.ckpt, mesh=MESHES["tensor"], unstack_layers=True)
  gen = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  **loading.engine_options(args, cfg8))
  assert gen.layer_states is not None
  got = gen.generate(prompts, pixels, max_new_tokens=6)
  np.testing.assert_array_equal(got.tokens, want.tokens)


@needs_8
def test_one_prompt_on_an_fsdp_mesh_runs_padded(pair, prompts):
  """8 batch slices, 3 prompts: the batch is padded to 8 rows and only 3 come back."""
  _, ours = pair
  gen = Generator(ours, eos_id=2, pad_id=0, mesh=mesh(MESHES["fsdp"]), unstack_layers=False)
  got = gen.generate(prompts[:3], max_new_tokens=NEW)
  one = Generator(ours, eos_id=2, pad_id=0, unstack_layers=False).generate(
      prompts[:3], max_new_tokens=NEW)
  assert got.tokens.shape == (3, NEW)
  np.testing.assert_array_equal(got.tokens, one.tokens)


def test_mesh_spec_errors():
  with pytest.raises(ValueError, match="expected data=N,fsdp=N,tensor=N"):
    loading.mesh_config("data=2,pipeline=4")
  assert loading.mesh_config("fsdp=8") == MeshConfig(data=-1, fsdp=8, tensor=1)
  assert loading.mesh_config(None) is None


@needs_8
def test_generate_command_takes_a_mesh(run, capsys):
  """`generate --mesh`: the flag every inference command shares (loading.py); one prompt
  on an fsdp=8 mesh answers as on one device."""
  from sqllava_jax import cli  # pylint: disable=g-import-not-at-top
  argv = ["generate", "--ckpt", run.ckpt, "--prompt", "What is shown?", "--image", run.image,
          "--max-new-tokens", "3", "--json"]
  outs = []
  for extra in ([], ["--mesh", "data=1,fsdp=8"]):
    assert cli.main(argv + extra) == 0
    outs.append(capsys.readouterr().out.strip().splitlines()[-1])
  assert outs[0] == outs[1] and len(json.loads(outs[0])["token_ids"]) == 3, outs
