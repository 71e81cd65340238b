"""Bad evaluation inputs: every kind skipped and counted in the result (per reason, the first
ids), never a crash midway, or `--strict` stopping at the record and naming it; and LLaVA's
ScienceQA file asked as the reference's model_vqa_science.py asks it."""

import json
import os
import shutil

import pytest

from sqllava_jax import cli
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.suite import SuiteOptions, run_suite
from sqllava_jax.training.checkpoint import load_model
from tests.eval_helpers import make_tiny_run, spy_prompts
from tests.eval_suite_data import make_eval_tree

NEW = 4
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("tiny_inputs")))


@pytest.fixture
def images(run, tmp_path):
  """An image folder: two good images, a damaged one, an empty one; a file beside it."""
  folder = tmp_path / "images"
  folder.mkdir()
  for name in ("eval_000000.png", "eval_000001.png"):
    shutil.copy(os.path.join(run.data.image_folder, name), folder / name)
  good = (folder / "eval_000000.png").read_bytes()
  (folder / "cut.png").write_bytes(good[:len(good) // 3])  # truncated mid-file
  (folder / "empty.png").write_bytes(b"")
  shutil.copy(folder / "eval_000000.png", tmp_path / "outside.png")
  return str(folder)


def write_jsonl(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  return str(path)


def eval_argv(run, data, images, out, *extra):
  return ["eval", "--ckpt", run.ckpt, "--task", "pope", "--data", data, "--images", images,
          "--out", str(out), "--no-progress", "--batch-size", "8", "--max-new-tokens", str(NEW),
          *extra]


def last_json(capsys):
  return json.loads(capsys.readouterr().out.splitlines()[-1])


BAD_FILE = [
    {"question_id": "good", "image": "eval_000000.png", "text": "Is there a circle?"},
    {"question_id": "missing", "image": "nope.png", "text": "Is there a circle?"},
    {"question_id": "cut", "image": "cut.png", "text": "Is there a circle?"},
    {"question_id": "empty", "image": "empty.png", "text": "Is there a circle?"},
    {"question_id": "outside", "image": "../outside.png", "text": "Is there a circle?"},
    {"question_id": "absolute", "image": "/etc/passwd", "text": "Is there a circle?"},
    {"question_id": "no_text", "image": "eval_000000.png"},
    "{this line is not JSON",
    [1, 2],
    {"question_id": "good", "image": "eval_000000.png", "text": "Is there a circle?"},  # repeat
    # the same id with another question (MME, TextVQA): a question of its own
    {"question_id": "good", "image": "eval_000000.png", "text": "Is there a square?"},
    {"question_id": "text_only", "text": "Is the sky blue?"},
]


def test_every_kind_of_bad_question_is_skipped_and_counted(run, images, tmp_path, capsys):
  data = write_jsonl(tmp_path / "q.jsonl", BAD_FILE)
  assert cli.main(eval_argv(run, data, images, tmp_path / "out")) == 0
  result = last_json(capsys)
  answers = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
  assert [(a["question_id"], a["prompt"]) for a in answers] == [
      ("good", "Is there a circle?"), ("good", "Is there a square?"),
      ("text_only", "Is the sky blue?")]
  assert result["skipped_by_reason"] == {
      "missing_image": 1, "corrupt_image": 1, "empty_image_file": 1, "unsafe_image_path": 2,
      "malformed_question": 3, "duplicate_question": 1}
  assert result["skipped"] == 9 and result["num_items"] == len(BAD_FILE)
  # the first five in file order; records without an id are named by their line's index
  assert result["skipped_first"] == ["missing", "cut", "empty", "outside", "absolute"]
  assert result["skip_summary"].startswith("skipped 9 records (75.0% of 12 read)")
  # a rerun neither asks again nor tries the bad images again, and reports the same
  assert cli.main(eval_argv(run, data, images, tmp_path / "out")) == 0
  again = last_json(capsys)
  assert {k: again[k] for k in ("skipped", "skipped_by_reason", "skipped_first")} == \
         {k: result[k] for k in ("skipped", "skipped_by_reason", "skipped_first")}


@pytest.mark.parametrize("record, named", [
    ({"question_id": "no_text", "image": "eval_000000.png"}, "record 'no_text', index 1"),
    ({"question_id": "missing", "image": "nope.png", "text": "Hi?"},
     "record 'missing', index 1"),
    ({"question_id": "outside", "image": "../outside.png", "text": "Hi?"},
     "record 'outside', index 1"),
])
def test_strict_stops_at_the_record_and_names_it(run, images, tmp_path, capsys, record, named):
  data = write_jsonl(tmp_path / "q.jsonl", [BAD_FILE[0], record])
  assert cli.main(eval_argv(run, data, images, tmp_path / "out", "--strict")) == 2
  err = capsys.readouterr().err
  assert "sqllava-jax eval: error: [" in err and named in err, err
  assert not os.path.exists(tmp_path / "out" / "answers.jsonl"), "no merged answers written"


def test_scienceqa_file_asks_each_problem(run, images, tmp_path, capsys, monkeypatch):
  """LLaVA's llava_test_CQM-I.json layout; the prompts model_vqa_science.py builds with
  --single-pred-prompt, written out: the first human turn with <image> taken out and
  stripped, '<image>\\n' in front when the problem has an image, the answer-format line
  after it on a new line; the answers file records the same text as `prompt`."""
  suffix = "Answer with the option's letter from the given choices directly."
  problems = [
      {"id": "4", "image": "eval_000001.png", "conversations": [
          {"from": "human", "value": "<image>\nContext: A shape.\nWhich shape is it?\n"
                                     "Options: (A) circle (B) square"},
          {"from": "gpt", "value": "A"}]},
      {"id": "9", "conversations": [
          {"from": "human", "value": "Which is a mammal?\nOptions: (A) cat (B) trout "},
          {"from": "gpt", "value": "A"}]},
  ]
  data = tmp_path / "llava_test_CQM-I.json"
  data.write_text(json.dumps(problems))
  sent = spy_prompts(monkeypatch, lambda p, _: not p.endswith("USER: - ASSISTANT:"))
  argv = ["eval", "--ckpt", run.ckpt, "--task", "scienceqa", "--data", str(data), "--images",
          images, "--out", str(tmp_path / "out"), "--no-progress", "--batch-size", "8",
          "--max-new-tokens", str(NEW), "--prompt-suffix", suffix]
  assert cli.main(argv) == 0
  q4 = f"Context: A shape.\nWhich shape is it?\nOptions: (A) circle (B) square\n{suffix}"
  q9 = f"Which is a mammal?\nOptions: (A) cat (B) trout\n{suffix}"
  assert sent == [f"{VICUNA} USER: <image>\n{q4} ASSISTANT:", f"{VICUNA} USER: {q9} ASSISTANT:"]
  answers = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
  assert [(a["question_id"], a["prompt"]) for a in answers] == [("4", f"<image>\n{q4}"),
                                                                ("9", q9)]


def test_eval_suite_counts_them_per_benchmark(run, tmp_path):
  """eval-suite shares the path: LLaVA's ScienceQA file with its one image gone, a repeated
  problem and a record without conversations; counted in the benchmark's `skipped` and its
  note, the other problem answered; strict, the run stops naming the first bad record."""
  data = make_eval_tree(str(tmp_path / "eval"),
                        [os.path.join(run.data.image_folder, "eval_000000.png")])
  os.remove(os.path.join(data, "scienceqa", "images", "test", "7", "image.png"))
  path = os.path.join(data, "scienceqa", "llava_test_CQM-A.json")
  with open(path) as f:
    problems = json.load(f)
  with open(path, "w") as f:
    json.dump(problems + [problems[1], {"id": "9"}], f)
  model, _ = load_model(run.ckpt)
  engine = Engine(model, Tokenizer(run.data.tokenizer))
  suite = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "eval", "paper.yaml")
  options = lambda out, strict: SuiteOptions(
      data_dir=data, out_dir=str(tmp_path / out), model_id="tiny", batch_size=2,
      max_new_tokens=NEW, only=("scienceqa",), progress=False, strict=strict)
  [b] = run_suite(engine, suite, options("out", False))["benchmarks"]
  assert b["skipped"]["skipped_by_reason"] == {"missing_image": 1, "duplicate_question": 1,
                                               "malformed_question": 1}
  assert b["skipped"]["skipped_first"] == ["7", "8", "9"]
  assert b["note"].startswith("skipped 3 records (75.0% of 4 read)")
  answers = [json.loads(line) for line in open(tmp_path / "out" / "scienceqa" / "answers.jsonl")]
  assert [a["question_id"] for a in answers] == ["8"]
  with pytest.raises(BadRecord, match=r"\[duplicate_question\] record '8', index 2"):
    run_suite(engine, suite, options("strict", True))
