"""MMBench against the official evaluator's rules (open-compass/opencompass
tools/eval_mmbench.py; llava/eval/model_vqa_mmbench.py and
scripts/convert_mmbench_for_submission.py), written out case by case."""

import csv
import json
import os
import zipfile
from xml.etree import ElementTree

import pytest

from sqllava_jax.evaluation import mmbench
from sqllava_jax.evaluation.tasks import score

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
          "source", "l2-category", "comment", "split"]


# can_infer_option: whitespace pieces; one bare letter A-E wins, unless "A" is a piece of an
# answer longer than three pieces; then one letter in a wrapper, wrappers tried in order.
@pytest.mark.parametrize("answer, letter", [
    ("A", "A"),
    ("  C \n", "C"),
    ("B.", "B"),                      # wrapper ("", ".")
    ("(D)", "D"),                     # wrapper ("(", ")")
    ("B) square", "B"),               # wrapper ("", ")")
    ("The answer is D", "D"),         # one bare letter, no "A" piece
    ("answer: C", "C"),
    ("A dog", "A"),                   # "A" alone in a short answer is the letter
    ("A cat sits here", None),        # four pieces with "A": maybe the article; no wrapper
    ("A cat sits here. B.", "B"),     # ... but a wrapped letter still counts
    ("The answer is A. It is round", "A"),   # "A." wrapped; no bare letter
    ("A or B", None),                 # two bare letters, no wrapped one
    ("E", "E"),                       # E is a letter too (then simply wrong)
    ("F", None),
    ("a", None),                      # case matters
    ("(B).", "B"),
    ("Failed to obtain answer via API", None),
    ("", None),
])
def test_option_letter_rules(answer, letter):
  assert mmbench.infer_option(answer) == letter


# can_infer_text: lowercased option text inside the lowercased answer, exactly one option.
@pytest.mark.parametrize("answer, letter", [
    ("It is a SQUARE.", "B"),
    ("circle or square", None),
    ("nothing like that", None),
    ("I cannot tell", None),
])
def test_option_text_rules(answer, letter):
  assert mmbench.infer_text(answer, {"A": "circle", "B": "Square"}) == letter


def test_option_text_is_a_plain_substring():
  # the official rule matches inside words: "cannot" holds the option "no"
  assert mmbench.infer_text("I cannot tell", {"A": "no", "B": "yes"}) == "A"


def test_letter_rules_come_before_text_rules():
  row = {"A": "circle", "B": "square", "C": None, "D": None}
  assert mmbench.infer_answer("B", row) == "B"
  assert mmbench.infer_answer("a square", row) == "B"
  assert mmbench.infer_answer("the circle, not the square", row) is None


def _write_tsv(path, rows, header=HEADER):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    for r in rows:
      w.writerow([r.get(h, "") for h in header])


def _row(index, answer, options, **extra):
  row = {"index": index, "question": "Q?", "answer": answer, "category": "cat", "image": "aW1n",
         "l2-category": "l2", "split": "dev"}
  row.update(zip("ABCD", options))
  row.update(extra)
  return row


def test_prompt_as_llava_builds_it_and_pandas_missing_values(tmp_path):
  path = tmp_path / "t.tsv"
  _write_tsv(path, [_row(1, "A", ["x", "y", "None", "z"], hint="A hint."),
                    _row(2, "B", ["p", "q", "NaN", ""], hint="nan"),
                    _row(3, "A", ["NA", "q"])])
  qs = {q["question_id"]: q for q in mmbench.load_questions(path)}
  # hint, question, then options up to the first missing one ("None" reads as missing)
  assert qs[1]["text"] == "A hint.\nQ?\nA. x\nB. y"
  assert qs[2]["text"] == "Q?\nA. p\nB. q"
  assert qs[3]["text"] == "Q?"
  assert qs[1]["image_base64"] == "aW1n"


