"""Captioning metrics as SQ-LLaVA's sqllava/eval/eval_image_caption.py computes them.

That script: `pre_caption` on every caption (below; predictions cut at 20 words, its
`--max_words` default, references at 50, `pre_caption`'s default), then aac-metrics'
`preprocess_mono_sents` / `preprocess_mult_sents` (the Stanford PTB tokenizer of
coco-caption, stanford-corenlp-3.4.1 with -preserveLines -lowerCase, dropping the same
punctuation tokens), then aac-metrics' corpus-level `bleu` (n = 4, "closest" reference
length: it reports BLEU-4 only, as "BLUE"), `meteor` (meteor-1.5, `-l en -norm`), `cider_d`
(sigma 6, times 10) and `spice` (spice-1.0, the mean of the per-image "All" F-scores). Each
of those is a port of the coco-caption scorer that pycocoevalcap packages, with the same
jars, options and aggregation, so we score with pycocoevalcap: our `bleu_4`, `meteor`,
`cider_d` and `spice` are the script's "BLUE", "METEOR", "Cider" and "SPICE" (fractions, and
CIDEr-D in [0, 10], as it prints them). BLEU-1..3 come from the same computation.

Where the two differ we follow aac-metrics: CIDEr-D of fewer than two images is refused
(`unavailable`, with the reason; coco-caption would give 0). A caption that keeps a single
newline after `pre_caption` makes aac-metrics' tokenizer raise; pycocoevalcap's turns it into
a space, which we let it do.

BLEU and CIDEr-D are pure Python. METEOR, SPICE and the PTB tokenizer run on Java; SPICE also
needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads at first use. Whatever cannot run
here is reported under `unavailable` with the reason, never failed on.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import string
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer import ptbtokenizer as ptb_module

from sqllava_jax.evaluation.answers import PathLike, Record, as_answer_records, index_unique

CAPTION_METRICS = ("bleu", "meteor", "cider_d", "spice")
TOKENIZERS = ("auto", "ptb", "simple")
# The characters eval_image_caption.py's pre_caption turns into spaces.
_REFERENCE_STRIPPED = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
# eval_image_caption.py: `--max_words` (predictions) defaults to 20, pre_caption's own
# `max_words` (references) to 50.
PREDICTION_MAX_WORDS = 20
REFERENCE_MAX_WORDS = 50
_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def preprocess_caption(text: str, max_words: int) -> str:
  """eval_image_caption.py's pre_caption: lowercased, .!"()*#:;~ turned into spaces, runs of
  two or more whitespace characters merged into one space, trailing newlines and then
  surrounding spaces stripped, and cut to `max_words` words split on single spaces.

  A lone tab or newline is no run, so it stays inside its word: "a\tb c" is two words.
  """
  text = _WHITESPACE_RUN.sub(" ", _REFERENCE_STRIPPED.sub(" ", text.lower()))
  text = text.rstrip("\n").strip(" ")
  words = text.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else text


@functools.lru_cache(maxsize=None)
def java_problem() -> str | None:
  """None when `java` runs here, else why not."""
  java = shutil.which("java")
  if java is None:
    return ("no `java` on PATH; METEOR, SPICE and the PTB tokenizer run on Java (install a "
            "JRE, e.g. `apt-get install default-jre-headless`)")
  try:
    subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
  except (OSError, subprocess.SubprocessError) as e:
    return f"`java -version` failed: {e}"
  return None


def _package_dir(module) -> str:
  return os.path.dirname(os.path.abspath(module.__file__))


def _meteor_problem() -> str | None:
  folder = _package_dir(meteor_module)
  for needed in (meteor_module.METEOR_JAR, os.path.join("data", "paraphrase-en.gz")):
    if not os.path.exists(os.path.join(folder, needed)):
      return f"METEOR needs {needed} inside pycocoevalcap's meteor folder; reinstall pycocoevalcap"
  return java_problem()


def _spice_problem() -> str | None:
  lib = os.path.join(_package_dir(spice_module), "lib")
  missing = [jar for jar in _CORENLP_JARS if not os.path.exists(os.path.join(lib, jar))]
  if missing:
    # pycocoevalcap would download them from nlp.stanford.edu on first use; we never start a
    # download from a scorer (it hangs without network).
    return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} in pycocoevalcap's "
            f"spice/lib), which pycocoevalcap downloads at first use and this machine does not "
            f"have; fetch it once where the network is reachable with `python -c \"from "
            f"pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
            f"get_stanford_models()\"`")
  return java_problem()


def caption_metric_availability() -> dict[str, str | None]:
  """`{metric: None if it can run here, else the reason}` for `CAPTION_METRICS`."""
  return {"bleu": None, "meteor": _meteor_problem(), "cider_d": None, "spice": _spice_problem()}


def _simple_tokenize(text: str) -> str:
  # A stand-in for the PTB tokenizer where Java is missing: whitespace words with
  # punctuation trimmed from their ends ("dog," -> "dog"; "t-shirt" and "man's" stay whole,
  # where PTB would give "man 's"), so scores can differ slightly from the reference's.
  words = (word.strip(string.punctuation) for word in text.split())
  return " ".join(word for word in words if word)


def tokenize_captions(captions: Mapping[str, Sequence[str]],
                      tokenizer: str) -> dict[str, list[str]]:
  """`{id: [tokenised caption, ...]}` with the PTB tokenizer ("ptb") or `_simple_tokenize`."""
  if tokenizer == "simple":
    return {k: [_simple_tokenize(c) for c in v] for k, v in captions.items()}
  return ptb_module.PTBTokenizer().tokenize(
      {k: [{"caption": c} for c in v] for k, v in captions.items()})


def _choose_tokenizer(tokenizer: str) -> tuple[str, str | None]:
  """The tokenizer to run and, when "auto" falls back to "simple", why."""
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
  problem = java_problem()
  if tokenizer == "ptb" and problem:
    raise ValueError(f"the PTB tokenizer cannot run: {problem}; or pass tokenizer='simple'")
  if tokenizer == "auto":
    return ("simple", problem) if problem else ("ptb", None)
  return tokenizer, None


def _bleu(gts: dict, res: dict) -> dict[str, float]:
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}


def _cider_d(gts: dict, res: dict) -> dict[str, float]:
  # pycocoevalcap's Cider is CIDEr-D: clipped tf-idf n-gram similarity with a Gaussian length
  # penalty (sigma 6), averaged over n = 1..4 and the references, times 10.
  return {"cider_d": float(Cider().compute_score(gts, res)[0])}


def _meteor(gts: dict, res: dict) -> dict[str, float]:
  scorer = meteor_module.Meteor()  # its finaliser stops the Java process
  try:
    score, _ = scorer.compute_score(gts, res)
  except Exception:
    # compute_score fails holding its lock, which the finaliser waits for: stop Java and free
    # the lock here.
    scorer.meteor_p.kill()
    if scorer.lock.locked():
      scorer.lock.release()
    raise
  return {"meteor": float(score)}


def _spice(gts: dict, res: dict) -> dict[str, float]:
  score, _ = spice_module.Spice().compute_score(gts, res)
  return {"spice": float(score)}


_SCORERS = {"bleu": _bleu, "meteor": _meteor, "cider_d": _cider_d, "spice": _spice}


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                  metrics: Sequence[str]) -> None:
  unknown = [m for m in metrics if m not in CAPTION_METRICS]
  if unknown:
    raise ValueError(f"unknown caption metrics {unknown}; choose from {', '.join(CAPTION_METRICS)}")
  if not predictions:
    raise ValueError("caption: no predictions to score")
  for key in predictions:
    if key not in references:
      raise ValueError(f"caption: image {key!r} has no reference captions; check that the "
                       f"answers and the annotation file come from the same split")
    if not references[key]:
      raise ValueError(f"caption: image {key!r} has an empty list of reference captions")


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   metrics: Sequence[str] = CAPTION_METRICS, tokenizer: str = "auto",
                   max_words: int = PREDICTION_MAX_WORDS,
                   max_reference_words: int = REFERENCE_MAX_WORDS) -> dict[str, Any]:
  """Corpus-level caption metrics of `predictions` against `references`.

  predictions: `{image id: generated caption}`; references: `{image id: [captions]}` holding
    every predicted id (ids without a prediction are ignored).
  metrics: any of "bleu" (BLEU-1..4), "meteor", "cider_d", "spice".
  tokenizer: "ptb" (Java), "simple" (pure Python, approximate) or "auto" (PTB when Java runs).
  CIDEr-D weighs n-grams by their document frequency over the scored references, so it needs a
  corpus of many images; like aac-metrics it refuses a single one (`unavailable`).
  Returns `bleu_1`..`bleu_4`, `meteor`, `cider_d`, `spice` for those computed (BLEU, METEOR and
  SPICE in [0, 1], CIDEr-D in [0, 10]), `unavailable` (`{metric: reason}`), `tokenizer` and
  `num_images`.
  """
  _check_inputs(predictions, references, metrics)
  tokenizer, fallback_reason = _choose_tokenizer(tokenizer)
  ids = list(predictions)
  res = tokenize_captions({k: [preprocess_caption(predictions[k], max_words)] for k in ids},
                          tokenizer)
  gts = tokenize_captions(
      {k: [preprocess_caption(c, max_reference_words) for c in references[k]] for k in ids},
      tokenizer)
  report: dict[str, Any] = {}
  unavailable = {"ptb_tokenizer": fallback_reason} if fallback_reason else {}
  availability = caption_metric_availability()
  if len(ids) < 2:
    availability["cider_d"] = (f"CIDEr-D needs at least 2 images ({len(ids)} given): aac-metrics, "
                               f"which eval_image_caption.py scores with, refuses fewer")
  for name in CAPTION_METRICS:
    if name not in metrics:
      continue
    reason = availability[name]
    if reason:
      unavailable[name] = reason
      continue
    try:
      report.update(_SCORERS[name](gts, res))
    except Exception as e:  # noqa: BLE001 - a Java scorer failing must not lose the others
      if name not in ("meteor", "spice"):
        raise
      unavailable[name] = f"{name} failed to run: {type(e).__name__}: {e}"
  report.update(unavailable=unavailable, tokenizer=tokenizer, num_images=len(ids))
  return report


def _captions(value: Any) -> list[str]:
  return [value] if isinstance(value, str) else list(value)


def _record_captions(record: Any, what: str) -> list[str]:
  if not isinstance(record, Mapping) or "caption" not in record:
    raise ValueError(f"caption: {what} has no 'caption': {record!r}")
  return _captions(record["caption"])


def references_from_annotations(annotations: Any,
                                answer_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
  """`{image id: [captions]}` from a COCO captions file's content (`{"annotations":
  [{"image_id", "caption"}]}`), a mapping `{id: caption or [captions]}`, a list of records
  with `question_id` and `caption` (a string or a list), or a list of records without ids
  (coco_karpathy_test.json, flickr30k_test.json: `{"image", "caption": [...]}`).

  The last kind is matched by position, as eval_image_caption.py does (`anno[i]` for the
  i-th answer line): `answer_ids` are the answers' ids in file order.
  """
  if isinstance(annotations, Mapping) and "annotations" in annotations:
    references: dict[str, list[str]] = {}
    for a in annotations["annotations"]:
      references.setdefault(str(a["image_id"]), []).append(a["caption"])
    return references
  if isinstance(annotations, Mapping):
    return {str(k): _captions(v) for k, v in annotations.items()}
  annotations = list(annotations)
  if all(isinstance(r, Mapping) and "question_id" in r for r in annotations):
    records = index_unique(annotations, lambda r: str(r["question_id"]), "caption annotations")
    return {k: _record_captions(r, f"annotation {k!r}") for k, r in records.items()}
  if answer_ids is None:
    raise ValueError("caption: annotation records without 'question_id' are matched to the "
                     "answers by position; give the answers' ids in file order")
  if len(answer_ids) > len(annotations):
    raise ValueError(f"caption: {len(answer_ids)} answers but {len(annotations)} annotation "
                     f"records; eval_image_caption.py pairs the i-th answer with the i-th "
                     f"record, so the answers must come from this annotation file's questions")
  return {k: _record_captions(annotations[i], f"annotation record {i}")
          for i, k in enumerate(answer_ids)}


def score_captions(predictions: Iterable[Record] | PathLike, annotations: Any, *,
                   metrics: Sequence[str] = CAPTION_METRICS, tokenizer: str = "auto") -> dict:
  """`caption_scores` for answer records (`question_id` = image id, `text` = caption).

  annotations: as `references_from_annotations` reads them (e.g. COCO's captions_val2014.json
    or the Karpathy test split's list, the latter matched by answer position).
  """
  records = as_answer_records(predictions, "caption")
  texts = index_unique(records, lambda r: str(r["question_id"]), "caption answers")
  return caption_scores({k: r["text"] for k, r in texts.items()},
                        references_from_annotations(annotations, list(texts)), metrics=metrics,
                        tokenizer=tokenizer)
