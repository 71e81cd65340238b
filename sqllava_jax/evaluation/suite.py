"""The paper's table in one run: every benchmark of a suite whose files are present.

    report = run_suite(engine, "configs/eval/paper.yaml",
                       SuiteOptions(data_dir="playground/data/eval", out_dir="out",
                                    model_id="sqllava-7b"), aspect_ratio="pad")

For each benchmark of the suite (configs/eval/*.yaml) in turn: its question file is looked
for under the data folder (absent: the benchmark is skipped and the table says which file
it wanted); its questions are answered into `OUT/{name}/` with the reference's prompt and
decoding, appended as they come and continued on a rerun (`eval_loop.run_eval`); then it is
scored locally where its ground truth is present, judged where it is a judged benchmark and
a judge is configured (every judge reply cached in `OUT/judge_cache.jsonl`), and its
submission file written where its server scores it. `OUT/results.json` and
`OUT/results.md` (the paper's numbers beside ours) are rewritten after every benchmark.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax

from sqllava_jax.data.images import AspectRatio
from sqllava_jax.evaluation import llava_bench, mmbench, mmvet, submissions
from sqllava_jax.evaluation.benchmarks import Benchmark, Entry, Suite, load_suite, read_questions
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings, run_eval
from sqllava_jax.evaluation.judge import Judge, JudgeConfig, JudgeError
from sqllava_jax.evaluation.outputs import write_json, write_text
from sqllava_jax.evaluation.pope import pope_annotations
from sqllava_jax.evaluation.questions import skip_report
from sqllava_jax.evaluation.tasks import score

JUDGE_CACHE = "judge_cache.jsonl"


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
  """max_new_tokens, when set, caps every benchmark's budget (smoke runs; the table notes
  it); `only` restricts the run to the named benchmarks."""
  data_dir: str
  out_dir: str
  model_id: str
  batch_size: int = 8
  max_new_tokens: Optional[int] = None
  only: tuple[str, ...] = ()
  judge: Optional[JudgeConfig] = None
  progress: bool = True
  checkpoint: str = ""  # the weights' identity (`loading.checkpoint_identity`)
  strict: bool = False  # a question that cannot be asked stops the run (else: skipped, counted)


@dataclasses.dataclass
class Outcome:
  """status: scored | submission (answers and the server's file, scored there) | answers
  (answered, not scored: `note` says what is missing) | skipped (files absent) | error
  (answered, but scoring or judging failed: `note` says why)."""
  name: str
  title: str
  status: str
  paper: Optional[float] = None
  score: Optional[float] = None
  note: str = ""
  files: dict = dataclasses.field(default_factory=dict)
  result: dict = dataclasses.field(default_factory=dict)
  num_questions: int = 0
  seconds: float = 0.0
  skipped: dict = dataclasses.field(default_factory=dict)  # `questions.skip_report`


def _headline(result: dict, key: str, scale: float) -> Optional[float]:
  value: Any = result
  for part in key.split("."):
    if not isinstance(value, dict) or part not in value:
      raise ValueError(f"the result has no {key!r} (keys: {', '.join(result)}); fix the "
                       "benchmark config's headline")
    value = value[part]
  return None if value is None else round(float(value) * scale, 2)


class _Run:
  """One suite run's shared state: options, the engine, the judge."""

  def __init__(self, engine: Engine, options: SuiteOptions, aspect_ratio: AspectRatio):
    self.engine, self.options, self.aspect_ratio = engine, options, aspect_ratio
    self.judge: Optional[Judge] = None
    if options.judge is not None and jax.process_index() == 0:  # only process 0 judges
      self.judge = Judge(options.judge, os.path.join(options.out_dir, JUDGE_CACHE))

  def settings(self, bench: Benchmark) -> EvalSettings:
    budget = bench.decoding.max_new_tokens
    if self.options.max_new_tokens:
      budget = min(budget, self.options.max_new_tokens)
    return EvalSettings(images_dir=bench.path(self.options.data_dir, bench.images),
                        template=bench.decoding.template, batch_size=self.options.batch_size,
                        max_new_tokens=budget, sampling=bench.decoding.sampling,
                        model_id=self.options.model_id, aspect_ratio=self.aspect_ratio,
                        checkpoint=self.options.checkpoint, strict=self.options.strict)

  def annotations(self, bench: Benchmark, question_file: str) -> Optional[Any]:
    """The scorer's ground truth, or None when its file is absent."""
    if bench.annotation_format == "questions":
      return question_file
    path = bench.path(self.options.data_dir, bench.annotations)
    if not os.path.exists(path):
      return None
    if bench.annotation_format == "pope_labels":
      return pope_annotations(question_file, path)
    return path

  def run(self, bench: Benchmark, entry: Entry) -> Optional[Outcome]:
    outcome = Outcome(bench.name, bench.title, "skipped", paper=entry.paper)
    question_file = bench.question_file(self.options.data_dir)
    if question_file is None:
      wanted = " or ".join(os.path.join(bench.folder, q) for q in bench.questions)
      outcome.note = f"not found: {wanted}"
      return outcome
    try:
      questions = read_questions(bench, question_file)
    except ValueError as e:  # a damaged question file stops this benchmark, not the suite
      outcome.status, outcome.note = "error", f"{type(e).__name__}: {e}"
      return outcome
    start = time.perf_counter()
    out_dir = os.path.join(self.options.out_dir, bench.name)
    done = run_eval(self.engine, questions, self.settings(bench), out_dir,
                    progress=self.options.progress, desc=bench.name, question_file=question_file)
    if done is None:  # not process 0: it only answers
      return None
    answers, skipped = done
    outcome.files["answers"] = answers
    outcome.num_questions = len(questions)
    outcome.skipped = skip_report(skipped, len(questions) - len(skipped))
    if skipped:
      outcome.note = f"{outcome.skipped['skip_summary']}. "
    try:
      self._score(bench, outcome, answers, questions, question_file)
      if bench.submission:
        self._submit(bench, outcome, answers, questions, question_file, out_dir)
    except (ValueError, FileNotFoundError, JudgeError) as e:
      # The answers are kept (a rerun continues from them); the other benchmarks still run.
      outcome.status = "error"
      outcome.note += f"{type(e).__name__}: {e}"
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome

  def _submit(self, bench: Benchmark, outcome: Outcome, answers: str, questions: list[dict],
              question_file: str, out_dir: str) -> None:
    context: dict[str, Any] = {"questions": questions, "question_file": question_file,
               "all_questions": self._all_questions(bench, questions)}
    if bench.submission in submissions.NEEDS_ANNOTATIONS:
      context["annotations"] = self.annotations(bench, question_file)
      if context["annotations"] is None:
        outcome.note += " no submission file: its annotations are absent"
        return
    outcome.files["submission"] = submissions.write(bench.submission, out_dir, answers, context)

  def _all_questions(self, bench: Benchmark, questions: list[dict]) -> list[dict]:
    if bench.submission_questions:
      path = bench.path(self.options.data_dir, bench.submission_questions)
      if os.path.isfile(path):
        return submissions.all_questions(path)
    return questions

  def _score(self, bench: Benchmark, outcome: Outcome, answers: str, questions: list[dict],
             question_file: str) -> None:
    outcome.status = "submission" if bench.submission else "answers"
    if bench.judged:
      result = self._judged(bench, outcome, answers)
    elif bench.scorer:
      annotations = self.annotations(bench, question_file)
      if annotations is None:
        outcome.note += f"not scored: {os.path.join(bench.folder, bench.annotations)} is absent"
        return
      match = self._option_matcher(bench)
      if match is not None:
        result = mmbench.circular_scores(answers, annotations, match=match)
      else:
        result = score(bench.scorer, answers, annotations)
        if result.get("unresolved"):
          outcome.note += (f"{result['unresolved']} answers no rule reads counted wrong (the "
                           "official evaluator has a judge match them: name one and put its "
                           f"file at {os.path.join(bench.folder, bench.judge.prompt_file)}). ")
    else:
      return
    if result is not None:
      outcome.result = result
      outcome.score = _headline(result, bench.headline, bench.scale)
      outcome.status = "scored"

  def _option_matcher(self, bench: Benchmark) -> Optional[mmbench.OptionMatcher]:
    """MMBench's judge for answers no rule reads, when a judge and the official evaluator's
    file (its prompt) are there."""
    if bench.scorer != "mmbench" or not bench.judge.prompt_file or self.judge is None:
      return None
    path = bench.path(self.options.data_dir, bench.judge.prompt_file)
    if not os.path.isfile(path):
      return None
    template, header = mmbench.read_matching_prompt(path)
    p = bench.judge
    return mmbench.OptionMatcher(self.judge, mmbench.MatchingProtocol(
        template, header, temperature=p.temperature, max_tokens=p.max_tokens,
        attempts=p.max_replies))

  def _judged(self, bench: Benchmark, outcome: Outcome, answers: str) -> Optional[dict]:
    if self.judge is None:
      outcome.note += "not judged: name a judge with --judge-url and --judge-model"
      return None
    judged = self._llava_bench if bench.judged == "llava_bench" else self._mmvet
    try:
      return judged(self.judge, bench, outcome, answers)
    except FileNotFoundError as e:
      outcome.note += f"not judged: {e}"
      return None

  def _llava_bench(self, judge: Judge, bench: Benchmark, outcome: Outcome, answers: str) -> dict:
    files = llava_bench.load_bench(bench.path(self.options.data_dir, ""))
    p = bench.judge
    reviews = llava_bench.review(judge, llava_bench.Protocol(p.system, p.temperature,
                                                             p.max_tokens),
                                 files["questions"], files["contexts"], files["references"],
                                 answers, files["rules"])
    outcome.files["reviews"] = llava_bench.write_reviews(
        os.path.join(os.path.dirname(answers), "reviews.jsonl"), reviews)
    return llava_bench.summarize(reviews)

  def _mmvet(self, judge: Judge, bench: Benchmark, outcome: Outcome, answers: str) -> dict:
    samples = mmvet.load_samples(bench.path(self.options.data_dir, bench.annotations))
    p = bench.judge
    prompt = mmvet.read_prompt(bench.path(self.options.data_dir, p.prompt_file))
    protocol = mmvet.Protocol(p.retry_suffix, p.temperature, p.temperature_step, p.max_tokens,
                              p.max_replies)
    grades = mmvet.grade_all(judge, protocol, prompt, samples, answers)
    outcome.files["grades"] = mmvet.write_grades(
        os.path.join(os.path.dirname(answers), "grades.json"), grades)
    return mmvet.capability_scores(grades, samples)


def run_suite(engine: Engine, suite_path: str, options: SuiteOptions, *,
              aspect_ratio: AspectRatio = "pad") -> Optional[dict]:
  """Runs the suite; returns the report (also written as results.json / results.md) on
  process 0, None on the others."""
  suite, benches = load_suite(suite_path)
  unknown = sorted(set(options.only) - {b.name for b in benches})
  if unknown:
    raise ValueError(f"--only names {', '.join(unknown)}, which {suite_path} does not hold; "
                     f"choose from {', '.join(b.name for b in benches)}")
  os.makedirs(options.out_dir, exist_ok=True)
  run = _Run(engine, options, aspect_ratio)
  outcomes = []
  for bench, entry in zip(benches, suite.benchmarks):
    if options.only and bench.name not in options.only:
      continue
    outcome = run.run(bench, entry)
    if outcome is not None:
      outcomes.append(outcome)
      if jax.process_index() == 0:
        write_report(options.out_dir, report(suite, suite_path, options, outcomes))
  if jax.process_index() != 0:
    return None
  return report(suite, suite_path, options, outcomes)


def report(suite: Suite, suite_path: str, options: SuiteOptions, outcomes: list[Outcome]
           ) -> dict:
  return {"suite": suite.name, "suite_file": suite_path, "model": suite.model,
          "source": suite.source, "model_id": options.model_id, "data_dir": options.data_dir,
          "max_new_tokens_cap": options.max_new_tokens,
          "judge_model": options.judge.model if options.judge else None,
          "benchmarks": [dataclasses.asdict(o) for o in outcomes]}


def _cell(o: dict) -> str:
  """This run's entry in the table: the score, the file to submit, or what happened."""
  if o["status"] == "scored":
    return "n/a" if o["score"] is None else f"{o['score']:.1f}"
  if o["status"] == "submission" and "submission" in o["files"]:
    path = o["files"]["submission"]
    return f"submit `{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}`"
  return {"submission": "answered", "answers": "answered", "error": "error"}.get(o["status"],
                                                                                 "skipped")


def _note(text: str) -> str:
  """A table cell: one line, no column bars."""
  return " ".join(text.split()).replace("|", "\\|")


def markdown(rep: dict) -> str:
  lines = [f"# {rep['model']}: the paper's table and this run", "",
           f"Model `{rep['model_id']}`, suite `{rep['suite_file']}`, data `{rep['data_dir']}`."
           f" Paper numbers: {rep['source']}.", ""]
  if rep["max_new_tokens_cap"]:
    lines += [f"**Budget capped at {rep['max_new_tokens_cap']} new tokens per answer: not the "
              "reference protocol, numbers not comparable.**", ""]
  lines += [f"| Benchmark | {rep['model']} (paper) | This run | Questions | Note |",
            "|---|---:|---:|---:|---|"]
  for o in rep["benchmarks"]:
    paper = "" if o["paper"] is None else f"{o['paper']:.1f}"
    lines.append(f"| {o['title']} | {paper} | {_cell(o)} | {o['num_questions'] or ''} | "
                 f"{_note(o['note'])} |")
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, rep: dict) -> None:
  write_json(os.path.join(out_dir, "results.json"), rep, indent=1)
  write_text(os.path.join(out_dir, "results.md"), markdown(rep))
