"""`sqllava-jax show-example CONFIG [key=value ...] --index I [--json]`: what training sees
for record I of the configured data: the templated prompt with the trained spans marked,
the image placeholder span, the turns relabelled as VUSER. `--json` prints one object with
`prompt`, `input_ids` and `labels` (-100 where no loss), before padding."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from sqllava_jax.config import load_config
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.examples import Explained
from sqllava_jax.data.labels import IGNORE_INDEX
from sqllava_jax.data.pipeline import make_example_builder
from sqllava_jax.data.templates import VUSER

_TRAINED, _VUSER, _DIM, _RESET = "\033[1;32m", "\033[1;35m", "\033[2m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  parser.add_argument("--index", type=int, required=True, help="record index in the source")
  parser.add_argument("--split", default=None, help="split (TFDS / synthetic); default data.split")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                      help="colour trained spans (default: when stdout is a terminal)")


def run(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  builder = make_example_builder(cfg, split=args.split)
  if not 0 <= args.index < len(builder):
    print(f"--index {args.index} is out of range: the source has {len(builder)} records "
          f"(0..{len(builder) - 1})", file=sys.stderr)
    return 2
  try:
    explained = builder.explain(args.index)
  except BadRecord as e:
    if args.json:
      print(json.dumps({"index": args.index, "reason": e.reason, "error": str(e)}))
    else:
      print(f"this record is skipped in training: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(as_json(explained, image_token_id=builder.image_token_id)))
  else:
    color = sys.stdout.isatty() if args.color is None else args.color
    print(describe(explained, builder, color=color))
  return 0


def _image_span(input_ids: np.ndarray, image_token_id: int):
  where = np.flatnonzero(input_ids == image_token_id)
  return [int(where[0]), int(where[-1]) + 1] if len(where) else None


def _vuser_turns(explained: Explained) -> list[int]:
  return [i for i, (role, _) in enumerate(explained.turns) if role == VUSER]


def as_json(explained: Explained, *, image_token_id: int) -> dict:
  tokens = explained.tokens
  return {"index": explained.record.index, "id": explained.record.id,
          "image": explained.record.image, "prompt": tokens.prompt,
          "input_ids": tokens.input_ids.tolist(), "labels": tokens.labels.tolist(),
          "image_span": _image_span(tokens.input_ids, image_token_id),
          "vuser_turns": _vuser_turns(explained), "num_trained": tokens.num_trained}


def describe(explained: Explained, builder, *, color: bool) -> str:
  record, tokens = explained.record, explained.tokens
  span = _image_span(tokens.input_ids, builder.image_token_id)
  source = getattr(builder.source, "path", builder.source)
  lines = [
      f"record {record.id!r} (index {record.index}) of {source}",
      f"image: {record.image or 'none (text only)'}"
      + (f", placeholders at tokens {span[0]}..{span[1] - 1}" if span else ""),
      f"template {builder.template.name}, sq_r {builder.sq_r}, seed {builder.seed}: "
      + (f"turns {', '.join(map(str, _vuser_turns(explained)))} relabelled as VUSER"
         if _vuser_turns(explained) else "no turn relabelled as VUSER"),
      f"tokens: {len(tokens.input_ids)} (max_length {builder.max_length}), "
      f"trained: {tokens.num_trained}",
      "legend: " + ("green = trained answer, magenta = trained VUSER question, dim = image"
                    if color else "[[trained]], {{trained VUSER question}}"),
      "",
      render_prompt(explained, builder.tokenizer, color=color),
  ]
  return "\n".join(lines)


def render_prompt(explained: Explained, tokenizer, *, color: bool) -> str:
  """The prompt as training sees it, segment by segment, with trained spans marked."""
  tokens = explained.tokens
  pieces: list[tuple[str, str]] = []  # (text, style)
  for k, seg in enumerate(tokens.segments):
    kept = tokens.segment_of_token == k
    count = int(kept.sum())
    if seg.kind == "bos" and count:
      continue
    style = "plain"
    if seg.kind == "image":
      style = "image"
    elif seg.trained:
      assert (tokens.labels[kept] != IGNORE_INDEX).all()
      style = "vuser" if seg.role == VUSER else "trained"
    if count == tokens.segment_lengths[k]:
      pieces.append((f"<image x{count}>" if seg.kind == "image" else seg.text, style))
      continue
    if count:
      pieces.append((tokenizer.decode(tokens.input_ids[kept], skip_special_tokens=False), style))
    pieces.append((" ...[truncated at max_length]", "plain"))
    break
  merged: list[list[str]] = []
  for text, style in pieces:
    if merged and merged[-1][1] == style:
      merged[-1][0] += text
    else:
      merged.append([text, style])
  return "".join(_mark(text, style, color) for text, style in merged)


def _mark(text: str, style: str, color: bool) -> str:
  if style == "plain":
    return text
  if color:
    return {"image": _DIM, "trained": _TRAINED, "vuser": _VUSER}[style] + text + _RESET
  return {"image": text, "trained": f"[[{text}]]", "vuser": f"{{{{{text}}}}}"}[style]
