"""The inference commands end to end on a tiny checkpoint: generate, ask, eval."""

import json

import pytest

from sqllava_jax import cli
from sqllava_jax.commands.eval import request_of
from sqllava_jax.config import Config
from sqllava_jax.data.images import load_pixels, normalize
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation.eval_command import perplexity_config
from sqllava_jax.evaluation.generate import Generator
from sqllava_jax.evaluation.sampling import Sampling
from sqllava_jax.training.checkpoint import load_model
from tests.eval_helpers import make_tiny_run

NEW = 4  # one budget everywhere: the tests share compiled programs
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("tiny_run")))


@pytest.fixture(scope="module")
def reference(run):
  """The checkpoint's model, tokenizer and image pixels, loaded without the commands."""
  model, cfg = load_model(run.ckpt)
  tok = Tokenizer(run.data.tokenizer)
  with open(run.image, "rb") as f:
    pixels = normalize(load_pixels(f.read(), size=32, aspect_ratio="pad", max_pixels=10**7))
  return model, cfg, tok, pixels


def cli_json(capsys, *argv):
  assert cli.main(list(argv)) == 0
  return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_generate_builds_the_vicuna_prompt_with_the_image(run, reference, capsys):
  model, cfg, tok, pixels = reference
  q = "What shape is in the northwest?"
  [out] = cli_json(capsys, "generate", "--ckpt", run.ckpt, "--prompt", q, "--image", run.image,
                   "--max-new-tokens", str(NEW), "--json")
  # The reference layout, written out by hand.
  ids = tok.encode_prompt(f"{VICUNA} USER: <image>\n{q} ASSISTANT:", num_image_tokens=16)
  want = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id).generate(
      [ids], pixels[None], max_new_tokens=NEW)
  assert out["token_ids"] == want.new_tokens(0)
  assert out["text"] == tok.decode(want.new_tokens(0)).strip()
  assert out["prompt"] == q


def test_generate_raw_text_batch_and_sampling_flags(run, reference, capsys):
  model, cfg, tok, _ = reference
  prompts = ["red circle", "how many shapes are there"]
  argv = ["generate", "--ckpt", run.ckpt, "--template", "raw", "--json", "--prompt", prompts[0],
          "--prompt", prompts[1], "--max-new-tokens", str(NEW), "--temperature", "0.9",
          "--top-k", "20", "--top-p", "0.9", "--seed", "4"]
  outs = cli_json(capsys, *argv)
  for o in outs:
    assert len(o["token_ids"]) == NEW or o["token_ids"][-1] == tok.eos_id
  # raw: BOS + the prompt's tokens, no template
  want = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id).generate(
      [[tok.bos_id] + tok.encode(p) for p in prompts], max_new_tokens=NEW,
      sampling=Sampling(0.9, 20, 0.9), seed=4)
  assert [o["token_ids"] for o in outs] == [want.new_tokens(0), want.new_tokens(1)]
  assert cli_json(capsys, *argv) == outs, "a seed fixes the sample"


def test_generate_errors_say_the_fix(run, capsys):
  assert cli.main(["generate", "--ckpt", run.ckpt, "--prompt", "a", "--prompt", "b",
                   "--image", run.image, "--image", run.image, "--image", run.image]) == 2
  assert "one image for all prompts or one per prompt" in capsys.readouterr().err
  assert cli.main(["generate", "--ckpt", run.ckpt, "--prompt", "a", "--template", "plain"]) == 2
  assert "needs an image" in capsys.readouterr().err
  assert cli.main(["generate", "--ckpt", run.ckpt, "--prompt", "a", "--image", "nope.png"]) == 2
  assert "not found" in capsys.readouterr().err


