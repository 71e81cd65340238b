"""The demo's report, `report.md` with its figures in `figures/` and the same as one
self-contained `report.html`, and the one-line JSON summary.

It opens with what a newcomer wants to see: a held-out image beside the three questions the
model asked about it and its answers, then a grid of held-out images with the model's
answers marked right or wrong, the scores against chance, the loss curves and the details.
"""

from __future__ import annotations

import os
import shlex
from typing import Mapping, Sequence

from sqllava_jax.demo import document as doc
from sqllava_jax.demo import figures, synthetic

STAGE_TITLES = {
    "stage0": ("stage 0, vision tower + projector + LLM from scratch (vicuna_v1 Q&A, a quarter "
               "of the records under v1_sq's system prompt)"),
    "stage1": "stage 1, alignment: projector + ViT-LoRA on captions (plain)",
    "stage2": "stage 2, instruction tuning: LLM-LoRA + projector + ViT-LoRA (v1_sq, sq_r 0.5)",
}
CURVE_TITLES = {"stage0": "stage 0: vision tower + projector + LLM",
                "stage1": "stage 1: alignment", "stage2": "stage 2: instruction tuning"}
FIGURES = "figures"
# The grid: the first held-out questions, with the first wrong answers among them.
GRID_SIZE, GRID_WRONG = 12, 4