def _circular_fixture(tmp_path):
  rows = []
  # question 1: four options, answer A, three circular copies
  opts = ["circle", "square", "triangle", "star"]
  for k in range(4):
    rows.append(_row(k * 10**6 + 1, "ABCD"[-k % 4], opts[k:] + opts[:k], category="shape",
                     **{"l2-category": "perception"}))
  # question 2: two options, answer B, one copy
  for k in range(2):
    rows.append(_row(k * 10**6 + 2, "AB"[(1 - k) % 2], (["red", "blue"] * 2)[k:k + 2],
                     category="colour", **{"l2-category": "perception"}))
  # question 3: two options, answer A, one copy
  for k in range(2):
    rows.append(_row(k * 10**6 + 3, "AB"[-k % 2], (["yes", "no"] * 2)[k:k + 2],
                     category="colour", **{"l2-category": "reasoning"}))
  path = tmp_path / "dev.tsv"
  _write_tsv(path, rows)
  return path


def test_circular_evaluation_counts_a_question_only_when_every_copy_is_right(tmp_path):
  path = _circular_fixture(tmp_path)
  answers = [
      # question 1: the right letter each time, in different forms -> right
      {"question_id": 1, "text": "A"}, {"question_id": 1000001, "text": "(D)"},
      {"question_id": 2000001, "text": "It is a circle"}, {"question_id": 3000001, "text": "B."},
      # question 2: the original right, its copy wrong -> wrong (vanilla would count it)
      {"question_id": 2, "text": "B"}, {"question_id": 1000002, "text": "B"},
      # question 3: a copy no rule reads -> wrong, counted as unresolved
      {"question_id": 3, "text": "A"}, {"question_id": 1000003, "text": "I am unsure"},
  ]
  result = score("mmbench", answers, str(path))
  assert result["accuracy"] == pytest.approx(1 / 3)
  assert result["vanilla_accuracy"] == pytest.approx(1.0)
  assert result["num_questions"] == 3 and result["num_rows"] == 8
  assert result["unresolved"] == 1 and result["unanswered"] == 0
  assert result["per_category"] == {"colour": 0.0, "shape": 1.0}
  assert result["per_l2_category"] == {"perception": 0.5, "reasoning": 0.0}


def test_unanswered_copies_count_wrong_and_unknown_rows_are_refused(tmp_path):
  path = _circular_fixture(tmp_path)
  result = score("mmbench", [{"question_id": 1, "text": "A"}], str(path))
  assert result["accuracy"] == 0.0 and result["unanswered"] == 7
  with pytest.raises(ValueError, match=r"indices \[77\]"):
    score("mmbench", [{"question_id": 77, "text": "A"}], str(path))


def test_test_split_without_answers_is_not_scored(tmp_path):
  path = tmp_path / "test.tsv"
  header = [h for h in HEADER if h != "answer"]
  _write_tsv(path, [_row(1, None, ["x", "y"])], header)
  with pytest.raises(ValueError, match="test split"):
    score("mmbench", [{"question_id": 1, "text": "A"}], str(path))


def _read_sheet(path):
  """The cells of an xlsx's first sheet, read with the standard library only."""
  ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
  with zipfile.ZipFile(path) as z:
    assert "xl/workbook.xml" in z.namelist()
    root = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
  table = []
  for row in root.find("m:sheetData", ns):
    cells = {}
    for c in row:
      col = "".join(ch for ch in c.get("r") if ch.isalpha())
      if c.get("t") == "inlineStr":
        cells[col] = c.find("m:is/m:t", ns).text or ""
      else:
        cells[col] = float(c.find("m:v", ns).text)
    table.append(cells)
  return table


