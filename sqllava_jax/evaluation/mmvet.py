"""MM-Vet: a judge grades each answer against the ground truth; scores per capability.

The protocol of the official evaluator (yuweihao/MM-Vet `mm-vet_evaluator.py`):

- Files: `mm-vet.json` (`{"v1_0": {"question", "answer", "capability": [...]}, ...}`),
  LLaVA's `llava-mm-vet.jsonl` (question_id 0, 1, ... for sample `v1_{question_id}`), the
  images, and the evaluator's few-shot prompt. The prompt is read from the official
  evaluator file itself (its module-level string `prompt`; put `mm-vet_evaluator.py` beside
  `mm-vet.json`) or from a plain text file holding it.
- Per sample the judge reads the prompt, a newline, then `question | ground truth |
  prediction | ` with ` <AND> ` / ` <OR> ` spaced out in the ground truth; temperature 0,
  3 tokens. The grade is the reply's first space-separated word as a number in [0, 1].
  Otherwise the judge is asked again with "Predict the correctness of the answer (digit): "
  after the row, temperature 0, then 0.5, 1.0, 1.5 higher each time; after five unreadable
  replies the grade is 0.0 (the reference sends a sixth request it never reads; we do not).
- Scores: for each capability, 100 * (sum of the grades of the samples needing it) / (their
  number); `total` over all samples; each rounded to one decimal. Also per capability
  integration (the exact set of capabilities of a sample).
- Upload file (the online evaluator's and the official script's input): `{"v1_{id}":
  answer}` as JSON.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
from typing import Any, Mapping, Optional

from sqllava_jax.evaluation.answers import as_answer_records, load_json_or_jsonl
from sqllava_jax.evaluation.judge import Judge
from sqllava_jax.evaluation.outputs import write_json


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The grader's settings (configs/eval/mmvet.yaml `judge`)."""
  retry_suffix: str
  temperature: float = 0.0
  temperature_step: float = 0.5
  max_tokens: int = 3
  max_replies: int = 5


def read_prompt(path: str) -> str:
  """The few-shot prompt: the `prompt = "..."` string of the evaluator's .py file (read with
  `ast`, nothing is executed), or the whole of any other file."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if not path.endswith(".py"):
    return text
  for node in ast.parse(text, filename=path).body:
    if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "prompt"
                                             for t in node.targets)
        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
      return node.value.value
  raise ValueError(f"{path} has no module-level string `prompt`; give MM-Vet's official "
                   "mm-vet_evaluator.py or a text file holding its prompt")


def sample_id(question_id: Any) -> str:
  """LLaVA's scripts/convert_mmvet_for_eval.py: question 7 is sample `v1_7`."""
  return f"v1_{question_id}"


def grade_row(prompt: str, question: str, truth: str, prediction: str) -> str:
  truth = truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
  return prompt + "\n" + " | ".join([question, truth, prediction, ""])


def parse_grade(content: str) -> Optional[float]:
  try:
    grade = float(content.split(" ")[0].strip())
  except ValueError:
    return None
  return grade if 0.0 <= grade <= 1.0 else None


def grade(judge: Judge, protocol: Protocol, prompt: str, sample: Mapping[str, Any],
          prediction: str) -> dict:
  """`{"model", "content", "score"}` for one sample (lists of one run, the evaluator's
  grade-file layout)."""
  row = grade_row(prompt, sample["question"], sample["answer"], prediction)
  reply = judge.chat([{"role": "user", "content": row}], temperature=protocol.temperature,
                     max_tokens=protocol.max_tokens)
  score = parse_grade(reply.content)
  temperature = protocol.temperature
  for _ in range(protocol.max_replies - 1):
    if score is not None:
      break
    reply = judge.chat([{"role": "user", "content": row + protocol.retry_suffix}],
                       temperature=temperature, max_tokens=protocol.max_tokens)
    temperature += protocol.temperature_step
    score = parse_grade(reply.content)
  return {"model": [reply.model], "content": [reply.content],
          "score": [0.0 if score is None else score]}


def grade_all(judge: Judge, protocol: Protocol, prompt: str, samples: Mapping[str, Mapping],
              answers: Any) -> dict[str, dict]:
  """Grades of every answered sample, keyed by sample id."""
  predictions = {sample_id(p["question_id"]): p["text"]
                 for p in as_answer_records(answers, "mmvet")}
  unknown = sorted(set(predictions) - set(samples))
  if unknown:
    raise ValueError(f"mmvet: {unknown[0]!r} is not in mm-vet.json; use LLaVA's "
                     "llava-mm-vet.jsonl with the same release's mm-vet.json")
  return {k: grade(judge, protocol, prompt, samples[k], predictions[k])
          for k in samples if k in predictions}


def capability_scores(grades: Mapping[str, Mapping], samples: Mapping[str, Mapping]) -> dict:
  """`total`, `per_capability` and `per_integration` (x100, one decimal) over all samples of
  mm-vet.json (an ungraded sample counts 0), `num_samples` and `num_graded`."""
  sums: collections.Counter[str] = collections.Counter()
  counts: collections.Counter[str] = collections.Counter()
  int_sums: collections.Counter[str] = collections.Counter()
  int_counts: collections.Counter[str] = collections.Counter()
  for k, sample in samples.items():
    caps = frozenset(sample["capability"])
    score: Any = grades[k]["score"][0] if k in grades else 0.0
    for c in caps:
      sums[c] += score
      counts[c] += 1
    name = "_".join(sorted(caps))
    int_sums[name] += score
    int_counts[name] += 1
  total = sum(grades[k]["score"][0] for k in samples if k in grades)
  return {"total": round(total / len(samples) * 100, 1),
          "per_capability": {c: round(sums[c] / counts[c] * 100, 1)
                             for c, _ in counts.most_common()},
          "per_integration": {c: round(int_sums[c] / int_counts[c] * 100, 1)
                              for c, _ in int_counts.most_common()},
          "num_samples": len(samples), "num_graded": sum(1 for k in samples if k in grades)}


def load_samples(path: str) -> dict[str, dict]:
  data = load_json_or_jsonl(path)
  if not isinstance(data, Mapping) or not all(
      isinstance(v, Mapping) and {"question", "answer", "capability"} <= set(v)
      for v in data.values()):
    raise ValueError(f"{path}: expected MM-Vet's mm-vet.json, an object of samples with "
                     "'question', 'answer' and 'capability'")
  return dict(data)


def write_submission(path: str, answers: Any) -> str:
  return write_json(path, {sample_id(p["question_id"]): p["text"]
                           for p in as_answer_records(answers, "mmvet")}, indent=2)


def write_grades(path: str, grades: Mapping[str, Mapping]) -> str:
  return write_json(path, grades, indent=1)
