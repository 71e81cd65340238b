"""MMBench: questions from its TSV, circular evaluation of the dev split, the server's file.

The TSV (`mmbench_dev_20230712.tsv`, `mmbench_test_20230712.tsv`) has one row per question
and per circular copy: a question of index i < 1e6 comes back as rows i + 1e6, i + 2e6, ...
with its options rotated. Columns: index, question, hint, A..D, answer (dev only),
category, image (base64), source, l2-category, comment, split.

- Questions, as llava/eval/model_vqa_mmbench.py builds them: the hint (when present) and the
  question on separate lines, then one `X. option` line per option up to the first missing
  one; the benchmark's prompt suffix is appended by the suite (configs/eval/mmbench.yaml).
  Empty cells and the strings pandas reads as missing ("NaN", "None", "NA", ...) count as
  missing, as there (pandas' default `na_values`, plus that file's `is_none`).
- Scoring, as the official dev evaluator (open-compass/opencompass tools/eval_mmbench.py):
  a question counts only if every one of its circular copies is answered with the right
  letter. A letter is read from the answer by `infer_option` (a single capital letter A..E
  standing alone, or wrapped as `A.`, `(A)`, `A:` and the like), else by `infer_text` (the
  answer contains the text of exactly one option). Where neither reads a letter the official
  evaluator asks gpt-3.5 to match the answer to an option, then draws a random letter:
  `OptionMatcher` does the same through our judge, with the prompt read from the official
  file; without it such a copy counts wrong (`unresolved` says how many there were: with
  LLaVA's "answer with the letter" prompt they are rare). Accuracy is reported overall and
  per category and l2-category.
- Submission (both splits): the Excel file of scripts/convert_mmbench_for_submission.py:
  the TSV's columns without hint, category, source, image, comment and l2-category, with a
  `prediction` column inserted as the seventh.
"""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import os
import random
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from sqllava_jax.evaluation import xlsx
from sqllava_jax.evaluation.answers import as_answer_records, mean

OPTION_LETTERS = "ABCD"
CIRCULAR_STRIDE = 1_000_000
# pandas.read_csv's default `na_values`: cells the reference's pandas reads as NaN.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
SUBMISSION_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
SUBMISSION_PREDICTION_COLUMN = 6
# The `is_none` of llava/eval/model_vqa_mmbench.py also drops these, in any case.
_NONE_WORDS = ("nan", "none")
# tools/eval_mmbench.py's wrappers around a letter: (prefix, suffix), tried in this order.
_LETTER_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
                    ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def read_tsv(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
  """(header, rows) of an MMBench TSV; each row maps column -> str, or None where missing.
  `index` must be an integer in every row."""
  csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if not header or "index" not in header or "question" not in header:
      raise ValueError(f"{path}: not an MMBench TSV (the header needs 'index' and 'question')")
    rows = []
    for n, cells in enumerate(reader, 2):
      if not cells:
        continue
      if len(cells) != len(header):
        raise ValueError(f"{path} line {n}: {len(cells)} cells for {len(header)} columns")
      row: dict[str, Any] = {k: (None if v in PANDAS_NA else v) for k, v in zip(header, cells)}
      try:
        row["index"] = int(row["index"])
      except (TypeError, ValueError):
        raise ValueError(f"{path} line {n}: index {row['index']!r} is not an integer") from None
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} holds no questions")
  return header, rows


def _missing(value: Optional[str]) -> bool:
  return value is None or value.lower() in _NONE_WORDS


def row_options(row: Mapping[str, Any]) -> list[str]:
  """The row's options in order, up to the first missing one."""
  options = []
  for letter in OPTION_LETTERS:
    if _missing(row.get(letter)):
      break
    options.append(row[letter])
  return options


def question_text(row: Mapping[str, Any]) -> str:
  """`{hint}\\n{question}\\nA. {a}\\nB. {b}...` (no suffix, no image token)."""
  text = row["question"] or ""
  if not _missing(row.get("hint")):
    text = f"{row['hint']}\n{text}"
  for letter, option in zip(OPTION_LETTERS, row_options(row)):
    text += f"\n{letter}. {option}"
  return text


def load_questions(path: str | os.PathLike) -> list[dict]:
  """The TSV's rows as eval questions: `question_id` the row's index, the image inline."""
  _, rows = read_tsv(path)
  questions = []
  for row in rows:
    if not row.get("image"):
      raise ValueError(f"{path}: row with index {row['index']} has no image")
    questions.append({"question_id": row["index"], "text": question_text(row),
                      "image": f"mmbench-{row['index']}", "image_base64": row["image"]})
  return questions