def test_submission_has_the_servers_columns(tmp_path):
  path = _circular_fixture(tmp_path)
  out = mmbench.write_submission(str(tmp_path / "s.xlsx"), str(path),
                                 [{"question_id": 1, "text": "A <&> B"}])
  header, first, second = _read_sheet(out)[:3]
  # convert_mmbench_for_submission.py: hint, category, source, image, comment and
  # l2-category dropped; `prediction` inserted as the seventh column.
  assert list(header.values()) == ["index", "question", "A", "B", "C", "D", "prediction",
                                   "answer", "split"]
  assert first == {"A": 1.0, "B": "Q?", "C": "circle", "D": "square", "E": "triangle",
                   "F": "star", "G": "A <&> B", "H": "A", "I": "dev"}
  assert "G" not in second  # an unanswered row has an empty prediction
  assert not os.path.exists(out + ".tmp")
  json.dumps(first)


EVALUATOR = '''import pandas as pd


def build_option_str(option_list):
    s = 'Options here: \\n'
    for c, opt in zip('ABCD', option_list):
        s += f'{c}. {opt}\\n'
    return s


def build_prompt(question, options, prediction):
    tmpl = ('Match it. '
            'Question: {}?\\nOptions: {}\\nAnswer: {}\\nYour output: ')
    return tmpl.format(question, options, prediction)
'''


def _matcher(tmp_path, server):
  from sqllava_jax.evaluation.judge import Judge, JudgeConfig  # pylint: disable=g-import-not-at-top
  path = tmp_path / "eval_mmbench.py"
  path.write_text(EVALUATOR)
  template, header = mmbench.read_matching_prompt(str(path))
  assert (template, header) == ("Match it. Question: {}?\nOptions: {}\nAnswer: {}\nYour output: ",
                                "Options here: \n")
  judge = Judge(JudgeConfig(base_url=server.url, model="gpt-3.5", api_key_env="TEST_JUDGE_KEY"),
                str(tmp_path / "cache.jsonl"))
  return mmbench.OptionMatcher(judge, mmbench.MatchingProtocol(template, header))


def test_the_judge_matches_what_no_rule_reads_then_a_seeded_random_letter(tmp_path,
                                                                          monkeypatch):
  import random  # pylint: disable=g-import-not-at-top

  from tests.eval_suite_data import JudgeServer  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("TEST_JUDGE_KEY", "k")
  replies = iter(["hmm", "B", "no idea", "none", "still no"])
  row = {"index": 1, "question": "Which", "A": "red", "B": "blue", "C": None, "D": None,
         "answer": "B"}
  with JudgeServer(lambda body: (200, next(replies))) as server:
    matcher = _matcher(tmp_path, server)
    assert matcher(row, "the sky's colour") == "B"  # unreadable reply, then "B"
    first = server.requests[0]
    assert first["messages"] == [{"role": "user", "content": (
        "Match it. Question: Which?\nOptions: Options here: \nA. red\nB. blue\n\n"
        "Answer: the sky's colour\nYour output: ")}]
    assert (first["temperature"], first["max_tokens"]) == (0.7, 512)
    # three unreadable replies: a letter of A-D or E from random.seed(2680)'s stream
    want = "ABCDE"[random.Random(2680).randint(0, 4)]
    assert matcher(row, "something else") == want
    assert len(server.requests) == 5


def test_circular_evaluation_asks_the_judge_only_where_the_reference_does(tmp_path):
  path = _circular_fixture(tmp_path)
  asked = []

  def match(row, answer):
    asked.append(row["index"])
    return row["answer"] if "right" in answer else "A"
  answers = [
      # question 1: two copies unread; the judge reads the first right, the second wrong
      {"question_id": 1, "text": "A"}, {"question_id": 1000001, "text": "right, surely"},
      {"question_id": 2000001, "text": "hmm"}, {"question_id": 3000001, "text": "B"},
      # question 2: a copy read wrong by the rules: no judge call at all
      {"question_id": 2, "text": "unclear"}, {"question_id": 1000002, "text": "B"},
      # question 3: the unread copy matched right by the judge
      {"question_id": 3, "text": "A"}, {"question_id": 1000003, "text": "right one"},
  ]
  result = mmbench.circular_scores(answers, str(path), match=match)
  assert asked == [1000001, 2000001, 1000003]
  assert result["accuracy"] == pytest.approx(1 / 3) and result["unresolved"] == 4
