"""A damaged checkpoint is never trusted: every step's manifest matches zlib's CRC-32 of each
file; bit rot or truncation of any file is found; resume skips to the newest intact step;
with none intact `train` exits non-zero naming the files; `check-checkpoint` reports."""

import glob
import json
import os
import shutil
import zlib

import numpy as np
import pytest

from sqllava_jax import cli
from sqllava_jax.training import integrity
from sqllava_jax.training.checkpoint import (
  PARAMS,
  Checkpointer,
  DamagedCheckpointError,
  abstract_params,
  config_from_meta,
  load_model,
)
from sqllava_jax.training.trainer import Trainer
from sqllava_jax.tree_paths import flat
from tests.checkpoint_helpers import trained  # noqa: F401  (a fixture)
from tests.train_helpers import CONFIG, tiny_cfg

ORBAX_COMMIT_FILES = {"_CHECKPOINT_METADATA", "commit_success.txt"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def run_copy(trained, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(trained, out)
  return out


def step_files(step_dir):
  """{relative path: path} of every file of a step but orbax's two commit files."""
  out = {}
  for path in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    rel = os.path.relpath(path, step_dir)
    if os.path.isfile(path) and rel not in ORBAX_COMMIT_FILES | {integrity.MANIFEST}:
      out[rel] = path
  return out


def largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "params", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize)


def scramble_at(path, fraction, n=64):
  """Inverts `n` bytes of `path` centred at `fraction` of its size; the size stays. Returns
  the original bytes of the file."""
  with open(path, "rb") as f:
    original = f.read()
  start = min(max(0, int(len(original) * fraction) - n // 2), max(0, len(original) - n))
  with open(path, "r+b") as f:
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in original[start:start + n]))
  assert os.path.getsize(path) == len(original) and original
  return original


def scramble_middle(path, n=64):
  """Inverts `n` bytes in the middle of `path`; the size stays."""
  scramble_at(path, 0.5, n)


def test_manifest_is_the_crc32_and_size_of_every_file(trained):
  for step in (2, 4):
    step_dir = os.path.join(trained, "checkpoints", str(step))
    with open(os.path.join(step_dir, integrity.MANIFEST)) as f:
      manifest = json.load(f)
    files = step_files(step_dir)
    assert set(manifest["files"]) == set(files)
    assert {"params", "train", "meta", "data"} == {rel.split("/")[0] for rel in files}
    for rel, path in files.items():
      with open(path, "rb") as f:
        data = f.read()
      entry = manifest["files"][rel]
      assert entry["size"] == len(data), rel
      # Files are below one segment (64 MiB): one CRC over the whole file.
      assert entry["crc32"] == [f"{zlib.crc32(data):08x}"], rel


def test_bit_rot_in_an_array_file_is_found_and_nothing_restores_it(run_copy, trained):
  ckpt_dir = os.path.join(run_copy, "checkpoints")
  target = largest_array_file(os.path.join(ckpt_dir, "4"))
  scramble_middle(target)
  rel = os.path.relpath(target, os.path.join(ckpt_dir, "4"))
  problems = Checkpointer(ckpt_dir, read_only=True).verify(4)
  assert len(problems) == 1 and problems[0].startswith(f"{rel}: crc32 differs"), problems
  with pytest.raises(DamagedCheckpointError, match=rel):
    load_model(ckpt_dir)


def test_orbax_alone_restores_scrambled_bytes_without_a_word(run_copy, trained):
  """What the manifest protects against. Whether orbax notices depends on where the bytes
  land in its data file, whose layout differs from run to run: on a zstd frame header its
  decompression fails (naming the array, not the file), inside a frame's data most often
  nothing is noticed and a parameter comes back with other numbers, and bytes no restored
  array uses change nothing. Of a spread of places some must be the silent kind."""
  ckpt_dir = os.path.join(run_copy, "checkpoints")
  target = largest_array_file(os.path.join(ckpt_dir, "4"))
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  cfg = config_from_meta(ckpt.read_meta(4))
  saved = flat(Checkpointer(os.path.join(trained, "checkpoints"), read_only=True).restore(
      4, params=abstract_params(cfg.model))[PARAMS])
  outcomes = {}
  for fraction in (0.5, 0.3, 0.1, 0.2, 0.4, 0.6, 0.7, 0.8):
    original = scramble_at(target, fraction)
    try:
      damaged = flat(ckpt.restore(4, params=abstract_params(cfg.model), verify=False)[PARAMS])
    except Exception as e:  # a read error of any kind counts as noticed
      outcomes[fraction] = f"error: {str(e)[:80]}"
    else:
      changed = [k for k in saved
                 if not np.array_equal(np.asarray(damaged[k]), np.asarray(saved[k]))]
      outcomes[fraction] = f"silently changed {changed}" if changed else "unchanged"
    with open(target, "wb") as f:
      f.write(original)
    assert ckpt.verify(4) == []
    if outcomes[fraction].startswith("silently"):
      break
  assert any(o.startswith("silently") for o in outcomes.values()), outcomes


@pytest.mark.parametrize("damage", ["scramble", "truncate", "delete"])
def test_every_file_of_a_step_is_covered(run_copy, damage):
  step_dir = os.path.join(run_copy, "checkpoints", "4")
  ckpt = Checkpointer(os.path.join(run_copy, "checkpoints"), read_only=True)
  for rel, path in step_files(step_dir).items():
    with open(path, "rb") as f:
      original = f.read()
    if damage == "scramble":
      scramble_middle(path, n=8)
      expected = f"{rel}: crc32 differs"
    elif damage == "truncate":
      with open(path, "r+b") as f:
        f.truncate(len(original) // 2)
      expected = f"{rel}: {len(original) // 2} bytes, integrity.json says {len(original)}"
    else:
      os.remove(path)
      expected = f"{rel}: missing"
    problems = ckpt.verify(4)
    assert len(problems) == 1 and problems[0].startswith(expected), (rel, problems)
    with open(path, "wb") as f:
      f.write(original)
  assert ckpt.verify(4) == []


def test_a_damaged_or_missing_manifest_is_not_trusted(run_copy):
  step_dir = os.path.join(run_copy, "checkpoints", "4")
  path = os.path.join(step_dir, integrity.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  rel = next(iter(manifest["files"]))
  manifest["files"][rel]["size"] += 1  # an edited manifest no longer matches its own CRC
  with open(path, "w") as f:
    json.dump(manifest, f)
  assert integrity.verify(step_dir) == [
    "integrity.json is damaged (its own checksum does not match)"]
  os.remove(path)
  assert integrity.verify(step_dir)[0].startswith("no integrity.json")
  # A file added after the commit is reported too.
  integrity.write_manifest(step_dir)
  with open(os.path.join(step_dir, "meta", "extra"), "w") as f:
    f.write("x")
  assert integrity.verify(step_dir) == [
    "meta/extra: not in integrity.json (written after the commit)"]


def test_resume_skips_a_damaged_newest_step(run_copy, data_dir, capsys):
  ckpt_dir = os.path.join(run_copy, "checkpoints")
  target = largest_array_file(os.path.join(ckpt_dir, "4"))
  scramble_middle(target)
  trainer = Trainer(tiny_cfg(run_copy, data_dir, "train.max_steps=8", "train.save_every=2"))
  summary = trainer.run()
  out, err = capsys.readouterr()
  assert "resumed from step 2 in" in out
  assert f"skipped step 4 of {ckpt_dir}: damaged" in err and os.path.basename(target) in err
  assert summary["steps"] == 8
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  assert ckpt.all_steps() == [4, 6, 8]  # keep_checkpoints=3
  assert all(ckpt.verify(s) == [] for s in (4, 6, 8))  # step 4 was trained and saved anew
  assert integrity.verify(os.path.join(ckpt_dir, "4.damaged"))  # the damaged one is kept aside


def test_no_intact_step_exits_non_zero_naming_the_files(run_copy, data_dir, capsys):
  ckpt_dir = os.path.join(run_copy, "checkpoints")
  targets = [largest_array_file(os.path.join(ckpt_dir, s)) for s in ("2", "4")]
  for t in targets:
    scramble_middle(t)
  code = cli.main(["train", CONFIG, f"output_dir={run_copy}", f"data.synthetic.dir={data_dir}",
                   "train.max_steps=8", "train.save_every=2", "train.async_checkpointing=false"])
  err = capsys.readouterr().err
  assert code == 1
  assert f"sqllava-jax train: error: {ckpt_dir} is damaged: step 4: params/" in err
  for t in targets:
    assert os.path.basename(t) in err
  # Nothing was set aside or overwritten: a rerun says the same, it does not start afresh.
  assert Checkpointer(ckpt_dir, read_only=True).all_steps() == [2, 4]
  assert not os.path.exists(os.path.join(run_copy, "run.lock"))


def test_check_checkpoint_command(run_copy, capsys):
  ckpt_dir = os.path.join(run_copy, "checkpoints")
  assert cli.main(["check-checkpoint", run_copy]) == 0
  out = capsys.readouterr().out
  assert "step 2: intact" in out and "step 4: intact" in out
  target = largest_array_file(os.path.join(ckpt_dir, "4"))
  scramble_middle(target)
  assert cli.main(["check-checkpoint", ckpt_dir]) == 1
  out = capsys.readouterr().out
  assert "step 2: intact" in out and "step 4: DAMAGED" in out and os.path.basename(target) in out
  assert cli.main(["check-checkpoint", os.path.join(ckpt_dir, "2")]) == 0
  # A step from before manifests: untrusted until adopted with --write-manifest.
  os.remove(os.path.join(ckpt_dir, "2", integrity.MANIFEST))
  assert cli.main(["check-checkpoint", ckpt_dir, "--step", "2"]) == 1
  assert "no integrity.json" in capsys.readouterr().out
  assert cli.main(["check-checkpoint", ckpt_dir, "--step", "2", "--write-manifest"]) == 0
  assert "step 2: intact" in capsys.readouterr().out
  np.testing.assert_equal(Checkpointer(ckpt_dir, read_only=True).verify(2), [])
