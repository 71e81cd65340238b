"""The model flags every inference command shares (`generate`, `ask`, `eval`, `eval-suite`),
and the `loading.ModelOptions` they say."""

from __future__ import annotations

import argparse

from sqllava_jax.evaluation.loading import ModelOptions


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, help="checkpoint directory (training run or "
                      "converted model); its saved config describes the model")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--tokenizer", default=None,
                      help="SentencePiece tokenizer.model (default: the config's data.tokenizer, "
                           "or tokenizer.model beside the checkpoint)")
  parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                      help="fold LoRA adapters into the base weights (faster decoding)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.compute_dtype=bfloat16 (repeatable)")
  parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                      help="inference mesh: weights, batch and KV cache shard over it by the "
                           "config's mesh.rules (e.g. data=1,fsdp=8); default: weights whole")
  parser.add_argument("--unstack-layers", action=argparse.BooleanOptionalAction, default=None,
                      help="keep an unstacked copy of the decoder layers for decoding (faster "
                           "on CPU, the layers' memory once more; default: on CPU only)")
  parser.add_argument("--share-heads", action=argparse.BooleanOptionalAction, default=True,
                      help="prefill once the head that a batch's prompts on one image share "
                           "(vision tower, system prompt, image tokens); --no-share-heads "
                           "prefills every prompt whole")


def model_options(args: argparse.Namespace) -> ModelOptions:
  return ModelOptions(ckpt=args.ckpt, step=args.step, tokenizer=args.tokenizer,
                      merge_lora=args.merge_lora, overrides=tuple(args.override),
                      mesh=args.mesh, unstack_layers=args.unstack_layers,
                      share_heads=args.share_heads)
