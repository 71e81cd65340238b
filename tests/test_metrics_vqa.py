"""VQAv2 / VizWiz / TextVQA accuracy on hand-computed cases."""

import pytest

from sqllava_jax.evaluation import vqa_metrics as vqa


@pytest.mark.parametrize("text, official, evalai", [
    ("Two dogs.", "2 dogs", "2 dogs"),
    ("t-shirt", "t shirt", "t shirt"),           # a mark inside a word becomes a space
    ("yes !", "yes", "yes"),                     # a mark touching a space is deleted
    ("1,000", "1000", "1000"),                   # digit-comma-digit: every mark deleted
    ("3.5", "3.5", "3.5"),                       # a period before a digit stays
    ("no.", "no", "no"),
    ("The answer: none", "answer: 0", "answer: 0"),  # ':' is not in the official list
    ("dont", "don't", "don't"),                  # contractions restored
    ("A man's hat", "man's hat", "man 's hat"),  # EvalAI splits the possessive off
    ("Is it\nred?", "is it red", "is it red"),
    ("(cat)", "cat", "cat"),
    ("ten,five", "10 5", "tenfive"),             # official: a space; EvalAI drops commas first
    ("an apple\t", "apple", "apple"),
])
def test_answer_normalisation(text, official, evalai):
  assert vqa.normalize_answer(text) == official
  assert vqa.normalize_answer_evalai(text) == evalai


@pytest.mark.parametrize("agreeing, expected", [
    # Leaving out one of 10 humans: with k agreeing, the k left-out agreeing humans give
    # min((k-1)/3, 1) and the 10-k others min(k/3, 1).
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0),
])
def test_soft_score_ten_humans(agreeing, expected):
  humans = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
  assert vqa.vqa_soft_score("cat", humans) == pytest.approx(expected, abs=1e-12)


def test_soft_score_needs_humans():
  with pytest.raises(ValueError, match="at least one human answer"):
    vqa.vqa_soft_score("cat", [])


