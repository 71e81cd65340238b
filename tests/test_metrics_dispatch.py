"""The `score` dispatcher: task names, files on disk, registration."""

import json

import pytest

from sqllava_jax.evaluation import tasks

KNOWN = ("vqav2", "vizwiz", "textvqa", "gqa", "scienceqa", "pope", "mme", "caption", "mmbench",
         "seed_bench")


def test_known_tasks():
  assert tuple(tasks.BENCHMARK_TASKS) == KNOWN


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown task 'vqa3'; choose one of " + ", ".join(KNOWN)):
    tasks.score("vqa3", [{"question_id": 1, "text": "yes"}], {})


def _answers(rows):
  return [{"question_id": qid, "prompt": "Q?", "text": text, "answer_id": f"a{i}",
           "model_id": "tiny"} for i, (qid, text) in enumerate(rows)]


def test_score_reads_answers_jsonl_and_annotation_json(tmp_path):
  answers = tmp_path / "answers.jsonl"
  answers.write_text("".join(json.dumps(r) + "\n" for r in _answers([("1", "Yes."), ("2", "no")])))
  annotations = tmp_path / "testdev_balanced_questions.json"
  annotations.write_text(json.dumps({"1": {"answer": "yes"}, "2": {"answer": "yes"}}))
  result = tasks.score("gqa", answers, annotations)
  assert result == {"task": "gqa", "accuracy": 0.5, "correct": 1, "num_questions": 2}


def test_score_reads_jsonl_annotations(tmp_path):
  annotations = tmp_path / "pope.jsonl"
  annotations.write_text(json.dumps({"question_id": 3, "label": "no", "category": "random"}) + "\n")
  result = tasks.score("pope", _answers([(3, "No, there is none.")]), str(annotations))
  assert result["task"] == "pope" and result["mean_f1"] == 0.0
  assert result["per_split"]["random"]["accuracy"] == 1.0


def test_score_reads_the_mme_folder(tmp_path):
  (tmp_path / "scene").mkdir()
  (tmp_path / "scene" / "0001.txt").write_text(
      "Is it a beach? Please answer yes or no.\tYes\n"
      "Is it a forest? Please answer yes or no.\tNo\n")
  predictions = [
      {"question_id": "scene/0001.jpg", "prompt": "Is it a beach? Please answer yes or no.",
       "text": "Yes"},
      {"question_id": "scene/0001.jpg", "prompt": "Is it a forest? Please answer yes or no.",
       "text": "Yes"},
  ]
  result = tasks.score("mme", predictions, tmp_path)
  assert result["per_subtask"]["scene"]["score"] == pytest.approx(50.0, abs=1e-9)


def test_empty_answers_file_is_an_error(tmp_path):
  answers = tmp_path / "answers.jsonl"
  answers.write_text("")
  with pytest.raises(ValueError, match="gqa: no predictions to score"):
    tasks.score("gqa", answers, {"1": {"answer": "yes"}})


def test_missing_annotation_file_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    tasks.score("gqa", _answers([("1", "yes")]), tmp_path / "missing.json")


def test_register_task(monkeypatch):
  monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
  tasks.register_task("count", lambda predictions, annotations: {"n": len(predictions)})
  assert tasks.score("count", _answers([(1, "a"), (2, "b")]), {}) == {"task": "count", "n": 2}
  with pytest.raises(ValueError, match="'gqa' is already registered"):
    tasks.register_task("gqa", lambda predictions, annotations: {})
