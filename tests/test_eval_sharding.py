"""Data-parallel evaluation: 8 simulated devices give one device's tokens; process shards
merge back into the single-process answers file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation import eval_loop
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.questions import load_questions
from sqllava_jax.training.checkpoint import load_model
from tests.eval_helpers import make_tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEW = 4  # the eval command tests' budget and batch: the mesh program is shared with them


def mesh_vs_one(ckpt: str, tokenizer: str) -> dict:
  """Tokens of one batch of 8 (an image in every row) generated on all 8 devices and on one,
  greedy (prompts of 67-116 tokens) and sampled (137-186 tokens): the eval command tests
  compile the same two 8-device programs."""
  import jax  # pylint: disable=g-import-not-at-top

  from sqllava_jax.evaluation.generate import Generator  # pylint: disable=g-import-not-at-top
  from sqllava_jax.evaluation.sampling import Sampling  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  model, cfg = load_model(ckpt)
  tok = Tokenizer(tokenizer)
  rng = np.random.default_rng(0)
  image = [cfg.model.image_token_id] * cfg.model.num_image_tokens
  pixels = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  out = {}
  cases = (("greedy", Sampling(), 0), ("sampled", Sampling(1.0, 50, 0.9), 70))
  for name, sampling, extra in cases:
    prompts = [[1] + image + rng.integers(3, 400, size=50 + extra + 7 * i).tolist()
               for i in range(8)]
    for mesh in (None, dp.eval_mesh()):
      gen = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
      got = gen.generate(prompts, pixels, max_new_tokens=NEW, sampling=sampling, seed=1)
      out[f"{name}/{'mesh' if mesh else 'one'}"] = got.tokens.tolist()
  return out


SUBPROCESS = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from tests.test_eval_sharding import mesh_vs_one
print(json.dumps(mesh_vs_one(*sys.argv[1:])))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("shard_run")))


def test_eight_devices_generate_what_one_device_does(run):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() == 8:  # the test session already simulates 8 devices
    out = mesh_vs_one(run.ckpt, run.data.tokenizer)
  else:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, run.ckpt, run.data.tokenizer],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ("greedy", "sampled"):
    np.testing.assert_array_equal(out[f"{name}/mesh"], out[f"{name}/one"], err_msg=name)
  assert out["greedy/one"] != out["sampled/one"], "sampling should leave the greedy path"


def test_process_shards_merge_into_the_single_process_answers(run, tmp_path):
  model, _ = load_model(run.ckpt)
  engine = Engine(model, Tokenizer(run.data.tokenizer))
  questions = load_questions(run.data.vqa("eval"))[:5]  # 3 + 2 rows: process 1 pads
  settings = eval_loop.EvalSettings(images_dir=run.data.image_folder, max_new_tokens=3,
                                    batch_size=2, model_id="m")
  single, _ = eval_loop.answer_shard(engine, questions, settings, process_index=0,
                                     process_count=1, progress=False)
  two = eval_loop.EvalSettings(**{**settings.__dict__, "batch_size": 4})
  for i in range(2):
    records, skipped = eval_loop.answer_shard(engine, questions, two, process_index=i,
                                              process_count=2, progress=False)
    # each process its half of each batch of four: [0, 1] and [4]; [2, 3] and padding
    assert [r["index"] for r in records] == [[0, 1, 4], [2, 3]][i] and not skipped
    eval_loop.write_jsonl(eval_loop.shard_path(str(tmp_path), i, 2), records)
  merged = eval_loop.read_jsonl(eval_loop.merge_shards(str(tmp_path), 2, "m"))
  assert [m["question_id"] for m in merged] == [q["question_id"] for q in questions]
  assert [m["text"] for m in merged] == [r["text"] for r in single]
  assert all(m["model_id"] == "m" and "index" not in m for m in merged)


def test_merge_names_a_missing_shard(tmp_path):
  eval_loop.write_jsonl(eval_loop.shard_path(str(tmp_path), 0, 2), [])
  with pytest.raises(FileNotFoundError, match=r"answers.1-of-2.jsonl is missing: process 1"):
    eval_loop.merge_shards(str(tmp_path), 2, "m")


def test_unreadable_images_are_skipped_and_counted(run, tmp_path):
  model, _ = load_model(run.ckpt)
  engine = Engine(model, Tokenizer(run.data.tokenizer))
  questions = load_questions(run.data.vqa("eval"))[:3]
  questions[1] = {**questions[1], "image": "missing.png"}
  settings = eval_loop.EvalSettings(images_dir=run.data.image_folder, max_new_tokens=3,
                                    batch_size=2)
  records, skipped = eval_loop.answer_shard(engine, questions, settings, process_index=0,
                                            process_count=1, progress=False)
  assert [r["index"] for r in records] == [0, 2]
  assert [s["question_id"] for s in skipped] == [questions[1]["question_id"]]
  assert skipped[0]["reason"] == "missing_image"


@pytest.mark.parametrize("total, processes, batch, expected", [
    (5, 2, 2, 2), (4, 2, 2, 1), (1, 4, 1, 1), (0, 1, 8, 0), (17, 1, 8, 3)])
def test_every_item_has_one_row_of_one_batch(total, processes, batch, expected):
  """batch: rows per process; an item's global row is the same for any process count."""
  global_batch = processes * batch
  assert dp.num_batches(total, global_batch) == expected
  rows = [list(dp.batch_rows(total, global_batch, b, i, processes))
          for b in range(expected) for i in range(processes)]
  assert sum(rows, []) == list(range(total)), "in order: batch by batch, process by process"
  assert all(len(r) <= batch for r in rows)
