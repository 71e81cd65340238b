"""Input pipeline throughput: ours (Grain) against a reference-style per-sample loader.

Both paths do the whole job on the same files: decode a 500x375 photo-like JPEG, pad it to
a square with the CLIP mean colour, resize and centre crop to 336, normalise, build the
v1_sq prompt with self-questioning turns, tokenise, mask the labels and batch. The
reference path is the one llava trains with: transformers' `CLIPImageProcessor` after the
padding, and labels by counting each round's tokens with `LlamaTokenizer` (written out
below), then a padding collate. "Per core" runs pin this process to one CPU.

    python benchmarks/input_pipeline.py [--samples 384] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from sqllava_jax.config import Config, replace
from sqllava_jax.data.pipeline import make_pipeline
from sqllava_jax.demo import synthetic

WORDS = ("the a man woman dog cat street car red blue green old young small large standing "
         "sitting holding near behind front table window tree building sky water people "
         "looking walking wearing shirt hat bag phone picture image scene left right top "
         "bottom background appears there is are two three several many with and of on in "
         "at what where how why color kind doing does this that which").split()


def _sentence(rng: random.Random, lo: int, hi: int, end: str) -> str:
  words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
  return " ".join(words).capitalize() + end


def make_records(n: int, seed: int = 0) -> list[dict]:
  """LLaVA-665K-like records: 1 to 5 question/answer rounds, answers of 5 to 60 words."""
  rng = random.Random(seed)
  records = []
  for i in range(n):
    turns = []
    for k in range(rng.randint(1, 5)):
      q = _sentence(rng, 5, 15, "?")
      turns.append({"from": "human", "value": f"<image>\n{q}" if k == 0 else q})
      turns.append({"from": "gpt", "value": " ".join(_sentence(rng, 5, 20, ".")
                                                     for _ in range(rng.randint(1, 3)))})
    records.append({"id": str(i), "image": f"{i % 64:03d}.jpg", "conversations": turns})
  return records


def make_photos(folder: str, n: int = 64, seed: int = 0) -> None:
  """500x375 JPEGs cut from scikit-image's sample photographs, varied per file."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
             skimage.data.rocket(), skimage.data.immunohistochemistry(),
             skimage.data.hubble_deep_field()]
  rng = np.random.default_rng(seed)
  for i in range(n):
    src = Image.fromarray(sources[i % len(sources)])
    w, h = src.size
    scale = rng.uniform(1.0, 1.6)
    cw, ch = min(w, int(w / scale)), min(h, int(h / scale))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BICUBIC)
    if i % 2:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)


