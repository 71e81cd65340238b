"""The three official answer normalisations of the ten-human VQA benchmarks, quirks included.

- `VQA` is PythonEvaluationTools/vqaEvaluation/vqaEval.py of github.com/GT-Vision-Lab/VQA as
  fixed in 2021 (processPunctuation, then processDigitArticle).
- `VIZWIZ` is the vqaEval.py of the VizWiz VQA evaluation API (the one vizwiz.org links,
  written after the 2015 VQA code): the same punctuation list as `VQA`, but the pre-2016 VQA
  contraction table, whose restored apostrophes are mostly curly (U+2019).
- `EVALAI` is `EvalAIAnswerProcessor` of llava/eval/m4c_evaluator.py (haotian-liu/LLaVA, from
  facebookresearch/mmf): lowercases, deletes commas and question marks and splits "'s" off
  first, then the `VQA` steps. LLaVA writes its VQAv2 and VizWiz submission files with it
  (scripts/convert_vqav2_for_submission.py, convert_vizwiz_for_submission.py) and scores
  TextVQA with it.

Quirks shared by all three, from those files:
- The period pattern `(?!<=\\d)(\\.)(?!\\d)` opens with a look-ahead that never fails (it
  reads like a look-behind), so every period not followed by a digit goes: "no." -> "no",
  "1." -> "1", "3.5" stays.
- The period substitution passes `re.UNICODE` where `re.sub` takes its count: at most 32
  periods go per call ("yes" followed by 40 periods keeps 8).
- Whether a mark is deleted or becomes a space is decided per mark on the text before any
  replacement: deleted where the original text has it beside a space, or has a
  digit-comma-digit anywhere; replaced by a space otherwise ("t-shirt" -> "t shirt").
- Number words map to digits before articles are dropped, and contractions are restored
  only after both, on lowercased words, so the table's capitalised keys ("Im", "Ive") never
  match; "somebody'd" maps to "somebodyd", as in the table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

# The contraction table of the VQA code (2021) and of EvalAIAnswerProcessor (identical).
VQA_CONTRACTIONS = {
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

_CURLY = "\u2019"
# The pre-2016 VQA table (the VizWiz API keeps it) is the same table written with curly
# apostrophes, except that these two keys and these eight restored forms kept straight ones.
_VIZWIZ_STRAIGHT_KEYS = frozenset({"couldn'tve", "hadn'tve"})
_VIZWIZ_STRAIGHT_VALUES = frozenset(
    {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"})


def _curl(text: str) -> str:
  return text.replace("'", _CURLY)


VIZWIZ_CONTRACTIONS = {
    (k if k in _VIZWIZ_STRAIGHT_KEYS else _curl(k)):
        (v if k in _VIZWIZ_STRAIGHT_VALUES else _curl(v))
    for k, v in VQA_CONTRACTIONS.items()
}

NUMBER_WORDS = {
  "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# The punctuation list of all three files (the 2015 VQA list also had ':' and "'"; the
# VizWiz API took the newer one).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")
# `re.UNICODE` passed as re.sub's count, in all three files.
_PERIODS_PER_CALL = int(re.UNICODE)
_VQA_COMMA = re.compile(r"\d,\d")
# EvalAIAnswerProcessor's own comma pattern; its first step has deleted every comma already,
# so it never matches there.
_EVALAI_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def strip_whitespace(text: str) -> str:
  """Newlines and tabs to spaces, then the ends stripped (every file does this first)."""
  return text.replace("\n", " ").replace("\t", " ").strip()


@dataclasses.dataclass(frozen=True)
class AnswerNormalizer:
  """One official normalisation: `__call__(text) -> str` ("Two dogs." -> "2 dogs").

  name: what the reports call it; contractions: the table restoring apostrophes;
  comma_rule: the digit-comma-digit pattern whose presence deletes every mark; evalai_first:
  run EvalAIAnswerProcessor's word_tokenize step (lowercase, delete "," and "?", "'s" ->
  " 's") before the rest.
  """

  name: str
  contractions: Mapping[str, str]
  comma_rule: re.Pattern
  evalai_first: bool = False

  def punctuation(self, text: str) -> str:
    """processPunctuation: marks deleted or spaced (decided on `text`), then periods."""
    delete_all = self.comma_rule.search(text) is not None
    out = text
    for mark in PUNCTUATION:
      touches_space = mark + " " in text or " " + mark in text
      out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=_PERIODS_PER_CALL)

  def digits_and_articles(self, text: str) -> str:
    """processDigitArticle: lowercase words, digits for number words, no articles, then
    the contraction table."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(self.contractions.get(word, word) for word in words if word not in ARTICLES)

  def __call__(self, text: str) -> str:
    if self.evalai_first:
      text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return self.digits_and_articles(self.punctuation(strip_whitespace(text)))


VQA = AnswerNormalizer("vqa", VQA_CONTRACTIONS, _VQA_COMMA)
VIZWIZ = AnswerNormalizer("vizwiz", VIZWIZ_CONTRACTIONS, _VQA_COMMA)
EVALAI = AnswerNormalizer("evalai", VQA_CONTRACTIONS, _EVALAI_COMMA, evalai_first=True)
