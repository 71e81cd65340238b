"""The synthetic set's eval tasks, registered with `evaluation.tasks` (same result layout).

- `synthetic_vqa`: exact match (case, whitespace and a final full stop ignored) against the
  generator's gold answers (what the question names, then the answer: `northwest red`),
  overall and per question type.
- `synthetic_sq`: of the questions the model asked about each image (self-questioning), the
  fraction that are well-formed questions of the set's grammar about objects actually in
  the image (`synthetic.question_is_valid`).

For both, the annotations are the question records themselves (they carry `answer` and
`scene`), so `--data` is all `eval` needs.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

from sqllava_jax.demo import synthetic
from sqllava_jax.evaluation.answers import as_answer_records, lookup, mean, records_by_question_id
from sqllava_jax.evaluation.tasks import register_task


def synthetic_vqa(predictions: Any, annotations: Sequence[Mapping]) -> dict:
  """annotations: records with `question_id`, `answer` (and `question_type`)."""
  index = records_by_question_id(annotations, "synthetic_vqa")
  by_type = collections.defaultdict(list)
  for p in as_answer_records(predictions, "synthetic_vqa"):
    gold = lookup(index, p["question_id"], "synthetic_vqa")
    correct = synthetic.is_correct(p["text"], gold["answer"])
    by_type[gold.get("question_type", "all")].append(correct)
  every = [c for v in by_type.values() for c in v]
  return {"accuracy": mean(every), "correct": int(sum(every)), "num_questions": len(every),
          "per_type": {t: {"accuracy": mean(v), "num_questions": len(v)}
                       for t, v in sorted(by_type.items())}}


def synthetic_sq(predictions: Any, annotations: Sequence[Mapping]) -> dict:
  """predictions: one record per asked question, `text` the question and `source_id` the
  image's question id; annotations: records with `question_id` and `scene`."""
  index = records_by_question_id(annotations, "synthetic_sq")
  valid, parsed, types = [], [], collections.Counter[str]()
  for p in as_answer_records(predictions, "synthetic_sq"):
    scene = synthetic.Scene.from_json(lookup(index, p.get("source_id", p["question_id"]),
                                             "synthetic_sq")["scene"])
    form = synthetic.parse_question(p["text"])
    parsed.append(form is not None)
    valid.append(synthetic.question_is_valid(p["text"], scene))
    types[form[0] if form else "malformed"] += 1
  return {"valid_fraction": mean(valid), "well_formed_fraction": mean(parsed),
          "num_questions": len(valid), "question_types": dict(sorted(types.items()))}


register_task("synthetic_vqa", synthetic_vqa, self_annotated=True)
register_task("synthetic_sq", synthetic_sq, self_annotated=True, self_questioning=True)
