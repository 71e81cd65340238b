"""A one-sheet .xlsx writer (Office Open XML, inline strings), for MMBench's submission file.

The MMBench server takes the Excel file LLaVA's scripts/convert_mmbench_for_submission.py
writes with pandas and openpyxl: one sheet, `Sheet1`, a header row, then one row per TSV
row. Writing that layout needs no spreadsheet library: a zip of five small XML parts.
Numbers become numeric cells, strings inline-string cells, None an empty cell.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Sequence
from xml.sax.saxutils import escape

_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '</Types>')
_ROOT_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="xl/workbook.xml" Type="http://schemas.openxmlformats.org/'
    'officeDocument/2006/relationships/officeDocument"/></Relationships>')
_WORKBOOK = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
    'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
    '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>')
_WORKBOOK_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="worksheets/sheet1.xml" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet"/>'
    '</Relationships>')
# Characters XML 1.0 cannot hold at all (control characters other than tab, newline, CR).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def column_name(i: int) -> str:
  """0 -> A, 25 -> Z, 26 -> AA."""
  name = ""
  i += 1
  while i:
    i, r = divmod(i - 1, 26)
    name = chr(ord("A") + r) + name
  return name


def _cell(ref: str, value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f'<c r="{ref}"><v>{value!r}</v></c>'
  text = escape(_NOT_XML.sub("", str(value)))
  return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def _sheet(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = []
  for r, row in enumerate([list(header), *rows], 1):
    cells = "".join(_cell(f"{column_name(c)}{r}", v) for c, v in enumerate(row))
    lines.append(f'<row r="{r}">{cells}</row>')
  return ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
          '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
          f'<sheetData>{"".join(lines)}</sheetData></worksheet>')


def write_xlsx(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Writes `header` and `rows` (each as long as `header`) as `path`, atomically."""
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f"{path}: row {i} has {len(row)} cells for {len(header)} columns")
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("[Content_Types].xml", _CONTENT_TYPES)
    z.writestr("_rels/.rels", _ROOT_RELS)
    z.writestr("xl/workbook.xml", _WORKBOOK)
    z.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
    z.writestr("xl/worksheets/sheet1.xml", _sheet(header, rows))
  os.replace(tmp, path)
