"""The `llava` export: transformers' `LlavaForConditionalGeneration` + `AutoProcessor`.

Weights use the layout of the hub's llava-hf checkpoints (`language_model.model.*`,
`language_model.lm_head.weight`, `multi_modal_projector.linear_{1,2}.*`,
`vision_tower.vision_model.*`), which transformers 4 loads as is and transformers 5 maps
onto its own module tree (its `save_pretrained` writes the same top-level names).

transformers looks `<image>` up in the embedding table before replacing it with image
features, so the image token needs an id inside the vocabulary: it gets id V (the
SentencePiece size), the embedding and `lm_head` grow by one zero row, and the generation
config suppresses it, so greedy decoding is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import sentencepiece as spm

from sqllava_jax.config import Config
from sqllava_jax.convert import reference, tokenizer_files
from sqllava_jax.convert.hf_export import Job, generation_config, write_json, write_weights
from sqllava_jax.convert.hf_io import CheckpointError
from sqllava_jax.models import projector, vision
from sqllava_jax.models.key_map import KeySpec, prefixed

EMBED, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def _sentencepiece_size(path: str) -> int:
  return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def check(cfg: Config, tokenizer: Optional[str]) -> None:
  """Refuses models transformers' LLaVA cannot represent, before anything is written."""
  m = cfg.model
  if m.projector.type != "mlp2x_gelu":
    raise CheckpointError(f"the llava format holds LLaVA-1.5's mlp2x_gelu projector; this "
                          f"checkpoint's projector is {m.projector.type!r}: export it as sqllava "
                          "(the reference layout), or as llama + clip")
  if tokenizer is None:
    raise CheckpointError("the llava format ships a processor, which needs the tokenizer: pass "
                          "--tokenizer with the SentencePiece tokenizer.model")
  size = _sentencepiece_size(tokenizer)
  if size != m.llm.vocab_size:
    raise CheckpointError(f"tokenizer {tokenizer} has {size} pieces but the LLM's vocab_size is "
                          f"{m.llm.vocab_size}; the <image> token must get id {m.llm.vocab_size}: "
                          "pass the tokenizer the model was trained with")


def hf_config(cfg: Config, image_token_id: int, dtype: str) -> dict:
  m = cfg.model
  text = {**m.llm.to_hf_config(), "vocab_size": m.llm.vocab_size + 1}
  text.pop("architectures")
  vis = m.vision.to_hf_config()
  vis.pop("architectures")
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "image_token_index": image_token_id, "image_seq_length": m.num_image_tokens,
          "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
          "vision_feature_select_strategy": "default" if m.vision.select_feature == "patch"
                                            else "full",
          "vision_feature_layer": m.vision.select_layer,
          "tie_word_embeddings": m.llm.tie_word_embeddings, "torch_dtype": dtype,
          "text_config": text, "vision_config": vis}


def key_map(cfg: Config) -> list[KeySpec]:
  """Our paths <-> the hub layout's names."""
  m = cfg.model
  llm = [dataclasses.replace(s, hf="language_model." + s.hf)
         for s in reference.llm_key_map(m.llm)]
  return (llm + prefixed(vision.hf_key_map(m.vision), ours_prefix="vision/",
                         hf_prefix="vision_tower.")
          + prefixed(projector.llava_key_map(m.projector), ours_prefix="projector/",
                     hf_prefix="multi_modal_projector."))


def add_image_row(name: str, value: np.ndarray) -> np.ndarray:
  """[V, D] -> [V + 1, D] for the embedding and the output head: a zero row for `<image>`."""
  if name in (EMBED, LM_HEAD):
    return np.concatenate([value, np.zeros((1,) + value.shape[1:], value.dtype)])
  return value


def export(directory: str, job: Job) -> None:
  cfg = job.cfg
  path = tokenizer_files.find_tokenizer(job.options.tokenizer, cfg, job.ckpt)
  assert path is not None  # `check` refused a job without a tokenizer
  image_id = tokenizer_files.write_llava_processor(directory, path, cfg)
  if image_id != cfg.model.llm.vocab_size:  # `check` guarantees it; a tokenizer quirk would not
    raise CheckpointError(f"the tokenizer gave <image> id {image_id}; expected "
                          f"{cfg.model.llm.vocab_size}")
  write_json(directory, "config.json", hf_config(cfg, image_id, job.dtype_name))
  write_json(directory, "generation_config.json",
             generation_config(job, suppress_tokens=[image_id]))
  write_weights(directory, job, key_map(cfg), desc="llava", edit=add_image_row)