def infer_option(answer: str, letters: str = "ABCDE") -> Optional[str]:
  """The letter an answer names by itself, as tools/eval_mmbench.py's can_infer_option.

  The answer is split on whitespace. One piece equal to exactly one letter gives that letter,
  unless "A" is a piece of an answer of more than three pieces (then "A" may be the article,
  and the wrapped forms are tried instead). Then, for each wrapper in turn (`A.`, `A,`,
  `A:`, `A)`, `A).`, `(A)`, `(A).`, `:A`, ...), exactly one letter so wrapped gives it.
  """
  if "Failed to obtain answer via API" in answer:
    return None
  pieces = [p.strip() for p in answer.split()]

  def named(prefix: str = "", suffix: str = "") -> list[str]:
    return [c for c in letters if prefix + c + suffix in pieces]

  bare = named()
  if len(bare) == 1 and not ("A" in pieces and len(pieces) > 3):
    return bare[0]
  for prefix, suffix in _LETTER_WRAPPERS:
    wrapped = named(prefix, suffix)
    if len(wrapped) == 1:
      return wrapped[0]
  return None


def infer_text(answer: str, choices: Mapping[str, str]) -> Optional[str]:
  """The letter whose option text (lowercased) is inside the lowercased answer, when exactly
  one is (can_infer_text)."""
  answer = answer.lower()
  hits = [k for k, text in choices.items() if str(text).lower() in answer]
  return hits[0] if len(hits) == 1 else None


def infer_answer(answer: str, row: Mapping[str, Any]) -> Optional[str]:
  """`infer_option`, else `infer_text` over the row's non-missing options (build_choices:
  every present cell of A..D, not only those before the first gap)."""
  choices = {k: row[k] for k in OPTION_LETTERS if row.get(k) is not None}
  return infer_option(answer) or infer_text(answer, choices)


def _answers_by_index(predictions: Any) -> dict[int, str]:
  out = {}
  for p in as_answer_records(predictions, "mmbench"):
    out[int(p["question_id"])] = str(p["text"])
  return out


