"""The composite model puts image features exactly at the placeholder positions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqllava_jax.config import load_config
from sqllava_jax.models.sqllava import SQLLaVA, check_image_placeholders, merge_image_features

IMG = -200


@pytest.fixture(scope="module")
def model():
  cfg = load_config("configs/tiny.yaml")
  return SQLLaVA(cfg.model, rngs=nnx.Rngs(0))


def test_merge_places_feature_k_at_the_kth_placeholder():
  b, t, p, h = 3, 12, 4, 5
  text = np.random.default_rng(0).normal(size=(b, t, h)).astype(np.float32)
  feats = np.random.default_rng(1).normal(size=(b, p, h)).astype(np.float32)
  mask = np.zeros((b, t), bool)
  mask[0, 1:5] = True     # image right after BOS
  mask[1, 7:11] = True    # image later in the row
  # row 2: text only
  out = np.asarray(merge_image_features(jnp.asarray(text), jnp.asarray(feats), jnp.asarray(mask)))
  np.testing.assert_array_equal(out[0, 1:5], feats[0])
  np.testing.assert_array_equal(out[1, 7:11], feats[1])
  np.testing.assert_array_equal(out[~mask], text[~mask])
  np.testing.assert_array_equal(out[2], text[2])


def test_model_embeddings_hold_projected_features_at_image_positions(model):
  cfg = model.cfg
  p = cfg.num_image_tokens
  t = p + 10
  ids = np.full((2, t), 5, np.int64)
  ids[:, 0] = 1
  ids[0, 1:1 + p] = IMG
  ids[1, 6:6 + p] = IMG
  ids[1, 3] = 7
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  embeds, _ = model.embed_inputs(jnp.asarray(ids), jnp.asarray(pixels))
  feats, _ = model.encode_images(jnp.asarray(pixels))
  text = model.llm.embed_tokens.embedding[...]
  embeds, feats, text = np.asarray(embeds), np.asarray(feats), np.asarray(text)
  np.testing.assert_allclose(embeds[0, 1:1 + p], feats[0], atol=1e-6)
  np.testing.assert_allclose(embeds[1, 6:6 + p], feats[1], atol=1e-6)
  assert not np.allclose(feats[0], feats[1]), "the two images must give different features"
  np.testing.assert_allclose(embeds[1, 3], text[7], atol=1e-6)
  np.testing.assert_allclose(embeds[0, 0], text[1], atol=1e-6)
  np.testing.assert_allclose(embeds[0, 1 + p:],
                             np.broadcast_to(text[5], (t - 1 - p, text.shape[1])), atol=1e-6)


def test_forward_has_static_shapes_and_logits(model):
  p = model.cfg.num_image_tokens
  ids = np.full((2, p + 8), 4, np.int64)
  ids[0, 2:2 + p] = IMG
  positions = np.broadcast_to(np.arange(p + 8), ids.shape)
  hidden, aux = model(jnp.asarray(ids), jnp.zeros((2, 32, 32, 3)), jnp.asarray(positions))
  assert hidden.shape == (2, p + 8, model.cfg.llm.hidden_size)
  assert model.llm.logits(hidden).shape == (2, p + 8, model.cfg.llm.vocab_size)
  assert aux["projector/assignments"].shape == (2, p)


def test_placeholder_count_is_checked():
  ids = np.zeros((2, 10), np.int64)
  ids[0, 1:5] = IMG
  check_image_placeholders(ids, np.array([True, False]), 4, IMG)
  with pytest.raises(ValueError, match="row 0 holds 4 image placeholders.*expected 3"):
    check_image_placeholders(ids, np.array([True, False]), 3, IMG)
  with pytest.raises(ValueError, match="row 1 holds 0 .*expected 4"):
    check_image_placeholders(ids, np.array([True, True]), 4, IMG)
