"""`sqllava-jax build-dataset --json FILE --images DIR --out DIR`: a LLaVA JSON file and its
images as TFDS ArrayRecord shards (images inside), for `data.source=tfds`. Give several
splits as `--json train=a.json --json eval=b.json`. TensorFlow is not needed."""

from __future__ import annotations

import argparse

from sqllava_jax.data.tfds_builder import build_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--json", action="append", required=True, metavar="[SPLIT=]FILE",
                      help="LLaVA JSON list (or JSON lines); SPLIT defaults to --split")
  parser.add_argument("--images", required=True, help="the folder the records' images are under")
  parser.add_argument("--out", required=True, help="output folder (TFDS data_dir)")
  parser.add_argument("--split", default="train", help="split name for a bare --json FILE")
  parser.add_argument("--num-shards", type=int, default=None,
                      help="ArrayRecord shards per split (default: TFDS picks by size)")


def parse_splits(items: list[str], default_split: str) -> dict[str, str]:
  splits: dict[str, str] = {}
  for item in items:
    split, sep, path = item.partition("=")
    if not sep or "/" in split or not split:
      split, path = default_split, item
    if split in splits:
      raise SystemExit(f"--json: split {split!r} given twice; name splits as SPLIT=FILE")
    splits[split] = path
  return splits


def run(args: argparse.Namespace) -> int:
  splits = parse_splits(args.json, args.split)
  result = build_dataset(splits, args.images, args.out, num_shards=args.num_shards)
  print(f"wrote {result.path}")
  for split, count in result.records.items():
    print(f"  {split}: {count} records")
  print(f"  image bytes stored: {result.image_bytes:,}")
  if result.image_problems:
    problems = ", ".join(f"{r} {n}" for r, n in sorted(result.image_problems.items()))
    print(f"  records whose image could not be read (skipped in training): {problems}")
  print(f"use: data.source=tfds data.tfds_dir={result.path} data.split={next(iter(splits))}")
  return 0
