"""`eval-suite` end to end on a tiny checkpoint and tiny copies of every benchmark in its
distributor's layout: every benchmark answered, scored, judged (a local judge server) or
written for its server; results.md beside the paper's numbers; and a run killed midway
(SIGKILL of a subprocess) that continues without asking any question twice and ends with
the scores of an uninterrupted run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation import answer_log, loading
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.judge import JudgeConfig
from sqllava_jax.evaluation.suite import SuiteOptions, run_suite
from sqllava_jax.training.checkpoint import load_model
from tests.conftest import TEST_XLA_FLAGS
from tests.eval_helpers import make_tiny_run
from tests.eval_suite_data import JudgeServer, judge_reply, make_eval_tree
from tests.test_metrics_mmbench import _read_sheet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "configs", "eval", "paper.yaml")
NEW = 4
BATCH = 2
NUM_QUESTIONS = 42  # every question of every benchmark in eval_suite_data
PAPER = {"vqav2": 80.3, "gqa": 63.7, "vizwiz": 55.3, "scienceqa": 70.5, "textvqa": 60.5,
         "pope": 87.2, "mmbench": 66.6, "mmbench_cn": 60.0, "llava_bench": 74.3, "mmvet": 37.6}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("suite")
  run = make_tiny_run(str(root))
  sources = [os.path.join(run.data.image_folder, f"eval_00000{i}.png") for i in range(3)]
  return run, make_eval_tree(str(root / "eval"), sources)


@pytest.fixture(scope="module")
def engine(tree):
  run, _ = tree
  model, _ = load_model(run.ckpt)
  return Engine(model, Tokenizer(run.data.tokenizer))


@pytest.fixture(scope="module")
def server():
  with JudgeServer(judge_reply) as s:
    yield s


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")


def _options(tree, out, server):
  run, data = tree
  # the identity the command records, so that the command's run and ours are one run
  return SuiteOptions(data_dir=data, out_dir=str(out), model_id="tiny", batch_size=BATCH,
                      max_new_tokens=NEW, progress=False,
                      checkpoint=loading.checkpoint_identity(run.ckpt),
                      judge=JudgeConfig(base_url=server.url, model="judge-1",
                                        api_key_env="TEST_JUDGE_KEY"))


@pytest.fixture(scope="module")
def uninterrupted(tree, engine, server, tmp_path_factory):
  out = tmp_path_factory.mktemp("full")
  os.environ["TEST_JUDGE_KEY"] = "sk-test"  # module scope: monkeypatch is per test
  report = run_suite(engine, SUITE, _options(tree, out, server))
  return report, str(out), len(server.requests)


def _answers(out, name):
  with open(os.path.join(out, name, "answers.jsonl")) as f:
    return [json.loads(line) for line in f]


def _by_name(report):
  return {b["name"]: b for b in report["benchmarks"]}


def test_every_benchmark_runs_with_its_protocol(uninterrupted):
  report, out, _ = uninterrupted
  b = _by_name(report)
  assert {k: v["status"] for k, v in b.items()} == {
      "vqav2": "submission", "gqa": "scored", "vizwiz": "submission", "scienceqa": "scored",
      "textvqa": "scored", "pope": "scored", "mmbench": "scored", "mmbench_cn": "scored",
      "llava_bench": "scored",
      "mmvet": "scored", "mmbench_test": "submission", "seed_bench": "scored", "mme": "scored"}
  assert {k: v["paper"] for k, v in b.items() if v["paper"] is not None} == PAPER
  assert sum(v["num_questions"] for v in b.values()) == NUM_QUESTIONS
  # prompt suffixes: appended where the reference's script appends them, not doubled where
  # LLaVA's question file already ends with them
  sqa = _answers(out, "scienceqa")
  assert sqa[0]["prompt"] == ("<image>\nQuestion: Which shape?\nOptions: (A) circle (B) square"
                              "\nAnswer with the option's letter from the given choices directly.")
  assert sqa[1]["prompt"].startswith("Question: Which is a colour?")
  assert _answers(out, "mmbench")[0]["prompt"] == (
      "Look closely.\nWhat shape is it?\nA. circle\nB. square\nC. triangle\nD. star\n"
      "Answer with the option's letter from the given choices directly.")
  assert _answers(out, "mmbench_cn")[0]["prompt"].endswith("D. star\n请直接回答选项字母。")
  assert _answers(out, "vqav2")[0]["prompt"].count("single word or phrase") == 1
  # SEED-Bench: the image part only
  assert [a["question_id"] for a in _answers(out, "seed_bench")] == [101, 102]


def test_scores_follow_the_official_rules(uninterrupted):
  report, out, _ = uninterrupted
  b = _by_name(report)
  gqa = _answers(out, "gqa")  # exact match after lowercasing, trailing full stops dropped
  want = sum(a["text"].rstrip(".").lower() == "yes" for a in gqa) / len(gqa)
  assert b["gqa"]["score"] == round(100 * want, 2)
  seed = {a["question_id"]: a["text"] for a in _answers(out, "seed_bench")}
  assert b["seed_bench"]["score"] == round(100 * ((seed[101] == "A") + (seed[102] == "B")) / 2, 2)
  # the judge's scripted replies: conv "8 6", detail "5,10" -> 100 * 8.0 / 6.5
  assert b["llava_bench"]["score"] == round(8.0 / 6.5 * 100, 1)
  # MM-Vet grades 0.5, 0.3 (after an unreadable reply), 1.0
  assert b["mmvet"]["score"] == 60.0
  assert b["mmvet"]["result"]["per_capability"] == {"ocr": 65.0, "rec": 40.0, "math": 100.0}
  # MMBench: answers no rule reads went to the judge, which always said "A"
  _, out, _ = uninterrupted
  with open(os.path.join(out, "judge_cache.jsonl")) as f:
    matched = [json.loads(line) for line in f if '"A"' in line]
  assert b["mmbench"]["result"]["unresolved"] == 0 or matched
  assert b["mmbench"]["result"]["num_questions"] == 2
  assert b["mmbench"]["result"]["num_rows"] == 6


def test_submission_files_in_the_servers_layouts(uninterrupted):
  report, out, _ = uninterrupted
  files = {k: v["files"] for k, v in _by_name(report).items()}
  vqa = json.load(open(files["vqav2"]["submission"]))
  assert [v["question_id"] for v in vqa] == [11, 12, 99] and vqa[2]["answer"] == ""
  viz = json.load(open(files["vizwiz"]["submission"]))
  assert [v["image"] for v in viz] == ["VizWiz_test_00000000.png", "VizWiz_test_00000001.png"]
  gqa = json.load(open(files["gqa"]["submission"]))
  assert set(gqa[0]) == {"questionId", "prediction"}
  for name in ("mmbench", "mmbench_test"):
    sheet = _read_sheet(files[name]["submission"])
    assert len(sheet) == 7 and sheet[0]["G"] == "prediction"
  seed = [json.loads(line) for line in open(files["seed_bench"]["submission"])]
  assert [s["question_id"] for s in seed] == ["101", "102"]
  assert set(json.load(open(files["mmvet"]["submission"]))) == {"v1_0", "v1_1", "v1_2"}
  assert len([json.loads(line) for line in open(files["llava_bench"]["reviews"])]) == 2


def test_results_md_puts_the_papers_numbers_beside_ours(uninterrupted):
  report, out, _ = uninterrupted
  md = open(os.path.join(out, "results.md")).read()
  rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  assert "| 80.3 | submit `vqav2/submission.json` |" in rows["VQAv2 (test-dev)"]
  assert f"| 63.7 | {_by_name(report)['gqa']['score']:.1f} |" in rows["GQA"]
  assert "| 37.6 | 60.0 |" in rows["MM-Vet"]
  assert "capped at 4 new tokens" in md
  assert json.load(open(os.path.join(out, "results.json")))["benchmarks"] == report["benchmarks"]


def test_absent_benchmarks_are_skipped_and_named(tree, engine, server, tmp_path):
  _, data = tree
  report = run_suite(engine, SUITE, SuiteOptions(
      data_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "out"), model_id="tiny",
      progress=False))
  b = _by_name(report)
  assert all(v["status"] == "skipped" for v in b.values())
  assert b["mmbench"]["note"] == "not found: mmbench/mmbench_dev_20230712.tsv"
  assert "skipped" in open(tmp_path / "out" / "results.md").read()


def _logged(out):
  """(benchmark, index) of every complete answer-log line, in file order."""
  done = []
  for path in sorted(glob.glob(os.path.join(out, "*", "answers.0-of-1.jsonl"))):
    name = os.path.basename(os.path.dirname(path))
    with open(path, "rb") as f:
      lines = f.read().split(b"\n")[:-1]  # a partial last line is not an answer
    done += [(name, json.loads(line)["index"]) for line in lines]
  return done


def _start(tree, out, server):
  run, data = tree
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=TEST_XLA_FLAGS,
             TEST_JUDGE_KEY="sk-test")
  argv = [sys.executable, "-m", "sqllava_jax.cli", "eval-suite", "--ckpt", run.ckpt,
          "--suite", SUITE, "--data", data, "--out", str(out), "--batch-size", str(BATCH),
          "--max-new-tokens", str(NEW), "--model-id", "tiny", "--judge-url", server.url,
          "--judge-model", "judge-1", "--judge-key-env", "TEST_JUDGE_KEY", "--no-progress"]
  return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)


def test_a_killed_run_continues_without_asking_twice(tree, engine, server, uninterrupted,
                                                     tmp_path, monkeypatch):
  out = tmp_path / "killed"
  proc = _start(tree, out, server)
  deadline = time.monotonic() + 240
  while len(_logged(str(out))) < 9 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  before = _logged(str(out))
  assert 0 < len(before) < NUM_QUESTIONS, "the kill should land midway"

  asked = []
  complete = engine.complete

  def spy(prompts, pixels, **kwargs):
    asked.extend(p for p in prompts if not p.endswith("USER: - ASSISTANT:"))  # not padding
    return complete(prompts, pixels, **kwargs)
  monkeypatch.setattr(engine, "complete", spy)
  report = run_suite(engine, SUITE, _options(tree, out, server))

  after = _logged(str(out))
  assert len(after) == len(set(after)) == NUM_QUESTIONS, "every question logged exactly once"
  for name in {n for n, _ in before}:  # each log keeps the lines from before the kill
    kept = [i for n, i in before if n == name]
    assert [i for n, i in after if n == name][:len(kept)] == kept, name
  assert len(asked) == NUM_QUESTIONS - len(before), "only the unanswered questions are asked"
  full, full_out, _ = uninterrupted
  for name in _by_name(full):
    assert _answers(str(out), name) == _answers(full_out, name), name
  strip = lambda r: [{k: v for k, v in b.items() if k not in ("files", "seconds")}
                     for b in r["benchmarks"]]
  assert strip(report) == strip(full)


def test_a_folder_of_another_run_is_refused(tree, engine, uninterrupted):
  _, data = tree
  _, out, _ = uninterrupted
  other = SuiteOptions(data_dir=data, out_dir=out, model_id="tiny", batch_size=BATCH,
                       max_new_tokens=NEW + 1, progress=False, only=("gqa",),
                       checkpoint=loading.checkpoint_identity(tree[0].ckpt))
  with pytest.raises(ValueError, match="holds answers of another run.*settings"):
    run_suite(engine, SUITE, other)
  assert os.path.isfile(os.path.join(out, "gqa", answer_log.RUN_FILE))


def test_eval_command_continues_a_cut_log(tree, tmp_path, monkeypatch, capsys):
  """`sqllava-jax eval` shares the resumable path: a log cut after one answer and half of
  the next (a kill mid-write) is continued, asking only the questions it lacks."""
  from sqllava_jax import cli  # pylint: disable=g-import-not-at-top
  run, _ = tree
  argv = ["eval", "--ckpt", run.ckpt, "--task", "synthetic_vqa", "--data", run.data.vqa("eval"),
          "--images", run.data.image_folder, "--out", str(tmp_path), "--no-progress",
          "--batch-size", "8", "--max-new-tokens", str(NEW)]
  assert cli.main(argv) == 0
  full = open(tmp_path / "answers.jsonl").read()
  first = json.loads(capsys.readouterr().out.splitlines()[-1])
  log = tmp_path / "answers.0-of-1.jsonl"
  lines = log.read_bytes().split(b"\n")
  log.write_bytes(lines[0] + b"\n" + lines[1][:10])
  os.remove(tmp_path / "answers.jsonl")
  asked = []
  complete = Engine.complete

  def spy(self, prompts, pixels, **kwargs):
    asked.extend(p for p in prompts if not p.endswith("USER: - ASSISTANT:"))
    return complete(self, prompts, pixels, **kwargs)
  monkeypatch.setattr(Engine, "complete", spy)
  assert cli.main(argv) == 0
  again = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert len(asked) == first["num_items"] - 1
  assert open(tmp_path / "answers.jsonl").read() == full
  assert again["accuracy"] == first["accuracy"]
  # another budget into the same folder is another run: refused, nothing lost
  assert cli.main([*argv[:-1], str(NEW + 1)]) == 2
  assert "holds answers of another run (settings differ" in capsys.readouterr().err
  assert open(tmp_path / "answers.jsonl").read() == full


def test_a_benchmark_that_cannot_be_scored_is_reported_and_the_rest_run(tree, engine, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  _, data = tree
  for name in ("gqa", "pope"):
    shutil.copytree(os.path.join(data, name), tmp_path / "eval" / name)
  with open(tmp_path / "eval" / "gqa" / "data" / "testdev_balanced_questions.json", "w") as f:
    json.dump({"999": {"answer": "no"}}, f)  # another split's ground truth
  report = run_suite(engine, SUITE, SuiteOptions(
      data_dir=str(tmp_path / "eval"), out_dir=str(tmp_path / "out"), model_id="tiny",
      batch_size=BATCH, max_new_tokens=NEW, progress=False, only=("gqa", "pope")))
  b = _by_name(report)
  assert b["gqa"]["status"] == "error" and "not in the annotations" in b["gqa"]["note"]
  assert os.path.isfile(b["gqa"]["files"]["answers"])
  assert b["pope"]["status"] == "scored"


def test_the_command_prints_the_table_and_says_what_it_wrote(tree, tmp_path, capsys):
  from sqllava_jax import cli  # pylint: disable=g-import-not-at-top
  run, data = tree
  argv = ["eval-suite", "--ckpt", run.ckpt, "--suite", SUITE, "--data", data, "--out",
          str(tmp_path), "--only", "pope", "--batch-size", "8", "--max-new-tokens",
          str(NEW), "--no-progress"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "| POPE (F1) | 87.2 |" in out and f"wrote {tmp_path}/results.md" in out
  assert cli.main([*argv, "--judge-url", "http://127.0.0.1:9/v1"]) == 2
  assert "give both --judge-url and --judge-model" in capsys.readouterr().err
  assert cli.main([*argv[:-1], "--only", "nope"]) == 2
  assert "--only names nope" in capsys.readouterr().err


def test_without_a_judge_the_judged_benchmarks_are_answered_and_written(tree, engine,
                                                                         tmp_path):
  _, data = tree
  report = run_suite(engine, SUITE, SuiteOptions(
      data_dir=data, out_dir=str(tmp_path), model_id="tiny", batch_size=BATCH,
      max_new_tokens=NEW, progress=False, only=("llava_bench", "mmvet")))
  b = _by_name(report)
  # MM-Vet's upload goes to the online evaluator, so it still has a submission file
  for name, status in (("llava_bench", "answers"), ("mmvet", "submission")):
    assert b[name]["status"] == status and "not judged" in b[name]["note"], name
    assert b[name]["score"] is None
  assert set(json.load(open(b["mmvet"]["files"]["submission"]))) == {"v1_0", "v1_1", "v1_2"}


def test_two_processes_answer_as_one(tree, uninterrupted, tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  run, data = tree
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=TEST_XLA_FLAGS)
  argv = [sys.executable, "-m", "sqllava_jax.cli", "eval-suite", "--ckpt", run.ckpt, "--suite",
          SUITE, "--data", data, "--out", str(tmp_path), "--only", "pope", "--batch-size",
          str(BATCH), "--max-new-tokens", str(NEW), "--model-id", "tiny", "--no-progress",
          "--coordinator", f"localhost:{port}", "--num-processes", "2"]
  procs = [subprocess.Popen([*argv, "--process-id", str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  _, full_out, _ = uninterrupted
  assert _answers(str(tmp_path), "pope") == _answers(full_out, "pope")
  logged = answer_log.read_logs(str(tmp_path / "pope"), 2)  # each process its share
  assert sorted(r["index"] for r in logged) == [0, 1, 2, 3]
  assert os.path.getsize(tmp_path / "pope" / "answers.1-of-2.jsonl") > 0
