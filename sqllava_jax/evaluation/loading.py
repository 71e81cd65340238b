"""What the inference commands share: loading a checkpoint for inference and its tokenizer,
and the inference mesh. `ModelOptions` holds what their model flags say (the commands build
it from their arguments: `sqllava_jax.commands.model_flags`).

A mesh spec `data=N,fsdp=N,tensor=N` (the `plan` command's syntax; an axis not named keeps
data=-1, fsdp=1, tensor=1, and -1 fills the rest) shards the weights over the mesh by the
checkpoint config's `mesh.rules`, as training does; each process restores only its shards.
Without it the weights are restored whole, and `eval`/`eval-suite` split only the batch
over every device."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh

from sqllava_jax.config import Config, MeshConfig, parse_mesh_spec, replace
from sqllava_jax.data.pipeline import tokenizer_path
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation import data_parallel as dp
from sqllava_jax.models import lora
from sqllava_jax.models.sqllava import SQLLaVA
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training import checkpoint
from sqllava_jax.training.state import param_shardings


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Which weights answer, and how they are laid out for inference.

  ckpt: a training run's or converted model's directory (its saved config describes the
  model); step: its step (None: the latest); tokenizer: a SentencePiece `tokenizer.model`
  (None: `tokenizer_for`'s search); merge_lora: fold the adapters into the base weights;
  overrides: the user's `key.sub=value` config overrides; mesh: a mesh spec (None: the
  weights whole); unstack_layers: keep an unstacked copy of the decoder layers for decoding
  (None: on CPU only); share_heads: rows that begin alike on one image prefill their common
  head once (`prompt_heads`).
  """
  ckpt: str
  step: Optional[int] = None
  tokenizer: Optional[str] = None
  merge_lora: bool = True
  overrides: tuple[str, ...] = ()
  mesh: Optional[str] = None
  unstack_layers: Optional[bool] = None
  share_heads: bool = True


def mesh_config(spec: Optional[str], rules=MeshConfig().rules) -> Optional[MeshConfig]:
  """'data=1,fsdp=8' -> MeshConfig(data=1, fsdp=8, tensor=1); None for no spec."""
  return _spec_mesh(spec, rules) if spec else None


def _spec_mesh(spec: str, rules) -> MeshConfig:
  return MeshConfig(**parse_mesh_spec(spec), rules=tuple(rules))


def engine_options(options: ModelOptions, cfg: Config, default_mesh: Optional[Mesh] = None
                   ) -> dict:
  """Keyword arguments of `Engine` for these options: their mesh (else `default_mesh`), the
  config's rules, `unstack_layers`, `share_heads`."""
  mesh = default_mesh
  if options.mesh:
    mesh = make_mesh(_spec_mesh(options.mesh, cfg.mesh.rules))
  return {"mesh": mesh, "rules": cfg.mesh.rules, "unstack_layers": options.unstack_layers,
          "share_heads": options.share_heads}


def load_for_inference(ckpt: str, *, step: Optional[int] = None, overrides: Sequence[str] = (),
                       merge_lora: bool = True, mesh: Optional[str] = None
                       ) -> tuple[SQLLaVA, Config]:
  """The model of a checkpoint with its config, adapters merged unless asked not to.

  mesh: a mesh spec: each parameter is restored onto its shards of that mesh (each
  process reads only its own), and the returned config's `mesh` is that mesh (its rules the
  checkpoint's). Without one the weights are restored whole: on the default device, or with
  several processes replicated over all devices (orbax needs a target layout there)."""
  shardings = None
  if mesh:
    saved = _saved_config(ckpt, step, overrides)
    mesh_cfg = _spec_mesh(mesh, saved.mesh.rules)
    shardings = _sharded(saved, make_mesh(mesh_cfg))
  elif jax.process_count() > 1:
    shardings = _replicated(_saved_config(ckpt, step, overrides))
  model, cfg = checkpoint.load_model(ckpt, step=step, overrides=overrides, shardings=shardings)
  if mesh:
    cfg = replace(cfg, mesh=mesh_cfg)
  if merge_lora:
    lora.merge(model)
  return model, cfg


def _saved_config(ckpt: str, step: Optional[int], overrides: Sequence[str]) -> Config:
  """The checkpoint's config, after checking the step's files (a damaged meta is reported
  as damage, not as a config error)."""
  reader = checkpoint.Checkpointer(ckpt, read_only=True)
  step = reader.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt} holds no complete checkpoint (no step directory)")
  reader.check(step)
  meta = reader.read_meta(step)
  return checkpoint.config_from_meta(meta, overrides)


def _sharded(cfg: Config, mesh: Mesh):
  """Each parameter's sharding over `mesh` under the config's rules (training's)."""
  return param_shardings(cfg.model, mesh, cfg.mesh.rules)


def _replicated(cfg: Config):
  """A replicated sharding over every device for each parameter of the checkpoint's model."""
  everywhere = dp.replicated(dp.eval_mesh())
  return jax.tree.map(lambda _: everywhere, checkpoint.abstract_params(cfg.model))


def tokenizer_for(cfg: Config, ckpt: str, path: Optional[str] = None) -> Tokenizer:
  """`path`, else `tokenizer.model` beside the checkpoint, else the config's data tokenizer."""
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
  if step is None:
    step = checkpoint.Checkpointer(ckpt, read_only=True).latest_step()
  return f"{os.path.abspath(ckpt)}@{step}"


def load(options: ModelOptions) -> tuple[SQLLaVA, Config, Tokenizer]:
  """The model, its config and its tokenizer, as `options` say."""
  model, cfg = load_for_inference(options.ckpt, step=options.step, overrides=options.overrides,
                                  merge_lora=options.merge_lora, mesh=options.mesh)
  return model, cfg, tokenizer_for(cfg, options.ckpt, options.tokenizer)
