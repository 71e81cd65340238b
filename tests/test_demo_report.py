"""The demo report as a newcomer sees it: the held-out image beside the questions the model
asked, a grid of held-out answers marked right and wrong, the loss curves; `report.md` with
its figures beside it and `report.html` self-contained.

The report is written from hand-made stage and evaluation results (what `run.py` hands it),
so every mark it must show is known here; the images are drawn with a colour that no
matplotlib default uses, so finding it in a figure proves the image is in the figure.
"""

from __future__ import annotations

import base64
import html.parser
import os
import re
import types

import numpy as np
import pytest
from PIL import Image

from sqllava_jax.demo import document as doc
from sqllava_jax.demo import figures, report
from sqllava_jax.demo.timing import Timings

MAGENTA = (201, 17, 203)


def _image(path, colour) -> str:
  pixels = np.zeros((32, 32, 3), np.uint8)
  pixels[4:20, 6:22] = colour
  Image.fromarray(pixels).save(path)
  return str(path)


def _stage(name: str, loss_from: float) -> dict:
  return {"template": "v1_sq", "sq_r": 0.5, "data_file": f"{name}_train.json",
          "batch_size": 16, "max_length": 480, "optimizer": "adamw",
          "groups": [{"name": "everything", "lr": 1e-3, "frozen": False}],
          "trainable": {"llm": 300_000}, "frozen": {}, "init_from": "", "init_from_exclude": [],
          "steps": 100, "first_loss": loss_from, "final_loss": loss_from / 10,
          "final_mean": loss_from / 9, "wall_s": 12.0,
          "loss_curve": [(s, loss_from / (1 + s)) for s in range(0, 100, 10)]}


