"""What a compiled XLA program does, read from its optimised HLO text.

`matmul_flops` counts every `dot` of the program (one device's part of an SPMD program)
times the trip counts of the loops around it. XLA's own cost analysis counts a loop body
once, so for a model whose layers are scanned it reports roughly one layer; this count is the
whole step as compiled, recomputation under remat included.

`peak_buffers` lists the buffers live at the memory peak, from the live-range file that
XLA writes when compiling with `xla_dump_to`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Optional

_HEADER = re.compile(r"^(?:ENTRY )?%([^\s(]+) \(.*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = (.*)$")
_ARRAY = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class _Instr:
  type: str
  opcode: str
  rest: str


def _split_type(text: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' -> ('f32[2,3]{1,0}', 'dot(...)'); tuple types nest parens."""
  if not text.startswith("("):
    head, _, tail = text.partition(" ")
    return head, tail
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return text[:i + 1], text[i + 2:]
  return text, ""


def parse(hlo_text: str) -> tuple[dict[str, dict[str, _Instr]], Optional[str]]:
  """{computation: {instruction: _Instr}} and the entry computation's name."""
  comps: dict[str, dict[str, _Instr]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = comps.setdefault(header.group(1), {})
      entry = header.group(1) if line.startswith("ENTRY") else entry
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      type_, rest = _split_type(m.group(2))
      opcode = rest.split("(", 1)[0]
      current[m.group(1)] = _Instr(type_, opcode, rest)
  return comps, entry


def dims(type_: str) -> Optional[tuple[int, ...]]:
  m = _ARRAY.match(type_)
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def _dot_flops(instr: _Instr, table: dict[str, _Instr]) -> float:
  out = dims(instr.type) or ()
  operands = instr.rest.split("(", 1)[1].split(")", 1)[0]
  lhs = operands.split(",")[0].split()[-1].lstrip("%")
  lhs_dims = dims(table[lhs].type) if lhs in table else None
  m = _CONTRACT.search(instr.rest)
  if lhs_dims is None or m is None:
    return 0.0
  k = math.prod(lhs_dims[int(i)] for i in m.group(1).split(",") if i)
  return 2.0 * math.prod(out) * k


def matmul_flops(hlo_text: str) -> tuple[float, list[str]]:
  """(FLOPs of every dot x enclosing trip counts, notes on what could not be counted)."""
  comps, entry = parse(hlo_text)
  notes: set[str] = set()

  @functools.lru_cache(maxsize=None)
  def flops(name: str) -> float:
    table = comps.get(name, {})
    total = 0.0
    for instr in table.values():
      if instr.opcode == "dot":
        total += _dot_flops(instr, table)
      elif instr.opcode == "convolution":
        notes.add("convolutions are not counted")
      callees = [(c, 1) for c in _CALLS.findall(instr.rest)]
      if instr.opcode == "while":
        trip = _TRIP.search(instr.rest)
        if trip is None:
          notes.add("a loop without a known trip count is counted once")
        callees = [(c, int(trip.group(1)) if trip else 1) for c in _CALLS.findall(instr.rest)]
      total += sum(flops(c) * n for c, n in callees)
      branches = _BRANCHES.search(instr.rest)
      if branches:  # one branch runs: count the dearest
        names = [b.strip().lstrip("%") for b in branches.group(1).split(",") if b.strip()]
        total += max((flops(b) for b in names), default=0.0)
    return total

  if entry is None:
    return 0.0, ["no ENTRY computation in the HLO text"]
  return flops(entry), sorted(notes)


def _live_at_peak(path: str) -> list[tuple[str, str, int]]:
  """[(instruction, tuple index, bytes)]: the 'Live ranges at N (peak)' list of XLA's
  '...-live-range.txt' dump."""
  out, inside = [], False
  with open(path) as f:
    for line in f:
      if "(peak):" in line:
        inside = True
        continue
      if inside:
        m = re.match(r"^\s+([^\s{]+)\{([^}]*)\}: (\d+) bytes", line)
        if not m:
          break
        out.append((m.group(1), m.group(2), int(m.group(3))))
  return out


def peak_buffers(dump_dir: str, hlo_text: str, top: int) -> list[dict]:
  """The `top` biggest temporaries and arguments live at the peak: bytes, shape, producer."""
  files = [f for f in os.listdir(dump_dir) if f.endswith("-live-range.txt")]
  if not files:
    return []
  # Several modules may be dumped; the train step is the one with the biggest peak.
  ranges = [_live_at_peak(os.path.join(dump_dir, f)) for f in files]
  live = max(ranges, key=lambda r: sum(b for *_, b in r))
  comps, _ = parse(hlo_text)
  where = {name: instr for table in comps.values() for name, instr in table.items()}
  rows = []
  for name, index, size in sorted(live, key=lambda x: -x[2])[:top]:
    instr = where.get(name)
    op = _OP_NAME.search(instr.rest) if instr else None
    shape = _element(instr.type, index) if instr else "?"
    rows.append({"bytes": size, "buffer": name + (f"{{{index}}}" if index else ""),
                 "shape": shape, "op": _short_op(op.group(1)) if op else ""})
  return rows


def _element(type_: str, index: str) -> str:
  """The array type at tuple `index` ('2') of a tuple type; the type itself if not a tuple."""
  if not index or not type_.startswith("("):
    return re.sub(r"\{[^}]*\}$", "", type_)
  body = re.sub(r"/\*[^*]*\*/", "", type_[1:-1])
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(body):
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      parts.append(body[start:i].strip())
      start = i + 1
  parts.append(body[start:].strip())
  i = int(index.split(",")[0])
  return _element(parts[i], ",".join(index.split(",")[1:])) if i < len(parts) else "?"


def _short_op(op_name: str) -> str:
  """'jit(step)/while/body/.../checkpoint/dot_general' -> its last three parts; an argument's
  "state['params']['llm']..." -> 'state/params/llm/...'."""
  if op_name.startswith(("state[", "batch[")):
    return re.sub(r"\[\\?'([^'\\]+)\\?'\]", r"/\1", op_name)
  return "/".join(op_name.split("/")[-3:])
