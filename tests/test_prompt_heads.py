"""Rows that begin alike on one image prefill their common head once: which rows share
what (the rules written out), and that the tokens are those of transformers' `generate` on
the whole prompts, of the plain prefill, and of one device when the batch is sharded."""

import numpy as np
import pytest

from sqllava_jax.convert.hf import llama_from_hf
from sqllava_jax.evaluation.generate import Generator
from sqllava_jax.evaluation.prompt_heads import plan_heads
from sqllava_jax.evaluation.sampling import Sampling
from sqllava_jax.models.sqllava import SQLLaVA
from tests.eval_helpers import random_model, tiny_config
from tests.hf_fixtures import save_llama, tiny_llama_config
from tests.test_generate import hf_greedy
from tests.test_inference_sharding import MESHES, mesh, needs_8

IMG = -200
NEW = 10


def test_rows_with_one_image_share_up_to_where_they_differ():
  image = [IMG] * 3
  a = [1, 5] + image + [7, 8, 9]
  b = [1, 5] + image + [7, 4]
  c = [1, 5] + image + [6, 6, 6, 6]
  pixels = np.zeros((4, 2, 2, 3), np.float32)
  pixels[3] += 1  # row 3: the same tokens as row 0 on another image
  plan = plan_heads([a, b, c, a], pixels, image_token_id=IMG, min_saved_share=0)
  assert plan.heads == [[1, 5] + image, a[:-1]]
  assert plan.head_of == [0, 0, 0, 1]
  assert plan.tails == [[7, 8, 9], [7, 4], [6, 6, 6, 6], [9]]
  assert plan.source == [0, 3]
  assert plan.saved_tokens == 2 * 5


def test_identical_prompts_keep_one_token_of_their_own():
  p = [1, 5, IMG, IMG, 7, 8]
  plan = plan_heads([p] * 3, np.zeros((3, 2, 2, 3), np.float32), image_token_id=IMG)
  assert plan.heads == [p[:-1]] and plan.tails == [[8]] * 3 and plan.head_of == [0, 0, 0]


def test_text_rows_share_their_common_prefix():
  plan = plan_heads([[1, 2, 3, 4, 9], [1, 2, 3, 4, 5, 6], [1, 2, 3, 8]], None,
                    image_token_id=IMG)
  assert plan.heads == [[1, 2, 3]] and plan.tails == [[4, 9], [4, 5, 6], [8]]


def test_text_rows_without_a_common_first_token_split_by_it():
  plan = plan_heads([[1, 2, 3, 4, 9], [7, 8, 9], [1, 2, 3, 4, 5]], None, image_token_id=IMG,
                    min_saved_share=0)
  assert plan.heads == [[1, 2, 3, 4], [7, 8]] and plan.head_of == [0, 1, 0]
  assert plan.tails == [[9], [9], [5]]


@pytest.mark.parametrize("prompts, pixels, why", [
    ([[1, 2, 3], [1, 4, 5]], None, "saves 1 token of 6"),
    ([[1, IMG, 3, 4], [1, IMG, 3, 4]], np.arange(2.0).reshape(2, 1, 1, 1), "two images"),
    ([[1, 2, IMG], [1, 2, IMG]], np.zeros((2, 1, 1, 1)), "a prompt ends in its image"),
    ([[1], [1]], None, "nothing left to share"),
    ([[2, 3, 4], [1, 3, 4]], None, "no common first token"),
])
def test_nothing_worth_sharing(prompts, pixels, why):
  assert plan_heads(prompts, pixels, image_token_id=IMG) is None, why


def test_image_placeholders_without_pixels_are_refused():
  with pytest.raises(ValueError, match="no pixels"):
    plan_heads([[1, IMG, 3], [1, IMG, 3]], None, image_token_id=IMG)


def spy_shared(gen: Generator) -> list:
  """Appends to the returned list each time `gen` prefills through shared heads."""
  calls, with_heads = [], gen._with_heads
  gen._with_heads = lambda *a: calls.append(1) or with_heads(*a)
  return calls


# --- generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  path = tmp_path_factory.mktemp("heads_llama")
  hf = save_llama(path, tiny_llama_config(num_kv_heads=2), seed=5)
  return hf, llama_from_hf(str(path))


@pytest.fixture(scope="module")
def text_prompts():
  """Eight rows under one 24-token system prompt, two of them identical."""
  rng = np.random.default_rng(1)
  system = [1] + rng.integers(3, 128, size=23).tolist()
  rows = [system + rng.integers(3, 128, size=n).tolist() for n in (3, 9, 1, 14, 6, 2, 11)]
  return rows + [rows[1]]


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "scanned"])
def test_shared_heads_decode_as_transformers(pair, text_prompts, unstack):
  hf, ours = pair
  assert plan_heads(text_prompts, None, image_token_id=IMG) is not None
  want = hf_greedy(hf, text_prompts, eos_id=2, max_new_tokens=NEW)
  gen = Generator(ours, eos_id=2, pad_id=0, unstack_layers=unstack)
  shared = spy_shared(gen)
  out = gen.generate(text_prompts, max_new_tokens=NEW)
  assert shared, "the heads were not shared"
  assert len({tuple(r) for r in want}) == len(text_prompts) - 1  # rows differ
  for i, row in enumerate(want):
    assert out.new_tokens(i) == row, f"row {i}"


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
  cfg = tiny_config(str(tmp_path_factory.mktemp("heads_data")))
  return random_model(cfg.model, seed=3), cfg.model