def _num(x, digits: int = 4) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _count(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _yes(ok: bool) -> str:
  return f"{figures.RIGHT_MARK} yes" if ok else f"{figures.WRONG_MARK} no"


def summary_line(stages: Mapping, results: Mapping, out: str, timings) -> dict:
  total = timings.total()
  return {"synthetic_vqa_accuracy": results["vqa"]["accuracy"],
          "synthetic_sq_valid": results["sq"]["valid_fraction"],
          "stage1_final_loss": stages["stage1"]["final_loss"],
          "stage2_final_loss": stages["stage2"]["final_loss"],
          "export_dir": os.path.join(out, "export"),
          "wall_s": round(total.wall_s, 1), "cpu_s": round(total.cpu_s, 1),
          "report": os.path.join(out, "report.md")}


def _header(summary: Mapping, argv: Sequence[str], timings, fast: bool) -> list[doc.Block]:
  total, cpus = timings.total(), os.cpu_count() or 1
  share = total.cpu_s / max(total.wall_s * cpus, 1e-9)
  blocks: list[doc.Block] = [
      doc.Heading("sqllava-jax demo", 1),
      doc.Text(f"Command: `{shlex.join(['sqllava-jax', 'demo', *argv])}`")]
  if fast:
    blocks.append(doc.Text("**`--fast`: a plumbing check on a handful of records and steps; "
                           "the numbers below mean nothing.**"))
  blocks += [
      doc.Text(f"Wall time {total.wall_s:.0f} s; CPU time {total.cpu_s:.0f} s on {cpus} CPUs "
               f"(this run used {share:.0%} of the machine). Load average (1 min): "
               f"{timings.start_load[0]:.2f} at the start, {_num(total.load_mean, 2)} on "
               f"average and {_num(timings.sampler.peak(), 2)} at the peak during the run."),
      doc.Table(("result", "value"), (
          ("held-out answer accuracy (`synthetic_vqa`, greedy, exact match)",
           _num(summary["synthetic_vqa_accuracy"])),
          ("valid self-asked questions (`synthetic_sq`)", _num(summary["synthetic_sq_valid"])),
          ("stage 1 final loss", _num(summary["stage1_final_loss"])),
          ("stage 2 final loss", _num(summary["stage2_final_loss"])),
          ("export", f"`{summary['export_dir']}`")))]
  return blocks


def _ask_section(ask: Mapping, figure: str) -> list[doc.Block]:
  rows = []
  for t in ask["turns"]:
    truth = "" if t["correct"] or t["gold"] is None else f" (truth: {doc.literal(t['gold'])})"
    rows.append((doc.literal(t["question"]), doc.literal(t["answer"]) + truth, _yes(t["valid"]),
                 _yes(t["correct"])))
  return [doc.Heading("Three questions the model asked about a held-out image"),
          doc.Text("The model saw this image (a scene that never occurs in training) and, as "
                   "SQ-LLaVA's self-questioning does, first described it, then sampled each "
                   "question after the virtual user's `VUSER:` and answered it greedily. A "
                   "question is valid when it is about a shape that is in the image."),
          doc.Figure(figure, "a held-out image beside the questions the model asked and its "
                             "answers"),
          doc.Text(f"Image `{ask['image']}`; truth: {doc.literal(ask['scene'])}"),
          doc.Text(f"Description (greedy): {doc.literal(ask['description'])}"),
          doc.Table(("question (sampled)", "answer (greedy)", "valid question",
                     "correct answer"), rows)]


def grid_examples(examples: Sequence[Mapping], size: int = GRID_SIZE,
                  wrong: int = GRID_WRONG) -> list[Mapping]:
  """`size` answered questions about as many held-out images, in order: the first images,
  the k-th asked its question number k modulo its count (so the types take turns), except
  that up to `wrong` of them give way to the first images answered wrong, shown with their
  first wrong answer, so that the grid shows mistakes when there are any."""
  images: dict[str, list[Mapping]] = {}
  for ex in examples:
    images.setdefault(ex["image"], []).append(ex)
  order = list(images)
  missed = [im for im in order if not all(ex["correct"] for ex in images[im])][:wrong]
  kept = [im for im in order if im not in missed][:size - len(missed)]
  pick = {im: next(ex for ex in images[im] if not ex["correct"]) for im in missed}
  pick.update({im: images[im][order.index(im) % len(images[im])] for im in kept})
  return [pick[im] for im in order if im in pick]


def _vqa_section(vqa: Mapping, figure: str, shown: Sequence[Mapping]) -> list[doc.Block]:
  rows = [(t, _num(r["accuracy"]), str(r["num_questions"]), _num(synthetic.CHANCE[t], 3),
           _num(vqa["constant_per_type"][t], 3)) for t, r in vqa["per_type"].items()]
  rows.append(("**all**", f"**{_num(vqa['accuracy'])}**", str(vqa["num_questions"]),
               _num(vqa["chance"], 3), _num(vqa["constant"], 3)))
  wrong = sum(not ex["correct"] for ex in shown)
  return [doc.Heading("Held-out answers (`synthetic_vqa`)"),
          doc.Text(f"{len(shown)} held-out images, each with one of its questions and the "
                   f"model's answer: green and {figures.RIGHT_MARK} when right, red and "
                   f"{figures.WRONG_MARK} with the truth when wrong ({wrong} of these "
                   f"{len(shown)} wrong). They are the first images of the held-out set, "
                   f"except that up to {GRID_WRONG} give way to the first images the model "
                   "answered wrong, so that its mistakes show."),
          doc.Figure(figure, "held-out images with the model's answers, right and wrong "
                             "marked"),
          doc.Text(f"{vqa['num_questions']} questions about held-out images, one of each type "
                   "per image, template `vicuna_v1`, greedy, exact match. Chance: a uniform "
                   "guess among the possible answers of the type. Best constant: always the "
                   "most frequent held-out answer of the type, the most an answer that "
                   "ignores the image can score (held-out scenes lean to three and four "
                   "shapes: the few small scenes all occur in training)."),
          doc.Table(("question type", "accuracy", "questions", "chance", "best constant"),
                    rows),
          doc.Text(f"Answers: `{vqa['answers']}`")]


def _sq_section(sq: Mapping) -> list[doc.Block]:
  types = ", ".join(f"{k} {v}" for k, v in sq["question_types"].items())
  return [doc.Heading("Self-questioning (`synthetic_sq`)"),
          doc.Text(f"{sq['num_questions']} questions asked about {sq['num_images']} held-out "
                   "images with the reference protocol (greedy description, then each "
                   "question sampled at temperature 1.2, top-k 300, top-p 0.95 after "
                   "`VUSER:`)."),
          doc.Bullets((f"valid (well-formed and about a shape in the image): "
                       f"**{_num(sq['valid_fraction'])}**",
                       f"well-formed: {_num(sq['well_formed_fraction'])}",
                       f"question types: {types}")),
          doc.Text(f"Questions: `{sq['answers']}`")]


def _origin(s: Mapping) -> str:
  """Where the stage's weights came from."""
  if "base_dir" in s:
    files = s["files"]["params.safetensors"]
    return (f"**not trained in this run**: the stage-0 base in `{s['base_dir']}` "
            f"({_count(s['num_parameters'])} parameters, params.safetensors sha256 "
            f"`{files['sha256'][:12]}`), made by `{s['made_by']}`, whose stage 0 took "
            f"{s['wall_s']:.0f} s on {s['cpus']} CPUs (mean load {_num(s['mean_load'], 2)}); "
            "`--from-scratch` trains it here")
  if s["init_from"]:
    exclude = s["init_from_exclude"]
    return f"starts from `{s['init_from']}`" + (f" except `{'`, `'.join(exclude)}`"
                                                 if exclude else "")
  written = f"; written as a base folder to `{s['base_written']}`" if s.get("base_written") else ""
  return "starts from scratch" + written


def _stage_section(name: str, s: Mapping) -> list[doc.Block]:
  groups = ", ".join(f"{g['name']} " + ("frozen" if g["frozen"] else f"lr {g['lr']:g}")
                     for g in s["groups"])
  trains = ", ".join(f"{k} {_count(v)}" for k, v in s["trainable"].items()) or "nothing"
  frozen = ", ".join(f"{k} {_count(v)}" for k, v in s["frozen"].items()) or "nothing"
  return [doc.Heading(STAGE_TITLES[name], 3),
          doc.Bullets((
              _origin(s),
              f"data: `{s['data_file']}`, template `{s['template']}`, sq_r {s['sq_r']}, "
              f"sequences of at most {s['max_length']} tokens",
              f"trains: {trains}; frozen: {frozen}",
              f"parameter groups ({s['optimizer']}): {groups}",
              ("when the base was made: " if "base_dir" in s else "") +
              f"{s['steps']} steps of {s['batch_size']} examples; loss "
              f"{_num(s['first_loss'])} -> {_num(s['final_loss'])} (mean of the last 10 steps "
              f"{_num(s['final_mean'])}); {s['wall_s']:.0f} s in the training loop"))]


def _timing_section(timings) -> list[doc.Block]:
  rows = [(t.name, f"{t.wall_s:.1f}", f"{t.cpu_s:.1f}", _num(t.load_mean, 2))
          for t in [*timings.steps, timings.total()]]
  return [doc.Heading("Timings"), doc.Table(("step", "wall s", "CPU s", "mean load"), rows)]


def make_figures(out: str, stages: Mapping, results: Mapping) -> dict[str, str]:
  """Writes the figures into `out/figures`; their paths relative to `out`."""
  os.makedirs(os.path.join(out, FIGURES), exist_ok=True)
  rel = {k: os.path.join(FIGURES, f"{k}.png") for k in ("asked", "answers", "loss")}
  ask = results["ask"]
  figures.asked(ask["image"], ask["scene"], ask["turns"], os.path.join(out, rel["asked"]))
  figures.answer_grid(grid_examples(results["vqa"]["examples"]),
                      os.path.join(out, rel["answers"]))
  titles = {k: CURVE_TITLES[k] + (" (the base, as recorded when it was made)"
                                   if "base_dir" in s else "") for k, s in stages.items()}
  figures.loss_curves({k: s["loss_curve"] for k, s in stages.items()}, titles,
                      os.path.join(out, rel["loss"]))
  return rel


def blocks(options, stages: Mapping, results: Mapping, exported: Mapping, timings,
           summary: Mapping, argv: Sequence[str], figs: Mapping[str, str]) -> list[doc.Block]:
  out = _header(summary, argv, timings, options.fast)
  out += _ask_section(results["ask"], figs["asked"])
  out += _vqa_section(results["vqa"], figs["answers"],
                      grid_examples(results["vqa"]["examples"]))
  out += _sq_section(results["sq"])
  out += [doc.Heading("Stages"), doc.Figure(figs["loss"], "training loss of each stage")]
  for name, s in stages.items():
    out += _stage_section(name, s)
  out += [doc.Heading("Export"),
          doc.Bullets([f"`{fmt}`: `{path}`" for fmt, path in exported.items()])]
  return out + _timing_section(timings)


def write(out: str, options, stages: Mapping, results: Mapping, exported: Mapping,
          timings, summary: Mapping, argv: Sequence[str]) -> str:
  """Writes `report.md` (figures beside it) and `report.html`; returns report.md's path."""
  figs = make_figures(out, stages, results)
  content = blocks(options, stages, results, exported, timings, summary, argv, figs)
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write(doc.to_markdown(content))
  with open(os.path.join(out, "report.html"), "w") as f:
    f.write(doc.to_html(content, out, "sqllava-jax demo"))
  return path
