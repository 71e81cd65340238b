"""LLaVA-Bench (in-the-wild): a judge compares our answers with GPT-4's, per category.

The protocol of llava/eval/eval_gpt_review_bench.py and summarize_gpt_review.py:

- Files (the benchmark's own folder): `questions.jsonl` (question_id, image, text,
  category: conv | detail | complex), `context.jsonl` (image, caption: the description the
  text-only judge reads), `answers_gpt4.jsonl` (the reference answers, line by line with
  the questions), and `rule.json`, LLaVA's llava/eval/table/rule.json (the judge's
  instruction per category, `llava_bench_{category}`; copy it beside the questions).
- For the i-th question, the judge reads the caption, the question, the reference answer as
  "Assistant 1" and ours as "Assistant 2", and the category's instruction; it is asked with
  the system line of configs/eval/llava_bench.yaml, temperature 0.2, up to 1024 tokens.
- Its first line holds the two scores: commas become spaces and the line must split on
  single spaces into exactly two numbers, else the review scores (-1, -1), which the
  summary then averages in like any other (a quirk of the reference, kept).
- Summary: per category and over all, the mean of each assistant's scores; the relative
  score is 100 * mean(ours) / mean(reference), the means first rounded to three decimals and
  the ratio to one, as the paper's table reports it.
Reviews go to `reviews.jsonl` in the reference's layout (id, question_id, answer1_id,
answer2_id, category, content, tuple).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from sqllava_jax.evaluation.answers import as_answer_records, load_json_or_jsonl
from sqllava_jax.evaluation.judge import Judge
from sqllava_jax.evaluation.outputs import write_jsonl


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The judge's settings (configs/eval/llava_bench.yaml `judge`)."""
  system: str
  temperature: float = 0.2
  max_tokens: int = 1024


def parse_scores(review: str) -> tuple[float, float]:
  """(reference, ours) from the review's first line, or (-1, -1) when it is not two numbers."""
  pair = review.split("\n")[0].replace(",", " ").split(" ")
  if len(pair) != 2:
    return (-1.0, -1.0)
  try:
    return (float(pair[0]), float(pair[1]))
  except ValueError:
    return (-1.0, -1.0)


def review_content(caption: Any, question: str, reference: str, ours: str,
                   rule: Mapping[str, str]) -> str:
  """The judge's user message: context, question, both answers, the category's instruction."""
  caption = "\n".join(caption) if isinstance(caption, list) else caption
  role = rule["role"]
  return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
          f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
          f"[{role} 2]\n{ours}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def review(judge: Judge, protocol: Protocol, questions: Sequence[Mapping],
           contexts: Sequence[Mapping], references: Sequence[Mapping], answers: Any,
           rules: Mapping[str, Mapping[str, str]]) -> list[dict]:
  """One review per question, in question order (answers pair with questions line by line,
  as in the reference, and must carry the same question ids)."""
  answers = as_answer_records(answers, "llava_bench")
  if not len(questions) == len(references) == len(answers):
    raise ValueError(f"llava_bench: {len(questions)} questions, {len(references)} reference "
                     f"answers and {len(answers)} answers; they pair line by line")
  captions = {c["image"]: c["caption"] for c in contexts}
  reviews = []
  for i, (q, ref, ans) in enumerate(zip(questions, references, answers)):
    if str(ans["question_id"]) != str(q["question_id"]):
      raise ValueError(f"llava_bench: answer {i} is for question {ans['question_id']!r}, "
                       f"line {i} of questions.jsonl is {q['question_id']!r}")
    category = f"llava_bench_{q['category']}"
    if category not in rules:
      raise ValueError(f"llava_bench: rule.json has no {category!r}; use LLaVA's "
                       "llava/eval/table/rule.json")
    if q["image"] not in captions:
      raise ValueError(f"llava_bench: context.jsonl has no caption for image {q['image']!r}")
    content = review_content(captions[q["image"]], q["text"], ref["text"], ans["text"],
                             rules[category])
    reply = judge.chat([{"role": "system", "content": protocol.system},
                        {"role": "user", "content": content}],
                       temperature=protocol.temperature, max_tokens=protocol.max_tokens)
    reviews.append({"id": i + 1, "question_id": q["question_id"],
                    "answer1_id": ref.get("answer_id", ref["question_id"]),
                    "answer2_id": ans.get("answer_id", ans["question_id"]),
                    "category": category, "content": reply.content,
                    "tuple": list(parse_scores(reply.content))})
  return reviews


def summarize(reviews: Sequence[Mapping]) -> dict:
  """`relative_score` (over all reviews) and `per_category` ({category: {relative,
  reference, ours}}), the scores on summarize_gpt_review.py's scale (x10, one decimal)."""
  groups = collections.defaultdict(list)
  for r in reviews:
    groups[r["category"].removeprefix("llava_bench_")].append(r["tuple"])
    groups["all"].append(r["tuple"])
  table = {}
  for name, pairs in sorted(groups.items()):
    # The reference rounds both means to three decimals before dividing.
    ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
    ours = round(sum(p[1] for p in pairs) / len(pairs), 3)
    table[name] = {"relative": round(ours / ref * 100, 1) if ref else None,
                   "reference": round(ref * 10, 1), "ours": round(ours * 10, 1)}
  return {"relative_score": table["all"]["relative"],
          "per_category": {k: v for k, v in table.items() if k != "all"},
          "reference_score": table["all"]["reference"], "our_score": table["all"]["ours"],
          "num_questions": len(reviews),
          "unparsed_reviews": sum(1 for r in reviews if list(r["tuple"]) == [-1.0, -1.0])}


def load_bench(folder: str) -> dict:
  """questions, contexts, references and rules from the benchmark's folder."""
  def need(name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      hint = " (copy LLaVA's llava/eval/table/rule.json there)" if name == "rule.json" else ""
      raise FileNotFoundError(f"llava_bench: {path} is missing{hint}")
    return path
  return {"questions": load_json_or_jsonl(need("questions.jsonl")),
          "contexts": load_json_or_jsonl(need("context.jsonl")),
          "references": load_json_or_jsonl(need("answers_gpt4.jsonl")),
          "rules": load_json_or_jsonl(need("rule.json"))}


def write_reviews(path: str, reviews: Sequence[Mapping]) -> str:
  return write_jsonl(path, reviews)
