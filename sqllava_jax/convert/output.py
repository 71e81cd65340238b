"""All-or-nothing output directories for the converters.

Everything is written into a hidden temporary directory beside `--out` and renamed onto
`--out` only when complete, so a failed or killed conversion never leaves a half-written
model where a later `train`, `eval` or `from_pretrained` would pick it up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from flax import nnx

from sqllava_jax.config import Config
from sqllava_jax.training.checkpoint import save_model


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def check_output(out: str, *, overwrite: bool) -> str:
  """The absolute path of `out`, refusing to replace an existing one unless `overwrite`."""
  path = os.path.abspath(out)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; remove it, choose another --out, or pass "
                          "--overwrite")
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory; choose another --out")
  return path


@contextlib.contextmanager
def atomic_directory(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temporary directory beside `out`; on success it becomes `out` (an old
  `out` is replaced only with `overwrite`), on any error it is deleted and `out` untouched."""
  path = check_output(out, overwrite=overwrite)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
  try:
    yield tmp
    if os.path.lexists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(old, "previous"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_checkpoint(out: str, model: nnx.Module, cfg: Config, *, overwrite: bool = False,
                     extra_meta: dict | None = None, tokenizer: str | None = None) -> str:
  """Writes `model` as a model-only checkpoint (params + meta, step 0) at `out`, atomically:
  the layout `train`, `eval`, `generate` and `ask` read (`training.checkpoint.load_model`).
  `tokenizer` (a tokenizer.model) is copied beside the steps, where they look for one."""
  path = check_output(out, overwrite=overwrite)
  with atomic_directory(path, overwrite=overwrite) as tmp:
    save_model(tmp, model, cfg, extra_meta=extra_meta)
    if tokenizer:
      shutil.copy(tokenizer, os.path.join(tmp, "tokenizer.model"))
  return path
