"""Prototype extractor vs a PyTorch implementation of docs/design.md section 2.2 written here."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from sqllava_jax.models.projector import PrototypeExtractor, adaptive_avg_pool


def torch_pool(x: torch.Tensor, n: int) -> torch.Tensor:
  """[B, L, D] -> [B, N, D] with torch's own AdaptiveAvgPool1d along the token axis."""
  return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def torch_prototype_extractor(x, w, num_prototypes, iterations):
  """Section 2 step by step; `w` holds torch-layout weights ([out, in] linears)."""
  lin = lambda name, t: t @ w[f"{name}.weight"].T + w[f"{name}.bias"]
  value, feature = lin("v", x), lin("f", x)                         # [B, L, D]
  centers, centers_feature = torch_pool(x, num_prototypes), torch_pool(feature, num_prototypes)
  b = F.normalize(value.transpose(1, 2), dim=-1)                    # [B, D, L], channels unit
  for _ in range(iterations):
    centers = lin("c", centers)
    sim = torch.softmax(F.normalize(centers, dim=-1) @ b, dim=1)    # softmax over N
    centers = sim @ feature
  cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
  s = torch.sigmoid(w["sim_beta"] + w["sim_alpha"] * cos)          # [B, N, L]
  onehot = F.one_hot(s.argmax(dim=1), num_prototypes).transpose(1, 2).to(s.dtype)
  s = s * onehot
  proto = (s @ feature + centers_feature) / (onehot.sum(-1, keepdim=True) + 1)
  out = x + s.transpose(1, 2) @ proto
  h = lin("mlp.0", out)
  return lin("mlp.2", h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("length,n", [(576, 256), (10, 4), (7, 7)])
def test_adaptive_pool_matches_torch(length, n):
  x = np.random.default_rng(0).normal(size=(2, length, 5)).astype(np.float32)
  ref = torch_pool(torch.from_numpy(x), n).numpy()
  np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), n)), ref, atol=1e-6)


def test_prototype_extractor_matches_reference():
  d, h, n, length = 32, 48, 256, 576
  module = PrototypeExtractor(d, h, num_prototypes=n, num_iterations=2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  # Non-trivial similarity scalars so a mix-up of alpha and beta shows.
  module.sim_alpha[...] = jnp.asarray(1.7)
  module.sim_beta[...] = jnp.asarray(-0.3)
  for name in ("c", "v", "f", "mlp_in", "mlp_out"):
    lin = getattr(module, name)
    lin.kernel[...] = jnp.asarray(rng.normal(size=lin.kernel.shape) * 0.2, jnp.float32)
    lin.bias[...] = jnp.asarray(rng.normal(size=lin.bias.shape) * 0.1, jnp.float32)
  torch_names = {"c": "c", "v": "v", "f": "f", "mlp_in": "mlp.0", "mlp_out": "mlp.2"}
  w = {}
  for ours, theirs in torch_names.items():
    lin = getattr(module, ours)
    w[f"{theirs}.weight"] = torch.from_numpy(np.asarray(lin.kernel[...]).T.copy())
    w[f"{theirs}.bias"] = torch.from_numpy(np.asarray(lin.bias[...]).copy())
  w["sim_alpha"], w["sim_beta"] = torch.tensor(1.7), torch.tensor(-0.3)
  x = rng.normal(size=(2, length, d)).astype(np.float32)
  ref = torch_prototype_extractor(torch.from_numpy(x), w, n, 2).numpy()
  got, aux = module(jnp.asarray(x))
  assert got.shape == (2, length, h)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)
  assignments = np.asarray(aux["assignments"])
  assert assignments.shape == (2, length)
  assert len(np.unique(assignments)) > 1, "every token chose the same prototype: weak test input"
