"""The stage-0 base: the demo's stand-in for pretrained CLIP and Vicuna, shipped with the package.

A user of SQ-LLaVA starts from a pretrained vision tower and LLM; the demo's are tiny and
trained from nothing by its stage 0, which is most of the demo's time. So the package ships
the stage-0 weights that `sqllava-jax demo --from-scratch` made (the default demo runs
stages 1 and 2 on top of them), in a folder of three files:

    params.safetensors   every parameter of the stage-0 model, float32, our paths
                         (`llm/layers/...`); no optimizer state
    tokenizer.model      the SentencePiece model the base was trained with (its token ids)
    recipe.json          how it was made: the full stage-0 config (run paths blanked), the
                         synthetic set's format version, the sha256 of both files, the
                         stage-0 loss curve and time, and the library versions

Every `--from-scratch` run writes such a folder as `<out>/base`; copying its files into
`sqllava_jax/demo/base/` regenerates the shipped one. Before the demo trusts a base it checks
the files against the recipe's checksums and the recipe against the run's own stage-0 config
(`check`): a base made for another model, another synthetic set or another set format is
refused with the fix, never trained on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from sqllava_jax import configlib
from sqllava_jax.config import Config
from sqllava_jax.demo import synthetic
from sqllava_jax.models.sqllava import abstract_model
from sqllava_jax.training.checkpoint import load_model, save_model
from sqllava_jax.tree_paths import flat, unflat

RECIPE, PARAMS, TOKENIZER = "recipe.json", "params.safetensors", "tokenizer.model"
BASE_FORMAT = 1
# Fields that give the base's weights their meaning: the architecture, and the synthetic set
# (its scenes decide which held-out images the base never saw; its tokenizer the token ids).
MODEL_KEYS = ("vision", "llm", "projector")
SYNTHETIC_KEYS = ("seed", "num_train", "num_eval", "image_size", "vocab_size")
# Where a stage config points at one run's folders: not part of the recipe.
RUN_PATHS = ("output_dir", "data.synthetic.dir", "data.tokenizer", "train.init_from")
FIX = ("run `sqllava-jax demo --from-scratch` (it trains stage 0 itself), or regenerate the "
       "base: a `--from-scratch` run writes one in <out>/base, whose files go into "
       "sqllava_jax/demo/base/")


class BaseMismatch(ValueError):
  """A stage-0 base that does not fit this demo (another model, set or set format) or whose
  files disagree with its recipe."""


def shipped_dir() -> str:
  """The packaged base folder (`sqllava_jax/demo/base/`) as a path on disk."""
  resource = importlib.resources.files(__package__).joinpath("base")
  if not isinstance(resource, os.PathLike):
    raise FileNotFoundError(f"the shipped stage-0 base is not a folder on disk ({resource}); "
                            "install sqllava-jax from a directory or a wheel, not a zip")
  return os.fspath(resource)


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def recipe_config(cfg: Config) -> dict:
  """`cfg` as plain data with the run's paths blanked: what the recipe records."""
  data = configlib.to_dict(cfg)
  for dotted in RUN_PATHS:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
      node = node[key]
    node[leaf] = ""
  return data


def _leaves(prefix: str, value: Any) -> dict:
  if isinstance(value, Mapping):
    return {k: v for key, sub in value.items() for k, v in _leaves(f"{prefix}.{key}", sub).items()}
  return {prefix: value}


def compatibility(cfg_data: Mapping, format_version: int) -> dict:
  """The recipe fields a base must share with the run (`MODEL_KEYS`, `SYNTHETIC_KEYS`), by
  dotted name (`model.llm.num_layers`)."""
  synthetic = cfg_data["data"]["synthetic"]
  return {**{k: v for key in MODEL_KEYS for k, v in
             _leaves(f"model.{key}", cfg_data["model"][key]).items()},
          **{f"data.synthetic.{k}": synthetic[k] for k in SYNTHETIC_KEYS},
          "synthetic format version": format_version}


def read_recipe(base_dir: str) -> dict:
  path = os.path.join(base_dir, RECIPE)
  if not os.path.isfile(path):
    raise BaseMismatch(f"{base_dir} holds no stage-0 base ({RECIPE} is missing); {FIX}")
  with open(path) as f:
    try:
      recipe = json.load(f)
    except json.JSONDecodeError as e:
      raise BaseMismatch(f"{path} is not valid JSON ({e}); {FIX}") from None
  if recipe.get("base_format") != BASE_FORMAT:
    raise BaseMismatch(f"{path} has base_format {recipe.get('base_format')!r}, this version "
                       f"reads {BASE_FORMAT}; {FIX}")
  return recipe


def verify_files(base_dir: str, recipe: Mapping) -> None:
  """Each file's sha256 against the recipe's."""
  for name in (PARAMS, TOKENIZER):
    path = os.path.join(base_dir, name)
    if not os.path.isfile(path):
      raise BaseMismatch(f"the stage-0 base in {base_dir} lacks {name}; {FIX}")
    want, got = recipe["files"][name]["sha256"], sha256(path)
    if got != want:
      raise BaseMismatch(f"{path} has sha256 {got}, its recipe {os.path.join(base_dir, RECIPE)} "
                         f"says {want}: the file is damaged or was changed; reinstall "
                         f"sqllava-jax, or {FIX}")


