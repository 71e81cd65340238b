"""The self-questioning protocol's prompts and sampling, with a recording stand-in engine."""

import numpy as np
import pytest

from sqllava_jax.evaluation import prompts as P
from sqllava_jax.evaluation.engine import Completion
from sqllava_jax.evaluation.sampling import GREEDY, Sampling
from sqllava_jax.evaluation.self_questioning import Protocol, self_question

SQ_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.Also, the artificial "
    "intelligence assistant is a curious virtual user. The virtual user asks complex questions "
    "that are relevant to the content in the image, for example, asking about background "
    "knowledge of the objects in the image, asking to discuss about events happening in the "
    "image, etc. Again, do not ask about uncertain details.")
OPEN = f"{SQ_SYSTEM} USER: <image>\nCan you describe the image in detail? ASSISTANT:"


class Recorder:
  """Answers every row with a canned text and records each call."""

  def __init__(self):
    self.calls = []

  def complete(self, prompts, pixels, *, max_new_tokens, sampling, seed=0):
    self.calls.append(dict(prompts=list(prompts), pixels=list(pixels), n=max_new_tokens,
                           sampling=sampling, seed=seed))
    step = len(self.calls)
    return [Completion(f"out{step}.{i}", [5]) for i in range(len(prompts))]


def test_reference_protocol_prompts_and_sampling():
  engine, images = Recorder(), [np.zeros((2, 2, 3)), np.ones((2, 2, 3))]
  results = self_question(engine, images, n=2, answer=True, seed=9)
  describe, ask, answer = engine.calls
  assert describe["prompts"] == [OPEN, OPEN] and describe["sampling"] == GREEDY
  assert ask["prompts"] == [f"{OPEN} out1.0</s>VUSER:"] * 2 + [f"{OPEN} out1.1</s>VUSER:"] * 2
  assert ask["sampling"] == Sampling(temperature=1.2, top_k=300, top_p=0.95)
  assert [p is images[0] for p in ask["pixels"]] == [True, True, False, False]
  assert answer["prompts"][1] == f"{OPEN} out1.0</s>VUSER: out2.1</s> ASSISTANT:"
  assert answer["sampling"] == GREEDY
  assert results[1].description == "out1.1"
  assert results[1].questions == ["out2.2", "out2.3"]
  assert results[1].answers == ["out3.2", "out3.3"]


def test_protocol_settings_are_overridable():
  engine = Recorder()
  hot = Sampling(temperature=0.7, top_k=5, top_p=0.5)
  protocol = Protocol(describe="What is here?", question_tokens=7, question_sampling=hot)
  [r] = self_question(engine, [np.zeros((2, 2, 3))], n=1, protocol=protocol, seed=3)
  assert engine.calls[0]["prompts"][0].endswith("USER: <image>\nWhat is here? ASSISTANT:")
  assert engine.calls[1]["sampling"] == hot and engine.calls[1]["n"] == 7
  assert engine.calls[1]["seed"] == 3 and r.answers is None and len(engine.calls) == 2


def test_vicuna_cannot_self_question():
  with pytest.raises(ValueError, match="has no role 'vuser'"):
    self_question(Recorder(), [np.zeros((2, 2, 3))], n=1, protocol=Protocol(template="vicuna_v1"))


@pytest.mark.parametrize("template, image, expected", [
    ("vicuna_v1", True, "questions. USER: <image>\nHi? ASSISTANT:"),
    ("vicuna_v1", False, "questions. USER: Hi? ASSISTANT:"),
    ("raw", True, "<image>\nHi?"),
    ("raw", False, "Hi?"),
    ("plain", True, "<image>"),
])
def test_question_prompts(template, image, expected):
  prompt = P.question_prompt("Hi?", template=template, image=image)
  assert prompt.endswith(expected) and (template != "raw" or prompt == expected)


def test_question_prompt_errors():
  with pytest.raises(ValueError, match="unknown template 'v2'; choose one of"):
    P.question_prompt("Hi?", template="v2", image=False)
  with pytest.raises(ValueError, match="needs an image"):
    P.question_prompt("Hi?", template="plain", image=False)
