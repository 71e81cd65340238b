"""VQAv2 / VizWiz / TextVQA accuracy on hand-computed cases."""

import pytest

from sqllava_jax.evaluation import vqa_metrics as vqa

C = "\u2019"  # the curly apostrophe of the VizWiz table
DOTS_40 = "yes" + "." * 40


# Expected values worked out by hand from the official files: vqaEval.py (GT-Vision-Lab/VQA,
# 2021), EvalAIAnswerProcessor (LLaVA llava/eval/m4c_evaluator.py) and the VizWiz API's
# vqaEval.py (pre-2016 contraction table).
@pytest.mark.parametrize("text, vqa_, evalai, vizwiz", [
    ("Two dogs.", "2 dogs", "2 dogs", "2 dogs"),
    ("YES", "yes", "yes", "yes"),                            # mixed case
    ("t-shirt", "t shirt", "t shirt", "t shirt"),             # a mark inside a word: a space
    ("yes !", "yes", "yes", "yes"),                           # a mark beside a space: deleted
    ("x -y", "x y", "x y", "x y"),
    ("cat (black)", "cat black", "cat black", "cat black"),  # "(" deleted, ")" spaced
    ("(cat)", "cat", "cat", "cat"), ("@home", "home", "home", "home"),
    ("1,000", "1000", "1000", "1000"),                        # digit-comma-digit: all deleted
    ("1, 2", "1 2", "1 2", "1 2"),
    ("ten,five", "10 5", "tenfive", "10 5"),                  # EvalAI deletes commas first
    ("3.5", "3.5", "3.5", "3.5"), ("1.5.6", "1.5.6", "1.5.6", "1.5.6"),
    ("no.", "no", "no", "no"), ("5..", "5", "5", "5"), ("a.b.c", "abc", "abc", "abc"),
    ("The answer: none", "answer: 0", "answer: 0", "answer: 0"),  # ':' is no listed mark
    ("zero", "0", "0", "0"), ("eleven", "eleven", "eleven", "eleven"),
    ("an apple\t", "apple", "apple", "apple"), ("a the an", "", "", ""), ("", "", "", ""),
    ("Is it\nred?", "is it red", "is it red", "is it red"),  # EvalAI deletes "?" first
    ("dont", "don't", "don't", f"don{C}t"),                   # contractions without apostrophe
    ("isnt", "isn't", "isn't", f"isn{C}t"), ("whats", "what's", "what's", f"what{C}s"),
    ("wheres", "where's", "where's", "where's"),              # kept straight in the VizWiz table
    ("aint", "ain't", "ain't", "ain't"),
    ("couldn'tve", "couldn't've", "couldn't've", f"couldn{C}t{C}ve"),  # a straight VizWiz key
    (f"he{C}dve", f"he{C}dve", f"he{C}dve", f"he{C}d{C}ve"),  # a curly VizWiz key
    ("he'dve", "he'd've", "he'd've", "he'dve"),
    ("Im", "im", "im", "im"),                                 # capitalised keys never match
    ("somebody'd", "somebodyd", "somebodyd", "somebody'd"),   # the table's reversed entry
    ("A man's hat", "man's hat", "man 's hat", "man's hat"),  # EvalAI splits "'s" off
    ("What's", "what's", "what 's", "what's"),
    ("yes" + "." * 32, "yes", "yes", "yes"),
    (DOTS_40, "yes" + "." * 8, "yes" + "." * 8, "yes" + "." * 8),  # re.UNICODE = 32 as count
])
def test_answer_normalisation(text, vqa_, evalai, vizwiz):
  assert vqa.normalize_answer(text) == vqa_
  assert vqa.normalize_answer_evalai(text) == evalai
  assert vqa.normalize_answer_vizwiz(text) == vizwiz


@pytest.mark.parametrize("agreeing, expected", [
    # Leaving out one of 10 humans: with k agreeing, the k left-out agreeing humans give
    # min((k-1)/3, 1) and the 10-k others min(k/3, 1).
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0),
])
def test_soft_score_ten_humans(agreeing, expected):
  humans = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
  assert vqa.vqa_soft_score("cat", humans) == pytest.approx(expected, abs=1e-12)


def test_soft_score_of_repeats_three_ways():
  # Ten answers, "cat" three times among seven others that repeat too: 3 x 2/3 + 7 x 1 = 0.9.
  humans = ["cat", "dog", "cat", "dog", "dog", "cat", "cow", "cow", "dog", "dog"]
  assert vqa.vqa_soft_score("cat", humans) == pytest.approx(0.9, abs=1e-12)
  assert vqa.vqa_soft_score("dog", humans) == pytest.approx(1.0, abs=1e-12)
  # "cow" twice: 2 x 1/3 + 8 x 2/3 = 6/10.
  assert vqa.vqa_soft_score("cow", humans) == pytest.approx(0.6, abs=1e-12)


def test_soft_score_needs_humans():
  with pytest.raises(ValueError, match="at least one human answer"):
    vqa.vqa_soft_score("cat", [])