def ask_like_batch(model_cfg, rng):
  """Three prompts on each of two images, as `ask` builds them: row 0-2 the same prompt
  (sampled questions), rows 3-5 one opening and three questions (their answers)."""
  opening = [1, 7, 9] + [model_cfg.image_token_id] * model_cfg.num_image_tokens
  opening += rng.integers(3, 400, size=12).tolist()
  asked = [opening + rng.integers(3, 400, size=n).tolist() for n in (4, 7, 2)]
  prompts = [opening] * 3 + asked
  pixels = np.repeat(rng.normal(size=(2, 32, 32, 3)).astype(np.float32), 3, axis=0)
  return prompts, pixels


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.2, top_k=50,
                                                           top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_image_heads_give_the_plain_prefill_tokens(composite, sampling):
  """Same tokens, greedy and sampled (a row's draw depends on the batch's key, its row and
  its logits), with the heads computed once as with every row prefilled whole."""
  model, model_cfg = composite
  assert isinstance(model, SQLLaVA)
  prompts, pixels = ask_like_batch(model_cfg, np.random.default_rng(0))
  plan = plan_heads(prompts, pixels, image_token_id=model_cfg.image_token_id)
  assert plan is not None and len(plan.heads) == 2
  kwargs = dict(max_new_tokens=NEW, sampling=sampling, seed=4)
  gen = Generator(model, eos_id=2, pad_id=0)
  used = spy_shared(gen)
  shared = gen.generate(prompts, pixels, **kwargs)
  assert used, "the heads were not shared"
  whole = Generator(model, eos_id=2, pad_id=0, share_heads=False).generate(prompts, pixels,
                                                                           **kwargs)
  np.testing.assert_array_equal(shared.tokens, whole.tokens)
  np.testing.assert_array_equal(shared.num_new, whole.num_new)
  if not sampling.greedy:  # the three rows of one prompt drew apart
    assert len({tuple(r) for r in shared.tokens[:3]}) > 1


@needs_8
@pytest.mark.parametrize("name", ["fsdp", "tensor"])
def test_sharded_heads_decode_as_one_device(composite, name):
  """Twelve rows on four images: four heads, padded to the mesh's 8 (fsdp) or 4 (tensor)
  batch slices, each row reading its head across the shards."""
  model, model_cfg = composite
  rng = np.random.default_rng(2)
  (p1, x1), (p2, x2) = ask_like_batch(model_cfg, rng), ask_like_batch(model_cfg, rng)
  prompts, pixels = p1 + p2, np.concatenate([x1, x2])
  want = Generator(model, eos_id=2, pad_id=0, share_heads=False).generate(
      prompts, pixels, max_new_tokens=NEW)
  gen = Generator(model, eos_id=2, pad_id=0, mesh=mesh(MESHES[name]),
                  unstack_layers=name == "tensor")
  shared = spy_shared(gen)
  got = gen.generate(prompts, pixels, max_new_tokens=NEW)
  assert shared, "the heads were not shared"
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.num_new, want.num_new)


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "scanned"])
def test_a_mixed_eval_batch(composite, unstack):
  """As `eval_loop` builds a batch: questions on one image, one on an image of its own, a
  text-only question (zero pixels) and inactive padding rows (the same text prompt)."""
  model, model_cfg = composite
  rng = np.random.default_rng(5)
  question = lambda n: rng.integers(3, 400, size=n).tolist()
  system = [1] + question(40)
  image = system + [model_cfg.image_token_id] * model_cfg.num_image_tokens
  prompts = [image + question(n) for n in (6, 9, 3)]  # image A
  prompts += [image + question(5)]  # image B
  prompts += [system + question(8)] + [system + [11, 12]] * 3  # text, then padding
  pixels = np.zeros((8, 32, 32, 3), np.float32)
  pixels[:3], pixels[3] = rng.normal(size=(32, 32, 3)), rng.normal(size=(32, 32, 3))
  plan = plan_heads(prompts, pixels, image_token_id=model_cfg.image_token_id)
  assert plan is not None and len(plan.heads) == 3
  want = Generator(model, eos_id=2, pad_id=0, share_heads=False,
                   unstack_layers=unstack).generate(prompts, pixels, max_new_tokens=NEW)
  gen = Generator(model, eos_id=2, pad_id=0, unstack_layers=unstack)
  shared = spy_shared(gen)
  got = gen.generate(prompts, pixels, max_new_tokens=NEW)
  assert shared, "the heads were not shared"
  np.testing.assert_array_equal(got.tokens, want.tokens)


@needs_8
def test_heads_padded_to_the_whole_batch_are_not_shared(composite):
  """Two heads on an fsdp=8 mesh pad to 8 rows: for a batch of 8 nothing would be saved."""
  model, model_cfg = composite
  prompts, pixels = ask_like_batch(model_cfg, np.random.default_rng(0))
  gen = Generator(model, eos_id=2, pad_id=0, mesh=mesh(MESHES["fsdp"]), unstack_layers=False)
  assert gen._head_rows(2) == 8 and gen._rows(6) == 8
  shared = spy_shared(gen)
  gen.generate(prompts, pixels, max_new_tokens=2)
  assert not shared


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-share-heads"], False)])
def test_the_commands_flag_reaches_the_engine(flags, expected):
  import argparse  # pylint: disable=g-import-not-at-top

  from sqllava_jax.commands.model_flags import add_model_arguments, model_options
  from sqllava_jax.evaluation.loading import engine_options
  parser = argparse.ArgumentParser()
  add_model_arguments(parser)
  options = model_options(parser.parse_args(["--ckpt", "run", *flags]))
  cfg = tiny_config("unused")
  assert engine_options(options, cfg)["share_heads"] is expected
