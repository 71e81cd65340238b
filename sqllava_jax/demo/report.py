"""`report.md` in the demo's output folder, and the one-line JSON summary."""

from __future__ import annotations

import os
import shlex
from typing import Mapping, Sequence

from sqllava_jax.data import synthetic

STAGE_TITLES = {
    "stage0": ("stage 0, vision tower + projector + LLM from scratch (vicuna_v1 Q&A, a quarter "
               "of the records under v1_sq's system prompt)"),
    "stage1": "stage 1, alignment: projector + ViT-LoRA on captions (plain)",
    "stage2": "stage 2, instruction tuning: LLM-LoRA + projector + ViT-LoRA (v1_sq, sq_r 0.5)",
}


def _num(x, digits: int = 4) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _text(text: str) -> str:
  """Model output, safe inside one Markdown line or table cell: control and line-break
  characters (a half-trained model emits byte pieces) as escapes, `|` escaped."""
  out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
  return out.replace("|", "\\|")


def _count(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def summary_line(stages: Mapping, results: Mapping, out: str, timings) -> dict:
  total = timings.total()
  return {"synthetic_vqa_accuracy": results["vqa"]["accuracy"],
          "synthetic_sq_valid": results["sq"]["valid_fraction"],
          "stage1_final_loss": stages["stage1"]["final_loss"],
          "stage2_final_loss": stages["stage2"]["final_loss"],
          "export_dir": os.path.join(out, "export"),
          "wall_s": round(total.wall_s, 1), "cpu_s": round(total.cpu_s, 1),
          "report": os.path.join(out, "report.md")}


def _header(summary: Mapping, argv: Sequence[str], timings, fast: bool) -> list[str]:
  total, cpus = timings.total(), os.cpu_count() or 1
  share = total.cpu_s / max(total.wall_s * cpus, 1e-9)
  lines = ["# sqllava-jax demo", "",
           f"Command: `{shlex.join(['sqllava-jax', 'demo', *argv])}`", ""]
  if fast:
    lines += ["**`--fast`: a plumbing check on a handful of records and steps; the numbers "
              "below mean nothing.**", ""]
  lines += [f"Wall time {total.wall_s:.0f} s; CPU time {total.cpu_s:.0f} s on {cpus} CPUs "
            f"(this run used {share:.0%} of the machine). Load average (1 min): "
            f"{timings.start_load[0]:.2f} at the start, {_num(total.load_mean, 2)} on average "
            f"and {_num(timings.sampler.peak(), 2)} at the peak during the run.", "",
            "| result | value |", "|---|---|",
            f"| held-out answer accuracy (`synthetic_vqa`, greedy, exact match) | "
            f"{_num(summary['synthetic_vqa_accuracy'])} |",
            f"| valid self-asked questions (`synthetic_sq`) | "
            f"{_num(summary['synthetic_sq_valid'])} |",
            f"| stage 1 final loss | {_num(summary['stage1_final_loss'])} |",
            f"| stage 2 final loss | {_num(summary['stage2_final_loss'])} |",
            f"| export | `{summary['export_dir']}` |", ""]
  return lines


def _stage_section(name: str, s: Mapping) -> list[str]:
  groups = ", ".join(f"{g['name']} " + ("frozen" if g["frozen"] else f"lr {g['lr']:g}")
                     for g in s["groups"])
  trains = ", ".join(f"{k} {_count(v)}" for k, v in s["trainable"].items()) or "nothing"
  frozen = ", ".join(f"{k} {_count(v)}" for k, v in s["frozen"].items()) or "nothing"
  start = (f"from `{s['init_from']}`" + (f" except {', '.join(s['init_from_exclude'])}"
                                          if s["init_from_exclude"] else "")
           if s["init_from"] else "from scratch")
  return [f"### {STAGE_TITLES[name]}", "",
          f"- data: `{s['data_file']}`, template `{s['template']}`, sq_r {s['sq_r']}, "
          f"sequences of at most {s['max_length']} tokens",
          f"- trains: {trains}; frozen: {frozen}",
          f"- parameter groups ({s['optimizer']}): {groups}; starts {start}",
          f"- {s['steps']} steps of {s['batch_size']} examples; loss "
          f"{_num(s['first_loss'])} -> {_num(s['final_loss'])} (mean of the last 10 steps "
          f"{_num(s['final_mean'])}); {s['wall_s']:.0f} s in the training loop", "",
          f"![{name} loss]({name}/loss.png)", ""]


def _vqa_section(vqa: Mapping) -> list[str]:
  lines = ["## Held-out answer accuracy (`synthetic_vqa`)", "",
           f"{vqa['num_questions']} questions about held-out images (scenes that never occur "
           "in training), one of each type per image, template `vicuna_v1`, greedy, exact "
           "match. Chance: a uniform guess among the possible answers of the type. Best "
           "constant: always the most frequent held-out answer of the type, the most an "
           "answer that ignores the image can score (held-out scenes lean to three and four "
           "shapes: the few small scenes all occur in training).", "",
           "| question type | accuracy | questions | chance | best constant |",
           "|---|---|---|---|---|"]
  for t, r in vqa["per_type"].items():
    lines.append(f"| {t} | {_num(r['accuracy'])} | {r['num_questions']} | "
                 f"{_num(synthetic.CHANCE[t], 3)} | {_num(vqa['constant_per_type'][t], 3)} |")
  lines += [f"| **all** | **{_num(vqa['accuracy'])}** | {vqa['num_questions']} | "
            f"{_num(vqa['chance'], 3)} | {_num(vqa['constant'], 3)} |", "",
            f"Answers: `{vqa['answers']}`", ""]
  return lines


def _sq_section(sq: Mapping) -> list[str]:
  types = ", ".join(f"{k} {v}" for k, v in sq["question_types"].items())
  return ["## Self-questioning (`synthetic_sq`)", "",
          f"{sq['num_questions']} questions asked about {sq['num_images']} held-out images with "
          "the reference protocol (greedy description, then each question sampled at "
          "temperature 1.2, top-k 300, top-p 0.95 after `VUSER:`).", "",
          f"- valid (well-formed and about a shape in the image): "
          f"**{_num(sq['valid_fraction'])}**",
          f"- well-formed: {_num(sq['well_formed_fraction'])}",
          f"- question types: {types}", "", f"Questions: `{sq['answers']}`", ""]


def _ask_section(ask: Mapping) -> list[str]:
  lines = ["## Three self-asked questions about one held-out image", "",
           f"Image `{ask['image']}`; truth: {ask['scene']}", "",
           f"Description (greedy): {_text(ask['description'])}", "",
           "| question (sampled) | answer (greedy) | valid question | correct answer |",
           "|---|---|---|---|"]
  for t in ask["turns"]:
    gold = "" if t["correct"] or t["gold"] is None else f" (truth: {t['gold']})"
    lines.append(f"| {_text(t['question'])} | {_text(t['answer'])}{gold} | {'yes' if t['valid'] else 'no'} | "
                 f"{'yes' if t['correct'] else 'no'} |")
  return lines + [""]


def _timing_section(timings) -> list[str]:
  lines = ["## Timings", "", "| step | wall s | CPU s | mean load |", "|---|---|---|---|"]
  for t in [*timings.steps, timings.total()]:
    lines.append(f"| {t.name} | {t.wall_s:.1f} | {t.cpu_s:.1f} | {_num(t.load_mean, 2)} |")
  return lines + [""]


def write(out: str, options, stages: Mapping, results: Mapping, exported: Mapping,
          timings, summary: Mapping, argv: Sequence[str]) -> str:
  lines = _header(summary, argv, timings, options.fast) + ["## Stages", ""]
  for name, s in stages.items():
    lines += _stage_section(name, s)
  lines += _vqa_section(results["vqa"]) + _sq_section(results["sq"]) + _ask_section(results["ask"])
  lines += ["## Export", ""] + [f"- `{fmt}`: `{path}`" for fmt, path in exported.items()] + [""]
  lines += _timing_section(timings)
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
