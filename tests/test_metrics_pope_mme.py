"""POPE and MME scores on hand-computed cases."""

import json

import pytest

from sqllava_jax.evaluation.mme import (
  MME_COGNITION,
  MME_PERCEPTION,
  load_mme_annotations,
  mme_scores,
  parse_yes_no_mme,
)
from sqllava_jax.evaluation.pope import (
  binary_scores,
  parse_yes_no_pope,
  pope_annotations,
  pope_scores,
)


@pytest.mark.parametrize("text, is_yes", [
    ("Yes, there is a dog in the image.", True),
    ("No, there is no dog.", False),
    ("There is not a dog in the image.", False),
    ("Yes. No cat, though.", True),             # only the first sentence counts
    ("The image shows a notebook.", True),      # "notebook" is not the word "not"
    ("No", False), ("no", False),
    ("NO", True), ("No!", True),                # the reference's exact word list
    ("", True),
])
def test_parse_yes_no_pope(text, is_yes):
  assert parse_yes_no_pope(text) is is_yes


def _pope(qid, split, label, answer):
  return ({"question_id": qid, "label": label, "category": split},
          {"question_id": qid, "text": answer})


def test_pope_scores_per_split_and_mean_f1():
  rows = [
      # random: TP, FN, FP, TN -> everything 0.5
      _pope(1, "random", "yes", "Yes"), _pope(2, "random", "yes", "No"),
      _pope(3, "random", "no", "Yes"), _pope(4, "random", "no", "No"),
      # popular: all right
      _pope(5, "popular", "yes", "Yes"), _pope(6, "popular", "no", "No."),
      # adversarial: always yes -> TP 2, FP 1: precision 2/3, recall 1, F1 0.8
      _pope(7, "adversarial", "yes", "Yes"), _pope(8, "adversarial", "yes", "Yes"),
      _pope(9, "adversarial", "no", "Yes"),
  ]
  result = pope_scores([p for _, p in rows], [a for a, _ in rows])
  random, popular, adversarial = (result["per_split"][s]
                                  for s in ("random", "popular", "adversarial"))
  assert random == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                  "yes_ratio": 0.5, "tp": 1, "fp": 1, "tn": 1, "fn": 1,
                                  "num_questions": 4})
  assert popular["f1"] == 1.0 and popular["accuracy"] == 1.0 and popular["yes_ratio"] == 0.5
  assert adversarial["precision"] == pytest.approx(2 / 3, abs=1e-12)
  assert adversarial["recall"] == 1.0
  assert adversarial["f1"] == pytest.approx(0.8, abs=1e-12)
  assert adversarial["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
  assert adversarial["yes_ratio"] == 1.0
  assert result["mean_f1"] == pytest.approx((0.5 + 1.0 + 0.8) / 3, abs=1e-12)
  assert result["num_questions"] == 9


def test_binary_scores_without_yes_answers_reports_zero_not_a_crash():
  scores = binary_scores([False, False], [True, False])
  assert scores["precision"] == 0.0 and scores["recall"] == 0.0 and scores["f1"] == 0.0
  assert scores["accuracy"] == 0.5 and scores["yes_ratio"] == 0.0


def test_pope_only_answered_splits_enter_the_mean():
  rows = [_pope(1, "popular", "yes", "Yes")]
  result = pope_scores([p for _, p in rows], [a for a, _ in rows])
  assert list(result["per_split"]) == ["popular"] and result["mean_f1"] == 1.0


def test_pope_rejects_unknown_split_and_label():
  annotation, prediction = _pope(1, "hard", "yes", "Yes")
  with pytest.raises(ValueError, match="random, popular, adversarial"):
    pope_scores([prediction], [annotation])
  annotation, prediction = _pope(1, "random", "maybe", "Yes")
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    pope_scores([prediction], [annotation])


def test_pope_unknown_question_names_the_id():
  annotation, _ = _pope(1, "random", "yes", "Yes")
  with pytest.raises(ValueError, match="question_id 77"):
    pope_scores([{"question_id": 77, "text": "Yes"}], [annotation])


def _write_lines(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_pope_annotations_pair_questions_and_label_files_in_order(tmp_path):
  questions = [
      {"question_id": 10, "image": "a.jpg", "category": "random"},
      {"question_id": 11, "image": "b.jpg", "category": "popular"},
      {"question_id": 12, "image": "c.jpg", "category": "random"},
  ]
  _write_lines(tmp_path / "questions.jsonl", questions)
  (tmp_path / "labels").mkdir()
  _write_lines(tmp_path / "labels" / "coco_pope_random.json",
               [{"question_id": 1, "image": "a.jpg", "label": "yes"},
                {"question_id": 2, "image": "c.jpg", "label": "no"}])
  _write_lines(tmp_path / "labels" / "coco_pope_popular.json",
               [{"question_id": 1, "image": "b.jpg", "label": "no"}])
  annotations = pope_annotations(tmp_path / "questions.jsonl", tmp_path / "labels")
  assert annotations == {"10": {"label": "yes", "category": "random"},
                         "11": {"label": "no", "category": "popular"},
                         "12": {"label": "no", "category": "random"}}
  with pytest.raises(ValueError, match="question_id 12 shows 'c.jpg'"):
    pope_annotations(questions, {"random": [{"image": "a.jpg", "label": "yes"},
                                            {"image": "x.jpg", "label": "no"}]})


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No.", "no"), ("yes, it is", "yes"), ("  no", "no"),
    ("Not really", "no"),                 # "no" within the first four characters
    ("The answer is yes", "other"),       # only the first four characters are read
    ("I don't know", "other"),
])
def test_parse_yes_no_mme(text, parsed):
  assert parse_yes_no_mme(text) == parsed


