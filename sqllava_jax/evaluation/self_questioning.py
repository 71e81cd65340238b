"""Visual self-questioning: the model describes an image, then asks questions about it.

The reference protocol (docs/design.md section 6), in the `v1_sq` template:
1. answer "Can you describe the image in detail?" greedily;
2. sample each question from the prompt ending `ASSISTANT: {description}</s>VUSER:`
   (temperature 1.2, top-k 300, top-p 0.95), stopping at `</s>`;
3. optionally answer each question greedily, the conversation continuing
   `VUSER: {question}</s> ASSISTANT:` (the layout the model was trained on).
Batched over images: all descriptions in one call, all questions in another.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from sqllava_jax.data.templates import ASSISTANT, USER, VUSER
from sqllava_jax.evaluation.engine import Engine
from sqllava_jax.evaluation.prompts import chat_prompt, with_image
from sqllava_jax.evaluation.sampling import GREEDY, SELF_QUESTION, Sampling

DESCRIBE = "Can you describe the image in detail?"


@dataclasses.dataclass(frozen=True)
class Protocol:
  template: str = "v1_sq"
  describe: str = DESCRIBE
  describe_tokens: int = 256
  question_tokens: int = 64
  answer_tokens: int = 128
  question_sampling: Sampling = SELF_QUESTION
  answer_sampling: Sampling = GREEDY


@dataclasses.dataclass(frozen=True)
class SelfQuestions:
  description: str
  questions: list[str]
  answers: Optional[list[str]] = None


def _request(protocol: Protocol) -> list[tuple[str, str]]:
  return [(USER, with_image(protocol.describe, True))]


def _opening(protocol: Protocol, description: str) -> list[tuple[str, str]]:
  return _request(protocol) + [(ASSISTANT, description)]


def describe(engine: Engine, pixels: Sequence[np.ndarray], protocol: Protocol) -> list[str]:
  prompt = chat_prompt(protocol.template, _request(protocol))
  done = engine.complete([prompt] * len(pixels), list(pixels),
                         max_new_tokens=protocol.describe_tokens, sampling=GREEDY)
  return [c.text for c in done]


def ask_questions(engine: Engine, pixels: Sequence[np.ndarray], descriptions: Sequence[str], n: int,
                  protocol: Protocol, seed: int) -> list[list[str]]:
  """n sampled questions per image (rows of one batch draw independently)."""
  prompts, images = [], []
  for image, description in zip(pixels, descriptions):
    prompt = chat_prompt(protocol.template, _opening(protocol, description), next_role=VUSER)
    prompts += [prompt] * n
    images += [image] * n
  done = engine.complete(prompts, images, max_new_tokens=protocol.question_tokens,
                         sampling=protocol.question_sampling, seed=seed)
  return [[c.text for c in done[i * n:(i + 1) * n]] for i in range(len(pixels))]


def answer_questions(engine: Engine, pixels: Sequence[np.ndarray], descriptions: Sequence[str],
                     questions: Sequence[Sequence[str]], protocol: Protocol,
                     seed: int) -> list[list[str]]:
  prompts, images = [], []
  for image, description, asked in zip(pixels, descriptions, questions):
    for q in asked:
      turns = _opening(protocol, description) + [(VUSER, q)]
      prompts.append(chat_prompt(protocol.template, turns, next_role=ASSISTANT))
      images.append(image)
  done = engine.complete(prompts, images, max_new_tokens=protocol.answer_tokens,
                         sampling=protocol.answer_sampling, seed=seed)
  out, k = [], 0
  for asked in questions:
    out.append([c.text for c in done[k:k + len(asked)]])
    k += len(asked)
  return out


def self_question(engine: Engine, pixels: Sequence[np.ndarray], *, n: int,
                  protocol: Protocol = Protocol(), answer: bool = False,
                  seed: int = 0) -> list[SelfQuestions]:
  """For each image (float32[H, W, 3], CLIP-normalised): its description, n questions and,
  with `answer`, the model's answer to each."""
  if n < 1:
    raise ValueError(f"n={n}: ask for at least one question")
  descriptions = describe(engine, pixels, protocol)
  questions = ask_questions(engine, pixels, descriptions, n, protocol, seed)
  answers = (answer_questions(engine, pixels, descriptions, questions, protocol, seed + 1)
             if answer else [None] * len(pixels))
  return [SelfQuestions(d, q, a) for d, q, a in zip(descriptions, questions, answers)]
