"""Self-questioning as a data engine: images in, LLaVA-format training records out.

    questions = folder_questions("images/", protocol.describe)      # or json_questions(...)
    summary = run_data_engine(engine, questions, settings, "out/")  # process 0: a dict

The images are the "questions" of an `eval_loop.run_eval` run in self-questioning mode, so
the data engine shares eval's machinery: batched (`Engine`), each process answering its
shard with process 0 merging, answers appended per batch and continued on a rerun (a killed
run asks nothing twice and, its batches being fixed, ends with what an uninterrupted run
writes), bad inputs skipped and counted (or `strict`). Process 0 then writes
`OUT/records.json`, one record per image:

    {"id", "image", "conversations": [
        {"from": "human", "value": "<image>\\n" + describe prompt},
        {"from": "gpt", "value": description},
        {"from": "human", "value": asked question 1}, {"from": "gpt", "value": its answer},
        ...]}

The asked questions are written as `human` turns, not `vuser`: `train` with `v1_sq` then
relabels each as a VUSER turn with probability `data.sq_r` (the paper's recipe, the same
draw as for any other record), so the share of the model's own sampled questions it learns
to ask is the run's setting, not forced to all of them; the answers are always learnt; and
the file also trains with `vicuna_v1`, which has no VUSER role. A question or answer that
came out empty (or holding `<image>`) is dropped with its pair; an image whose description
did, or that kept no pair, gives no record (both counted in the summary).
"""

from __future__ import annotations

import collections
import os
from typing import Optional, Sequence

from sqllava_jax.data.tokenizer import IMAGE_TOKEN
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings, read_jsonl, run_eval
from sqllava_jax.evaluation.outputs import write_json
from sqllava_jax.evaluation.questions import MALFORMED, load_questions, skip_report

RECORDS = "records.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def folder_questions(folder: str, describe: str) -> list[dict]:
  """One question per image file under `folder` (recursively, sorted by relative path):
  id and image the relative path, text the describe prompt."""
  if not os.path.isdir(folder):
    raise ValueError(f"--images {folder} is not a folder")
  paths = []
  for root, _, files in os.walk(folder):
    paths += [os.path.relpath(os.path.join(root, f), folder) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not paths:
    raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return [{"question_id": p, "image": p, "text": describe} for p in sorted(paths)]


def json_questions(path: str, describe: str) -> list[dict]:
  """One question per record of a LLaVA JSON, in file order: its id and image, the describe
  prompt (malformed records kept as they are, and text-only ones, to be skipped and counted
  by `run_eval`)."""
  return [q if MALFORMED in q else {**q, "text": describe} for q in load_questions(path)]


def _usable(text: str) -> bool:
  return bool(text.strip()) and IMAGE_TOKEN not in text


def training_records(answers: Sequence[dict], questions: Sequence[dict], describe: str
                     ) -> tuple[list[dict], collections.Counter]:
  """The merged answers (one per asked question, in question order) -> one LLaVA record per
  image, and what was dropped (empty_pair, empty_description, no_pair)."""
  image_of = {str(q["question_id"]): q.get("image") for q in questions if MALFORMED not in q}
  by_image: dict[str, list[dict]] = {}
  for a in answers:
    by_image.setdefault(str(a["source_id"]), []).append(a)
  records, dropped = [], collections.Counter[str]()
  for source_id, asked in by_image.items():
    if not _usable(asked[0]["description"]):
      dropped["empty_description"] += 1
      continue
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{describe}"},
             {"from": "gpt", "value": asked[0]["description"]}]
    for a in asked:
      if not (_usable(a["text"]) and _usable(a["answer"])):
        dropped["empty_pair"] += 1
        continue
      turns += [{"from": "human", "value": a["text"]}, {"from": "gpt", "value": a["answer"]}]
    if len(turns) == 2:
      dropped["no_pair"] += 1
      continue
    records.append({"id": source_id, "image": image_of[source_id], "conversations": turns})
  return records, dropped


def run_data_engine(engine: Engine, questions: Sequence[dict], settings: EvalSettings,
                    out_dir: str, *, progress: bool = True, question_file: Optional[str] = None
                    ) -> Optional[dict]:
  """Self-questions every image (continuing a run `out_dir` holds) and writes
  `OUT/records.json`; returns the summary on process 0, None elsewhere."""
  if not (settings.self_questioning and settings.answer_questions):
    raise ValueError("the data engine needs self_questioning and answer_questions: a training "
                     "record holds each question's answer")
  done = run_eval(engine, questions, settings, out_dir, progress=progress, desc="ask",
                  question_file=question_file)
  if done is None:
    return None
  answers_path, skipped = done
  records, dropped = training_records(read_jsonl(answers_path), questions,
                                      settings.protocol.describe)
  path = write_json(os.path.join(out_dir, RECORDS), records, indent=1)
  return {"records": path, "answers": answers_path, "num_images": len(questions),
          "num_records": len(records),
          "num_questions": sum((len(r["conversations"]) - 2) // 2 for r in records),
          "dropped": dict(sorted(dropped.items())),
          **skip_report(skipped, len(questions) - len(skipped))}
