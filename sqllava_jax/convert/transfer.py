"""Tensors through a key map, both ways, checking every one.

`import_tensors` reads a source's tensors into {our path: array}: a missing tensor, an
unexpected one, a wrong shape or a non-float dtype is an error that names it.
`export_tensors` streams our parameters out under the HF names, one tensor at a time.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from sqllava_jax.convert.hf_io import TensorSource
from sqllava_jax.models.key_map import KeySpec


def is_float_dtype(dtype: np.dtype) -> bool:
  """float16/32/64 and bfloat16 (which numpy knows only through ml_dtypes)."""
  return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def import_tensors(key_map: Sequence[KeySpec], source: TensorSource,
                   expected: Mapping[str, tuple[int, ...]],
                   *, ignore: Callable[[str], bool] = lambda name: False,
                   dtype: Optional[np.dtype] = None) -> dict[str, np.ndarray]:
  """HF tensors -> {our path: array}. `expected` gives our shape per path; unconsumed source
  keys (other than `ignore`d ones) and missing keys are errors naming the tensor."""
  where = getattr(source, "where", "checkpoint")
  available = set(source.keys())
  missing = [n for s in key_map for n in s.hf_names() if n not in available]
  if missing:
    raise ValueError(f"{where}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}")
  used = {n for s in key_map for n in s.hf_names()}
  unexpected = sorted(n for n in available - used if not ignore(n))
  if unexpected:
    raise ValueError(f"{where}: {len(unexpected)} unexpected tensors, e.g. "
                     f"{', '.join(unexpected[:5])}; is this the right kind of checkpoint?")
  where_of = getattr(source, "where_of", lambda name: where)
  out = {}
  for spec in key_map:
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


def export_tensors(key_map: Sequence[KeySpec], get: Callable[[str], np.ndarray]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """{our path} -> (HF name, tensor) one tensor at a time (streams a 7B export)."""
  for spec in key_map:
    value = get(spec.ours)
    if not spec.num_layers:
      yield spec.hf, spec.to_hf(np.asarray(value))
      continue
    if value.shape[0] != spec.num_layers:
      raise ValueError(
        f"{spec.ours} has {value.shape[0]} stacked layers; expected {spec.num_layers}")
    for i, name in enumerate(spec.hf_names()):
      yield name, spec.to_hf(np.asarray(value[i]))
