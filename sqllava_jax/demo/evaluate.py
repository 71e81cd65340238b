"""The demo's evaluations of the final model, all on the held-out `eval` split.

- answer accuracy (`synthetic_vqa`): one question of each type about each held-out image,
  the benchmark protocol (template `vicuna_v1`, greedy), exact match;
- self-questioning (`synthetic_sq`): the reference protocol (a greedy description, then
  questions sampled at temperature 1.2, top-k 300, top-p 0.95 in template `v1_sq`), scored
  as well-formed questions about shapes that are really in the image;
- one image questioned and answered as `sqllava-jax ask --answer` does.

One loaded model and one `Engine` serve all three (one set of compiled programs).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Optional

from sqllava_jax.data.images import resolve_image_path
from sqllava_jax.demo import synthetic

# Registers synthetic_vqa and synthetic_sq, which `score` runs below.
from sqllava_jax.demo import tasks as _tasks  # noqa: F401  pylint: disable=unused-import
from sqllava_jax.evaluation import loading
from sqllava_jax.evaluation.answers import as_answer_records
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.eval_loop import EvalSettings, run_eval
from sqllava_jax.evaluation.prompts import load_image
from sqllava_jax.evaluation.questions import load_questions
from sqllava_jax.evaluation.sampling import GREEDY, SELF_QUESTION
from sqllava_jax.evaluation.self_questioning import Protocol, self_question
from sqllava_jax.evaluation.tasks import score


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """How much to evaluate. 0 in a limit means everything the split holds."""
  vqa_limit: int = 0
  sq_images: int = 100
  sq_questions_per_image: int = 2
  batch_size: int = 64
  # The longest answer, "the yellow triangle is in the southeast</s>", is 8 tokens.
  answer_tokens: int = 12
  describe_tokens: int = 64     # the longest caption is about 45 tokens
  question_tokens: int = 24     # the longest question is about 12 tokens
  ask_questions: int = 3
  seed: int = 0


FAST_PLAN = EvalPlan(vqa_limit=8, sq_images=2, sq_questions_per_image=1, batch_size=4,
                     describe_tokens=16, question_tokens=8)


def load_engine(ckpt: str) -> tuple[Engine, object]:
  """(Engine over the checkpoint's model with LoRA merged, its config)."""
  model, cfg = loading.load_for_inference(ckpt)
  return Engine(model, loading.tokenizer_for(cfg, ckpt)), cfg


def _protocol(plan: EvalPlan) -> Protocol:
  return Protocol(template="v1_sq", describe_tokens=plan.describe_tokens,
                  question_tokens=plan.question_tokens, answer_tokens=plan.answer_tokens,
                  question_sampling=SELF_QUESTION, answer_sampling=GREEDY)


def _answered(done: Optional[tuple[str, list[dict]]]) -> tuple[str, list[dict]]:
  """`run_eval`'s result: the demo runs in one process, which always gets it."""
  assert done is not None
  return done


def answer_accuracy(engine: Engine, cfg, data_dir: str, out_dir: str, plan: EvalPlan) -> dict:
  """`synthetic_vqa` on the held-out questions; answers in `out_dir/answers.jsonl`."""
  paths = synthetic.dataset_paths(data_dir)
  questions = load_questions(paths.vqa("eval"))
  questions = questions[:plan.vqa_limit] if plan.vqa_limit else questions
  settings = EvalSettings(images_dir=paths.image_folder, template="vicuna_v1",
                          batch_size=plan.batch_size, max_new_tokens=plan.answer_tokens,
                          sampling=GREEDY, seed=plan.seed, model_id="sqllava-jax-demo",
                          aspect_ratio=cfg.data.image_aspect_ratio)
  answers, _ = _answered(run_eval(engine, questions, settings, out_dir))
  result = score("synthetic_vqa", answers, questions)
  return {**result, **baselines(questions), "answers": answers,
          "examples": answer_examples(answers, questions, paths.image_folder)}


def answer_examples(answers: str, questions: list[dict], images_dir: str) -> list[dict]:
  """Each answered question in question order: its image's path, the question, the model's
  answer, the gold answer and whether they match (as `synthetic_vqa` scores)."""
  said = {r["question_id"]: r["text"] for r in as_answer_records(answers, "synthetic_vqa")}
  return [{"image": resolve_image_path(images_dir, q["image"]), "question": q["text"],
           "answer": said[q["question_id"]], "gold": q["answer"],
           "question_type": q["question_type"],
           "correct": synthetic.is_correct(said[q["question_id"]], q["answer"])}
          for q in questions if q["question_id"] in said]


def baselines(questions: list[dict]) -> dict:
  """What guessing scores on these questions: `chance`, restating the question and guessing
  uniformly among the answers of its type (`synthetic.CHANCE`), and `constant`, restating it
  and always giving the most frequent gold answer of its type, the best any image-blind
  answer can do (held-out scenes are skewed towards three and four shapes, since the few
  small scenes all occur in training)."""
  by_type: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
      collections.Counter)
  for q in questions:
    by_type[q["question_type"]][q["answer"].split()[-1]] += 1
  n = len(questions)
  constant = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}
  return {"chance": sum(synthetic.CHANCE[t] * sum(c.values()) for t, c in by_type.items()) / n,
          "constant": sum(c.most_common(1)[0][1] for c in by_type.values()) / n,
          "constant_per_type": constant}


def question_validity(engine: Engine, cfg, data_dir: str, out_dir: str, plan: EvalPlan) -> dict:
  """`synthetic_sq` on the first `plan.sq_images` held-out images."""
  paths = synthetic.dataset_paths(data_dir)
  images = load_questions(paths.json(2, "eval"))[:plan.sq_images]
  settings = EvalSettings(images_dir=paths.image_folder, template="v1_sq",
                          batch_size=plan.batch_size, max_new_tokens=plan.question_tokens,
                          sampling=SELF_QUESTION, seed=plan.seed, model_id="sqllava-jax-demo",
                          aspect_ratio=cfg.data.image_aspect_ratio, self_questioning=True,
                          questions_per_image=plan.sq_questions_per_image,
                          protocol=_protocol(plan))
  answers, _ = _answered(run_eval(engine, images, settings, out_dir))
  return {**score("synthetic_sq", answers, images), "answers": answers,
          "num_images": len(images)}


def ask_one(engine: Engine, cfg, data_dir: str, plan: EvalPlan, index: int = 0) -> dict:
  """`ask --answer` on held-out image `index`, each question and answer checked against the
  image's scene."""
  paths = synthetic.dataset_paths(data_dir)
  _, image, scene = synthetic.load_scenes(data_dir, "eval")[index]
  path = resolve_image_path(paths.image_folder, image)
  pixels = load_image(path, size=engine.image_size, aspect_ratio=cfg.data.image_aspect_ratio)
  [result] = self_question(engine, [pixels], n=plan.ask_questions, protocol=_protocol(plan),
                           answer=True, seed=plan.seed)
  assert result.answers is not None  # asked with answer=True
  turns = []
  for q, a in zip(result.questions, result.answers):
    gold: Optional[str] = synthetic.answer_text(q, scene)
    turns.append({"question": q, "answer": a, "valid": gold is not None, "gold": gold,
                  "correct": gold is not None and synthetic.is_correct(a, gold)})
  return {"image": path, "scene": synthetic.caption(scene), "description": result.description,
          "turns": turns}


def out_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, "eval", name)
