"""The demo report as a list of blocks, written once and rendered twice: as Markdown with its
figures as PNG files beside it (`report.md`, read on GitHub or in any local viewer from the
output folder), and as one self-contained HTML file with the figures inline as base64 PNGs
(`report.html`: no external `src` or `href`, so it can be mailed or archived alone).

Text in blocks is a small Markdown subset: `code`, **bold** and backslash escapes. Text a
model wrote goes through `literal` first, so that its `*`, `|` or control characters show
as written instead of turning into markup or breaking a table row.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import re
from typing import Sequence, Union

# Markdown punctuation that `literal` escapes (CommonMark lets any ASCII punctuation be
# escaped; these are the ones that could start markup inside a line or a table cell).
_SPECIAL = re.compile(r"([\\`*_|<>\[\]#])")
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|`([^`]+)`|\*\*(.+?)\*\*")


@dataclasses.dataclass(frozen=True)
class Heading:
  text: str
  level: int = 2


@dataclasses.dataclass(frozen=True)
class Text:
  text: str


@dataclasses.dataclass(frozen=True)
class Bullets:
  items: Sequence[str]


@dataclasses.dataclass(frozen=True)
class Table:
  header: Sequence[str]
  rows: Sequence[Sequence[str]]

  def __post_init__(self):
    for row in self.rows:
      if len(row) != len(self.header):
        raise ValueError(f"table row {list(row)} has {len(row)} cells, the header "
                         f"{list(self.header)} {len(self.header)}")


@dataclasses.dataclass(frozen=True)
class Figure:
  path: str  # PNG, relative to the report's folder
  alt: str


Block = Union[Heading, Text, Bullets, Table, Figure]


def literal(text: str) -> str:
  """`text` shown as written: non-printable characters as Python escapes (a half-trained
  model emits byte pieces), Markdown punctuation escaped."""
  printable = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
  return _SPECIAL.sub(r"\\\1", printable)


def to_markdown(blocks: Sequence[Block]) -> str:
  lines: list[str] = []
  for b in blocks:
    if isinstance(b, Heading):
      lines.append(f"{'#' * b.level} {b.text}")
    elif isinstance(b, Text):
      lines.append(b.text)
    elif isinstance(b, Bullets):
      lines += [f"- {item}" for item in b.items]
    elif isinstance(b, Table):
      lines += [_md_row(b.header), "|" + "---|" * len(b.header)]
      lines += [_md_row(row) for row in b.rows]
    elif isinstance(b, Figure):
      lines.append(f"![{b.alt}]({b.path})")
    lines.append("")
  return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def inline_html(text: str) -> str:
  """The inline subset as HTML, everything else escaped."""
  out, last = [], 0
  for m in _INLINE.finditer(text):
    out.append(html.escape(text[last:m.start()]))
    escaped, code, bold = m.groups()
    if escaped is not None:
      out.append(html.escape(escaped))
    elif code is not None:
      out.append(f"<code>{html.escape(code)}</code>")
    else:
      out.append(f"<strong>{inline_html(bold)}</strong>")
    last = m.end()
  out.append(html.escape(text[last:]))
  return "".join(out)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 62em;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; color: #1f2328; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 90%;
       background: #f3f4f6; padding: 0.1em 0.3em; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.7em; text-align: left; }
th { background: #f6f8fa; }
img { max-width: 100%; }
"""


def to_html(blocks: Sequence[Block], folder: str, title: str) -> str:
  """One HTML page; each figure read from `folder` and inlined as a base64 data URI."""
  parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>",
           "<body>"]
  for b in blocks:
    if isinstance(b, Heading):
      parts.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
    elif isinstance(b, Text):
      parts.append(f"<p>{inline_html(b.text)}</p>")
    elif isinstance(b, Bullets):
      parts.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
    elif isinstance(b, Table):
      head = "".join(f"<th>{inline_html(c)}</th>" for c in b.header)
      body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>"
                     for row in b.rows)
      parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    elif isinstance(b, Figure):
      with open(os.path.join(folder, b.path), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
      parts.append(f'<figure><img alt="{html.escape(b.alt)}" '
                   f'src="data:image/png;base64,{data}"></figure>')
  parts += ["</body>", "</html>", ""]
  return "\n".join(parts)
