"""Batched generation over a question file, sharded over processes and devices, resumable.

Each process answers its block of rows of every batch (`data_parallel.batch_rows`), the
rows split over the mesh's `data`/`fsdp` axes, and appends its answers to
its log `answers.{i}-of-{n}.jsonl` after every batch (`answer_log`); process 0 then merges
them, in question order, into `answers.jsonl` (the LLaVA answers layout: question_id, prompt,
text, answer_id, model_id). A rerun into the same folder asks only the questions no log
holds yet. All processes run the same number of equally shaped batches (short shards pad
with inactive rows, whose answers are dropped), as the collectives inside require.

The batches are fixed by the question file: global batch b holds questions
[b * batch_size, (b + 1) * batch_size), each in the same row every time and on any number
of processes, with seed `seed + b`. A rerun runs only the batches that still hold an
unanswered question, answered questions turned into inactive rows in place; so a sampled
run (self-questioning) that was killed and continued draws what an uninterrupted one draws,
and one process what many draw (a row's draw depends on the batch's key, its row and its
own logits, not on the other rows).

Questions that cannot be asked are skipped and counted, never a crash midway: malformed and
repeated records (`questions.screen`, before anything runs) and unreadable images (as each
batch loads, logged so that a rerun does not try them again). With `strict` the first one
stops the run with the `BadRecord` naming it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import uuid
from typing import Callable, Collection, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.images import AspectRatio, resolve_image_path
from sqllava_jax.evaluation import answer_log
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.outputs import write_jsonl
from sqllava_jax.evaluation.prompts import load_image, load_inline_image, question_prompt
from sqllava_jax.evaluation.questions import screen, skip_entry
from sqllava_jax.evaluation.sampling import GREEDY, Sampling
from sqllava_jax.evaluation.self_questioning import Protocol, self_question

ANSWERS = "answers.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """batch_size is global (all processes); `self_questioning` runs the protocol instead of
  answering (`synthetic_sq`, `ask`), asking `questions_per_image` questions per image (and,
  with `answer_questions`, answering each); `strict` stops at the first bad question."""
  images_dir: str = ""
  template: str = "vicuna_v1"
  batch_size: int = 8
  max_new_tokens: int = 128
  sampling: Sampling = GREEDY
  seed: int = 0
  model_id: str = "sqllava-jax"
  aspect_ratio: AspectRatio = "pad"
  self_questioning: bool = False
  questions_per_image: int = 1
  protocol: Protocol = Protocol()
  checkpoint: str = ""  # which weights answer (`loading.checkpoint_identity`): a rerun
  # into the same folder with other weights must not continue this run's answers
  answer_questions: bool = False
  strict: bool = False


def answer_id(model_id: str, question_id, k: int = 0) -> str:
  """Deterministic, so reruns write identical files."""
  return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}/{k}").hex[:22]


def shard_path(out_dir: str, index: int, count: int) -> str:
  return answer_log.log_path(out_dir, index, count)


class _Images:
  """Loads each question's image (None for text-only questions); unreadable ones raise."""

  def __init__(self, engine: Engine, settings: EvalSettings):
    self.size, self.settings = engine.image_size, settings

  def __call__(self, question: dict) -> Optional[np.ndarray]:
    if not question.get("image"):
      return None
    if "image_base64" in question:  # MMBench's TSV carries its images inline
      return load_inline_image(question["image_base64"], name=question["image"], size=self.size,
                               aspect_ratio=self.settings.aspect_ratio)
    path = resolve_image_path(self.settings.images_dir, question["image"])
    return load_image(path, size=self.size, aspect_ratio=self.settings.aspect_ratio)