def test_ask_describes_asks_and_answers(run, capsys):
  # n=1: the three steps share one prompt bucket, so two programs serve them all.
  argv = ["ask", "--ckpt", run.ckpt, "--image", run.image, "--n", "1", "--describe-tokens",
          str(NEW), "--question-tokens", str(NEW), "--answer-tokens", str(NEW)]
  [out] = cli_json(capsys, *argv, "--answer", "--json")
  assert set(out) == {"description", "questions", "answers"}
  assert len(out["questions"]) == 1 and len(out["answers"]) == 1
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert text.startswith(f"Description: {out['description']}\nQ1: {out['questions'][0]}\n")
  assert "A1:" not in text


def eval_args(run, out, task, *extra):
  return ["eval", "--ckpt", run.ckpt, "--task", task, "--images", run.data.image_folder,
          "--out", str(out), "--no-progress", *extra]


def test_eval_synthetic_vqa_writes_answers_in_order_and_scores(run, tmp_path, capsys):
  data = run.data.vqa("eval")
  [result] = cli_json(capsys, *eval_args(run, tmp_path, "synthetic_vqa", "--data", data,
                                         "--batch-size", "8", "--max-new-tokens", str(NEW),
                                         "--model-id", "tiny"))
  with open(data) as f:
    questions = json.load(f)
  with open(tmp_path / "answers.jsonl") as f:
    answers = [json.loads(line) for line in f]
  assert [a["question_id"] for a in answers] == [q["id"] for q in questions]
  assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(answers[0])
  assert answers[0]["prompt"] == questions[0]["question"] and answers[0]["model_id"] == "tiny"
  assert len({a["answer_id"] for a in answers}) == len(answers)
  correct = sum(a["text"].strip().rstrip(".").lower() == q["answer"]
                for a, q in zip(answers, questions))
  assert result["num_questions"] == len(questions) == result["num_items"]
  assert result["accuracy"] == pytest.approx(correct / len(questions))
  assert json.loads((tmp_path / "scores.json").read_text())["accuracy"] == result["accuracy"]


def test_eval_synthetic_sq_asks_per_image(run, tmp_path, capsys):
  data = run.data.json(2, "eval")
  [result] = cli_json(capsys, *eval_args(run, tmp_path, "synthetic_sq", "--data", data,
                                         "--batch-size", "8", "--max-new-tokens", str(NEW),
                                         "--describe-tokens", str(NEW), "--limit", "3"))
  with open(tmp_path / "answers.jsonl") as f:
    answers = [json.loads(line) for line in f]
  assert [a["question_id"] for a in answers] == [f"eval-00000{i}#0" for i in range(3)]
  assert [a["source_id"] for a in answers] == [f"eval-00000{i}" for i in range(3)]
  assert result["num_questions"] == 3
  assert 0.0 <= result["valid_fraction"] <= result["well_formed_fraction"] <= 1.0


def test_eval_benchmark_task_without_annotations_writes_answers(run, tmp_path, capsys):
  questions = tmp_path / "q.jsonl"
  rows = [{"question_id": 7, "image": "eval_000001.png", "text": "Is there a circle?"},
          {"question_id": 8, "text": "Is the sky blue? Answer yes or no."}]  # text only
  questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  [result] = cli_json(capsys, *eval_args(run, tmp_path / "out", "pope", "--data",
                                         str(questions), "--max-new-tokens", str(NEW),
                                         "--batch-size", "8"))
  assert result["scored"] is False and "--annotations" in result["note"]
  answers = tmp_path / "out" / "answers.jsonl"
  assert [json.loads(line)["question_id"] for line in open(answers)] == [7, 8]


def test_path_flags_stay_strings():
  """`--images 2024` names a folder: the config gets the string '2024', not an integer read
  back from an override string."""
  args = cli.parse_args(["eval", "--ckpt", "1", "--task", "perplexity", "--data", "2024",
                         "--images", "2024", "--out", "out"])
  request = request_of(args)
  assert request.images == "2024" and request.model.ckpt == "1"
  data = perplexity_config(Config(), request).data
  assert (data.source, data.json_path, data.image_folder) == ("json", "2024", "2024")