def _grouped(rows: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
  groups = collections.defaultdict(list)
  for row in sorted(rows, key=lambda r: r["index"]):
    groups[row["index"] % CIRCULAR_STRIDE].append(row)
  main = {r["index"] for r in rows if r["index"] < CIRCULAR_STRIDE}
  stray = sorted(set(groups) - main)
  if stray:
    raise ValueError(f"mmbench: rows {stray[:5]} are circular copies of questions the TSV lacks")
  return groups


def _group_hit(group: Sequence[Mapping[str, Any]], answers: Mapping[int, str],
               match: Optional[Callable[[Mapping[str, Any], str], Optional[str]]]
               ) -> tuple[bool, int, int]:
  """(right, copies no rule reads, copies unanswered) for one question and its copies.

  As eval_sub_data: a copy whose letter the rules read wrong ends the question before any
  judge call; then each unread copy in turn goes to `match` (the judge), and the first
  wrong one ends it (so the judge is asked no more than the reference asks it).
  """
  letters = {r["index"]: infer_answer(answers[r["index"]], r) for r in group
             if r["index"] in answers}
  unread = [r for r in group if r["index"] in letters and letters[r["index"]] is None]
  unanswered = sum(r["index"] not in answers for r in group)
  if unanswered or any(letters[r["index"]] not in (None, r["answer"]) for r in group
                       if r["index"] in letters):
    return False, len(unread), unanswered
  for row in unread:
    if match is None or match(row, answers[row["index"]]) != row["answer"]:
      return False, len(unread), 0
  return True, len(unread), 0


def circular_scores(predictions: Any, annotations: Any, *,
                    match: Optional[Callable[[Mapping[str, Any], str], Optional[str]]] = None
                    ) -> dict:
  """MMBench dev circular accuracy.

  predictions: answer records (`question_id` = TSV index, `text`) or an answers JSONL path.
  annotations: the TSV's rows (`read_tsv(...)[1]`) or its path; they need `answer`.
  match: the judge's reading of an answer no rule reads (`OptionMatcher`); without one such
    a copy counts wrong.
  Returns `accuracy` (circular, over the questions of index < 1e6), `per_category`,
  `per_l2_category`, `num_questions`, `num_rows`, `unresolved` (copies no rule read a letter
  from), `unanswered` (copies without an answer: wrong) and `vanilla_accuracy` (the
  original rows alone, by the rules alone).
  """
  rows = read_tsv(annotations)[1] if isinstance(annotations, (str, os.PathLike)) else annotations
  if any(r.get("answer") is None for r in rows):
    raise ValueError("mmbench: the TSV has no 'answer' column (the test split): submit "
                     "the xlsx to the MMBench server instead")
  answers = _answers_by_index(predictions)
  unknown = sorted(set(answers) - {r["index"] for r in rows})
  if unknown:
    raise ValueError(f"mmbench: answers for indices {unknown[:5]} that the TSV does not have; "
                     "use the TSV the questions came from")
  hits, vanilla, unresolved, unanswered = {}, [], 0, 0
  cats, l2 = collections.defaultdict(list), collections.defaultdict(list)
  for main, group in _grouped(rows).items():
    ok, unread, missing = _group_hit(group, answers, match)
    hits[main] = ok
    unresolved += unread
    unanswered += missing
    head = group[0]
    if main in answers:
      vanilla.append(infer_answer(answers[main], head) == head["answer"])
    cats[head.get("category")].append(ok)
    l2[head.get("l2-category")].append(ok)
  return {"accuracy": mean(hits.values()), "num_questions": len(hits), "num_rows": len(rows),
          "per_category": {str(k): mean(v) for k, v in sorted(cats.items(), key=str)},
          "per_l2_category": {str(k): mean(v) for k, v in sorted(l2.items(), key=str)},
          "unresolved": unresolved, "unanswered": unanswered,
          "vanilla_accuracy": mean(vanilla) if vanilla else None}


@dataclasses.dataclass(frozen=True)
class MatchingProtocol:
  """How tools/eval_mmbench.py asks gpt-3.5 to match an answer to an option: its prompt
  (`template`, three `{}`: question, options, answer; `options_header` opens the option
  list), the sampling of opencompass' OpenAI wrapper, three tries, then a seeded random
  letter."""
  template: str
  options_header: str
  temperature: float = 0.7
  max_tokens: int = 512
  attempts: int = 3
  seed: int = 2680


def read_matching_prompt(path: str) -> tuple[str, str]:
  """(template, options_header) from the official evaluator's file, read with `ast`
  (nothing is run): the string `tmpl` of `build_prompt` and the first string `s` of
  `build_option_str`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  found: dict[str, str] = {}
  for fn in tree.body:
    if isinstance(fn, ast.FunctionDef) and fn.name in ("build_prompt", "build_option_str"):
      name = "tmpl" if fn.name == "build_prompt" else "s"
      for node in fn.body:
        if (isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
          found.setdefault(fn.name, node.value.value)
  if len(found) != 2:
    raise ValueError(f"{path} lacks build_prompt's `tmpl` or build_option_str's `s`; give "
                     "open-compass/opencompass tools/eval_mmbench.py")
  return found["build_prompt"], found["build_option_str"]


class OptionMatcher:
  """The judge's letter for an answer the rules cannot read, or a random one after
  `attempts` replies the rules cannot read either (one seeded stream for the whole run, as
  the reference's `rd.seed(2680)`)."""

  def __init__(self, judge, protocol: MatchingProtocol):
    self.judge, self.protocol = judge, protocol
    self._random = random.Random(protocol.seed)
    self.calls = 0

  def prompt(self, row: Mapping[str, Any], answer: str) -> str:
    options = "".join(f"{k}. {v}\n" for k, v in zip(OPTION_LETTERS, _present_options(row)))
    return self.protocol.template.format(row["question"], self.protocol.options_header + options,
                                         answer)

  def __call__(self, row: Mapping[str, Any], answer: str) -> Optional[str]:
    message = [{"role": "user", "content": self.prompt(row, answer)}]
    for attempt in range(self.protocol.attempts):
      self.calls += 1
      reply = self.judge.chat(message, temperature=self.protocol.temperature,
                              max_tokens=self.protocol.max_tokens, attempt=attempt
                              ).content.strip()
      letter = infer_answer(reply, row)
      if letter:
        return letter
    # The reference counts the option columns the row has (all four in the TSV), adds E.
    n = sum(k in row for k in OPTION_LETTERS)
    if n < 2:
      return None
    return (OPTION_LETTERS[:n] + "E")[self._random.randint(0, n)]


def _present_options(row: Mapping[str, Any]) -> list[str]:
  """extract_options: A, B, ... up to the first missing cell (pandas' NaN only)."""
  out = []
  for k in OPTION_LETTERS:
    if row.get(k) is None:
      break
    out.append(row[k])
  return out


def write_submission(path: str, tsv_path: str, predictions: Any) -> str:
  """The server's xlsx: TSV columns minus the dropped ones, `prediction` as the 7th column."""
  header, rows = read_tsv(tsv_path)
  answers = _answers_by_index(predictions)
  columns = [c for c in header if c not in SUBMISSION_DROPPED]
  columns.insert(min(SUBMISSION_PREDICTION_COLUMN, len(columns)), "prediction")
  table = [[answers.get(r["index"]) if c == "prediction" else r.get(c) for c in columns]
           for r in rows]
  xlsx.write_xlsx(path, columns, table)
  return path

