"""Checkpoint integrity: a checksum manifest in every step, written before orbax commits it.

Orbax reads damaged array files without complaint: scrambled bytes in the middle of an
OCDBT data file come back as different numbers. So every step carries `integrity.json`,
the size and CRC-32 of each file, and nothing restores a step whose files disagree.

When orbax commits a step, the primary process, after every process has written its part
(the `async_write_complete` barrier of an async save, `Checkpointer:save` of a blocking
one), calls the temporary path's `finalize`: `AtomicRenameTemporaryPath` writes
`commit_success.txt` and renames `<step>.orbax-checkpoint-tmp` to `<step>`;
`CommitFileTemporaryPath` (object stores) only writes `commit_success.txt`. Our subclasses
write the manifest first, so a step that orbax lists has one, and a step killed before the
manifest was complete is still a temporary directory that orbax ignores.

The manifest (format 1):

    {"format": 1, "algorithm": "crc32", "segment_bytes": 67108864,
     "files": {"params/ocdbt.process_0/d/9b19...": {"size": 313214, "crc32": ["8f1d03a2"]},
               ...},
     "manifest_crc32": "..."}

A file is hashed in segments of `segment_bytes`, one CRC per segment, so the segments of
all files are hashed in parallel threads (zlib releases the GIL) and a report can say where
a file is damaged. `manifest_crc32` covers the rest of the manifest, so a damaged manifest
is caught too. Outside the manifest: the two files orbax itself writes during the commit,
after ours (`_CHECKPOINT_METADATA`, a timestamp it restores without; `commit_success.txt`).
CRC-32 detects accidental damage (bit rot, truncation, a torn write), not tampering.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import zlib
from typing import Callable, Iterator, Sequence

from etils import epath
from orbax.checkpoint import path as ocp_path

MANIFEST = "integrity.json"
FORMAT = 1
SEGMENT_BYTES = 64 << 20
READ_BYTES = 8 << 20
# Written by orbax's own commit after the manifest (see the module docstring).
UNLISTED = frozenset({MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"})


def _crc32(view, value: int = 0) -> int:
  return zlib.crc32(view, value)


# name -> (start value, update(buffer, value) -> value). Only crc32 is written; the table is
# what `benchmarks/checkpoint_integrity.py` compares.
CHECKSUMS: dict[str, tuple[int, Callable]] = {"crc32": (0, _crc32),
                                              "adler32": (1, zlib.adler32)}
ALGORITHM = "crc32"


class DamagedCheckpointError(ValueError):
  """A checkpoint step whose files disagree with its manifest (or that has none)."""

  def __init__(self, step_dir: str, problems: Sequence[str]):
    self.step_dir, self.problems = str(step_dir), list(problems)
    super().__init__(f"{self.step_dir} is damaged: " + "; ".join(self.problems))


def _worker_count() -> int:
  return min(32, os.cpu_count() or 1)


def _segments(size: int, segment_bytes: int) -> list[tuple[int, int]]:
  """[(offset, length)] covering `size` bytes; one empty segment for an empty file."""
  segments = [(off, min(segment_bytes, size - off)) for off in range(0, size, segment_bytes)]
  return segments or [(0, 0)]


def segment_checksum(path: epath.Path, offset: int, length: int, algorithm: str = ALGORITHM) -> str:
  """Hex checksum of bytes [offset, offset + length) of `path`, read in READ_BYTES pieces."""
  value, update = CHECKSUMS[algorithm]
  buffer = bytearray(min(READ_BYTES, max(length, 1)))
  view = memoryview(buffer)
  with path.open("rb") as f:
    f.seek(offset)
    left = length
    while left:
      want = min(left, len(buffer))
      got = f.readinto(view[:want]) if hasattr(f, "readinto") else _read_into(f, view, want)
      if not got:
        break  # the file shrank while it was read: the size check reports it
      value = update(view[:got], value)
      left -= got
  return f"{value & 0xFFFFFFFF:08x}"


def _read_into(f, view: memoryview, want: int) -> int:
  data = f.read(want)
  view[:len(data)] = data
  return len(data)


def _listed_files(step_dir: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  """(relative posix path, path) of every file in the step, the orbax commit files excepted."""
  stack = [step_dir]
  while stack:
    folder = stack.pop()
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
      if child.is_dir():
        stack.append(child)
        continue
      rel = child.relative_to(step_dir).as_posix()
      if rel not in UNLISTED:
        yield rel, child


def checksum_files(files: dict[str, tuple[epath.Path, int]], *, algorithm: str = ALGORITHM,
                   segment_bytes: int = SEGMENT_BYTES, workers: int | None = None
                   ) -> dict[str, list[str]]:
  """{name: [checksum per segment]} of `files` ({name: (path, size)}), segments in parallel."""
  jobs = [(name, path, off, n) for name, (path, size) in files.items()
          for off, n in _segments(size, segment_bytes)]
  with concurrent.futures.ThreadPoolExecutor(workers or _worker_count()) as pool:
    sums = list(pool.map(lambda j: segment_checksum(j[1], j[2], j[3], algorithm), jobs))
  out: dict[str, list[str]] = {name: [] for name in files}
  for (name, *_), value in zip(jobs, sums):
    out[name].append(value)
  return out


def _self_checksum(body: dict) -> str:
  text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
  return f"{zlib.crc32(text) & 0xFFFFFFFF:08x}"


def build_manifest(step_dir: epath.PathLike, *, algorithm: str = ALGORITHM,
                   segment_bytes: int = SEGMENT_BYTES) -> dict:
  step_dir = epath.Path(step_dir)
  files = {rel: (path, path.stat().length) for rel, path in _listed_files(step_dir)}
  sums = checksum_files(files, algorithm=algorithm, segment_bytes=segment_bytes)
  body = {"format": FORMAT, "algorithm": algorithm, "segment_bytes": segment_bytes,
          "files": {rel: {"size": size, algorithm: sums[rel]}
                    for rel, (_, size) in files.items()}}
  return body | {"manifest_crc32": _self_checksum(body)}


def write_manifest(step_dir: epath.PathLike) -> dict:
  """Hashes every file of `step_dir` and writes its `integrity.json` (returns the manifest)."""
  step_dir = epath.Path(step_dir)
  manifest = build_manifest(step_dir)
  with (step_dir / MANIFEST).open("w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    if hasattr(f, "fileno"):
      f.flush()
      os.fsync(f.fileno())
  return manifest


def read_manifest(step_dir: epath.Path) -> tuple[dict | None, str | None]:
  """(manifest, None), or (None, why it cannot be used)."""
  path = step_dir / MANIFEST
  if not path.exists():
    return None, (f"no {MANIFEST} (not written by this version, or copied without it; "
                  f"`sqllava-jax check-checkpoint --write-manifest` adopts a step you trust)")
  try:
    manifest = json.loads(path.read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    ok = manifest.get("manifest_crc32") == _self_checksum(body)
  except (ValueError, AttributeError, UnicodeDecodeError) as e:
    return None, f"{MANIFEST} is unreadable ({e})"
  if not ok:
    return None, f"{MANIFEST} is damaged (its own checksum does not match)"
  if manifest.get("format") != FORMAT or manifest.get("algorithm") not in CHECKSUMS:
    return None, (f"{MANIFEST}: format {manifest.get('format')} / algorithm "
                  f"{manifest.get('algorithm')!r} unknown to this version")
  return manifest, None


def verify(step_dir: epath.PathLike) -> list[str]:
  """Problems of one step, one line per damaged, missing or unexpected file; [] if intact."""
  step_dir = epath.Path(step_dir)
  manifest, why = read_manifest(step_dir)
  if manifest is None:
    return [str(why)]
  algorithm, segment_bytes = manifest["algorithm"], manifest["segment_bytes"]
  expected = manifest["files"]
  present = {rel: (path, path.stat().length) for rel, path in _listed_files(step_dir)}
  problems = [f"{rel}: missing" for rel in sorted(set(expected) - set(present))]
  problems += [f"{rel}: not in {MANIFEST} (written after the commit)"
               for rel in sorted(set(present) - set(expected))]
  sized = {}
  for rel in sorted(set(expected) & set(present)):
    size, want = present[rel][1], expected[rel]["size"]
    if size != want:
      problems.append(f"{rel}: {size} bytes, {MANIFEST} says {want} "
                      f"({'truncated' if size < want else 'grown'})")
    else:
      sized[rel] = present[rel]
  sums = checksum_files(sized, algorithm=algorithm, segment_bytes=segment_bytes)
  for rel, got in sums.items():
    bad = [i for i, (a, b) in enumerate(zip(got, expected[rel][algorithm])) if a != b]
    if bad:
      size = sized[rel][1]
      where = ", ".join(f"{i * segment_bytes}-{min(size, (i + 1) * segment_bytes) - 1}"
                        for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
      problems.append(f"{rel}: {algorithm} differs from {MANIFEST} in bytes {where} "
                      "(bit rot or an overwrite)")
  return problems


def check(step_dir: epath.PathLike) -> None:
  """Raises DamagedCheckpointError unless `step_dir` matches its manifest."""
  problems = verify(step_dir)
  if problems:
    raise DamagedCheckpointError(str(step_dir), problems)


# ---- the hook into orbax's commit ---------------------------------------------------------
class _ManifestFirst:
  """Mixin for an orbax TemporaryPath: write the manifest, then commit as the base class."""

  async def finalize(self, *args, **kwargs):
    await asyncio.to_thread(write_manifest, self.get())
    return await super().finalize(*args, **kwargs)


class ManifestAtomicRenameTemporaryPath(_ManifestFirst,
                                        ocp_path.atomicity.AtomicRenameTemporaryPath):
  """Manifest, `commit_success.txt`, then the rename that makes the step visible."""


class ManifestCommitFileTemporaryPath(_ManifestFirst, ocp_path.atomicity.CommitFileTemporaryPath):
  """Manifest, then `commit_success.txt` that makes the step visible (object stores)."""


def temporary_path_class(directory: str) -> type:
  """Orbax's default commit for `directory` (rename locally, commit file on GCS), manifest
  first."""
  base = ocp_path.atomicity_defaults.get_default_temporary_path_class(epath.Path(directory))
  if issubclass(base, ocp_path.atomicity.CommitFileTemporaryPath):
    return ManifestCommitFileTemporaryPath
  return ManifestAtomicRenameTemporaryPath