def test_vqav2_normalises_only_when_humans_disagree():
  # Unanimous humans: the answer (after the EvalAI step) must equal them as written.
  assert vqa.vqav2_soft_score("t-shirt", ["t-shirt"] * 10) == 0.0
  assert vqa.vqav2_soft_score("Yes.", ["yes"] * 10) == 1.0
  assert vqa.vqav2_soft_score("two", ["2"] * 10) == 1.0
  assert vqa.vqav2_soft_score("dont", ["dont"] * 10) == 0.0   # EvalAI made it "don't"
  assert vqa.vqav2_soft_score("yes", [" yes\t"] * 10) == 1.0  # humans' whitespace stripped
  # Disagreeing humans: both sides normalised, "t-shirt" -> "t shirt" on both.
  assert vqa.vqav2_soft_score("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
  assert vqa.vqav2_soft_score("Two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6, abs=1e-12)
  assert vqa.vqav2_soft_score("", ["yes"] * 9 + ["no"]) == 0.0


def test_vqav2_forty_full_stops():
  # EvalAI removes 32 of the 40 periods; with unanimous humans nothing more is removed: 0.
  assert vqa.vqav2_soft_score(DOTS_40, ["yes"] * 10) == 0.0
  # Disagreeing humans: vqaEval.py's own pass removes the other 8: all 9 "yes" agree.
  assert vqa.vqav2_soft_score(DOTS_40, ["yes"] * 9 + ["no"]) == 1.0
  # 72 periods: 40 left after EvalAI, 8 after vqaEval.py.
  assert vqa.vqav2_soft_score("yes" + "." * 72, ["yes"] * 9 + ["no"]) == 0.0


def test_vqav2_equal_answer_records_leave_together():
  # vqaEval.py leaves out every record equal to the left-out one (after writing the
  # normalised answer into it). Real records differ by answer_id: 3 "yes" of 10 -> 0.9.
  with_ids = ([{"answer": a, "answer_id": i} for i, a in enumerate(["Yes", "yes", "yes."])]
              + [{"answer": "no", "answer_id": i} for i in range(3, 10)])
  assert vqa.vqav2_soft_score("yes", with_ids) == pytest.approx(0.9, abs=1e-12)
  # Without ids the three become equal records {"answer": "yes"}: leaving one out drops all
  # three (0), leaving out a "no" keeps three (1): (3 x 0 + 7 x 1) / 10.
  without_ids = [{"answer": a} for a in ["Yes", "yes", "yes."]] + [{"answer": "no"}] * 7
  assert vqa.vqav2_soft_score("yes", without_ids) == pytest.approx(0.7, abs=1e-12)
  # Plain strings count by position.
  assert vqa.vqav2_soft_score("yes", ["Yes", "yes", "yes."] + ["no"] * 7) == pytest.approx(0.9)


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
  assert result["per_question_type"] == pytest.approx({"what": (1.0 + 0.6 + 0.0) / 3})


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


def _vizwiz_record(name, humans):
  return {"image": name, "question": "?", "answer_type": "other",
          "answers": [{"answer": h, "answer_confidence": "yes"} for h in humans]}


@pytest.mark.parametrize("text, humans, expected", [
    # EvalAI (submission) then the VizWiz evaluation; humans compared as written.
    ("dont", ["don't"] * 10, 1.0),            # EvalAI restores the straight "don't" first
    (f"he{C}dve", [f"he{C}d{C}ve"] * 10, 1.0),  # the VizWiz table's curly entry
    ("isnt", [f"isn{C}t"] * 10, 0.0),          # EvalAI's "isn't" is no VizWiz key
    (DOTS_40, ["yes"] * 10, 1.0),              # 32 periods in EvalAI, the other 8 in VizWiz
    ("yes", ["Yes"] * 10, 0.0),                # human answers are not normalised
    ("", ["unanswerable"] * 10, 0.0),
    # Identical answer records still count one by one (leave-out by position): 0.9.
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
])
def test_vizwiz_pipeline(text, humans, expected):
  result = vqa.vizwiz_accuracy([{"question_id": "v.jpg", "text": text}],
                               [_vizwiz_record("v.jpg", humans)])
  assert result["accuracy"] == pytest.approx(expected, abs=1e-12)


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


def _textvqa(humans):
  return [{"question_id": 5, "image_id": "i5", "question": "Q?", "answers": humans}]


@pytest.mark.parametrize("text, humans, expected", [
    (DOTS_40, ["yes"] * 10, 0.0),              # one EvalAI pass: 8 periods stay
    ("don't", ["Dont"] * 3 + ["x"] * 7, 0.9),  # humans normalised too
    ("The Coca-Cola.", ["coca cola"] * 10, 1.0),
    ("two", ["2"] * 2 + ["two"] * 2 + ["3"] * 6, 1.0),  # four humans agree after normalising
    ("", ["yes"] * 10, 0.0),
])
def test_textvqa_pipeline(text, humans, expected):
  result = vqa.textvqa_accuracy([{"question_id": 5, "text": text}], _textvqa(humans))
  assert result["accuracy"] == pytest.approx(expected, abs=1e-12)


def test_textvqa_needs_ten_human_answers():
  with pytest.raises(ValueError, match="question 5 has 9 human answers.*exactly 10"):
    vqa.textvqa_accuracy([{"question_id": 5, "text": "x"}], _textvqa(["x"] * 9))


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


def test_vqav2_string_annotations_count_by_position():
  # Plain strings (a convenience layout, not the official one) have no records to compare:
  # ten "yes" are ten humans.
  result = vqa.vqav2_accuracy([{"question_id": 1, "text": "yes"}],
                              [{"question_id": 1, "answers": ["yes"] * 10}])
  assert result["accuracy"] == 1.0


def test_vqav2_bad_human_answer_names_the_record():
  with pytest.raises(ValueError, match="not a string or an {'answer': str} record"):
    vqa.vqav2_accuracy([{"question_id": 1, "text": "yes"}],
                       [{"question_id": 1, "answers": [{"text": "yes"}] * 10}])
