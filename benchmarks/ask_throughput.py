"""Images per second of self-questioning (`ask`'s protocol) with the shared prompt heads
against the same loop prefilling every row whole.

    python benchmarks/ask_throughput.py [--images 8] [--n 4] [--answer] [--batch 8]

Each image is described (greedy), then asked n sampled questions (n rows of one prompt), and
with `--answer` each question answered (n rows that share the opening and differ in the
question): `self_questioning.self_question`, batches of `--batch` images. Both sides run
`eval_throughput.py`'s mid-size random model on the synthetic set's images, each in a worker
process of its own (`ab.py`); the first pass compiles and is not timed. The sampled
questions depend only on the batch's key, the row and its logits, so both sides should write
the same text; the share that does is printed. A random model rarely stops early: every row
runs its whole token budget (`--describe-tokens`, `--question-tokens`, `--answer-tokens`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--batch", type=int, default=8, help="images per call")
  p.add_argument("--n", type=int, default=4, help="questions per image")
  p.add_argument("--answer", action="store_true", help="also answer each question")
  p.add_argument("--describe-tokens", type=int, default=32)
  p.add_argument("--question-tokens", type=int, default=16)
  p.add_argument("--answer-tokens", type=int, default=16)
  p.add_argument("--vocab", type=int, default=1000, help="the synthetic tokenizer's size")
  return p.parse_args()


class AskWorker:
  def __init__(self, files: dict, args, share_heads: bool):
    import jax  # pylint: disable=g-import-not-at-top

    from sqllava_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
    from sqllava_jax.evaluation.engine import Engine  # pylint: disable=g-import-not-at-top
    from sqllava_jax.evaluation.prompts import load_image
    from sqllava_jax.evaluation.questions import load_questions
    from sqllava_jax.evaluation.self_questioning import Protocol, self_question
    options = loading.ModelOptions(files["ckpt"], share_heads=share_heads)
    model, cfg, tokenizer = loading.load(options)
    self.engine = Engine(model, tokenizer, **loading.engine_options(options, cfg))
    names = list(dict.fromkeys(q["image"] for q in load_questions(files["questions"])))
    size = cfg.model.vision.image_size
    self.images = [load_image(os.path.join(files["images"], name), size=size,
                              aspect_ratio="pad") for name in names[:args.images]]
    self.protocol = dataclasses.replace(Protocol(), describe_tokens=args.describe_tokens,
                                        question_tokens=args.question_tokens,
                                        answer_tokens=args.answer_tokens)
    self.args, self.self_question = args, self_question
    self.header = f"jax {jax.__version__} on {jax.devices()[0].platform}"

  def info(self) -> dict:
    return {"header": self.header}

  def run(self) -> tuple[float, list[str]]:
    start, texts = time.perf_counter(), []
    for b in range(0, len(self.images), self.args.batch):
      for r in self.self_question(self.engine, self.images[b:b + self.args.batch],
                                  n=self.args.n, protocol=self.protocol,
                                  answer=self.args.answer, seed=b):
        texts += [r.description, *r.questions, *(r.answers or [])]
    return time.perf_counter() - start, texts


def main() -> None:
  import ab  # pylint: disable=g-import-not-at-top
  import eval_throughput  # pylint: disable=g-import-not-at-top
  args = parse_args()
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; each side in its own process")
  with tempfile.TemporaryDirectory() as root, contextlib.ExitStack() as stack:
    files = eval_throughput.build(root, args.vocab, per_image=1, limit=args.images)
    sides = [stack.enter_context(ab.Side(name, AskWorker, files, args, share))
             for name, share in (("shared heads", True), ("every row whole", False))]
    print(sides[0].info["header"])
    for side in sides:  # warm-up: every shape compiled
      side.call("run")
    rates, texts = {}, {}
    for side in sides:
      seconds, texts[side.name] = side.call("run")
      rates[side.name] = args.images / seconds
      print(f"{side.name:<16} {args.images} images in {seconds:6.1f} s: "
            f"{rates[side.name]:6.2f} images/s", flush=True)
    a, b = texts["shared heads"], texts["every row whole"]
    same = sum(x == y for x, y in zip(a, b))
    print(f"ratio: {rates['shared heads'] / rates['every row whole']:.2f}x ({args.n} questions "
          f"an image{', answered' if args.answer else ''}, batch {args.batch}); identical "
          f"texts {same}/{len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
      if x != y:
        print(f"text {i} differs:\n  shared: {x[:120]!r}\n  whole:  {y[:120]!r}")
    print(json.dumps({"images_per_s": rates, "identical_texts": same}))
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
