"""`sqllava-jax convert`: checkpoints in and out.

  convert import-hf --llm DIR --vision DIR [--projector FILE] --config CONFIG --out CKPT
  convert import-sqllava --model DIR [--base DIR] [--vision DIR] [--vit-lora DIR | --no-vit-lora]
                         --out CKPT
  convert export-hf --ckpt CKPT --out DIR --format FORMAT [--vision-tower NAME]

Imports write a model-only orbax checkpoint (what `train`, `eval`, `generate` and `ask`
read); exports write Hugging Face / reference / PEFT directories. Every output is written
into a temporary directory beside --out and renamed only when complete.
"""

from __future__ import annotations

import argparse
import sys

from sqllava_jax.config import Config, load_config
from sqllava_jax.convert import FORMATS


def _add_output(p: argparse.ArgumentParser, what: str) -> None:
  p.add_argument("--out", required=True, help=f"{what} to create (must not exist)")
  p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                 help="replace an existing --out (only once the new one is complete)")


def _add_config(p: argparse.ArgumentParser, *, required: bool) -> None:
  p.add_argument("--config", required=required,
                 help="YAML config for everything the checkpoints do not say (LoRA, training, "
                      "data)" + ("" if required else "; default: the built-in 7B stage-2 config"))
  p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  p = sub.add_parser("import-hf", help="transformers LLaMA + CLIP directories -> checkpoint")
  p.add_argument("--llm", required=True, help="LlamaForCausalLM directory (e.g. Vicuna)")
  p.add_argument("--vision", required=True, help="CLIP or CLIPVisionModel directory")
  p.add_argument("--projector", help="projector weights (reference mm_projector.bin names)")
  _add_config(p, required=True)
  _add_output(p, "checkpoint directory")

  p = sub.add_parser("import-sqllava", help="reference SQ-LLaVA / LLaVA-1.5 checkpoint -> ours")
  p.add_argument("--model", required=True, help="reference checkpoint directory (config.json "
                 "with mm_* fields: merged, LoRA, or stage-1 mm_projector.bin)")
  p.add_argument("--base", help="base LLM directory, for LoRA and stage-1 checkpoints")
  p.add_argument("--vision", help="CLIP vision tower directory (default: mm_vision_tower)")
  vit = p.add_mutually_exclusive_group()
  vit.add_argument("--vit-lora", help="ViT-LoRA PEFT directory, the original's lora_pt "
                   "(default: MODEL/Vit-lora if present; the ViT tensors inside MODEL's "
                   "adapter_model are never applied, as in the original)")
  vit.add_argument("--no-vit-lora", action="store_true",
                   help="no ViT-LoRA even if MODEL/Vit-lora exists (the original without "
                        "--lora_pretrain)")
  _add_config(p, required=False)
  _add_output(p, "checkpoint directory")

  p = sub.add_parser("export-hf", help="checkpoint -> HF / reference / PEFT directory")
  p.add_argument("--ckpt", required=True, help="sqllava-jax checkpoint directory")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--format", required=True, choices=FORMATS,
                 help="llama: LlamaForCausalLM; clip: CLIPVisionModel; llava: "
                      "LlavaForConditionalGeneration + processor (mlp2x_gelu); sqllava, "
                      "sqllava-lora, sqllava-stage1: the original code's merged, LoRA and "
                      "stage-1 layouts; peft: LoRA adapters only")
  p.add_argument("--vision-tower", help="mm_vision_tower for the sqllava layouts, written as "
                 "given: the tower the original loads (a hub id, or a path as it resolves it); "
                 "required for sqllava-lora and sqllava-stage1 (default for sqllava: "
                 "OUT/vision_tower)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                 help="weights dtype (auto: the config's model.param_dtype)")
  p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                 help="fold the LoRA adapters into the weights (--no-merge-lora: base weights, "
                      "for a peft export on top)")
  p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (e.g. 2GB)")
  p.add_argument("--tokenizer", help="tokenizer.model to ship (default: the one beside the "
                 "checkpoint, else the config's data tokenizer)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                 help="show a progress bar")
  _add_output(p, "output directory")


def _config(args) -> Config:
  return load_config(args.config, args.overrides)


def run_import_hf(args) -> str:
  from sqllava_jax.convert.output import check_output, write_checkpoint
  from sqllava_jax.convert.reference import import_hf, source_tokenizer
  check_output(args.out, overwrite=args.overwrite)
  model, cfg = import_hf(_config(args), llm_dir=args.llm, vision_dir=args.vision,
                         projector_file=args.projector)
  return write_checkpoint(args.out, model, cfg, overwrite=args.overwrite,
                          extra_meta={"converted_from": {"llm": args.llm, "vision": args.vision}},
                          tokenizer=source_tokenizer(args.llm))


def run_import_sqllava(args) -> str:
  from sqllava_jax.convert.output import check_output, write_checkpoint
  from sqllava_jax.convert.reference import import_reference, source_tokenizer
  check_output(args.out, overwrite=args.overwrite)
  model, cfg, notes = import_reference(args.model, _config(args), base_dir=args.base,
                                       vision_dir=args.vision, vit_lora_dir=args.vit_lora,
                                       use_vit_lora=not args.no_vit_lora)
  for note in notes:
    print(f"import-sqllava: {note}", file=sys.stderr)
  return write_checkpoint(args.out, model, cfg, overwrite=args.overwrite,
                          extra_meta={"converted_from": {"reference": args.model}},
                          tokenizer=source_tokenizer(args.model, args.base))


def run_export(args) -> str:
  from sqllava_jax.convert.export import ExportOptions, export_checkpoint
  from sqllava_jax.convert.safetensors_writer import parse_size
  options = ExportOptions(dtype=args.dtype, merge_lora=args.merge_lora,
                          max_shard_bytes=parse_size(args.shard_size), tokenizer=args.tokenizer,
                          progress=args.progress, vision_tower=args.vision_tower)
  return export_checkpoint(args.ckpt, args.out, args.format, options, step=args.step,
                           overwrite=args.overwrite)


ACTIONS = {"import-hf": run_import_hf, "import-sqllava": run_import_sqllava,
           "export-hf": run_export}


def run(args: argparse.Namespace) -> int:
  try:
    path = ACTIONS[args.action](args)
  except (ValueError, FileExistsError, NotADirectoryError) as e:
    # User input (a bad checkpoint, config or path): the message names the file and the fix.
    print(f"sqllava-jax convert {args.action}: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0