def test_vqav2_normalises_only_when_humans_disagree():
  # Unanimous humans: the answer (after the EvalAI step) must equal them as written.
  assert vqa.vqav2_soft_score("t-shirt", ["t-shirt"] * 10) == 0.0
  assert vqa.vqav2_soft_score("Yes.", ["yes"] * 10) == 1.0
  # Disagreeing humans: both sides normalised, "t-shirt" -> "t shirt" on both.
  assert vqa.vqav2_soft_score("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
  assert vqa.vqav2_soft_score("Two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6, abs=1e-12)


def _vqav2_annotation(qid, humans, answer_type):
  answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
             for i, a in enumerate(humans)]
  return {"question_id": qid, "answers": answers, "answer_type": answer_type,
          "question_type": "what"}


def test_vqav2_accuracy_per_answer_type():
  annotations = {"annotations": [
      _vqav2_annotation(1, ["yes"] * 10, "yes/no"),
      _vqav2_annotation(2, ["2"] * 2 + ["3"] * 8, "number"),
      _vqav2_annotation(3, ["red"] * 10, "other"),
  ]}
  predictions = [{"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "two"},
                 {"question_id": 3, "text": "blue"}]
  result = vqa.vqav2_accuracy(predictions, annotations)
  assert result["num_questions"] == 3
  assert result["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3, abs=1e-12)
  assert result["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.0, "yes/no": 1.0})


def test_vqav2_question_ids_match_across_types():
  annotations = [_vqav2_annotation(7, ["yes"] * 10, "yes/no")]
  result = vqa.vqav2_accuracy([{"question_id": "7", "text": "yes"}], annotations)
  assert result["accuracy"] == 1.0


def test_vqav2_unknown_question_names_the_id():
  annotations = [_vqav2_annotation(1, ["yes"] * 10, "yes/no")]
  with pytest.raises(ValueError, match="question_id 42"):
    vqa.vqav2_accuracy([{"question_id": 42, "text": "yes"}], annotations)


def test_vqav2_duplicate_answer_is_an_error():
  annotations = [_vqav2_annotation(1, ["yes"] * 10, "yes/no")]
  predictions = [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}]
  with pytest.raises(ValueError, match="answered twice"):
    vqa.vqav2_accuracy(predictions, annotations)


def test_empty_predictions_are_an_error():
  with pytest.raises(ValueError, match="no predictions"):
    vqa.vqav2_accuracy([], [_vqav2_annotation(1, ["yes"] * 10, "yes/no")])


def test_answer_record_without_text_is_an_error():
  with pytest.raises(ValueError, match="'question_id' and 'text'"):
    vqa.vqav2_accuracy([{"question_id": 1, "answer": "yes"}], [])


def test_vizwiz_keys_by_image_and_keeps_human_answers_as_written():
  annotations = [
      {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other",
       "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 5
                  + [{"answer": "blue", "answer_confidence": "maybe"}] * 5},
      {"image": "VizWiz_val_00000001.jpg", "question": "Is it on?", "answer_type": "yes/no",
       "answers": [{"answer": "Yes", "answer_confidence": "yes"}] * 10},
  ]
  predictions = [{"question_id": "VizWiz_val_00000000.jpg", "text": "Unanswerable."},
                 {"question_id": "VizWiz_val_00000001.jpg", "text": "Yes"}]
  result = vqa.vizwiz_accuracy(predictions, annotations)
  # The second answer normalises to "yes", which the unprocessed human "Yes" does not equal.
  assert result["accuracy"] == pytest.approx(0.5, abs=1e-12)
  assert result["per_answer_type"] == pytest.approx({"other": 1.0, "yes/no": 0.0})


def test_vizwiz_unknown_image_names_it():
  annotations = [{"image": "a.jpg", "answers": [{"answer": "x"}] * 10, "answer_type": "other"}]
  with pytest.raises(ValueError, match="'b.jpg'"):
    vqa.vizwiz_accuracy([{"question_id": "b.jpg", "text": "x"}], annotations)


_TEXTVQA = {"data": [
    {"question_id": 101, "image_id": "003a8ae2ef43b901", "question": "What brand is this?",
     "answers": ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7},
    {"question_id": 102, "image_id": "003a8ae2ef43b901", "question": "What colour is it?",
     "answers": ["red"] * 10},
]}


def test_textvqa_normalises_both_sides():
  # EvalAI turns "Coca-Cola" into "coca cola": 3 humans agree with the answer -> 0.9.
  predictions = [{"question_id": 101, "text": "Coca cola"}, {"question_id": 102, "text": "Red."}]
  result = vqa.textvqa_accuracy(predictions, _TEXTVQA)
  assert result == {"accuracy": pytest.approx((0.9 + 1.0) / 2, abs=1e-12), "num_questions": 2}


def test_textvqa_llava_layout_matches_image_and_question():
  ocr = ("What colour is it?\nReference OCR token: Coke, Zero\n"
         "Answer the question using a single word or phrase.")
  plain = "What brand is this?\nAnswer the question using a single word or phrase."
  predictions = [{"question_id": "003a8ae2ef43b901", "prompt": ocr, "text": "red"},
                 {"question_id": "003a8ae2ef43b901", "prompt": plain, "text": "pepsi"}]
  result = vqa.textvqa_accuracy(predictions, _TEXTVQA["data"])
  assert result["accuracy"] == pytest.approx(1.0, abs=1e-12)


def test_textvqa_unknown_question_names_id_and_question():
  prompt = "Who made it?\nAnswer the question using a single word or phrase."
  with pytest.raises(ValueError, match="'003a8ae2ef43b901'.*who made it"):
    vqa.textvqa_accuracy([{"question_id": "003a8ae2ef43b901", "prompt": prompt, "text": "x"}],
                         _TEXTVQA)


@pytest.mark.parametrize("prompt, question", [
    ("What is it?\nAnswer briefly.", "what is it?"),
    ("Q?\nReference OCR token: a, b\nAnswer briefly.", "q?"),
    ("Reference OCR token: a\nQ?\nAnswer briefly.", "q?"),
    ("OCR tokens: a b Question: Which one? Short answer:", "which one?"),
])
def test_textvqa_question_from_prompt(prompt, question):
  assert vqa.textvqa_question_from_prompt(prompt) == question


def test_textvqa_question_from_unknown_prompt_layout():
  with pytest.raises(ValueError, match="cannot find the question"):
    vqa.textvqa_question_from_prompt("just one line")
