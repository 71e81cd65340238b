"""Output files written whole or not at all: to `path.tmp`, then renamed over `path`, so an
interrupted write never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping


def write_text(path: str, text: str) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_json(path: str, value: Any, indent: int | None = None) -> str:
  return write_text(path, json.dumps(value, indent=indent))


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> str:
  return write_text(path, "".join(json.dumps(r) + "\n" for r in records))
