"""What the inference commands share: loading a checkpoint for inference and its tokenizer,
and the command-line flags for both."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import jax

from sqllava_jax.config import Config
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.models import lora
from sqllava_jax.models.sqllava import SQLLaVA


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


def load_for_inference(ckpt: str, *, step: Optional[int] = None, overrides: Sequence[str] = (),
                       merge_lora: bool = True) -> tuple[SQLLaVA, Config]:
  """The model of a checkpoint with its config, adapters merged unless asked not to. With
  several processes the weights are restored replicated over all devices (orbax needs a
  target layout there)."""
  from sqllava_jax.training.checkpoint import load_model  # pylint: disable=g-import-not-at-top
  shardings = _replicated(ckpt, step, overrides) if jax.process_count() > 1 else None
  model, cfg = load_model(ckpt, step=step, overrides=overrides, shardings=shardings)
  if merge_lora:
    lora.merge(model)
  return model, cfg


def _replicated(ckpt: str, step: Optional[int], overrides: Sequence[str]):
  """A replicated sharding over every device for each parameter of the checkpoint's model."""
  from sqllava_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  meta = checkpoint.Checkpointer(ckpt, read_only=True).read_meta(step)
  cfg = checkpoint.config_from_meta(meta, overrides)
  everywhere = dp.replicated(dp.eval_mesh())
  return jax.tree.map(lambda _: everywhere, checkpoint.abstract_params(cfg.model))


def tokenizer_for(cfg: Config, ckpt: str, path: Optional[str] = None) -> Tokenizer:
  """`path`, else `tokenizer.model` beside the checkpoint, else the config's data tokenizer."""
  from sqllava_jax.data.pipeline import tokenizer_path  # pylint: disable=g-import-not-at-top
  if path:
    return Tokenizer(path)
  beside = os.path.join(ckpt, "tokenizer.model")
  if os.path.isfile(beside):
    return Tokenizer(beside)
  try:
    return Tokenizer(tokenizer_path(cfg.data))
  except ValueError as e:
    raise ValueError(f"{e}; or pass --tokenizer") from None


def checkpoint_identity(ckpt: str, step: Optional[int] = None) -> str:
  """`/abs/path@step` (the latest step when none is given): what an answers folder records
  as the weights that answered, so that a rerun with newer weights does not resume it."""
  from sqllava_jax.training.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  if step is None:
    step = Checkpointer(ckpt, read_only=True).latest_step()
  return f"{os.path.abspath(ckpt)}@{step}"


def load_from_args(args: argparse.Namespace) -> tuple[SQLLaVA, Config, Tokenizer]:
  model, cfg = load_for_inference(args.ckpt, step=args.step, overrides=args.override,
                                  merge_lora=args.merge_lora)
  return model, cfg, tokenizer_for(cfg, args.ckpt, args.tokenizer)
