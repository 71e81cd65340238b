"""Questions per second of our `eval` loop against the reference's way of answering a
VQA-style file, on the same weights.

    python benchmarks/eval_throughput.py [--questions 24] [--batch 8] [--new 16] [--cores N]
                                         [--per-image K]

The reference loop is LLaVA's `llava/eval/model_vqa_loader.py`: one question at a time,
the image loaded and preprocessed, then `generate(do_sample=False, max_new_tokens=N)`; here
through transformers' `LlavaForConditionalGeneration` and `AutoProcessor`, loaded from our
`convert export llava` of the model. Ours is `eval_loop.answer_shard` (batches of `--batch`
questions, jitted generation) reading the same question file and images. A mid-size random
model: CLIP-like tower (112 px, patch 14: 64 image tokens, width 256, 4 layers), the
`mlp2x_gelu` projector, a LLaMA of width 1024, 8 layers, MLP 2816, fp32; the synthetic
set's questions and 112 px images. Each side runs in a worker process of its own (`ab.py`);
the first pass of each warms up (compiles) and is not timed. Both answer greedily, so the
answers should agree; the share that does is printed. With `--cores N` (N > 1) ours runs
on N simulated CPU devices with the model split over a `tensor` mesh axis (see
`generate.py`: on a quiet machine this buys nothing).

`--per-image K` asks K consecutive questions of each image: question i of the file on its
(i // K)-th distinct image. The synthetic file itself asks 4 of each (the default: the file
as it is), as VQA-style benchmarks ask several (POPE 6 of each of its 500 images in each of
its three splits, MME 2); 1 gives every question an image of its own. Our loop prefills
the head that a batch's questions on one image share (vision tower, system prompt, image
tokens) once (`prompt_heads`; off with `--no-share-heads`); the reference encodes the image
again for every question, as `model_vqa_loader.py` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

MODEL = ["model.vision.image_size=112", "model.vision.patch_size=14",
         "model.vision.hidden_size=256", "model.vision.intermediate_size=1024",
         "model.vision.num_layers=4", "model.vision.num_heads=4",
         "model.llm.hidden_size=1024", "model.llm.intermediate_size=2816",
         "model.llm.num_layers=8", "model.llm.num_heads=16", "model.llm.num_kv_heads=16",
         "model.llm.max_position_embeddings=1024", "model.projector.type=mlp2x_gelu",
         "model.llm_lora.rank=0", "model.vit_lora.rank=0", "model.compute_dtype=float32",
         "model.param_dtype=float32", "data.image_aspect_ratio=pad"]


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--questions", type=int, default=24)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new", type=int, default=16, help="max new tokens per answer")
  p.add_argument("--vocab", type=int, default=1000, help="the synthetic tokenizer's size")
  p.add_argument("--cores", type=int, default=1,
                 help="ours on this many simulated CPU devices, the model split over them")
  p.add_argument("--per-image", type=int, default=4,
                 help="consecutive questions asked of each image (the synthetic file's 4; "
                      "POPE: 6, MME: 2, 1: an image each)")
  p.add_argument("--no-share-heads", dest="share_heads", action="store_false",
                 help="ours prefills every question whole (no shared image heads)")
  return p.parse_args()


def regroup(path: str, out: str, per_image: int, limit: int) -> str:
  """The first `limit` questions of the file, K consecutive ones on each image (see the
  docstring)."""
  from sqllava_jax.evaluation.outputs import write_jsonl  # pylint: disable=g-import-not-at-top
  from sqllava_jax.evaluation.questions import load_questions
  questions = load_questions(path)[:limit]
  images = list(dict.fromkeys(q["image"] for q in load_questions(path)))
  if len(images) * per_image < len(questions):
    raise SystemExit(f"{len(questions)} questions need {-(-len(questions) // per_image)} "
                     f"images at {per_image} each; the file has {len(images)}")
  write_jsonl(out, [dict(q, image=images[i // per_image]) for i, q in enumerate(questions)])
  return out


def build(root: str, vocab: int, per_image: int, limit: int) -> dict:
  """The synthetic set, a random checkpoint of the mid-size model and its llava export."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from sqllava_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from sqllava_jax.convert.export import export_checkpoint  # pylint: disable=g-import-not-at-top
  from sqllava_jax.demo import synthetic  # pylint: disable=g-import-not-at-top
  from sqllava_jax.models.sqllava import SQLLaVA  # pylint: disable=g-import-not-at-top
  from sqllava_jax.training.checkpoint import save_model  # pylint: disable=g-import-not-at-top
  paths = synthetic.generate(os.path.join(root, "data"), num_train=8, num_eval=64,
                             image_size=112, vocab_size=vocab)
  from sqllava_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  vocab = Tokenizer(paths.tokenizer).vocab_size  # what the corpus gave (llava needs it exact)
  tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.yaml")
  cfg = load_config(tiny, [*MODEL, f"model.llm.vocab_size={vocab}",
                                          f"data.tokenizer={paths.tokenizer}"])
  ckpt = os.path.join(root, "ckpt")
  save_model(ckpt, SQLLaVA(cfg.model, rngs=nnx.Rngs(0)), cfg)
  hf = export_checkpoint(ckpt, os.path.join(root, "llava"), "llava")
  questions = paths.vqa("eval")
  questions = regroup(questions, os.path.join(root, "questions.jsonl"), per_image, limit)
  return {"ckpt": ckpt, "hf": hf, "questions": questions, "images": paths.image_folder}


