"""VQAv2, VizWiz and TextVQA accuracy: answer normalisation and the ten-human soft score.

Where each rule comes from:
- VQAv2: LLaVA writes its submission file with the EvalAI answer processor
  (scripts/convert_vqav2_for_submission.py), and the server scores it with the official VQA
  evaluation (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
  as fixed in 2021). We apply both, so a local score on val matches that pipeline.
- VizWiz: the same submission step (scripts/convert_vizwiz_for_submission.py), then the
  VizWiz evaluation, a copy of the older VQA one that always normalises the answer and
  compares it with the human answers as written.
- TextVQA: the evaluator LLaVA runs (llava/eval/eval_textvqa.py with llava/eval/m4c_evaluator.py,
  the EvalAI answer processor of facebookresearch/mmf), which normalises both the model's
  answer and the human answers.

An answer scores min(#humans agreeing / 3, 1) averaged over the ways of leaving one of the
(ten) human answers out; an accuracy is the mean over questions, a fraction in [0, 1].
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqllava_jax.evaluation.records import (PathLike, Record, as_answer_records, index_unique,
                                            match_answers, mean, question_id_resolver,
                                            records_by_question_id, unknown_question)

# The official contraction table (data; the odd "somebody'd" entry is in the original).
CONTRACTIONS = {
  "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
  "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
  "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
  "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
  "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
  "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
  "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
  "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
  "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
  "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
  "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
  "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
  "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
  "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
  "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
  "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
  "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
  "somethingd": "something'd", "somethingd've": "something'd've",
  "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
  "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
  "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
  "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
  "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
  "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
  "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
  "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
  "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
  "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
  "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
  "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
  "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
  "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"
}
NUMBER_WORDS = {
  "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead that never
# fails, not the look-behind it reads as, so every period not followed by a digit goes
# ("3.5" keeps its period, "no." and "1." lose theirs). The official call also passes
# re.UNICODE as the count, capping removals at 32, which no real answer reaches.
_PERIOD = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
  """The official punctuation rule.

  Each mark of `PUNCTUATION` is deleted where it touches a space ("yes !" -> "yes ") and
  becomes a space inside a word ("t-shirt" -> "t shirt"); when the text has a
  digit-comma-digit anywhere ("1,000"), every mark is deleted instead. Which of the two
  happens is decided on the original text, per mark. Then periods go, except before a digit.
  """
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in PUNCTUATION:
    touches_space = mark + " " in text or " " + mark in text
    out = out.replace(mark, "" if delete_all or touches_space else " ")
  return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
  """Lowercases, maps number words to digits, drops articles, restores contractions."""
  words = []
  for word in text.lower().split():
    word = NUMBER_WORDS.get(word, word)
    if word not in ARTICLES:
      words.append(CONTRACTIONS.get(word, word))
  return " ".join(words)


def _strip_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """An answer as the official VQA evaluation normalises it ("Two dogs." -> "2 dogs")."""
  return process_digit_article(process_punctuation(_strip_whitespace(text)))


def normalize_answer_evalai(text: str) -> str:
  """An answer as the EvalAI answer processor normalises it (TextVQA; LLaVA's VQAv2 and
  VizWiz submission files).

  Differs from `normalize_answer` by lowercasing first, deleting every comma and question
  mark up front, and splitting a possessive "'s" off its word ("man's" -> "man 's").
  """
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
  return process_digit_article(process_punctuation(_strip_whitespace(text)))


def vqa_soft_score(answer: str, human_answers: Sequence[str]) -> float:
  """min(#other humans giving `answer` / 3, 1), averaged over leaving each human out.

  Both sides must already be normalised. With ten humans, 0, 1, 2, 3 and 4+ agreeing give
  0, 0.3, 0.6, 0.9 and 1.
  """
  if not human_answers:
    raise ValueError("vqa_soft_score needs at least one human answer")
  total = 0.0
  for left_out in range(len(human_answers)):
    agree = sum(1 for j, human in enumerate(human_answers) if j != left_out and human == answer)
    total += min(1.0, agree / 3)
  return total / len(human_answers)


def _human_answers(annotation: Record, task: str) -> list[str]:
  """The human answers of one annotation: `answers` as strings or as `{"answer": ...}` dicts."""
  if "answers" not in annotation or not annotation["answers"]:
    raise ValueError(f"{task}: annotation has no human 'answers': {dict(annotation)!r}")
  return [a["answer"] if isinstance(a, Mapping) else a for a in annotation["answers"]]


def _accuracy_report(scores: Sequence[float], answer_types: Sequence[Any]) -> dict:
  """`accuracy` and `num_questions`, plus `per_answer_type` when the annotations have types."""
  report = {"accuracy": mean(scores), "num_questions": len(scores)}
  if any(t is not None for t in answer_types):
    by_type = defaultdict(list)
    for score, answer_type in zip(scores, answer_types):
      by_type[str(answer_type)].append(score)
    report["per_answer_type"] = {t: mean(s) for t, s in sorted(by_type.items())}
  return report


def vqav2_soft_score(text: str, human_answers: Sequence[str]) -> float:
  """The VQAv2 score of one raw model answer against the raw human answers.

  The answer first goes through the EvalAI processor, as LLaVA's submission file does. Then,
  as the official evaluation does, both sides are normalised only when the humans disagree:
  when all ten humans wrote the same string, the answer must equal it as it stands (after
  the EvalAI step), so "t shirt" does not match ten times "t-shirt".
  """
  answer = _strip_whitespace(normalize_answer_evalai(text))
  humans = [_strip_whitespace(h) for h in human_answers]
  if len(set(humans)) > 1:
    humans = [normalize_answer(h) for h in humans]
    answer = normalize_answer(answer)
  return vqa_soft_score(answer, humans)


def vqav2_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """VQAv2 accuracy as LLaVA's submission step plus the official VQA evaluation compute it.

  predictions: answer records (`question_id`, `text`) or an answers JSONL path.
  annotations: the official annotation file's content (`{"annotations": [...]}`), a list of
    its records, or `{question_id: record}`; a record has `answers` (ten
    `{"answer": ...}` dicts or strings) and optionally `answer_type`.
  Returns `accuracy`, `num_questions` and `per_answer_type` (fractions in [0, 1]).
  """
  task = "vqav2"
  records = as_answer_records(predictions, task)
  if isinstance(annotations, Mapping) and "annotations" in annotations:
    annotations = annotations["annotations"]
  index = records_by_question_id(annotations, task)

  scores, types = [], []
  for prediction, annotation in match_answers(records, question_id_resolver(index, task), task):
    scores.append(vqav2_soft_score(prediction["text"], _human_answers(annotation, task)))
    types.append(annotation.get("answer_type"))
  return _accuracy_report(scores, types)


def _vizwiz_key(record: Record) -> str:
  # The official VizWiz files have no question ids (one question per image): they are keyed
  # by image file name unless a record carries its own `question_id`.
  if "question_id" in record:
    return str(record["question_id"])
  if "image" not in record:
    raise ValueError(f"vizwiz: annotation record has neither 'question_id' nor 'image': "
                     f"{dict(record)!r}")
  return str(record["image"])


def vizwiz_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """VizWiz VQA accuracy as LLaVA's submission step plus the VizWiz evaluation compute it.

  predictions: answer records or an answers JSONL path; `question_id` is the image file name
    ("VizWiz_val_00000000.jpg") or the annotation's own `question_id`.
  annotations: the official `val.json` content: a list of records with `image`, `answers`
    (`{"answer": ..., "answer_confidence": ...}` dicts) and `answer_type`.
  Returns `accuracy`, `num_questions` and `per_answer_type` ("unanswerable", "yes/no", ...).
  """
  task = "vizwiz"
  records = as_answer_records(predictions, task)
  if isinstance(annotations, Mapping):
    annotations = [{"question_id": k, **v} for k, v in annotations.items()]
  index = index_unique(annotations, _vizwiz_key, f"{task} annotations")

  scores, types = [], []
  for prediction, annotation in match_answers(records, question_id_resolver(index, task), task):
    # The submission step (EvalAI processor), then the VizWiz evaluation's own normalisation;
    # unlike VQAv2, the VizWiz evaluation leaves the human answers untouched.
    answer = normalize_answer(normalize_answer_evalai(prediction["text"]))
    scores.append(vqa_soft_score(answer, _human_answers(annotation, task)))
    types.append(annotation.get("answer_type"))
  return _accuracy_report(scores, types)


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question_from_prompt(prompt: str) -> str:
  """The question inside a LLaVA TextVQA prompt, lowercased (as llava/eval/eval_textvqa.py
  reads it): "Q\\nReference OCR token: ...\\nAnswer ..." or "Q\\nAnswer ..." -> "q"."""
  lines = prompt.split("\n")
  if prompt.startswith("OCR tokens: "):
    match = _OCR_QUESTION.search(prompt)
    if match is None:
      raise ValueError(f"textvqa: no 'Question: ... Short answer:' in prompt {prompt!r}")
    question = match.group(1)
  elif "Reference OCR token: " in prompt and len(lines) == 3:
    question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
  elif len(lines) == 2:
    question = lines[0]
  else:
    raise ValueError(
        f"textvqa: cannot find the question in prompt {prompt!r}; expected the LLaVA layout "
        f"'QUESTION\\n[Reference OCR token: ...\\n]Answer ...', or give answers whose "
        f"question_id is the TextVQA question_id")
  return question.lower()


class _TextVQAIndex:
  """TextVQA annotations found by question id or, in the LLaVA layout, by image and question.

  LLaVA's TextVQA question file uses the image id as `question_id` (shared by the questions of
  one image), so eval_textvqa.py matches on (image id, question text from the prompt).
  """

  def __init__(self, annotations: Any):
    data = annotations["data"] if isinstance(annotations, Mapping) else annotations
    data = list(data)
    self.by_id = {str(r["question_id"]): r for r in data if "question_id" in r}
    self.by_image_question = {(str(r["image_id"]), r["question"].lower()): r
                              for r in data if "image_id" in r and "question" in r}

  def __call__(self, prediction: Record) -> Record:
    qid = str(prediction["question_id"])
    if qid in self.by_id:
      return self.by_id[qid]
    if "prompt" not in prediction:
      raise unknown_question("textvqa", prediction["question_id"],
                             "no such question id, and no 'prompt' to match image and question")
    question = textvqa_question_from_prompt(prediction["prompt"])
    try:
      return self.by_image_question[(qid, question)]
    except KeyError:
      raise unknown_question("textvqa", prediction["question_id"],
                             f"question {question!r}") from None


def textvqa_accuracy(predictions: Iterable[Record] | PathLike, annotations: Any) -> dict:
  """TextVQA accuracy as LLaVA's evaluator computes it (EvalAI normalisation on both sides).

  predictions: answer records or an answers JSONL path. `question_id` is either the TextVQA
    question id or, in the LLaVA layout, the image id with the question in `prompt`.
  annotations: the official `TextVQA_0.5.1_val.json` content (`{"data": [...]}`) or its list of
    records (`question_id`, `image_id`, `question`, `answers`: ten strings).
  Returns `accuracy` and `num_questions`.
  """
  task = "textvqa"
  records = as_answer_records(predictions, task)
  scores = []
  for prediction, annotation in match_answers(records, _TextVQAIndex(annotations), task):
    humans = [normalize_answer_evalai(a) for a in _human_answers(annotation, task)]
    scores.append(vqa_soft_score(normalize_answer_evalai(prediction["text"]), humans))
  return {"accuracy": mean(scores), "num_questions": len(scores)}
