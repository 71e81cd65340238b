"""Tokenizer, image-processor and processor files for exported directories.

The model was trained on ids from our `data.tokenizer.Tokenizer`: the LLaMA SentencePiece
model split at special tokens, each piece encoded with its own dummy-prefix `▁` (the slow,
legacy `LlamaTokenizer` the reference trained with). Exports carry

- `tokenizer.model`, for slow `LlamaTokenizer` and the reference code;
- `tokenizer.json` whose normaliser ("prepend ▁, spaces to ▁", applied to each piece between
  special tokens, no pre-tokenizer) gives the same ids in fast tokenizers. transformers 5's
  own `LlamaTokenizer` rebuilds a Metaspace pre-tokenizer that drops one `▁` after `</s>` and
  `<image>`, so the fast exports name the generic `PreTrainedTokenizerFast` class, which
  loads `tokenizer.json` as written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

from sqllava_jax.config import Config, VisionConfig
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.data.images import CLIP_MEAN, CLIP_STD

IMAGE_TOKEN = "<image>"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def find_tokenizer(explicit: Optional[str], cfg: Config, ckpt: str) -> Optional[str]:
  """The `tokenizer.model` to ship, found as `generate` and `ask` find theirs: `explicit` (a
  file or a directory holding one), else `tokenizer.model` beside the checkpoint, else the
  config's data tokenizer; None when there is none."""
  from sqllava_jax.data.pipeline import tokenizer_path  # pulls in grain; only this needs it
  if explicit:
    path = os.path.join(explicit, "tokenizer.model") if os.path.isdir(explicit) else explicit
    if not os.path.isfile(path):
      raise CheckpointError(f"--tokenizer {path} does not exist; pass the SentencePiece "
                            "tokenizer.model the model was trained with")
    return path
  beside = os.path.join(ckpt, "tokenizer.model")
  if os.path.isfile(beside):
    return beside
  try:
    path = tokenizer_path(cfg.data)
  except ValueError:  # the config names none
    return None
  return path if os.path.isfile(path) else None


def _fast_tokenizer(model_path: str, extra_special: Sequence[str]):
  """A transformers fast tokenizer converted from `model_path`, re-wired to our tokenisation."""
  import transformers  # Heavy, and only the tokenizer-shipping exports need it.
  from tokenizers import normalizers
  cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(model_path, os.path.join(tmp, "tokenizer.model"))
    tok = cls.from_pretrained(tmp, legacy=True, add_bos_token=True, add_eos_token=False)
  backend = tok.backend_tokenizer
  backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                             normalizers.Replace(" ", "▁")])
  backend.pre_tokenizer = None
  tok.pad_token = SPECIALS["pad_token"]
  if extra_special:
    tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
  return tok


def _patch_tokenizer_config(directory: str, model_max_length: int) -> None:
  path = os.path.join(directory, "tokenizer_config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
             add_bos_token=True, add_eos_token=False, **SPECIALS)
  with open(path, "w") as f:
    json.dump(cfg, f, indent=2)


def write_fast_tokenizer(directory: str, model_path: str, *, model_max_length: int,
                         extra_special: Sequence[str] = ()):
  """tokenizer.json + tokenizer_config.json + tokenizer.model; returns the tokenizer."""
  tok = _fast_tokenizer(model_path, extra_special)
  tok.save_pretrained(directory)
  _patch_tokenizer_config(directory, model_max_length)
  shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
  return tok


def write_slow_tokenizer(directory: str, model_path: str, *, model_max_length: int) -> None:
  """The files the reference loads with `AutoTokenizer.from_pretrained(use_fast=False)`."""
  shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
  cfg = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
         "add_eos_token": False, "model_max_length": model_max_length,
         "clean_up_tokenization_spaces": False, **SPECIALS}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(SPECIALS, f, indent=2)


def image_processor_config(vision: VisionConfig, *, pad: bool) -> dict:
  """CLIP preprocessing at the tower's resolution (DESIGN.md section 3); `pad` adds LLaVA's
  pad-to-square with the mean colour (`LlavaImageProcessor(do_pad=True)`)."""
  size = vision.image_size
  cfg = {"image_processor_type": "LlavaImageProcessor" if pad else "CLIPImageProcessor",
         "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
         "do_center_crop": True, "crop_size": {"height": size, "width": size},
         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}
  if pad:
    cfg["do_pad"] = True
  return cfg


def write_image_processor(directory: str, vision: VisionConfig, *, pad: bool = False) -> None:
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump(image_processor_config(vision, pad=pad), f, indent=2)


def write_llava_processor(directory: str, model_path: str, cfg: Config) -> int:
  """A directory `AutoProcessor` loads: image processor, tokenizer with `<image>`, and the
  processor settings that expand one `<image>` into the projector's token count. Returns
  the id of `<image>`."""
  import transformers  # Heavy, and only the llava export needs it.
  vision = cfg.model.vision
  pad = cfg.data.image_aspect_ratio == "pad"
  write_image_processor(directory, vision, pad=pad)
  image_processor = transformers.AutoImageProcessor.from_pretrained(directory)
  tok = _fast_tokenizer(model_path, [IMAGE_TOKEN])
  # The processor counts (image / patch)^2 + additional tokens, minus the class token for
  # the "default" strategy: 1 additional + default = patch tokens only, as select_feature.
  strategy = "default" if vision.select_feature == "patch" else "full"
  processor = transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tok, patch_size=vision.patch_size,
      vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
      image_token=IMAGE_TOKEN)
  processor.save_pretrained(directory)
  _patch_tokenizer_config(directory, cfg.model.llm.max_position_embeddings)
  shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
  return tok.convert_tokens_to_ids(IMAGE_TOKEN)