class OursWorker:
  def __init__(self, files: dict, args):
    if args.cores > 1:  # this worker process has not imported jax yet
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={args.cores}")
    import jax  # pylint: disable=g-import-not-at-top

    from sqllava_jax.evaluation import eval_loop, loading  # pylint: disable=g-import-not-at-top
    from sqllava_jax.evaluation.engine import Engine  # pylint: disable=g-import-not-at-top
    from sqllava_jax.evaluation.questions import load_questions
    # What `eval --ckpt CKPT [--mesh tensor=N] [--no-share-heads]` loads.
    options = loading.ModelOptions(files["ckpt"],
                                   mesh=f"tensor={args.cores}" if args.cores > 1 else None,
                                   share_heads=args.share_heads)
    model, cfg, tokenizer = loading.load(options)
    self.engine = Engine(model, tokenizer, **loading.engine_options(options, cfg))
    self.questions = load_questions(files["questions"])[:args.questions]
    self.settings = eval_loop.EvalSettings(images_dir=files["images"], batch_size=args.batch,
                                           max_new_tokens=args.new, model_id="bench")
    self.answer_shard = eval_loop.answer_shard
    self.header = (f"jax {jax.__version__} on {len(jax.devices())} "
                   f"{jax.devices()[0].platform} device(s)")

  def info(self) -> dict:
    return {"header": self.header}

  def run(self, limit: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    records, _ = self.answer_shard(self.engine, self.questions[:limit], self.settings,
                                   process_index=0, process_count=1, progress=False)
    return time.perf_counter() - start, [r["text"] for r in records]


class ReferenceWorker:
  """model_vqa_loader.py's loop through transformers' LLaVA, one question at a time."""

  def __init__(self, files: dict, args):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from sqllava_jax.evaluation.questions import load_questions
    self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
        files["hf"], torch_dtype=torch.float32).eval()
    self.processor = transformers.AutoProcessor.from_pretrained(files["hf"])
    self.questions = load_questions(files["questions"])[:args.questions]
    self.images, self.new = files["images"], args.new
    self.header = f"torch {torch.__version__} with {torch.get_num_threads()} threads"

  def info(self) -> dict:
    return {"header": self.header}

  def run(self, limit: int) -> tuple[float, list[str]]:
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    from sqllava_jax.evaluation.prompts import question_prompt
    start, texts = time.perf_counter(), []
    for q in self.questions[:limit]:
      image = Image.open(os.path.join(self.images, q["image"])).convert("RGB")
      prompt = question_prompt(q["text"], template="vicuna_v1", image=True)
      inputs = self.processor(text=prompt, images=image, return_tensors="pt")
      with torch.inference_mode():
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.new,
                                  num_beams=1, use_cache=True)
      new = out[0, inputs["input_ids"].shape[1]:]
      texts.append(self.processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return time.perf_counter() - start, texts


def main() -> None:
  import ab  # pylint: disable=g-import-not-at-top
  args = parse_args()
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; each side in its own process")
  with tempfile.TemporaryDirectory() as root, contextlib.ExitStack() as stack:
    files = build(root, args.vocab, args.per_image, args.questions)
    ours = stack.enter_context(ab.Side("sqllava-jax eval", OursWorker, files, args))
    ref = stack.enter_context(ab.Side("reference loop", ReferenceWorker, files, args))
    print(f"{ours.info['header']}; {ref.info['header']}")
    ours.call("run", args.questions), ref.call("run", 2)  # warm-up: every shape compiled
    rates, answers = {}, {}
    for side in (ours, ref):
      seconds, texts = side.call("run", args.questions)
      rates[side.name], answers[side.name] = len(texts) / seconds, texts
      print(f"{side.name:<18} {len(texts)} questions in {seconds:6.1f} s: "
            f"{rates[side.name]:6.2f} questions/s", flush=True)
    same = sum(a == b for a, b in zip(answers["sqllava-jax eval"], answers["reference loop"]))
    print(f"ratio: {rates['sqllava-jax eval'] / rates['reference loop']:.2f}x "
          f"(batch {args.batch}, {args.new} new tokens, {args.per_image} question(s) an "
          f"image); identical answers {same}/"
          f"{len(answers['reference loop'])}")
    print(json.dumps({"questions_per_s": rates, "identical_answers": same}))
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
