"""What the inference commands share: loading a checkpoint for inference and its tokenizer,
the inference mesh, and the command-line flags for them.

`--mesh data=N,fsdp=N,tensor=N` (the `plan` command's syntax; an axis not named keeps
data=-1, fsdp=1, tensor=1, and -1 fills the rest) shards the weights over the mesh by the
checkpoint config's `mesh.rules`, as training does; each process restores only its shards.
Without it the weights are restored whole, and `eval`/`eval-suite` split only the batch
over every device."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh

from sqllava_jax.config import Config, MeshConfig, replace
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
  parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                      help="inference mesh: weights, batch and KV cache shard over it by the "
                           "config's mesh.rules (e.g. data=1,fsdp=8); default: weights whole")
  parser.add_argument("--unstack-layers", action=argparse.BooleanOptionalAction, default=None,
                      help="keep an unstacked copy of the decoder layers for decoding (faster "
                           "on CPU, the layers' memory once more; default: on CPU only)")


def mesh_config(spec: Optional[str], rules=MeshConfig().rules) -> Optional[MeshConfig]:
  """'data=1,fsdp=8' -> MeshConfig(data=1, fsdp=8, tensor=1); None for no spec."""
  if not spec:
    return None
  from sqllava_jax.commands.plan import mesh_overrides  # pylint: disable=g-import-not-at-top
  sizes = {o.split("=")[0].split(".")[1]: int(o.split("=")[1]) for o in mesh_overrides(spec)}
  return MeshConfig(**sizes, rules=tuple(rules))


def inference_mesh(cfg: MeshConfig) -> Mesh:
  from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  return make_mesh(cfg)


def engine_options(args: argparse.Namespace, cfg: Config, default_mesh: Optional[Mesh] = None
                   ) -> dict:
  """Keyword arguments of `Engine` for these flags: the `--mesh` (else `default_mesh`), the
  config's rules, `--unstack-layers`."""
  mesh = default_mesh
  if getattr(args, "mesh", None):
    mesh = inference_mesh(mesh_config(args.mesh, cfg.mesh.rules))
  return {"mesh": mesh, "rules": cfg.mesh.rules,
          "unstack_layers": getattr(args, "unstack_layers", None)}


def load_for_inference(ckpt: str, *, step: Optional[int] = None, overrides: Sequence[str] = (),
                       merge_lora: bool = True, mesh: Optional[str] = None
                       ) -> tuple[SQLLaVA, Config]:
  """The model of a checkpoint with its config, adapters merged unless asked not to.

  mesh: a `--mesh` spec: each parameter is restored onto its shards of that mesh (each
  process reads only its own), and the returned config's `mesh` is that mesh (its rules the
  checkpoint's). Without one the weights are restored whole: on the default device, or with
  several processes replicated over all devices (orbax needs a target layout there)."""
  from sqllava_jax.training.checkpoint import load_model  # pylint: disable=g-import-not-at-top
  shardings = None
  if mesh:
    saved = _saved_config(ckpt, step, overrides)
    mesh_cfg = mesh_config(mesh, saved.mesh.rules)
    shardings = _sharded(saved, inference_mesh(mesh_cfg))
  elif jax.process_count() > 1:
    shardings = _replicated(_saved_config(ckpt, step, overrides))
  model, cfg = load_model(ckpt, step=step, overrides=overrides, shardings=shardings)
  if mesh:
    cfg = replace(cfg, mesh=mesh_cfg)
  if merge_lora:
    lora.merge(model)
  return model, cfg


def _saved_config(ckpt: str, step: Optional[int], overrides: Sequence[str]) -> Config:
  """The checkpoint's config, after checking the step's files (a damaged meta is reported
  as damage, not as a config error)."""
  from sqllava_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  reader = checkpoint.Checkpointer(ckpt, read_only=True)
  step = reader.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt} holds no complete checkpoint (no step directory)")
  reader.check(step)
  meta = reader.read_meta(step)
  return checkpoint.config_from_meta(meta, overrides)


def _sharded(cfg: Config, mesh: Mesh):
  """Each parameter's sharding over `mesh` under the config's rules (training's)."""
  from sqllava_jax.training.state import param_shardings  # pylint: disable=g-import-not-at-top
  return param_shardings(cfg.model, mesh, cfg.mesh.rules)


def _replicated(cfg: Config):
  """A replicated sharding over every device for each parameter of the checkpoint's model."""
  from sqllava_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
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
                                  merge_lora=args.merge_lora, mesh=getattr(args, "mesh", None))
  return model, cfg, tokenizer_for(cfg, args.ckpt, args.tokenizer)
