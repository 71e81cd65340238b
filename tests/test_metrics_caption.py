"""Caption metrics: BLEU and CIDEr-D against hand and direct computations; the Java scorers
where Java runs."""

import math
from collections import Counter

import numpy as np
import pytest

from sqllava_jax.evaluation import caption_metrics as cm

FAST = ("bleu", "cider_d")  # the pure-Python metrics


def _scores(predictions, references, **kwargs):
  kwargs.setdefault("metrics", FAST)
  kwargs.setdefault("tokenizer", "simple")
  return cm.caption_scores(predictions, references, **kwargs)


@pytest.mark.parametrize("text, max_words, expected", [
    # Worked out by hand from pre_caption in SQ-LLaVA's sqllava/eval/eval_image_caption.py.
    ('A Man, riding (a) "horse"!', 20, "a man, riding a horse"),  # "," is kept
    ("Two  dogs\n\nplay.", 20, "two dogs play"),    # runs of whitespace become one space
    ("a\tb c", 1, "a\tb"),                          # a lone tab is no run: one word "a\tb"
    ("a\tb c", 2, "a\tb c"),
    ("dog\n", 20, "dog"), ("dog.\n", 20, "dog"),    # trailing newline / run stripped
    ("\ndog", 20, "\ndog"),                         # only spaces are stripped at the front
    ("~a*b#c:d;e~", 20, "a b c d e"), ("", 20, ""),
    (" ".join(f"w{i}" for i in range(21)), 20, " ".join(f"w{i}" for i in range(20))),
    (" ".join(f"w{i}" for i in range(20)), 20, " ".join(f"w{i}" for i in range(20))),
])
def test_preprocess_caption_as_pre_caption(text, max_words, expected):
  assert cm.preprocess_caption(text, max_words) == expected


def test_official_word_limits():
  # eval_image_caption.py: predictions at its --max_words default, references at 50.
  assert (cm.PREDICTION_MAX_WORDS, cm.REFERENCE_MAX_WORDS) == (20, 50)


def test_identical_caption_gives_bleu_one():
  result = _scores({"1": "a man rides a brown horse"}, {"1": ["a man rides a brown horse"]})
  for n in range(1, 5):
    assert result[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)


def test_bleu_by_hand():
  # Candidate and reference both 6 words, so no brevity penalty. Clipped matches:
  # unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5 (the cat, on the, the mat),
  # trigrams 1/4 (on the mat), 4-grams 0/3.
  result = _scores({"1": "the cat sat on the mat"}, {"1": ["the cat is on the mat"]})
  assert result["bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
  assert result["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-6)
  assert result["bleu_3"] == pytest.approx(0.5, rel=1e-6)  # (5/6 * 3/5 * 1/4) ** (1/3)
  # coco-caption adds 1e-15 to each match count, so no 4-gram match is tiny, not 0.
  assert result["bleu_4"] < 1e-3


def test_bleu_brevity_penalty_by_hand():
  result = _scores({"1": "the cat"}, {"1": ["the cat sat on the mat"]})
  assert result["bleu_1"] == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)


def _ngrams(words, n):
  return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _direct_bleu(candidates, references, n_max=4):
  """Corpus BLEU: clipped n-gram precisions summed over images, closest reference length."""
  matches, totals = [0] * n_max, [0] * n_max
  cand_len = ref_len = 0
  for key, cand in candidates.items():
    words = cand.split()
    refs = [r.split() for r in references[key]]
    cand_len += len(words)
    ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    for n in range(1, n_max + 1):
      counts = _ngrams(words, n)
      max_ref = Counter()
      for r in refs:
        max_ref |= _ngrams(r, n)
      matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
      totals[n - 1] += sum(counts.values())
  penalty = min(1.0, math.exp(1 - ref_len / cand_len))
  precisions = np.array(matches) / np.array(totals)
  return [penalty * float(np.prod(precisions[:n]) ** (1 / n)) for n in range(1, n_max + 1)]


def _direct_cider_d(candidates, references, sigma=6.0):
  """CIDEr-D from its definition (Vedantam et al. 2015, with coco-caption's clipping)."""
  num_images = len(references)
  doc_freq = Counter()
  for refs in references.values():
    doc_freq.update({g for r in refs for n in range(1, 5) for g in _ngrams(r.split(), n)})

  def vectors(sentence):
    words = sentence.split()
    return [{g: c * (math.log(num_images) - math.log(max(1.0, doc_freq[g])))
             for g, c in _ngrams(words, n).items()} for n in range(1, 5)], len(words)

  scores = []
  for key, cand in candidates.items():
    cand_vecs, cand_len = vectors(cand)
    total = np.zeros(4)
    for ref in references[key]:
      ref_vecs, ref_len = vectors(ref)
      for n in range(4):
        c, r = cand_vecs[n], ref_vecs[n]
        norm = math.sqrt(sum(v * v for v in c.values())) * math.sqrt(sum(v * v for v in r.values()))
        dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in c.items())
        cosine = dot / norm if norm else 0.0
        total[n] += cosine * math.exp(-((cand_len - ref_len) ** 2) / (2 * sigma ** 2))
    scores.append(10.0 * total.mean() / len(references[key]))
  return float(np.mean(scores))