TURNS = [
    {"question": "Where is the red square?", "answer": "the red square is in the northwest",
     "valid": True, "gold": "the red square is in the northwest", "correct": True},
    {"question": "What color is the shape in the southeast?", "answer": "southeast blue",
     "valid": True, "gold": "southeast green", "correct": False},
    {"question": "Where is the *blue* | circle?", "answer": "<script>x</script>",
     "valid": False, "gold": None, "correct": False},
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  images = [_image(out / f"eval_{i}.png", MAGENTA) for i in range(14)]
  examples = [{"image": images[i // 4], "question": f"question {i}?", "answer": f"answer {i}",
               "gold": f"answer {i}" if i % 7 else "other", "question_type": "color",
               "correct": bool(i % 7)} for i in range(56)]
  stages = {s: _stage(s, 5.0 - i) for i, s in enumerate(("stage0", "stage1", "stage2"))}
  results = {
      "vqa": {"accuracy": 0.875, "num_questions": 56, "examples": examples,
              "per_type": {"color": {"accuracy": 0.875, "num_questions": 56}},
              "chance": 0.2, "constant": 0.3, "constant_per_type": {"color": 0.3},
              "answers": str(out / "answers.jsonl")},
      "sq": {"num_questions": 4, "num_images": 2, "valid_fraction": 0.75,
             "well_formed_fraction": 1.0, "question_types": {"position": 4},
             "answers": str(out / "questions.jsonl")},
      "ask": {"image": images[0], "scene": "one red square in the northwest",
              "description": "one shape:\na red square", "turns": TURNS},
  }
  timings = Timings()
  summary = {"synthetic_vqa_accuracy": 0.875, "synthetic_sq_valid": 0.75,
             "stage1_final_loss": 0.4, "stage2_final_loss": 0.3,
             "export_dir": str(out / "export")}
  options = types.SimpleNamespace(fast=False)
  report.write(str(out), options, stages, results, {"llama": str(out / "export/llama")},
               timings, summary, ["--out", str(out)])
  return out, results


def _figure_paths(markdown: str) -> list[str]:
  return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_markdown_embeds_the_three_figures_beside_it(written):
  out, _ = written
  md = (out / "report.md").read_text()
  paths = _figure_paths(md)
  assert paths == ["figures/asked.png", "figures/answers.png", "figures/loss.png"]
  for p in paths:  # relative to the report, so it renders from the output folder
    assert not os.path.isabs(p)
    assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
  # The image and its questions come first, before any table of numbers but the summary.
  assert md.index("figures/asked.png") < md.index("Held-out answers")


def test_ask_table_marks_each_question_and_answer(written):
  out, _ = written
  lines = (out / "report.md").read_text().splitlines()
  start = lines.index("| question (sampled) | answer (greedy) | valid question | correct answer |")
  rows = lines[start + 2:lines.index("", start)]
  ok, bad = f"{figures.RIGHT_MARK} yes", f"{figures.WRONG_MARK} no"
  assert rows == [
      f"| Where is the red square? | the red square is in the northwest | {ok} | {ok} |",
      f"| What color is the shape in the southeast? | southeast blue (truth: southeast green) "
      f"| {ok} | {bad} |",
      f"| Where is the \\*blue\\* \\| circle? | \\<script\\>x\\</script\\> | {bad} | {bad} |"]


class _Refs(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.refs, self.tags = [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data")]


def test_html_is_one_self_contained_file(written):
  out, _ = written
  page = (out / "report.html").read_text()
  parser = _Refs()
  parser.feed(page)
  assert "script" not in parser.tags and "link" not in parser.tags
  assert [t for t, _, _ in parser.refs] == ["img", "img", "img"], parser.refs
  prefix = "data:image/png;base64,"
  for (_, _, src), name in zip(parser.refs, ("asked", "answers", "loss")):
    assert src.startswith(prefix)
    assert base64.b64decode(src[len(prefix):]) == (out / "figures" / f"{name}.png").read_bytes()
  assert "url(" not in page and "@import" not in page
  # The model's text is shown, never run: its markup arrives escaped.
  assert "&lt;script&gt;x&lt;/script&gt;" in page
  assert "<strong>0.7500</strong>" in page and "<code>synthetic_vqa</code>" in page


def _pixels_near(path, colour, tol: int = 12) -> int:
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
  return int((np.abs(pixels - np.array(colour)).max(-1) <= tol).sum())


def _hex(colour: str) -> tuple[int, int, int]:
  return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_figures_show_the_images_and_the_marks(written):
  out, _ = written
  asked, grid = out / "figures" / "asked.png", out / "figures" / "answers.png"
  # The image: its 16 x 16 magenta block drawn several pixels per pixel.
  assert _pixels_near(asked, MAGENTA, tol=0) > 16 * 16 * 4
  assert _pixels_near(grid, MAGENTA, tol=0) > 12 * 16 * 16
  for path in (asked, grid):  # right in green, wrong in red, both present
    assert _pixels_near(path, _hex(figures.RIGHT)) > 20, path
    assert _pixels_near(path, _hex(figures.WRONG)) > 20, path
  assert Image.open(out / "figures" / "loss.png").size[0] > 3 * 300  # a panel per stage


def test_grid_picks_first_images_and_first_mistakes():
  def ex(image, correct):
    return {"image": image, "correct": correct}
  examples = [ex("a", True), ex("a", True), ex("b", True), ex("b", False), ex("c", True),
              ex("d", False), ex("d", False), ex("e", True), ex("f", True)]
  shown = report.grid_examples(examples, size=4, wrong=2)
  # b and d were answered wrong: shown with their first wrong answer; a and c fill the rest,
  # a with its question 0 and c (third image) with its question 2 % 1 = 0.
  assert [e["image"] for e in shown] == ["a", "b", "c", "d"]
  assert shown[1] is examples[3] and shown[3] is examples[5]
  assert [e["image"] for e in report.grid_examples(examples, size=3, wrong=0)] == ["a", "b", "c"]
  assert report.grid_examples(examples, size=3, wrong=0)[1] is examples[3]  # b's 2nd (1 % 2)


def test_literal_keeps_model_output_on_one_markdown_line():
  text = doc.literal("What\n|col\x0bor\x00? `x` **y** [z](u)")
  assert "\n" not in text and "\x00" not in text
  rendered = doc.to_markdown([doc.Table(("q",), ((text,),))]).splitlines()
  assert rendered[2] == "| What\\\\n\\|col\\\\x0bor\\\\x00? \\`x\\` \\*\\*y\\*\\* \\[z\\](u) |"
  # In HTML the same escapes come back as the characters the model wrote.
  assert doc.inline_html(text) == "What\\n|col\\x0bor\\x00? `x` **y** [z](u)"


def test_a_table_row_of_the_wrong_width_is_refused():
  with pytest.raises(ValueError, match="has 1 cells, the header"):
    doc.Table(("a", "b"), (("only",),))