def check(base_dir: str, cfg: Config) -> dict:
  """The recipe of the base in `base_dir` once its files and its fields that give the weights
  their meaning agree with `cfg`, the run's stage-0 config; else `BaseMismatch` naming each
  difference and the fix."""
  recipe = read_recipe(base_dir)
  verify_files(base_dir, recipe)
  theirs = compatibility(recipe["stage0_config"], recipe["synthetic_format_version"])
  ours = compatibility(configlib.to_dict(cfg), synthetic.FORMAT_VERSION)
  diffs = [f"{k}: base {theirs.get(k, 'unset')}, this run {v}" for k, v in ours.items()
           if theirs.get(k, "unset") != v]
  if diffs:
    raise BaseMismatch(f"the stage-0 base in {base_dir} was made for another demo "
                       f"({'; '.join(diffs)}); {FIX}")
  return recipe


def base_config(recipe: Mapping, paths: Sequence[str]) -> Config:
  """The stage-0 config the base was trained with, placed in this run by `paths`
  (`key=value` overrides of the run paths)."""
  data = configlib.apply_overrides(recipe["stage0_config"], paths, Config)
  return configlib.from_dict(Config, data)


def _param_arrays(cfg: Config, params: Mapping[str, np.ndarray], source: str) -> dict:
  """`params` (flat, by path) checked against the model `cfg` builds: every tensor there,
  none extra, each of its shape and dtype."""
  want = flat(nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param)))
  missing, extra = sorted(set(want) - set(params)), sorted(set(params) - set(want))
  if missing or extra:
    raise BaseMismatch(f"{source} does not fit the model of its recipe: missing "
                       f"{missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}; {FIX}")
  for name, spec in want.items():
    got = params[name]
    if tuple(got.shape) != tuple(spec.shape) or got.dtype != spec.dtype:
      raise BaseMismatch(f"{source}: tensor {name} is {got.dtype}{list(got.shape)}, the model "
                         f"wants {spec.dtype}{list(spec.shape)}; {FIX}")
  return {k: jax.numpy.asarray(v) for k, v in params.items()}


def install(base_dir: str, recipe: Mapping, cfg: Config, ckpt_dir: str) -> str:
  """Writes the base's weights as a model checkpoint in `ckpt_dir` (what stage 1's
  `train.init_from` reads) and its tokenizer to `cfg.data.tokenizer`; returns `ckpt_dir`.
  `cfg` is `base_config(recipe, ...)`."""
  source = os.path.join(base_dir, PARAMS)
  arrays = _param_arrays(cfg, load_file(source), source)
  graphdef, state = nnx.split(abstract_model(cfg.model))
  nnx.replace_by_pure_dict(state, unflat(arrays))
  save_model(ckpt_dir, nnx.merge(graphdef, state), cfg,
             extra_meta={"stage0_base": {"dir": base_dir, "files": recipe["files"]}})
  os.makedirs(os.path.dirname(os.path.abspath(cfg.data.tokenizer)), exist_ok=True)
  shutil.copyfile(os.path.join(base_dir, TOKENIZER), cfg.data.tokenizer)
  return ckpt_dir


def _versions() -> dict:
  return {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax", "sentencepiece",
                                                     "numpy")}


def thin_curve(points: Sequence[tuple[int, float]], most: int = 200) -> list[list]:
  """At most about `most` evenly spaced (step, loss) points, the last one kept: the shape of
  the curve for the report, not every step."""
  every = max(1, -(-len(points) // most))
  kept = list(points[::every]) + ([points[-1]] if (len(points) - 1) % every else [])
  return [[int(s), round(float(v), 5)] for s, v in kept]


def write(ckpt_dir: str, tokenizer: str, dest: str, *, made_by: str, stage: Mapping,
          loss: Sequence[tuple[int, float]]) -> str:
  """Writes the base folder `dest` from the stage-0 checkpoint `ckpt_dir`, the tokenizer it
  trained with, the stage's summary (`steps`, `final_loss`, `wall_s`, ...) and its loss
  record; all or nothing (built beside `dest`, renamed into place). Returns `dest`."""
  model, cfg = load_model(ckpt_dir)
  params = {k: np.asarray(v) for k, v in
            sorted(flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items())}
  parent = os.path.dirname(os.path.abspath(dest))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".base-", dir=parent)
  try:
    save_file(params, os.path.join(tmp, PARAMS))
    shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER))
    files = {n: {"sha256": sha256(os.path.join(tmp, n)),
                 "bytes": os.path.getsize(os.path.join(tmp, n))} for n in (PARAMS, TOKENIZER)}
    recipe = {"base_format": BASE_FORMAT, "made_by": made_by,
              "synthetic_format_version": synthetic.FORMAT_VERSION,
              "num_parameters": int(sum(v.size for v in params.values())),
              "files": files, "stage0": dict(stage), "loss": thin_curve(loss),
              "versions": _versions(), "stage0_config": recipe_config(cfg)}
    with open(os.path.join(tmp, RECIPE), "w") as f:
      json.dump(recipe, f, indent=1)
      f.write("\n")
    for name in (PARAMS, TOKENIZER, RECIPE):  # as a copied folder would be, not mkdtemp's 0600
      os.chmod(os.path.join(tmp, name), 0o644)
    os.chmod(tmp, 0o755)
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.rename(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def stage_summary(recipe: Mapping, base_dir: str) -> dict[str, Any]:
  """What the report says about a stage 0 taken from a base (its recorded training)."""
  return {**recipe["stage0"], "base_dir": base_dir, "made_by": recipe["made_by"],
          "num_parameters": recipe["num_parameters"], "files": recipe["files"],
          "loss_curve": [tuple(p) for p in recipe["loss"]]}