_CANDIDATES = {
    "1": "a man riding a brown horse on the beach",
    "2": "two dogs play with a red ball in the grass",
    "3": "a plate of food with broccoli and rice",
}
_REFERENCES = {
    "1": ["a man rides a horse on the beach", "a person riding a brown horse near the sea"],
    "2": ["two dogs playing with a ball on the grass", "a pair of dogs chase a red ball"],
    "3": ["a plate with rice and broccoli", "food on a white plate with broccoli and rice"],
}


def test_bleu_matches_direct_computation():
  result = _scores(_CANDIDATES, _REFERENCES)
  expected = _direct_bleu(_CANDIDATES, _REFERENCES)
  assert expected[3] > 0.05  # every order has matches, so the comparison checks all four
  np.testing.assert_allclose([result[f"bleu_{n}"] for n in range(1, 5)], expected, rtol=1e-6)


def test_cider_d_matches_direct_computation():
  result = _scores(_CANDIDATES, _REFERENCES)
  expected = _direct_cider_d(_CANDIDATES, _REFERENCES)
  assert 0.5 < expected < 10  # a non-trivial value: partial matches, shared words, lengths
  np.testing.assert_allclose(result["cider_d"], expected, rtol=1e-9)


def test_cider_d_by_hand():
  # Each image's n-grams occur in its own references only: idf = log 2 for all of them. An
  # identical 4-word caption has cosine 1 at n = 1..4 -> 10; a 2-word caption has no 3- or
  # 4-grams, so its mean over n is 2/4 -> 5.
  four = _scores({"1": "a b c d", "2": "e f g h"}, {"1": ["a b c d"], "2": ["e f g h"]})
  assert four["cider_d"] == pytest.approx(10.0, abs=1e-9)
  two = _scores({"1": "a b", "2": "e f"}, {"1": ["a b"], "2": ["e f"]})
  assert two["cider_d"] == pytest.approx(5.0, abs=1e-9)
  # One image alone: aac-metrics (what SQ-LLaVA scores with) refuses CIDEr-D of fewer than two
  # candidates; coco-caption would give 0 (every n-gram in all reference sets, idf 0).
  alone = _scores({"1": "a b c d"}, {"1": ["a b c d"]})
  assert "cider_d" not in alone
  assert "at least 2 images" in alone["unavailable"]["cider_d"]
  assert alone["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_prediction_truncated_to_twenty_words():
  reference = " ".join(f"w{i}" for i in range(20))
  result = _scores({"1": reference + " extra words here"}, {"1": [reference]})
  assert result["bleu_4"] == pytest.approx(1.0, abs=1e-6)
  result = _scores({"1": reference + " extra words here"}, {"1": [reference]}, max_words=23)
  assert result["bleu_1"] == pytest.approx(20 / 23, rel=1e-6)


def test_empty_prediction_counts_in_the_corpus():
  # The empty caption adds no n-grams but its reference length enters the corpus brevity
  # penalty: candidate length 2, reference length 4 -> BLEU-1 = 1 * exp(1 - 4/2). For CIDEr-D
  # it scores 0 and the other image 5 (2-word captions, as in test_cider_d_by_hand).
  result = _scores({"1": "", "2": "e f"}, {"1": ["a b"], "2": ["e f"]})
  assert result["bleu_1"] == pytest.approx(math.exp(-1), rel=1e-6)
  assert result["cider_d"] == pytest.approx(5.0 / 2, abs=1e-9)


def test_caption_input_errors():
  with pytest.raises(ValueError, match="no predictions"):
    _scores({}, {"1": ["a"]})
  with pytest.raises(ValueError, match="image '9'"):
    _scores({"9": "a cat"}, {"1": ["a cat"]})
  with pytest.raises(ValueError, match="unknown caption metrics.*bleu, meteor, cider_d, spice"):
    _scores({"1": "a"}, {"1": ["a"]}, metrics=("rouge",))
  with pytest.raises(ValueError, match="unknown tokenizer"):
    _scores({"1": "a"}, {"1": ["a"]}, tokenizer="nltk")


def test_score_captions_reads_coco_annotations():
  coco = {"annotations": [{"image_id": 1, "caption": "A cat on a mat."},
                          {"image_id": 1, "caption": "a cat sits on a mat"},
                          {"image_id": 2, "caption": "a dog"}]}
  predictions = [{"question_id": 1, "text": "a cat on a mat"}]
  result = cm.score_captions(predictions, coco, metrics=FAST, tokenizer="simple")
  assert result["bleu_4"] == pytest.approx(1.0, abs=1e-6)
  assert result["num_images"] == 1 and result["tokenizer"] == "simple"


def test_karpathy_annotations_are_matched_by_position():
  # coco_karpathy_test.json has no ids: eval_image_caption.py pairs answer line i with
  # record i and flattens its list of captions.
  karpathy = [{"image": "val2014/a.jpg", "caption": ["a b c d", "a b c e"]},
              {"image": "val2014/b.jpg", "caption": ["e f g h"]},
              {"image": "val2014/c.jpg", "caption": ["x y"]}]
  assert cm.references_from_annotations(karpathy, ["7", "3"]) == {
      "7": ["a b c d", "a b c e"], "3": ["e f g h"]}
  predictions = [{"question_id": 7, "text": "a b c d"}, {"question_id": 3, "text": "e f g h"}]
  result = cm.score_captions(predictions, karpathy, metrics=FAST, tokenizer="simple")
  assert result["bleu_4"] == pytest.approx(1.0, abs=1e-6)
  assert result["num_images"] == 2
  with pytest.raises(ValueError, match="4 answers but 3 annotation records"):
    cm.references_from_annotations(karpathy, ["1", "2", "3", "4"])
  with pytest.raises(ValueError, match="record 1 has no 'caption'"):
    cm.references_from_annotations([karpathy[0], {"image": "b.jpg"}], ["1", "2"])


def test_availability_names_a_reason_for_each_missing_metric():
  availability = cm.caption_metric_availability()
  assert set(availability) == set(cm.CAPTION_METRICS)
  assert availability["bleu"] is None and availability["cider_d"] is None
  for reason in availability.values():
    assert reason is None or len(reason) > 20


def test_without_java_the_java_metrics_are_reported_not_failed(monkeypatch):
  monkeypatch.setattr(cm, "java_problem", lambda: "no `java` on PATH")
  result = cm.caption_scores({"1": "a b c d", "2": "e f g h"}, {"1": ["a b c d"], "2": ["e f g h"]},
                             metrics=cm.CAPTION_METRICS, tokenizer="auto")
  assert result["tokenizer"] == "simple"
  assert result["bleu_4"] == pytest.approx(1.0, abs=1e-6)
  assert result["cider_d"] == pytest.approx(10.0, abs=1e-9)
  assert "meteor" not in result and "spice" not in result
  assert set(result["unavailable"]) == {"ptb_tokenizer", "meteor", "spice"}
  assert "no `java` on PATH" in result["unavailable"]["meteor"]
  with pytest.raises(ValueError, match="PTB tokenizer cannot run.*tokenizer='simple'"):
    cm.caption_scores({"1": "a"}, {"1": ["a"]}, tokenizer="ptb")


@pytest.fixture(scope="module")
def java_scores():
  if cm.java_problem():
    pytest.skip(f"Java cannot run here: {cm.java_problem()}")
  predictions = {"1": "A man's dog, running.", "2": "two cats sleep on a bed"}
  references = {"1": ["a man 's dog running"], "2": ["a bowl of soup on a table"]}
  return cm.caption_scores(predictions, references, metrics=cm.CAPTION_METRICS, tokenizer="ptb")


def test_ptb_tokenizer_splits_possessives_and_drops_punctuation():
  if cm.java_problem():
    pytest.skip(f"Java cannot run here: {cm.java_problem()}")
  tokens = cm.tokenize_captions({"1": ["a man's dog, running"]}, "ptb")
  assert tokens == {"1": ["a man 's dog running"]}


def test_meteor_runs_where_java_does(java_scores):
  # Image 1 matches its reference exactly after PTB tokenization, image 2 shares only "on"
  # and "a": the corpus METEOR lies strictly between 0 and 1.
  assert "meteor" in java_scores, java_scores["unavailable"]
  assert 0.0 < java_scores["meteor"] < 1.0
  assert java_scores["tokenizer"] == "ptb"


def test_spice_runs_or_says_why_not(java_scores):
  reason = cm.caption_metric_availability()["spice"]
  if reason is None:
    assert "spice" in java_scores or "spice" in java_scores["unavailable"]
  else:
    assert "spice" not in java_scores
    assert java_scores["unavailable"]["spice"] == reason
    assert "CoreNLP" in reason