def _answers(engine: Engine, batch: Sequence[dict], pixels, settings: EvalSettings,
             seed: int, with_pixels: bool) -> list[list[dict]]:
  """Per question of the batch, its answer records (one, or one per asked question)."""
  if settings.self_questioning:
    asked = self_question(engine, pixels, n=settings.questions_per_image,
                          protocol=settings.protocol, answer=settings.answer_questions,
                          seed=seed)
    return [[{"question_id": f"{q['question_id']}#{k}", "source_id": q["question_id"],
              "prompt": q["text"], "text": text, "description": r.description,
              **({"answer": r.answers[k]} if r.answers is not None else {})}
             for k, text in enumerate(r.questions)] for q, r in zip(batch, asked)]
  prompts = [question_prompt(q["text"], template=settings.template, image=p is not None)
             for q, p in zip(batch, pixels)]
  done = engine.complete(prompts, pixels, max_new_tokens=settings.max_new_tokens,
                         sampling=settings.sampling, seed=seed, with_pixels=with_pixels)
  # A question may carry the `prompt` its benchmark's answer files record (ScienceQA's marks
  # its image with '<image>', which the official scorer reads).
  return [[{"question_id": q["question_id"], "prompt": q.get("prompt", q["text"]),
            "text": c.text}] for q, c in zip(batch, done)]


PAD_QUESTION = {"question_id": None, "text": "-"}


def _load_batch(items: list[tuple[int, dict]], size: int, images: Callable,
                blank: Optional[np.ndarray], done: Collection[int], strict: bool
                ) -> tuple[list, list, list[bool], list[dict]]:
  """(questions, pixels, active, skipped) of one batch, `size` rows in place: a question in
  `done`, one whose image cannot be read (listed in `skipped` with its `index`, or raised
  when `strict`) and the rows past the shard's end are inactive (`blank` pixels)."""
  rows, pixels, active, skipped = [], [], [], []
  for index, q in items:
    image, ok = blank, index not in done
    if ok:
      try:
        image = images(q)
      except BadRecord as e:
        e = e.with_context(record_id=str(q["question_id"]), index=index)
        if strict:
          raise e from None
        skipped.append(skip_entry(index, q["question_id"], e))
        image, ok = blank, False
    rows.append((index, q) if ok else (-1, PAD_QUESTION))
    pixels.append(image)
    active.append(ok)
  while len(rows) < size:
    rows.append((-1, PAD_QUESTION))
    pixels.append(blank)
    active.append(False)
  return rows, pixels, active, skipped


def pending_batches(num_questions: int, batch_size: int, done: Collection[int]) -> list[int]:
  """The global batches (every process runs them together) that hold a question not in
  `done`."""
  return [b for b in range(dp.num_batches(num_questions, batch_size))
          if any(i not in done for i in range(b * batch_size,
                                               min((b + 1) * batch_size, num_questions)))]


def answer_shard(engine: Engine, questions: Sequence[dict], settings: EvalSettings, *,
                 process_index: int, process_count: int, progress: bool = True,
                 done: Collection[int] = (), on_batch: Optional[Callable[[list], None]] = None,
                 desc: str = "eval") -> tuple[list[dict], list[dict]]:
  """This process's answer records (each with its question's `index` in the file) and the
  questions skipped for unreadable images. Questions whose index is in `done` are not asked;
  `on_batch` receives each batch's log lines (answer records, and `{"index", "skipped"}` for
  unreadable images) as soon as the batch is answered."""
  if settings.batch_size % process_count:
    raise ValueError(f"batch size {settings.batch_size} is not divisible by the "
                     f"{process_count} processes; choose a multiple of {process_count}")
  local = settings.batch_size // process_count
  done = set(done)
  steps = pending_batches(len(questions), settings.batch_size, done)
  images = _Images(engine, settings)
  # Every batch passes pixels when any question has an image, so that all processes (and
  # all batches) run the same program.
  with_pixels = settings.self_questioning or any(q.get("image") for q in questions)
  blank = None
  if settings.self_questioning:
    blank = np.zeros((engine.image_size, engine.image_size, 3), np.float32)
  records: list[dict] = []
  skipped: list = []
  # Process 0 shows the whole run's progress: its own rows times the process count.
  todo = sum(i not in done for i in range(len(questions)))
  bar = tqdm(total=len(questions), initial=len(questions) - todo, unit="ex", desc=desc,
             smoothing=0.1, disable=not progress or process_index != 0)
  rows_of = lambda b: dp.batch_rows(len(questions), settings.batch_size, b, process_index,
                                   process_count)
  load = lambda b: _load_batch([(i, questions[i]) for i in rows_of(b)], local, images, blank,
                               done, settings.strict)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    # The next batch's images load while the device answers this one.
    pending = pool.submit(load, steps[0]) if steps else None
    for k, b in enumerate(steps):
      assert pending is not None  # set before the loop whenever there are steps
      rows, pixels, active, batch_skipped = pending.result()
      if k + 1 < len(steps):
        pending = pool.submit(load, steps[k + 1])
      answers = _answers(engine, [q for _, q in rows], pixels, settings, settings.seed + b,
                         with_pixels)
      lines = []
      for (index, _), recs, keep in zip(rows, answers, active):
        if keep:
          lines += [{"index": index, **r} for r in recs]
      records += lines
      skipped += batch_skipped
      lines += [{"index": s["index"], "skipped": _unindexed(s)} for s in batch_skipped]
      if on_batch is not None:
        on_batch(lines)
      bar.update(sum(active) * process_count)
  bar.close()
  return records, [_unindexed(s) for s in skipped]


