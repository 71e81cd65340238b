"""Batched, jitted generation over the KV cache: prefill, then a `lax.while_loop` of decode steps.

    gen = Generator(model, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = gen.generate([ids_a, ids_b], pixel_values, max_new_tokens=64, sampling=GREEDY, seed=0)
    out.new_tokens(0)  # the ids generated for prompt 0, up to and including `</s>`

Prompts of different lengths are left-padded to a bucket length (`bucket_length`: steps of
16 up to 256, then at most an eighth more than the prompt), so one compiled program serves
every request of the same (batch, bucket, max_new_tokens, greedy-or-sampling) shape;
temperature, top-k and top-p are traced values. A row stops at `eos_id` (later slots hold
`pad_id`); the loop stops when every row has stopped or after `max_new_tokens`. Prefill and
the loop run in one program, so a request is one device call.

`model` is a composite `SQLLaVA` (image placeholders in the ids are filled with image
features from `pixel_values`) or a bare `Llama` (text only). The device side (shardings and
the jitted program) is `inference_program.InferenceProgram`; this module is the host side.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from sqllava_jax.evaluation import data_parallel, prompt_heads
from sqllava_jax.evaluation.inference_program import InferenceProgram, SharedHeads
from sqllava_jax.evaluation.sampling import GREEDY, Sampling
from sqllava_jax.models.sqllava import SQLLaVA, check_image_placeholders

__all__ = ["Generated", "Generator", "bucket_length", "left_pad", "pad_rows"]

# The tails after a shared head are often a single token (`ask` samples n questions from one
# prompt): tails of up to 4 tokens pad to 4, not to the prompts' shortest bucket (longer
# tails to 16 and up, as prompts).
TAIL_MIN_BUCKET = 4


def bucket_length(n: int, *, min_length: int = 16, per_octave: int = 8,
                  multiple: int = 16) -> int:
  """The padded prompt length for a prompt of `n` tokens: `min_length`, or else the next
  multiple of `max(multiple, 2**k / per_octave)`, where 2**k is the largest power of two
  below `n`. Each octave (2**k, 2**(k+1)] then holds at most `per_octave` buckets, each one
  a compiled program, and padding adds at most 1/per_octave of the prompt's length (once
  prompts are longer than `multiple * per_octave`), a waste the prefill's matmuls pay in
  full (for 576 image tokens and a question: 640, 704 or 768)."""
  if n <= 0:
    raise ValueError(f"a prompt needs at least one token (got {n}); add BOS")
  if n <= min_length:
    return min_length
  step = max(multiple, (1 << ((n - 1).bit_length() - 1)) // per_octave)
  return -(-n // step) * step


def left_pad(prompts: Sequence[Sequence[int]], length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids int32[B, length], mask bool[B, length]), each right-aligned."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {i} has {len(p)} tokens; expected 1..{length}")
    ids[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return ids, mask


@dataclasses.dataclass(frozen=True)
class Generated:
  """tokens: int32[B, max_new_tokens], pad after a row's `</s>`; num_new: int32[B], the
  tokens each row generated (its `</s>` included)."""
  tokens: np.ndarray
  num_new: np.ndarray

  def new_tokens(self, row: int) -> list[int]:
    return [int(t) for t in self.tokens[row, :self.num_new[row]]]


class Generator:
  """Generates from a snapshot of `model`'s weights (taken at construction).

  With `mesh`, the weights are sharded over it by `rules` (training's logical axis rules;
  default: `MeshConfig`'s) and every batch is split along its leading axis over the mesh
  axes of logical `batch` (`data` and `fsdp`); each process then passes and gets back only
  its own rows. Without one, everything runs on the default device.

  `unstack_layers`: keep an unstacked copy of the decoder layers for decoding (None: on CPU
  devices only, where it makes decoding about twice as fast for the layers' memory once
  more; see `inference_program`).

  `share_heads`: rows that begin alike on the same image (`prompt_heads`) prefill their
  common head, vision tower included, once per batch, and each row only the rest.
  """

  def __init__(self, model: nnx.Module, *, eos_id: int, pad_id: int,
               mesh: Optional[jax.sharding.Mesh] = None, rules=None, min_bucket: int = 16,
               buckets_per_octave: int = 8, unstack_layers: Optional[bool] = None,
               share_heads: bool = True):
    self.program = InferenceProgram(model, mesh, rules, unstack_layers=unstack_layers)
    self.state, self.layer_states = self.program.place(model)
    self.eos_id, self.pad_id = eos_id, pad_id
    self.cfg = model.cfg if isinstance(model, SQLLaVA) else None
    self.min_bucket, self.buckets_per_octave = min_bucket, buckets_per_octave
    self.mesh = mesh
    # Each row names its head by global row index: only where a process's rows are one
    # block (every process must agree, as they run the same programs).
    scattered = not self.program.rows_contiguous()
    self.share_heads = share_heads and not self._agree(int(scattered))

  def _check_ids(self, prompts, pixel_values) -> Optional[np.ndarray]:
    if self.cfg is None:
      if pixel_values is not None or any(min(p) < 0 for p in prompts if p):
        raise ValueError("this model is a bare LLM: pass token ids only, no images")
      return None
    counts = [sum(1 for t in p if t == self.cfg.image_token_id) for p in prompts]
    has_image = np.asarray(counts) > 0
    if has_image.any() and pixel_values is None:
      raise ValueError("the prompts hold image placeholders; pass pixel_values [B, H, W, 3]")
    if pixel_values is not None and len(pixel_values) != len(prompts):
      raise ValueError(f"{len(pixel_values)} images for {len(prompts)} prompts; give one per "
                       "prompt (zeros for text-only prompts)")
    ids, _ = left_pad(prompts, max(len(p) for p in prompts), self.pad_id)
    check_image_placeholders(ids, has_image, self.cfg.num_image_tokens, self.cfg.image_token_id)
    return None if pixel_values is None else np.asarray(pixel_values, np.float32)

  def generate(self, prompts: Sequence[Sequence[int]], pixel_values: Optional[np.ndarray] = None,
               *, max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
               prompt_length: Optional[int] = None) -> Generated:
    """prompts: B lists of ids (BOS included; `image_token_id` at image positions);
    pixel_values: float32[B, H, W, 3] (CLIP-normalised) or None. `prompt_length` pads to a
    fixed length instead of the bucket (one shape for a whole eval run)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    pixels = self._check_ids(prompts, pixel_values)
    plan = None
    if self.share_heads and prompt_length is None:
      image_token = self.cfg.image_token_id if self.cfg is not None else None
      plan = prompt_heads.plan_heads(prompts, pixels, image_token_id=image_token)
      if plan is not None and not self._pays(plan, prompts):
        plan = None
      if self._agree(int(plan is None)):
        plan = None  # every process must run the same program
    if plan is None:
      length = (self._agree(prompt_length) if prompt_length
                else self._bucket(max(len(p) for p in prompts)))
      ids, mask = left_pad(prompts, length, self.pad_id)
      inputs, heads = (ids, pixels, mask), None
    else:
      inputs, heads = self._with_heads(plan, pixels)
    ids, pixels, mask = self.program.global_batch(
        pad_rows(inputs, self.program.rows_multiple()))
    tokens, num_new = self.program.generate(
        self.state, self.layer_states, ids, pixels, mask, jax.random.key(seed), sampling.arrays(),
        heads, max_new_tokens=max_new_tokens, greedy=sampling.greedy, eos_id=self.eos_id,
        pad_id=self.pad_id)
    if self.mesh is not None:
      tokens, num_new = data_parallel.local_rows(tokens), data_parallel.local_rows(num_new)
    rows = len(prompts)
    return Generated(np.asarray(tokens)[:rows], np.asarray(num_new)[:rows])

  def _agree(self, value: int) -> int:
    """The largest `value` of all processes: every process must run the same program."""
    return value if self.mesh is None else data_parallel.agree_max(value)

  def _local_bucket(self, n: int, min_length: Optional[int] = None) -> int:
    return bucket_length(n, min_length=min_length or self.min_bucket,
                         per_octave=self.buckets_per_octave)

  def _bucket(self, n: int, min_length: Optional[int] = None) -> int:
    """`bucket_length` of `n`, the same on every process."""
    return self._agree(self._local_bucket(n, min_length))

  def _rows(self, count: int) -> int:
    """The rows a batch of `count` rows runs with on this process (the mesh's multiple)."""
    multiple = self.program.rows_multiple()
    return -(-count // multiple) * multiple

  def _head_rows(self, count: int) -> int:
    """The rows that `count` distinct heads run with: a power of two (few program shapes),
    then the mesh's multiple."""
    return self._rows(1 << (count - 1).bit_length())

  def _pays(self, plan: prompt_heads.PromptHeads, prompts: Sequence[Sequence[int]]) -> bool:
    """Whether the padded shapes of the shared prefill (the heads' rows and bucket, every
    row's tail bucket) hold under 3/4 of the token slots of the plain prefill (all rows at
    the longest prompt's bucket): padding heads to a power of two and to the mesh's batch
    slices can leave nothing saved (two heads on 8 slices run 8 head rows)."""
    bucket = self._local_bucket  # this process's view; the choice is agreed after
    rows = self._rows(len(prompts))
    plain = rows * bucket(max(map(len, prompts)))
    shared = (self._head_rows(len(plan.heads)) * bucket(max(map(len, plan.heads))) +
              rows * bucket(max(map(len, plan.tails)), TAIL_MIN_BUCKET))
    return shared <= (1 - prompt_heads.MIN_SAVED_SHARE) * plain

  def _with_heads(self, plan: prompt_heads.PromptHeads, pixels: Optional[np.ndarray]):
    """((tail ids, None, tail mask), SharedHeads) for `plan`: the heads padded to
    `_head_rows`, as many on every process."""
    multiple = self.program.rows_multiple()
    rows = self._agree(self._head_rows(len(plan.heads)))
    head_ids, head_mask = left_pad(plan.heads, self._bucket(max(map(len, plan.heads))),
                                   self.pad_id)
    head_pixels = None if pixels is None else pixels[plan.source]
    head_ids, head_pixels, head_mask = self.program.global_batch(
        pad_rows((head_ids, head_pixels, head_mask), rows))
    # A row's head is its index among this process's heads, then among all (global) heads.
    first = self.program.first_global_row(rows)
    tail_ids, tail_mask = left_pad(plan.tails, self._bucket(max(map(len, plan.tails)),
                                                            TAIL_MIN_BUCKET), self.pad_id)
    head_of = np.asarray(plan.head_of, np.int32) + first
    assert head_of.max() < rows * jax.process_count()  # an index past the heads reads NaN
    head_of, = self.program.global_batch(pad_rows((head_of,), multiple))
    heads = SharedHeads(head_ids, head_pixels, head_mask, head_of)
    return (tail_ids, None, tail_mask), heads


def pad_rows(arrays: Sequence[Optional[np.ndarray]], multiple: int) -> tuple:
  """Each array (None passes through) with its last row repeated up to a multiple of
  `multiple` rows: a batch the mesh's batch slices cannot split evenly (one prompt on an
  fsdp=8 mesh) runs padded, and the padding rows' answers are dropped."""
  out = []
  for a in arrays:
    extra = -len(a) % multiple if a is not None else 0
    out.append(a if a is None or not extra
               else np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]))
  return tuple(out)
