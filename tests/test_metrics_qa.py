"""GQA exact match and ScienceQA letter parsing (official and lenient) on hand-computed cases."""

import pytest

from sqllava_jax.evaluation.qa_metrics import (
  gqa_accuracy,
  parse_choice,
  parse_choice_official,
  scienceqa_accuracy,
)

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


# Worked out by hand from llava/eval/eval_science_qa.py: the text as written is one of A-E,
# or starts with a letter of A-E then ". ", or holds "The answer is " + capital + any one
# character exactly once; the letter must be among the problem's choices (get_pred_idx).
@pytest.mark.parametrize("text, official, lenient", [
    ("A", 0, 0), ("C", 2, 2),
    ("B.", None, 1),                          # two characters: neither rule, no phrase
    ("(B)", None, 1), ("B) a dog", None, 1),  # ") " is not ". "
    ("B. a dog", 1, 1), ("B. ", 1, 1),
    ("A. B. The answer is C.", 0, 0),         # the "X. " rule comes before the phrase
    ("a dog", None, 1), ("A DOG", None, 1),   # an option's text
    ("The answer is B.", 1, 1), ("Because of X, The answer is C.", 2, 2),
    ("The answer is B. The answer is B.", None, 1),  # the phrase twice
    ("The answer is A. Or the answer is B.", 0, None),  # lowercase "the" is no phrase officially
    ("The answer is B", None, 1),             # the pattern needs one more character
    ("The answer is Bob", 1, None),           # ... any character: "Bob" reads as B
    ("The answer is (B).", None, 1),
    ("the answer is B.", None, 1),            # case-sensitive
    (" B", None, 1), ("B\n", None, 1),        # no stripping
    ("D", None, None), ("The answer is E.", None, None),  # past the last of three choices
    ("F", None, None),                        # not one of the five options
    ("I think it is a fish", None, None), ("", None, None),
])
def test_parse_choice_official_and_lenient(text, official, lenient):
  assert parse_choice_official(text, len(_CHOICES)) == official
  assert parse_choice(text, _CHOICES) == lenient


@pytest.mark.parametrize("text, expected", [
    ("C)", 2), ("the answer is (B)", 1), ("Because of X, the answer is A", 0), ("a cat.", 0),
    ("The answer is A. No, the answer is B.", None),    # two different letters
    ("the answer is a cat", None),                      # lowercase "a" is not a letter
])
def test_parse_choice_lenient_more(text, expected):
  assert parse_choice(text, _CHOICES) == expected


def test_sixth_choice_can_never_be_picked_officially():
  # The official options are A-E only.
  assert parse_choice_official("F", 6) is None and parse_choice_official("E", 6) == 4
  assert parse_choice("F", ["1", "2", "3", "4", "5", "6"]) == 5


def _problem(answer, image):
  return {"question": "Which animal?", "choices": _CHOICES, "answer": answer, "image": image}


def _answer(qid, text, image):
  prompt = ("<image>\n" if image else "") + "Which animal?\nA. A cat\nB. a dog\nC. a bird"
  return {"question_id": qid, "text": text, "prompt": prompt}


_PROBLEMS = {"1": _problem(0, "image.png"), "2": _problem(1, "image.png"),
             "3": _problem(2, None), "4": _problem(1, None), "5": _problem(0, "image.png")}
_ANSWERS = [
    _answer("1", "A", True),                 # right, IMG
    _answer("2", "(B)", True),               # FAILED officially, right leniently, IMG
    _answer("3", "C. a bird", False),        # right
    _answer("4", "no idea", False),          # FAILED for both
]


def test_scienceqa_official_accuracy_and_failed():
  result = scienceqa_accuracy(_ANSWERS, _PROBLEMS)
  assert result["accuracy"] == pytest.approx(2 / 4, abs=1e-12)
  assert result["correct"] == 2 and result["num_questions"] == 4
  assert result["img_accuracy"] == pytest.approx(1 / 2, abs=1e-12)
  assert result["num_img_questions"] == 2
  assert result["failed"] == 2 and result["failed_ids"] == ["2", "4"]
  assert result["unanswered"] == 0
  assert not any(k.startswith("lenient") for k in result)


def test_scienceqa_lenient_keys_beside_the_official_ones():
  result = scienceqa_accuracy(_ANSWERS, _PROBLEMS, lenient=True)
  assert result["accuracy"] == pytest.approx(2 / 4, abs=1e-12)        # official, unchanged
  assert result["lenient_accuracy"] == pytest.approx(3 / 4, abs=1e-12)
  assert result["lenient_correct"] == 3
  assert result["lenient_img_accuracy"] == pytest.approx(2 / 2, abs=1e-12)
  assert result["lenient_failed_ids"] == ["4"]


def test_scienceqa_split_counts_unanswered_as_failed():
  # As eval_science_qa.py iterates over the split: problem 5 has no answer, is FAILED and in
  # the denominator, but (its prompt being 'Unknown') not in the IMG subset.
  result = scienceqa_accuracy(_ANSWERS, _PROBLEMS, split_ids=["1", "2", "3", "4", "5"],
                              lenient=True)
  assert result["accuracy"] == pytest.approx(2 / 5, abs=1e-12)
  assert result["num_questions"] == 5 and result["unanswered"] == 1
  assert result["failed_ids"] == ["2", "4", "5"]
  assert result["num_img_questions"] == 2
  assert result["img_accuracy"] == pytest.approx(1 / 2, abs=1e-12)
  assert result["lenient_accuracy"] == pytest.approx(3 / 5, abs=1e-12)


def test_scienceqa_answer_outside_the_split_is_an_error():
  with pytest.raises(ValueError, match="problem '4' was answered but is not in the split"):
    scienceqa_accuracy(_ANSWERS, _PROBLEMS, split_ids=["1", "2", "3"])


def test_scienceqa_img_subset_from_the_prompt():
  # The official IMG flag is '<image>' in the answer's prompt; without a prompt, the problem's
  # image decides.
  answers = [{"question_id": "1", "text": "A", "prompt": "no image token"},
             {"question_id": "2", "text": "B"}]
  result = scienceqa_accuracy(answers, _PROBLEMS)
  assert result["num_img_questions"] == 1 and result["img_accuracy"] == 1.0


def test_scienceqa_without_image_problems():
  result = scienceqa_accuracy([{"question_id": "3", "text": "C"}], {"3": _problem(2, None)})
  assert result["accuracy"] == 1.0 and result["img_accuracy"] is None


def test_scienceqa_problem_without_choices_says_what_is_missing():
  with pytest.raises(ValueError, match="'choices' and 'answer'"):
    scienceqa_accuracy([{"question_id": "1", "text": "A"}], {"1": {"question": "?"}})


def test_score_dispatch_is_official_by_default():
  from sqllava_jax.evaluation import tasks
  result = tasks.score("scienceqa", [_answer("2", "(B)", True)], _PROBLEMS)
  assert result["accuracy"] == 0.0 and result["failed_ids"] == ["2"]
  assert not any(k.startswith("lenient") for k in result)