def _unindexed(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != "index"}


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def merge_shards(out_dir: str, count: int, model_id: str) -> str:
  """Joins the processes' logs into `answers.jsonl`, in question-file order, with
  `answer_id` and `model_id` added; returns its path."""
  records = []
  for i in range(count):
    path = shard_path(out_dir, i, count)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: process {i} did not finish, or {out_dir} "
                              "is not on a file system every process shares")
    records += [r for r in read_jsonl(path) if "skipped" not in r]
  # Stable: the records of one question (self-questioning's asked questions) keep the
  # order they were logged in, #2 before #10.
  records.sort(key=lambda r: r["index"])
  merged = []
  for r in records:
    out = {k: v for k, v in r.items() if k != "index"}
    out["answer_id"] = answer_id(model_id, r["question_id"], r["index"])
    out["model_id"] = model_id
    merged.append(out)
  path = os.path.join(out_dir, ANSWERS)
  write_jsonl(path, merged)
  return path


def run_fingerprint(settings: EvalSettings, questions: Sequence[dict], process_count: int
                    ) -> dict:
  """What must not change between a run and its continuation (the batch size may)."""
  fields = {k: v for k, v in dataclasses.asdict(settings).items()
            if k not in ("batch_size", "strict")}
  return {"settings": fields, "process_count": process_count,
          "num_questions": len(questions), "questions": answer_log.questions_digest(questions)}


def run_eval(engine: Engine, questions: Sequence[dict], settings: EvalSettings, out_dir: str, *,
             progress: bool = True, desc: str = "eval", question_file: Optional[str] = None
             ) -> Optional[tuple[str, list[dict]]]:
  """Answers `questions` on every process, continuing a run that `out_dir` already holds;
  returns (merged answers path, skipped questions: `{"index", "question_id", "reason",
  "message"}` in file order) on process 0 and None elsewhere. `question_file` names the
  file in the errors of a strict run."""
  index, count = jax.process_index(), jax.process_count()
  rejected = screen(questions, file=question_file, strict=settings.strict,
                    needs_image=settings.self_questioning)
  answer_log.claim(out_dir, run_fingerprint(settings, questions, count), write=index == 0)
  logged = answer_log.read_logs(out_dir, count)
  dp.barrier("eval-logs-read")  # every process sees the same done set before any appends
  done = answer_log.done_indices(logged) | {s["index"] for s in rejected}
  with answer_log.AnswerLog(out_dir, index, count) as log:
    answer_shard(engine, questions, settings, process_index=index, process_count=count,
                 progress=progress, done=done, on_batch=log.append, desc=desc)
  dp.barrier("eval-answers-written")
  if index != 0:
    return None
  unreadable = [{"index": r["index"], **r["skipped"]}
                for r in answer_log.read_logs(out_dir, count) if "skipped" in r]
  skipped = sorted(rejected + unreadable, key=lambda s: s["index"])
  return merge_shards(out_dir, count, settings.model_id), skipped
