"""CLIP vision tower vs transformers' CLIPVisionModel on the same weights (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sqllava_jax.convert.hf import vision_from_hf
from tests.hf_fixtures import save_clip_vision, to_np

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_vision")
  return save_clip_vision(path, seed=0), str(path)


@pytest.fixture(scope="module")
def pixels():
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # ours NHWC, torch NCHW


@pytest.fixture(scope="module")
def reference(checkpoint, pixels):
  hf, _ = checkpoint
  with torch.no_grad():
    out = hf(pixel_values=pixels[1], output_hidden_states=True)
  return [to_np(h) for h in out.hidden_states]


def test_every_hidden_state_matches(checkpoint, pixels, reference):
  _, path = checkpoint
  tower = vision_from_hf(path, select_layer=-1, select_feature="cls_patch")
  _, aux = tower(jnp.asarray(pixels[0]), all_hidden_states=True)
  got = np.asarray(aux["hidden_states"])
  assert got.shape[0] == len(reference) == 4
  for i, ref in enumerate(reference):
    np.testing.assert_allclose(got[i], ref, atol=ATOL, rtol=0, err_msg=f"hidden state {i}")


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_selected_patch_features_match(checkpoint, pixels, reference, select_layer):
  _, path = checkpoint
  tower = vision_from_hf(path, select_layer=select_layer)
  features, _ = tower(jnp.asarray(pixels[0]))
  expected = reference[select_layer][:, 1:]  # patch tokens only: the class token dropped
  assert features.shape == (2, 16, 32)
  np.testing.assert_allclose(np.asarray(features), expected, atol=ATOL, rtol=0)


def test_full_clip_checkpoint_imports_its_vision_tower(tmp_path, pixels):
  hf = save_clip_vision(tmp_path, seed=1, full=True)
  tower = vision_from_hf(str(tmp_path), select_layer=-2)
  with torch.no_grad():
    out = hf.vision_model(pixel_values=pixels[1], output_hidden_states=True)
    ref = to_np(out.hidden_states[-2])
  features, _ = tower(jnp.asarray(pixels[0]))
  np.testing.assert_allclose(np.asarray(features), ref[:, 1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_position_embeddings_start_at_the_configured_scale(std):
  """`init_position_std` sets the position embeddings' initial spread (CLIP's 0.02 by
  default; the demo's from-scratch tower starts them larger) and nothing else."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from sqllava_jax.config import LoRAConfig, VisionConfig  # pylint: disable=g-import-not-at-top
  from sqllava_jax.models.vision import VisionTower  # pylint: disable=g-import-not-at-top
  cfg = VisionConfig(image_size=64, patch_size=4, hidden_size=64, intermediate_size=128,
                     num_layers=1, num_heads=4, init_position_std=std)
  tower = VisionTower(cfg, LoRAConfig(rank=0), rngs=nnx.Rngs(0))
  position = np.asarray(tower.position_embedding[...])
  assert position.shape == (257, 64)
  assert float(position.std()) == pytest.approx(std, rel=0.05)
  assert float(np.asarray(tower.class_embedding[...]).std()) == pytest.approx(0.02, rel=0.3)
