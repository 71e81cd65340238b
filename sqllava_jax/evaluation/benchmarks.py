"""Benchmark definitions as data (configs/eval/*.yaml) and a suite of them (paper.yaml).

A benchmark config names where its files lie under the data folder, in the layout its
distributor ships (LLaVA's `playground/data/eval` tree), how its questions are read, the
prompt suffix and decoding of the reference's eval script, how it is scored and which
submission file it gets. A suite lists benchmark configs with the paper's number for each.

Prompt suffixes: the reference adds its answer-format line in one of two places. For most
benchmarks LLaVA's converted question file already ends each question with it (VQAv2's
"Answer the question using a single word or phrase."); for MMBench and ScienceQA the eval
script appends it (`--single-pred-prompt`). `prompt_suffix` is appended on a new line unless
the question already ends with it, so both kinds of file give the reference's prompt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional

from sqllava_jax import configlib
from sqllava_jax.evaluation import mmbench
from sqllava_jax.evaluation.questions import load_questions
from sqllava_jax.evaluation.sampling import Sampling

QuestionFormat = Literal["llava_jsonl", "scienceqa_json", "mmbench_tsv"]
AnnotationFormat = Literal["file", "pope_labels", "questions"]
Submission = Literal["", "vqav2", "vizwiz", "gqa", "mmbench", "seed_bench", "mmvet"]
Judged = Literal["", "llava_bench", "mmvet"]


@dataclasses.dataclass(frozen=True)
class Decoding:
  """The reference script's generation settings (temperature 0 is greedy)."""
  template: str = "vicuna_v1"
  temperature: float = 0.0
  top_p: float = 1.0
  max_new_tokens: int = 128

  @property
  def sampling(self) -> Sampling:
    return Sampling(self.temperature, 0, self.top_p)


@dataclasses.dataclass(frozen=True)
class JudgeProtocol:
  """A judged benchmark's grading settings; which fields apply depends on the benchmark
  (llava_bench: system, temperature, max_tokens; mmvet: all but system)."""
  system: str = ""
  temperature: float = 0.0
  max_tokens: int = 1024
  retry_suffix: str = ""
  temperature_step: float = 0.0
  max_replies: int = 1
  prompt_file: str = ""  # under the benchmark's folder (mmvet: the official evaluator)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark. Paths are relative to `folder`, itself relative to the data folder;
  `questions` lists candidate files, the first present one is used."""
  name: str
  title: str
  folder: str
  questions: tuple[str, ...]
  reference: str = ""  # the reference's eval script this follows
  question_format: QuestionFormat = "llava_jsonl"
  images: str = ""
  image_prefix: str = ""  # only the questions whose image path starts with this
  prompt_suffix: str = ""
  decoding: Decoding = Decoding()
  scorer: str = ""  # a task of `tasks.score`; "" when the benchmark is scored elsewhere
  annotations: str = ""
  annotation_format: AnnotationFormat = "file"
  headline: str = ""  # the result key the table shows, dotted for nested keys
  scale: float = 100.0  # headline x scale is the table's number
  submission: Submission = ""
  submission_questions: str = ""  # vqav2: the whole test split the server expects
  judged: Judged = ""
  judge: JudgeProtocol = JudgeProtocol()

  def __post_init__(self):
    if not self.questions:
      raise ValueError(f"benchmark {self.name!r} names no question file")
    if self.scorer and not self.headline:
      raise ValueError(f"benchmark {self.name!r} has scorer {self.scorer!r} but no headline key")

  def path(self, data_dir: str, relative: str) -> str:
    return os.path.join(data_dir, self.folder, relative)

  def question_file(self, data_dir: str) -> Optional[str]:
    for q in self.questions:
      if os.path.isfile(self.path(data_dir, q)):
        return self.path(data_dir, q)
    return None


@dataclasses.dataclass(frozen=True)
class Entry:
  """A suite's benchmark: its config file (relative to the suite file) and the paper's
  number, None where the paper reports none."""
  config: str
  paper: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  model: str  # whose numbers `paper` holds, e.g. SQ-LLaVA-7B
  source: str  # where those numbers are printed
  benchmarks: tuple[Entry, ...]


def load_benchmark(path: str) -> Benchmark:
  try:
    return configlib.from_dict(Benchmark, configlib.load_yaml(path))
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f"{path}: {e}") from None


def load_suite(path: str) -> tuple[Suite, list[Benchmark]]:
  """The suite and its benchmarks, in the suite's order."""
  try:
    suite = configlib.from_dict(Suite, configlib.load_yaml(path))
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f"{path}: {e}") from None
  here = os.path.dirname(os.path.abspath(path))
  benches = [load_benchmark(os.path.join(here, e.config)) for e in suite.benchmarks]
  names = [b.name for b in benches]
  if len(set(names)) != len(names):
    raise configlib.ConfigError(f"{path}: a benchmark appears twice: {names}")
  return suite, benches


def with_suffix(text: str, suffix: str) -> str:
  """`text`, then `suffix` on a new line unless the text already ends with it."""
  if not suffix or text.rstrip().endswith(suffix):
    return text
  return f"{text}\n{suffix}"


def read_questions(bench: Benchmark, path: str) -> list[dict]:
  """The benchmark's questions, filtered to `image_prefix` and ending with the suffix."""
  if bench.question_format == "mmbench_tsv":
    questions = mmbench.load_questions(path)
  elif bench.question_format == "scienceqa_json":  # llava/eval/model_vqa_science.py
    questions = load_questions(path, scienceqa=True)
  else:
    questions = load_questions(path)
  if bench.image_prefix:
    questions = [q for q in questions if str(q.get("image", "")).startswith(bench.image_prefix)]
    if not questions:
      raise ValueError(f"{path}: no question has an image under {bench.image_prefix!r}")
  return add_suffix(questions, bench.prompt_suffix)


def add_suffix(questions: list[dict], suffix: str) -> list[dict]:
  """`with_suffix` on each question's text and recorded prompt (malformed records, which
  `run_eval` skips and counts, stay as they are)."""
  for q in questions:
    for key in ("text", "prompt"):
      if isinstance(q.get(key), str):
        q[key] = with_suffix(q[key], suffix)
  return questions
