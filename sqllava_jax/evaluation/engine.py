"""Text in, text out: a `Generator` with its tokenizer and the model's image settings.

    engine = Engine(model, tokenizer)
    [c] = engine.complete([prompt_text], [pixels], max_new_tokens=64)
    c.text, c.token_ids
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.evaluation.generate import Generator
from sqllava_jax.evaluation.prompts import IMAGE_TOKEN
from sqllava_jax.evaluation.prompts import encode as encode_prompt
from sqllava_jax.evaluation.sampling import GREEDY, Sampling
from sqllava_jax.models.sqllava import SQLLaVA


@dataclasses.dataclass(frozen=True)
class Completion:
  """text: the decoded new tokens (specials dropped, stripped); token_ids: the new tokens,
  `</s>` included when the row stopped there."""
  text: str
  token_ids: list[int]


class Engine:
  """Prompt texts and images in, completions out, for a composite model and its tokenizer;
  `mesh` and `generator_kwargs` go to the `Generator`."""

  def __init__(self, model: SQLLaVA, tokenizer: Tokenizer, *, mesh=None, **generator_kwargs):
    if model.cfg.llm.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                       f"{model.cfg.llm.vocab_size} embeddings; use the model's tokenizer.model")
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.generator = Generator(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               mesh=mesh, **generator_kwargs)

  @property
  def image_size(self) -> int:
    return self.cfg.vision.image_size

  def encode(self, prompt: str) -> list[int]:
    return encode_prompt(self.tokenizer, prompt, num_image_tokens=self.cfg.num_image_tokens,
                         image_token_id=self.cfg.image_token_id)

  def stack_images(self, pixels: Sequence[Optional[np.ndarray]],
                   with_pixels: bool = False) -> Optional[np.ndarray]:
    """One float32[H, W, 3] or None per row -> float32[B, H, W, 3] (zeros for None), or
    None when no row has an image (unless `with_pixels`: one program for mixed batches)."""
    if all(p is None for p in pixels) and not with_pixels:
      return None
    s = self.image_size
    out = np.zeros((len(pixels), s, s, 3), np.float32)
    for i, p in enumerate(pixels):
      if p is not None:
        out[i] = p
    return out

  def complete_ids(self, ids: Sequence[Sequence[int]], pixels: Sequence[Optional[np.ndarray]],
                   *, max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
                   prompt_length: Optional[int] = None,
                   with_pixels: bool = False) -> list[Completion]:
    images = self.stack_images(pixels, with_pixels)
    out = self.generator.generate(ids, images, max_new_tokens=max_new_tokens,
                                  sampling=sampling, seed=seed, prompt_length=prompt_length)
    rows = [out.new_tokens(i) for i in range(len(ids))]
    return [Completion(self.tokenizer.decode(r).strip(), r) for r in rows]

  def complete(self, prompts: Sequence[str], pixels: Sequence[Optional[np.ndarray]], **kwargs
               ) -> list[Completion]:
    """prompts: B prompt texts (with `<image>` where the row has an image); pixels: B images
    (float32[H, W, 3], CLIP-normalised) or None. kwargs: as `complete_ids`."""
    if len(prompts) != len(pixels):
      raise ValueError(f"{len(prompts)} prompts but {len(pixels)} images; give one (or None) each")
    for i, (text, image) in enumerate(zip(prompts, pixels)):
      if (IMAGE_TOKEN in text) != (image is not None):
        has = "holds" if IMAGE_TOKEN in text else "lacks"
        raise ValueError(f"prompt {i} {has} {IMAGE_TOKEN} but "
                         f"{'no' if image is None else 'an'} image was given")
    return self.complete_ids([self.encode(p) for p in prompts], pixels, **kwargs)

