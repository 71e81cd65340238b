"""benchmarks/ab.py: each side of an A/B benchmark in a worker process of its own."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import ab  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


class Counter:
  def __init__(self, start: int):
    self.value = start

  def info(self) -> dict:
    return {"pid": os.getpid(), "start": self.value}

  def add(self, n: int) -> int:
    self.value += n
    return self.value

  def fail(self) -> None:
    raise ValueError("bad step 7")


class Broken:
  def __init__(self):
    raise RuntimeError("cannot build the model")


def test_side_runs_methods_in_another_process_and_keeps_state():
  with ab.Side("counter", Counter, 5) as side:
    assert side.info["start"] == 5
    assert side.info["pid"] != os.getpid()
    assert side.call("add", 2) == 7
    assert side.call("add", 3) == 10


def test_worker_errors_come_back_with_the_workers_traceback():
  with ab.Side("counter", Counter, 0) as side:
    with pytest.raises(ab.WorkerError, match=r"(?s)counter failed.*ValueError: bad step 7"):
      side.call("fail")
    assert side.call("add", 1) == 1  # the worker survives a failed call
  with pytest.raises(ab.WorkerError, match=r"(?s)broken failed.*cannot build the model"):
    ab.Side("broken", Broken)


def test_eval_benchmark_regroups_k_consecutive_questions_on_each_image(tmp_path):
  import eval_throughput  # pylint: disable=g-import-not-at-top

  from sqllava_jax.evaluation.outputs import write_jsonl  # pylint: disable=g-import-not-at-top
  from sqllava_jax.evaluation.questions import load_questions
  source = str(tmp_path / "q.jsonl")
  write_jsonl(source, [{"question_id": i, "text": f"q{i}", "image": f"im{i // 4}.png"}
                       for i in range(12)])  # 4 questions on each of 3 images
  out = eval_throughput.regroup(source, str(tmp_path / "k.jsonl"), 1, limit=3)
  assert [q["image"] for q in load_questions(out)] == ["im0.png", "im1.png", "im2.png"]
  out = eval_throughput.regroup(source, str(tmp_path / "k.jsonl"), 2, limit=5)
  got = load_questions(out)
  assert [q["image"] for q in got] == ["im0.png", "im0.png", "im1.png", "im1.png", "im2.png"]
  assert [q["text"] for q in got] == [f"q{i}" for i in range(5)]
  with pytest.raises(SystemExit, match="4 images at 1 each; the file has 3"):
    eval_throughput.regroup(source, str(tmp_path / "k.jsonl"), 1, limit=4)
