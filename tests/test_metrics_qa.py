"""GQA exact match and ScienceQA letter parsing on hand-computed cases."""

import pytest

from sqllava_jax.evaluation.qa_metrics import gqa_accuracy, parse_choice, scienceqa_accuracy

_GQA = {
    "201307251": {"answer": "yes", "types": {"structural": "verify", "semantic": "attr"}},
    "201640614": {"answer": "left", "types": {"structural": "query", "semantic": "rel"}},
    "202225914": {"answer": "man", "types": {"structural": "query", "semantic": "obj"}},
}


def test_gqa_exact_match_after_light_normalisation():
  predictions = [
      {"question_id": "201307251", "text": "Yes."},         # lowercased, period stripped
      {"question_id": "201640614", "text": "On the left"},  # no article or phrase stripping
      {"question_id": "202225914", "text": " Man "},
  ]
  result = gqa_accuracy(predictions, _GQA)
  assert result["correct"] == 2 and result["num_questions"] == 3
  assert result["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
  assert result["per_structural_type"] == pytest.approx({"query": 0.5, "verify": 1.0})
  assert result["per_semantic_type"] == pytest.approx({"attr": 1.0, "obj": 1.0, "rel": 0.0})


def test_gqa_records_without_types():
  annotations = [{"question_id": 5, "answer": "no"}]
  result = gqa_accuracy([{"question_id": "5", "text": "no"}], annotations)
  assert result == {"accuracy": 1.0, "correct": 1, "num_questions": 1}


def test_gqa_unknown_question_names_the_id():
  with pytest.raises(ValueError, match="question_id '999'"):
    gqa_accuracy([{"question_id": "999", "text": "yes"}], _GQA)


_CHOICES = ["A cat", "a dog", "a bird"]


@pytest.mark.parametrize("text, expected", [
    ("A", 0), ("B.", 1), ("(C)", 2), ("C)", 2),
    ("A. A cat", 0), ("B) a dog", 1),
    ("The answer is C.", 2), ("the answer is (B)", 1), ("Because of X, the answer is A", 0),
    ("a cat.", 0), ("A DOG", 1),                        # the full text of one option
    ("D", None),                                        # past the last option
    ("The answer is A. No, the answer is B.", None),    # two different letters
    ("the answer is a cat", None),                      # lowercase "a" is not a letter
    ("I think it is a fish", None), ("", None),
])
def test_parse_choice(text, expected):
  assert parse_choice(text, _CHOICES) == expected


def _problem(answer, image):
  return {"question": "Which animal?", "choices": _CHOICES, "answer": answer, "image": image}


def test_scienceqa_accuracy_reports_unparsed_and_image_subset():
  problems = {"1": _problem(0, "image.png"), "2": _problem(1, "image.png"),
              "3": _problem(2, None), "4": _problem(1, None)}
  predictions = [
      {"question_id": "1", "text": "A"},                 # right, with image
      {"question_id": "2", "text": "The answer is C."},  # wrong, with image
      {"question_id": "3", "text": "C. a bird"},         # right
      {"question_id": "4", "text": "no idea"},           # unparsed, counts wrong
  ]
  result = scienceqa_accuracy(predictions, problems)
  assert result["accuracy"] == pytest.approx(0.5, abs=1e-12)
  assert result["correct"] == 2 and result["num_questions"] == 4
  assert result["img_accuracy"] == pytest.approx(0.5, abs=1e-12)
  assert result["num_img_questions"] == 2
  assert result["unparsed"] == 1 and result["unparsed_ids"] == ["4"]


def test_scienceqa_without_image_problems():
  result = scienceqa_accuracy([{"question_id": "3", "text": "C"}], {"3": _problem(2, None)})
  assert result["accuracy"] == 1.0 and result["img_accuracy"] is None


def test_scienceqa_problem_without_choices_says_what_is_missing():
  with pytest.raises(ValueError, match="'choices' and 'answer'"):
    scienceqa_accuracy([{"question_id": "1", "text": "A"}], {"1": {"question": "?"}})
