"""Two-way key maps between our parameter paths and Hugging Face tensor names.

Each model module owns its map (a list of `KeySpec`); this module applies a map in either
direction, checking every tensor: a missing tensor, an unexpected one or a wrong shape is an
error that names it. Stacked (scanned) layers map to one HF tensor per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Optional, Sequence

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


def linear_specs(ours: str, hf: str, *, bias: bool, num_layers: int = 0) -> list[KeySpec]:
  """A torch `nn.Linear` (weight [out, in], optional bias) as our kernel [in, out] + bias."""
  specs = [KeySpec(f"{ours}/kernel", f"{hf}.weight", transpose, transpose, num_layers)]
  if bias:
    specs.append(KeySpec(f"{ours}/bias", f"{hf}.bias", num_layers=num_layers))
  return specs


def norm_specs(ours: str, hf: str, *, bias: bool, num_layers: int = 0) -> list[KeySpec]:
  specs = [KeySpec(f"{ours}/scale", f"{hf}.weight", num_layers=num_layers)]
  if bias:
    specs.append(KeySpec(f"{ours}/bias", f"{hf}.bias", num_layers=num_layers))
  return specs


def prefixed(specs: Sequence[KeySpec], ours_prefix: str = "", hf_prefix: str = "") -> list[KeySpec]:
  return [dataclasses.replace(s, ours=ours_prefix + s.ours, hf=hf_prefix + s.hf) for s in specs]


class TensorSource:
  """Anything with `keys()` and `get(name) -> np.ndarray` (a checkpoint reader or a dict)."""

  def __init__(self, tensors: Mapping[str, np.ndarray], where: str = "tensors"):
    self._tensors = tensors
    self.where = where

  def keys(self):
    return self._tensors.keys()

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self._tensors[name])


class PrefixedSource:
  """A view of `source` with `prefix` added to every name that lacks it (transformers 5 saves
  `CLIPVisionModel` without the `vision_model.` prefix that older and full-CLIP files carry)."""

  def __init__(self, source, prefix: str):
    self._source = source
    self.where = getattr(source, "where", "checkpoint")
    self._names = {(n if n.startswith(prefix) else prefix + n): n for n in source.keys()}

  def keys(self):
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._source.get(self._names[name])


class RenamedSource:
  """A view of `source` with every name passed through `rename` (a checkpoint that spells a
  prefix differently, e.g. PEFT wrappers around the same module)."""

  def __init__(self, source, rename: Callable[[str], str]):
    self._source = source
    self.where = getattr(source, "where", "checkpoint")
    self._names: dict[str, str] = {}
    for name in source.keys():
      new = rename(name)
      if new in self._names:
        raise ValueError(f"{self.where}: tensors {self._names[new]} and {name} are the same "
                         f"parameter ({new}); keep only one of them")
      self._names[new] = name

  def keys(self):
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._source.get(self._names[name])


class OverlaySource:
  """Sources read as one, a later source's tensor replacing an earlier one's of the same name
  (a base checkpoint under the files a fine-tune saved, as `load_state_dict` lays them over)."""

  def __init__(self, sources: Sequence):
    self.where = " + ".join(getattr(s, "where", "checkpoint") for s in sources)
    self._owner = {}
    for source in sources:
      for name in source.keys():
        self._owner[name] = source

  def keys(self):
    return self._owner.keys()

  def get(self, name: str) -> np.ndarray:
    return self._owner[name].get(name)

  def where_of(self, name: str) -> str:
    """The file or directory the tensor `name` comes from."""
    owner = self._owner.get(name)
    return getattr(owner, "where", self.where) if owner is not None else self.where


def is_float_dtype(dtype: np.dtype) -> bool:
  """float16/32/64 and bfloat16 (which numpy knows only through ml_dtypes)."""
  return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def import_tensors(specs: Sequence[KeySpec], source, expected: Mapping[str, tuple[int, ...]],
                   *, ignore: Callable[[str], bool] = lambda name: False,
                   dtype: Optional[np.dtype] = None) -> dict[str, np.ndarray]:
  """HF tensors -> {our path: array}. `expected` gives our shape per path; unconsumed source
  keys (other than `ignore`d ones) and missing keys are errors naming the tensor."""
  where = getattr(source, "where", "checkpoint")
  available = set(source.keys())
  missing = [n for s in specs for n in s.hf_names() if n not in available]
  if missing:
    raise ValueError(f"{where}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}")
  used = {n for s in specs for n in s.hf_names()}
  unexpected = sorted(n for n in available - used if not ignore(n))
  if unexpected:
    raise ValueError(f"{where}: {len(unexpected)} unexpected tensors, e.g. "
                     f"{', '.join(unexpected[:5])}; is this the right kind of checkpoint?")
  where_of = getattr(source, "where_of", lambda name: where)
  out = {}
  for spec in specs:
    if spec.ours not in expected:
      raise ValueError(f"key map names {spec.ours!r}, which the model does not have")
    want = tuple(expected[spec.ours])
    per_layer = []
    for name in spec.hf_names():
      raw = source.get(name)
      if not is_float_dtype(raw.dtype):
        raise ValueError(f"{where_of(name)}: tensor {name} has dtype {raw.dtype}; weights must "
                         "be floating point (float32, bfloat16 or float16): is the file damaged?")
      value = spec.to_ours(raw)
      if tuple(value.shape) != (want[1:] if spec.num_layers else want):
        raise ValueError(f"{where_of(name)}: tensor {name} has shape {tuple(raw.shape)}, which "
                         f"does not fit {spec.ours} of shape {want}"
                         f"{' (stacked over layers)' if spec.num_layers else ''}; "
                         "does the config match the weights?")
      per_layer.append(value)
    value = np.stack(per_layer) if spec.num_layers else per_layer[0]
    out[spec.ours] = value.astype(dtype) if dtype is not None else value
  return out


def export_tensors(specs: Sequence[KeySpec], get: Callable[[str], np.ndarray]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """{our path} -> (HF name, tensor) one tensor at a time (streams a 7B export)."""
  for spec in specs:
    value = get(spec.ours)
    if not spec.num_layers:
      yield spec.hf, spec.to_hf(np.asarray(value))
      continue
    if value.shape[0] != spec.num_layers:
      raise ValueError(f"{spec.ours} has {value.shape[0]} stacked layers; expected {spec.num_layers}")
    for i, name in enumerate(spec.hf_names()):
      yield name, spec.to_hf(np.asarray(value[i]))