class ReferenceLoader:
  """llava's per-sample path: PIL + expand2square + CLIPImageProcessor, prompt with VUSER
  turns, labels by per-round token counting over transformers' LlamaTokenizer, collate."""

  SEP, SEP2 = " ", "</s>"

  def __init__(self, records, image_folder, tokenizer_dir, system, sq_r, seed):
    # pylint: disable-next=g-import-not-at-top
    from transformers import CLIPImageProcessorPil, LlamaTokenizer
    self.records, self.image_folder, self.system = records, image_folder, system
    self.processor = CLIPImageProcessorPil(size={"shortest_edge": 336},
                                           crop_size={"height": 336, "width": 336})
    self.tok = LlamaTokenizer.from_pretrained(tokenizer_dir, legacy=True, add_bos_token=True)
    self.sq_r, self.rng = sq_r, random.Random(seed)

  def image(self, name):
    import torch  # pylint: disable=g-import-not-at-top
    img = Image.open(os.path.join(self.image_folder, name)).convert("RGB")
    w, h = img.size
    color = tuple(int(x * 255) for x in self.processor.image_mean)
    if w != h:
      side = max(w, h)
      square = Image.new(img.mode, (side, side), color)
      square.paste(img, ((side - w) // 2, (side - h) // 2))
      img = square
    out = self.processor.preprocess(img, return_tensors="np")["pixel_values"][0]
    return torch.from_numpy(out)

  def tokenize_image(self, text):
    ids = [self.tok.bos_token_id]
    for i, chunk in enumerate(text.split("<image>")):
      if i:
        ids.append(-200)
      ids.extend(self.tok(chunk).input_ids[1:])
    return ids

  def prompt(self, record):
    out = self.system + self.SEP
    for j, turn in enumerate(record["conversations"]):
      if turn["from"] == "human":
        role, text = "USER", turn["value"]
        if j > 0 and self.rng.random() < self.sq_r:
          role, text = "VUSER", text + self.SEP2
        out += f"{role}: {text}{self.SEP}"
      else:
        out += f"ASSISTANT: {turn['value']}{self.SEP2}"
    return out

  def labels(self, prompt):
    import torch  # pylint: disable=g-import-not-at-top
    ids = torch.tensor(self.tokenize_image(prompt))
    labels = ids.clone()
    labels[0] = -100
    pos, answer_sep = 1, " ASSISTANT: "
    for round_text in prompt.split(self.SEP2):
      if not round_text:
        break
      parts = round_text.split(answer_sep)
      round_len = len(self.tokenize_image(round_text))
      if len(parts) == 2:
        masked = len(self.tokenize_image(parts[0] + answer_sep)) - 2
      else:
        masked = len(self.tokenize_image("VUSER: ")) - 2
      labels[pos:pos + masked] = -100
      pos += round_len
    labels[pos:] = -100
    return ids, labels

  def __getitem__(self, i):
    record = self.records[i]
    image = self.image(record["image"])
    ids, labels = self.labels(self.prompt(record))
    return {"input_ids": ids, "labels": labels, "image": image}

  def collate(self, samples):
    import torch  # pylint: disable=g-import-not-at-top
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([s["input_ids"] for s in samples], batch_first=True, padding_value=0)
    return {"input_ids": ids,
            "labels": pad([s["labels"] for s in samples], batch_first=True, padding_value=-100),
            "attention_mask": ids.ne(0), "images": torch.stack([s["image"] for s in samples])}


def _rates(samples, wall, cpu):
  return {"wall": samples / wall, "cpu": samples / cpu if cpu else float("nan")}


def time_reference(loader, samples, batch_size):
  """Samples per second of wall time and per second of this process's CPU time."""
  wall, cpu = time.perf_counter(), time.process_time()
  for b in range(0, samples, batch_size):
    loader.collate([loader[i % len(loader.records)] for i in range(b, b + batch_size)])
  return _rates(samples, time.perf_counter() - wall, time.process_time() - cpu)


def time_ours(cfg, samples, batch_size, workers):
  it = iter(make_pipeline(cfg, batch_size=batch_size, num_workers=workers, num_epochs=0,
                          process_index=0, process_count=1))
  next(it)  # start-up (worker processes, first prefetch) is not throughput
  steps = samples // batch_size
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(it)
  # With workers the CPU time is spent elsewhere: only wall time is meaningful.
  rates = _rates(steps * batch_size, time.perf_counter() - wall,
                 0 if workers else time.process_time() - cpu)
  it.close()
  assert not it.skipped, it.skip_summary()
  return rates


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=256, help="samples timed per run")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="runs per path; the median is shown")
  parser.add_argument("--cpu", type=int, default=None, help="CPU for the per-core runs")
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix="input-bench-")
  try:
    images = os.path.join(work, "images")
    os.makedirs(images)
    make_photos(images)
    records = make_records(512)
    with open(os.path.join(work, "data.json"), "w") as f:
      json.dump(records, f)
    lines = [t["value"].replace("<image>\n", "") for r in records for t in r["conversations"]]
    from sqllava_jax.data.templates import get_template  # pylint: disable=g-import-not-at-top
    system = get_template("v1_sq").system
    synthetic.train_tokenizer(lines + [system] * 50 + ["USER: ASSISTANT: VUSER:"] * 50,
                              os.path.join(work, "tokenizer.model"), vocab_size=2000)
    cfg = replace(Config(), **{
        "data.source": "json", "data.json_path": os.path.join(work, "data.json"),
        "data.image_folder": images, "data.tokenizer": os.path.join(work, "tokenizer.model"),
        "data.template": "v1_sq", "data.sq_r": 0.5, "data.max_length": 2048,
        "data.num_threads": 1, "data.prefetch": 2})
    reference = ReferenceLoader(records, images, work, system, sq_r=0.5, seed=0)
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(1)

    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if args.cpu is None else args.cpu
    results = {"reference, 1 core": [], "ours, 1 core": []}
    os.sched_setaffinity(0, {cpu})
    time_reference(reference, 2 * args.batch_size, args.batch_size)  # warm-up
    # Alternating runs see the same background load (the machine may be shared).
    for _ in range(args.repeats):
      results["reference, 1 core"].append(time_reference(reference, args.samples, args.batch_size))
      results["ours, 1 core"].append(time_ours(cfg, args.samples, args.batch_size, 0))
    os.sched_setaffinity(0, set(allowed))
    results[f"ours, {args.workers} workers"] = [
        time_ours(cfg, args.samples, args.batch_size, args.workers) for _ in range(args.repeats)]
    load = os.getloadavg()[0]

    print(f"{len(allowed)} CPUs allowed; per-core runs pinned to CPU {cpu}; batch "
          f"{args.batch_size}, {args.samples} samples per run, median of {args.repeats}; "
          f"load average {load:.1f} at the end")
    print("  samples/s by wall clock, and per CPU-second of the process (what one core does "
          "when nothing else runs on it)")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu")}
           for name, runs in results.items()}
    for name, rate in med.items():
      per_cpu = "" if rate["cpu"] != rate["cpu"] else (
          f"   {rate['cpu']:7.1f} per CPU-s ({1000 / rate['cpu']:5.2f} CPU-ms/sample)")
      print(f"  {name:<20} {rate['wall']:7.1f} samples/s{per_cpu}")
    ref, ours = med["reference, 1 core"], med["ours, 1 core"]
    print(f"  ours / reference per core: {ours['wall'] / ref['wall']:.2f}x wall, "
          f"{ours['cpu'] / ref['cpu']:.2f}x per CPU-second (goal >= 1.5x)")
    print(f"  ours with {args.workers} workers: "
          f"{med[f'ours, {args.workers} workers']['wall']:.0f} samples/s (goal >= 300)")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