_HINT = " Please answer yes or no."


def _mme(category, image, question, answer, text):
  annotation = {"category": category, "image": image, "question": question + _HINT,
                "answer": answer}
  prediction = {"question_id": f"{category}/{image}.jpg", "prompt": question + _HINT,
                "text": text}
  return annotation, prediction


def test_mme_scores_accuracy_plus_and_category_sums():
  rows = [
      # existence: 3 of 4 questions right (0.75), 1 of 2 images fully right (0.5) -> 125
      _mme("existence", "1", "Is there a dog?", "Yes", "Yes"),
      _mme("existence", "1", "Is there a cat?", "No", "No"),
      _mme("existence", "2", "Is there a car?", "Yes", "Yes"),
      _mme("existence", "2", "Is there a bus?", "No", "Yes"),
      # code_reasoning: both wrong, one unparseable -> 0
      _mme("code_reasoning", "7", "Does it print 3?", "Yes", "No"),
      _mme("code_reasoning", "7", "Does it print 4?", "No", "It prints 3"),
  ]
  result = mme_scores([p for _, p in rows], [a for a, _ in rows])
  existence = result["per_subtask"]["existence"]
  assert existence == pytest.approx({"accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0,
                                     "num_questions": 4, "num_images": 2, "other": 0})
  assert result["per_subtask"]["code_reasoning"]["score"] == 0.0
  assert result["per_subtask"]["code_reasoning"]["other"] == 1
  assert result["perception"] == pytest.approx(125.0, abs=1e-9)
  assert result["cognition"] == 0.0
  assert len(result["missing_subtasks"]) == len(MME_PERCEPTION) + len(MME_COGNITION) - 2
  assert "existence" not in result["missing_subtasks"]


def test_mme_needs_both_questions_of_an_image():
  annotation, prediction = _mme("color", "1", "Is it red?", "Yes", "Yes")
  with pytest.raises(ValueError, match="color/1 has 1 answered question"):
    mme_scores([prediction], [annotation])


def test_mme_unknown_question_names_the_id():
  annotation, _ = _mme("color", "1", "Is it red?", "Yes", "Yes")
  _, prediction = _mme("color", "1", "Is it blue?", "Yes", "Yes")
  with pytest.raises(ValueError, match="'color/1.jpg'.*Is it blue"):
    mme_scores([prediction], [annotation])


def test_mme_rejects_unknown_subtask():
  rows = [_mme("smell", "1", "Q1?", "Yes", "Yes"), _mme("smell", "1", "Q2?", "No", "No")]
  with pytest.raises(ValueError, match="unknown subtask 'smell'.*existence"):
    mme_scores([p for _, p in rows], [a for a, _ in rows])


def test_load_mme_annotations_and_llava_prompts(tmp_path):
  # A subtask with images/ + questions_answers_YN/, and one with the .txt beside the image.
  (tmp_path / "artwork" / "images").mkdir(parents=True)
  (tmp_path / "artwork" / "questions_answers_YN").mkdir()
  (tmp_path / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
      "Is this by Monet?  Please answer yes or no.\tYes\n"
      "Is this by Dali? Please answer yes or no.\tNo\n")
  (tmp_path / "OCR").mkdir()
  (tmp_path / "OCR" / "0001.jpg").write_bytes(b"")
  (tmp_path / "OCR" / "0001.txt").write_text(
      "Is the word 'stop'? Please answer yes or no.\tYes\n"
      "Is the word 'go'? Please answer yes or no.\tNo\n")
  annotations = load_mme_annotations(tmp_path)
  assert len(annotations) == 4
  assert annotations[0] == {"category": "OCR", "image": "0001",
                            "question": "Is the word 'stop'? Please answer yes or no.",
                            "answer": "Yes"}
  short = "Answer the question using a single word or phrase."
  predictions = [
      # LLaVA's prompt: the short-answer hint instead of the yes/no one, single spaces.
      {"question_id": "artwork/10002.jpg", "prompt": f"Is this by Monet?\n{short}", "text": "Yes"},
      {"question_id": "artwork/10002.jpg", "prompt": "Is this by Dali? Please answer yes or no.",
       "text": "Yes"},
      {"question_id": "OCR/0001.jpg", "prompt": "Is the word 'stop'? Please answer yes or no.",
       "text": "Yes"},
      {"question_id": "OCR/0001.jpg", "prompt": "Is the word 'go'? Please answer yes or no.",
       "text": "No"},
  ]
  result = mme_scores(predictions, annotations)
  assert result["per_subtask"]["artwork"]["score"] == pytest.approx(50.0, abs=1e-9)
  assert result["per_subtask"]["OCR"]["score"] == pytest.approx(200.0, abs=1e-9)
  assert result["perception"] == pytest.approx(250.0, abs=1e-9)
