"""Key maps: our parameter paths <-> Hugging Face (or the original code's) tensor names.

A key map is a list of `KeySpec`s, one per parameter, each with the transforms between the
two layouts. Each model module owns its key map (`llama.hf_key_map`, `vision.hf_key_map`,
`projector.reference_key_map`, ...), built from the pieces here; the converters apply them
(`convert.transfer`). Stacked (scanned) layers map to one HF tensor per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] <-> our kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def conv_to_ours(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, H, W] -> our patch kernel [H, W, I, O]."""
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_to_hf(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def reshape_to(shape: tuple[int, ...]) -> Transform:
  return lambda x: np.reshape(x, shape)


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """One parameter: our path ('layers/self_attn/q_proj/kernel') and the HF name, with
  `{layer}` in the HF name when our parameter stacks `num_layers` per-layer tensors."""
  ours: str
  hf: str
  to_ours: Transform = identity
  to_hf: Transform = identity
  num_layers: int = 0

  def hf_names(self) -> list[str]:
    if not self.num_layers:
      return [self.hf]
    return [self.hf.format(layer=i) for i in range(self.num_layers)]


def linear_key_map(ours: str, hf: str, *, bias: bool, num_layers: int = 0) -> list[KeySpec]:
  """The key map of a torch `nn.Linear` (weight [out, in], optional bias): our kernel
  [in, out] + bias."""
  key_map = [KeySpec(f"{ours}/kernel", f"{hf}.weight", transpose, transpose, num_layers)]
  if bias:
    key_map.append(KeySpec(f"{ours}/bias", f"{hf}.bias", num_layers=num_layers))
  return key_map


def norm_key_map(ours: str, hf: str, *, bias: bool, num_layers: int = 0) -> list[KeySpec]:
  """The key map of a LayerNorm or RMSNorm (weight, optional bias): our scale + bias."""
  key_map = [KeySpec(f"{ours}/scale", f"{hf}.weight", num_layers=num_layers)]
  if bias:
    key_map.append(KeySpec(f"{ours}/bias", f"{hf}.bias", num_layers=num_layers))
  return key_map


def prefixed(key_map: Sequence[KeySpec], ours_prefix: str = "",
             hf_prefix: str = "") -> list[KeySpec]:
  """`key_map` with `ours_prefix` and `hf_prefix` in front of every path and name (a module
  inside the full model, a checkpoint that wraps it)."""
  return [dataclasses.replace(s, ours=ours_prefix + s.ours, hf=hf_prefix + s.hf) for s in key_map]
