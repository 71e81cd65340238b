"""`sqllava-jax ask` as a data engine: a folder of images or a LLaVA JSON in, LLaVA training
records out that `train` reads; a run killed midway (SIGKILL of a subprocess) continues
without asking about any image twice and ends with what an uninterrupted run writes; bad
images and records skipped and counted, or `--strict` naming them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sqllava_jax import cli
from sqllava_jax.data.conversations import parse_record, relabel_self_questions
from sqllava_jax.data.templates import ASSISTANT, USER, VUSER
from sqllava_jax.evaluation import data_parallel
from sqllava_jax.evaluation.self_questioning import DESCRIBE
from tests.conftest import TEST_XLA_FLAGS
from tests.eval_helpers import make_tiny_run, run_processes, spy_prompts, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 4
N = 2  # questions per image
NUM_IMAGES = 6
BATCH = 2
OPENING = "USER: <image>\nCan you describe the image in detail? ASSISTANT:"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("tiny_ask")))


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
  """Six images, two of them in a sub-folder."""
  out = tmp_path_factory.mktemp("ask_images")
  (out / "more").mkdir()
  for i in range(NUM_IMAGES):
    name = f"eval_00000{i}.png"
    shutil.copy(os.path.join(run.data.image_folder, name),
                out / ("more" if i >= 4 else "") / name)
  return str(out)


@pytest.fixture(autouse=True)
def one_device_engine(monkeypatch):
  """The in-process command runs on one device, as the subprocess does (the tests' eight
  simulated devices would split a batch of two)."""
  monkeypatch.setattr(data_parallel, "eval_mesh_if_parallel", lambda: None)


def ask_argv(run, folder, out, *extra):
  return ["ask", "--ckpt", run.ckpt, "--images", folder, "--out", str(out), "--n", str(N),
          "--describe-tokens", str(NEW), "--question-tokens", str(NEW), "--answer-tokens",
          str(NEW), "--batch-size", str(BATCH), "--seed", "3", "--no-progress", *extra]


def ask_json(capsys, argv):
  assert cli.main(argv) == 0
  return json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(run, folder, tmp_path_factory):
  out = tmp_path_factory.mktemp("ask_full")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(data_parallel, "eval_mesh_if_parallel", lambda: None)
    assert cli.main(ask_argv(run, folder, out)) == 0
  return str(out)


def records(out):
  with open(os.path.join(out, "records.json")) as f:
    return json.load(f)


def test_records_hold_the_description_questions_and_answers(uninterrupted):
  recs = records(uninterrupted)
  with open(os.path.join(uninterrupted, "answers.jsonl")) as f:
    asked = [json.loads(line) for line in f]
  images = [f"eval_00000{i}.png" for i in range(4)] + [f"more/eval_00000{i}.png" for i in (4, 5)]
  assert [a["source_id"] for a in asked] == [p for p in images for _ in range(N)]
  kept = [r["id"] for r in recs]
  assert kept == [p for p in images if p in kept] and len(kept) >= NUM_IMAGES - 1
  for r in recs:
    mine = [a for a in asked if a["source_id"] == r["id"]]
    assert r["image"] == r["id"]
    conv = r["conversations"]
    assert conv[:2] == [{"from": "human", "value": f"<image>\n{DESCRIBE}"},
                        {"from": "gpt", "value": mine[0]["description"]}]
    pairs = [(a["text"], a["answer"]) for a in mine if a["text"].strip() and a["answer"].strip()]
    assert [(q["value"], a["value"]) for q, a in zip(conv[2::2], conv[3::2])] == pairs
    assert all(t["from"] == "human" for t in conv[2::2])
    assert all(t["from"] == "gpt" for t in conv[3::2])


def test_asked_questions_become_vuser_turns_at_the_rate_sq_r(uninterrupted):
  """The questions are human turns, so `train`'s self-questioning relabel (sq_r) decides
  which of them the model learns to ask; the opening request is never relabelled."""
  recs = [parse_record(r, index=i) for i, r in enumerate(records(uninterrupted))]
  r = max(recs, key=lambda r: len(r.turns))
  assert len(r.turns) >= 4
  always = relabel_self_questions(r, sq_r=1.0, seed=0)
  never = relabel_self_questions(r, sq_r=0.0, seed=0)
  assert [role for role, _ in always] == [USER, ASSISTANT] + [VUSER, ASSISTANT] * (
      (len(r.turns) - 2) // 2)
  assert [role for role, _ in never] == [USER, ASSISTANT] * (len(r.turns) // 2)


def test_train_reads_the_records_back(run, folder, uninterrupted, tmp_path):
  from sqllava_jax.config import MeshConfig, replace  # pylint: disable=g-import-not-at-top
  from sqllava_jax.data.pipeline import make_example_builder  # pylint: disable=g-import-not-at-top
  from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from sqllava_jax.training.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from tests.train_helpers import metrics  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(run.data.root, f"data.tokenizer={run.data.tokenizer}", "data.source=json",
                    f"data.json_path={os.path.join(uninterrupted, 'records.json')}",
                    f"data.image_folder={folder}", "data.strict=true", "data.num_workers=0",
                    f"output_dir={tmp_path}", "train.max_steps=1", "train.save_every=1000",
                    "train.async_checkpointing=false", "train.per_device_batch_size=2")
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  Trainer(cfg, mesh=mesh).run()
  [step] = [m for m in metrics(tmp_path) if "loss" in m]
  assert step["step"] == 1 and np.isfinite(step["loss"]) and step["loss"] > 0
  # Every record builds (strict: a bad one raises); where sq_r made asked questions VUSER
  # turns, their tokens carry a loss that sq_r=0 leaves out.
  sq, plain = make_example_builder(cfg), make_example_builder(replace(cfg, **{"data.sq_r": 0.0}))
  relabelled = 0
  for i in range(len(sq)):
    ex, base = sq.explain(i), plain.explain(i)
    if any(role == VUSER for role, _ in ex.turns):
      relabelled += 1
      assert ex.tokens.num_trained > base.tokens.num_trained
  assert relabelled, "sq_r=0.5 relabels some asked question"


def _logged(out):
  """The image of every complete answer-log line, in file order."""
  path = os.path.join(out, "answers.0-of-1.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")[:-1]  # a partial last line is not an answer
  return [json.loads(line).get("source_id") for line in lines]


# SIGTERM too: `ask` keeps its default action (no handler), dying wherever it is, as a
# preempted host's process does after its grace period.
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_continues_without_asking_twice(run, folder, uninterrupted, tmp_path,
                                                     monkeypatch, capsys, kill):
  out = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=TEST_XLA_FLAGS)
  proc = subprocess.Popen([sys.executable, "-m", "sqllava_jax.cli",
                           *ask_argv(run, folder, out)], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 240
  while not _logged(str(out)) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(kill)
  proc.wait()
  assert proc.returncode == -kill, proc.stderr.read().decode()[-2000:]
  before = _logged(str(out))
  assert 0 < len(set(before)) < NUM_IMAGES, "the kill should land midway"
  assert not os.path.exists(out / "records.json")

  # real images only: a batch's answered rows run as blank padding
  described = spy_prompts(monkeypatch, lambda p, x: p.endswith(OPENING) and x.any())
  summary = ask_json(capsys, ask_argv(run, folder, out))
  assert len(described) == NUM_IMAGES - len(set(before)), "only the images not yet logged"
  after = _logged(str(out))
  assert after[:len(before)] == before and len(after) == NUM_IMAGES * N
  assert records(str(out)) == records(uninterrupted), "the sampled questions as uninterrupted"
  assert summary["num_images"] == NUM_IMAGES and summary["skipped"] == 0


def test_a_llava_json_with_bad_records(run, folder, tmp_path, capsys):
  good = lambda i, image: {"id": f"r{i}", "image": image, "conversations": [
      {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "shapes"}]}
  shutil.copy(os.path.join(folder, "eval_000000.png"), tmp_path / "outside.png")
  data = [good(0, "eval_000000.png"), good(1, "gone.png"), good(2, "../outside.png"),
          {"id": "r3", "conversations": [{"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello"}]},  # text only
          "not a record", good(0, "eval_000000.png"), good(5, "more/eval_000004.png")]
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(data))
  argv = ask_argv(run, folder, tmp_path / "out", "--data", str(path))
  summary = ask_json(capsys, argv)
  kept = [r["id"] for r in records(str(tmp_path / "out"))]
  assert kept and kept == [i for i in ("r0", "r5") if i in kept]
  assert summary["skipped_by_reason"] == {"missing_image": 1, "unsafe_image_path": 1,
                                          "text_only": 1, "malformed_question": 1,
                                          "duplicate_question": 1}
  assert summary["skipped_first"] == ["r1", "r2", "r3", "#4", "r0"]
  assert cli.main([*ask_argv(run, folder, tmp_path / "strict", "--data", str(path)),
                   "--strict"]) == 2
  err = capsys.readouterr().err
  assert "record '#4', index 4" in err and str(path) in err, err


def test_two_processes_write_what_one_writes(run, folder, uninterrupted, tmp_path):
  """Each process questions its rows of every batch (one of two here) and process 0 merges:
  the records, sampled questions included, are the one-process run's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=TEST_XLA_FLAGS)
  outs = run_processes(ask_argv(run, folder, tmp_path), 2, env, ROOT)
  assert json.loads(outs[0][0].splitlines()[-1])["num_records"] == len(records(uninterrupted))
  assert '"records"' not in outs[1][0], "only process 0 reports"
  assert records(str(tmp_path)) == records(uninterrupted)
  for i in range(2):  # each process logged its share: the images of its rows
    with open(tmp_path / f"answers.{i}-of-2.jsonl") as f:
      mine = sorted({json.loads(line)["index"] for line in f})
    assert mine == [k for k in range(NUM_IMAGES) if (k % BATCH) // (BATCH // 2) == i]


def test_an_images_questions_keep_their_order_past_ten(tmp_path):
  from sqllava_jax.evaluation import eval_loop  # pylint: disable=g-import-not-at-top
  lines = [{"index": i, "question_id": f"img{i}#{k}", "source_id": f"img{i}", "prompt": "p",
            "text": f"q{k}", "description": "d", "answer": f"a{k}"}
           for i in (1, 0) for k in range(12)]
  eval_loop.write_jsonl(eval_loop.shard_path(str(tmp_path), 0, 1), lines)
  merged = eval_loop.read_jsonl(eval_loop.merge_shards(str(tmp_path), 1, "m"))
  assert [m["question_id"] for m in merged] == [f"img{i}#{k}" for i in (0, 1) for k in range(12)]
