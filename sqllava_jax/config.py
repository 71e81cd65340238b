"""The config schema: frozen dataclasses that YAML files in `configs/` are data for.

Load with `load_config(path, overrides)`; overrides are `key.sub=value` strings. Small modules
take plain numbers; only the top-level models and runners read these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, TypeVar

from sqllava_jax import configlib
from sqllava_jax.configlib import ConfigError
from sqllava_jax.data import sources

if TYPE_CHECKING:  # the checker's protocol of dataclass instances (no runtime module)
  from _typeshed import DataclassInstance

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "qkv_proj"]
AttentionImpl = Literal["xla", "blocked", "cudnn", "splash", "auto"]

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT as transformers' `CLIPVisionConfig` (defaults: ViT-L/14 at 336 px)."""
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_eps: float = 1e-5
  hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
  # Hidden state whose features feed the projector: -2 is the output of the second-to-last
  # encoder layer (`hidden_states[-2]`); index 0 is the embeddings after `pre_layrnorm`.
  select_layer: int = -2
  select_feature: Literal["patch", "cls_patch"] = "patch"
  # Standard deviation of the position embeddings at initialisation (CLIP's: 0.02). Only a
  # tower trained from scratch cares: with 0.02 a patch's position is a small fraction of its
  # features, and a small tower learns slowly which patch is where.
  init_position_std: float = 0.02

  def __post_init__(self):
    _check(self.hidden_size % self.num_heads == 0,
           f"vision.hidden_size={self.hidden_size} not divisible by "
           f"vision.num_heads={self.num_heads}")
    _check(self.image_size % self.patch_size == 0,
           f"vision.image_size={self.image_size} not divisible by "
           f"vision.patch_size={self.patch_size}")
    _check(self.init_position_std >= 0,
           f"vision.init_position_std={self.init_position_std} must be >= 0")
    n = self.num_layers
    _check(-(n + 1) <= self.select_layer <= n,
           f"vision.select_layer={self.select_layer} out of range for {n} layers (-{n + 1}..{n})")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_features(self) -> int:
    """Visual tokens per image handed to the projector."""
    return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

  @property
  def feature_layer_count(self) -> int:
    """How many encoder layers must run to produce the selected hidden state."""
    idx = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
    return idx

  @classmethod
  def from_hf_config(cls, hf: dict, **overrides) -> "VisionConfig":
    hf = hf.get("vision_config", hf)
    return cls(image_size=hf.get("image_size", 224), patch_size=hf["patch_size"],
               num_channels=hf.get("num_channels", 3), hidden_size=hf["hidden_size"],
               intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
               num_heads=hf["num_attention_heads"], layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
               hidden_act=hf.get("hidden_act", "quick_gelu"), **overrides)

  def to_hf_config(self) -> dict:
    return dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                image_size=self.image_size, patch_size=self.patch_size,
                num_channels=self.num_channels, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, layer_norm_eps=self.layer_norm_eps,
                hidden_act=self.hidden_act, projection_dim=768, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """LLaMA decoder as transformers' `LlamaConfig` (defaults: Vicuna-7B v1.5)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 0

  def __post_init__(self):
    _check(self.num_heads % self.num_kv_heads == 0,
           f"llm.num_heads={self.num_heads} not divisible by llm.num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      _check(self.hidden_size % self.num_heads == 0,
             f"llm.hidden_size={self.hidden_size} not divisible by llm.num_heads={self.num_heads}")

  @property
  def effective_head_dim(self) -> int:
    """`head_dim` when set, else hidden_size / num_heads (as transformers derives it)."""
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_hf_config(cls, hf: dict, **overrides) -> "LLMConfig":
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
      raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; only default rotary")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
               num_heads=hf["num_attention_heads"],
               num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
               head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
               rope_theta=float(theta),
               max_position_embeddings=hf.get("max_position_embeddings", 4096),
               tie_word_embeddings=hf.get("tie_word_embeddings", False),
               bos_token_id=_first(hf.get("bos_token_id"), 1),
               eos_token_id=_first(hf.get("eos_token_id"), 2),
               pad_token_id=_first(hf.get("pad_token_id"), 0), **overrides)

  def to_hf_config(self) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"],
                vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                head_dim=self.effective_head_dim, rms_norm_eps=self.rms_norm_eps,
                rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
                tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
                attention_bias=False, mlp_bias=False, bos_token_id=self.bos_token_id,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                initializer_range=0.02, torch_dtype="float32")


def _first(value, default):
  if isinstance(value, list):
    return value[0] if value else default
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector: SQ-LLaVA's prototype extractor (`cluster`) or LLaVA's MLPs."""
  type: Literal["cluster", "mlp2x_gelu", "linear"] = "cluster"
  num_prototypes: int = 256
  num_iterations: int = 2

  def __post_init__(self):
    _check(self.num_prototypes > 0, f"projector.num_prototypes={self.num_prototypes} must be > 0")
    _check(self.num_iterations >= 0,
           f"projector.num_iterations={self.num_iterations} must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """`W x + (alpha / rank) * B(A(dropout(x)))`; rank 0 switches LoRA off."""
  rank: int = 0
  alpha: float = 0.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ()

  def __post_init__(self):
    _check(self.rank >= 0, f"lora rank={self.rank} must be >= 0")
    _check(0.0 <= self.dropout < 1.0, f"lora dropout={self.dropout} must be in [0, 1)")

  @property
  def enabled(self) -> bool:
    return self.rank > 0 and bool(self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  llm: LLMConfig = LLMConfig()
  projector: ProjectorConfig = ProjectorConfig()
  vit_lora: LoRAConfig = LoRAConfig(rank=64, alpha=128.0, dropout=0.2, targets=VIT_LORA_TARGETS)
  llm_lora: LoRAConfig = LoRAConfig(rank=128, alpha=256.0, dropout=0.05, targets=LLM_LORA_TARGETS)
  # Activations and matmuls run in `compute_dtype`; parameters are created in `param_dtype`
  # (training casts groups to their own dtype, see `train.param_groups`).
  compute_dtype: DType = "float32"
  param_dtype: DType = "float32"
  remat_policy: RematPolicy = "none"
  # Attention (models/attention.py): xla (dense reference), blocked (causal flash attention
  # in XLA: no [T, T] scores kept, upper triangle skipped; the CPU's fastest), cudnn (GPU
  # kernel), splash (TPU kernel), auto (cudnn on GPU, splash on TPU, blocked elsewhere).
  attention_impl: AttentionImpl = "xla"
  # Query/key block of `blocked` (128 measured fastest on CPU at 1024 tokens).
  attention_block_size: int = 128
  # Placeholder id written into `input_ids` at image positions (the reference's -200).
  image_token_id: int = -200

  def __post_init__(self):
    for name in self.vit_lora.targets:
      _check(name in VIT_LORA_TARGETS,
             f"model.vit_lora.targets: unknown {name!r}; choose from {', '.join(VIT_LORA_TARGETS)}")
    for name in self.llm_lora.targets:
      _check(name in LLM_LORA_TARGETS,
             f"model.llm_lora.targets: unknown {name!r}; choose from {', '.join(LLM_LORA_TARGETS)}")
    _check(self.attention_block_size >= 1,
           f"model.attention_block_size={self.attention_block_size} must be >= 1")

  @property
  def num_image_tokens(self) -> int:
    """Placeholder positions one `<image>` expands to (the projector keeps the token count)."""
    return self.vision.num_features


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
  """The demo's generated shapes set (`sqllava_jax.demo.synthetic`, `data.source: synthetic`),
  built in `dir` on first use."""
  dir: str = "data/synthetic"
  # 1: captions (template plain); 2: multi-turn questions and answers; 0: those plus a grid
  # description per image (the demo's from-scratch stage 0).
  stage: int = 2
  num_train: int = 4000
  num_eval: int = 500
  # Image side in pixels; 0 means the vision tower's `model.vision.image_size`.
  image_size: int = 0
  vocab_size: int = 512
  seed: int = 0

  def __post_init__(self):
    _check(self.stage in (0, 1, 2), f"data.synthetic.stage={self.stage} must be 0, 1 or 2")
    _check(self.num_train > 0 and self.num_eval > 0,
           f"data.synthetic.num_train={self.num_train} and num_eval={self.num_eval} must be > 0")
    _check(self.image_size == 0 or self.image_size >= 16,
           f"data.synthetic.image_size={self.image_size} must be 0 (vision size) or >= 16")
    _check(self.vocab_size >= 300,
           f"data.synthetic.vocab_size={self.vocab_size} must be >= 300 (256 byte pieces + words)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training examples come from and how they become fixed-shape batches."""
  # A source of `data/sources.py`'s registry: json and tfds, and the demo's synthetic set.
  source: Literal["json", "tfds", "synthetic"] = "json"
  json_path: str = ""
  image_folder: str = ""
  tfds_dir: str = ""
  # TFDS split, or the synthetic set's split (train / eval).
  split: str = "train"
  tokenizer: str = ""
  template: Literal["plain", "vicuna_v1", "v1_sq"] = "v1_sq"
  # Probability that a human turn (after the first, of an image record) becomes VUSER.
  sq_r: float = 0.0
  image_aspect_ratio: Literal["pad", "square"] = "pad"
  max_length: int = 2048
  # Pad rows to the smallest bucket that fits (static shapes); empty: always max_length.
  length_buckets: tuple[int, ...] = ()
  shuffle: bool = True
  # Passes over the data; 0 repeats forever (training then stops at train.max_steps).
  num_epochs: int = 1
  seed: int = 0
  # Worker processes (0: build batches in the training process), and threads building
  # examples in each process (0: in the thread that asks for the batch).
  num_workers: int = 0
  num_threads: int = 1
  # Batches buffered per worker (and examples per batch row in the thread prefetch).
  prefetch: int = 2
  # Drop a short last batch; keep it (padded with empty rows, example_index -1) for eval.
  drop_remainder: bool = True
  # Pack several examples into each row of max_length tokens (first fit; segment ids 1, 2, ...
  # and positions restarting per example) instead of one right-padded example per row.
  packing: bool = False
  # Image slots of a packed row (pixel_values [B, K, H, W, 3]); 0: as many as fit,
  # max_length // image tokens. Examples that would exceed it start a new row.
  max_images_per_row: int = 0
  # Examples in a packed row at most (example_index is [B, E] when packing).
  max_examples_per_row: int = 16
  # Fail on the first bad record instead of skipping and counting it.
  strict: bool = False
  max_image_pixels: int = 50_000_000
  log_first_bad: int = 5
  synthetic: SyntheticDataConfig = SyntheticDataConfig()

  def __post_init__(self):
    _check(0.0 <= self.sq_r <= 1.0, f"data.sq_r={self.sq_r} must be in [0, 1]")
    _check(self.sq_r == 0.0 or self.template == "v1_sq",
           f"data.sq_r={self.sq_r} relabels questions as VUSER turns, which only template "
           f"v1_sq has (data.template={self.template})")
    _check(self.max_length > 0, f"data.max_length={self.max_length} must be > 0")
    for b in self.length_buckets:
      _check(0 < b <= self.max_length,
             f"data.length_buckets: {b} must be in 1..data.max_length={self.max_length}")
    _check(self.seed >= 0, f"data.seed={self.seed} must be >= 0")
    _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
    _check(self.num_threads >= 0, f"data.num_threads={self.num_threads} must be >= 0")
    _check(self.prefetch >= 1, f"data.prefetch={self.prefetch} must be >= 1")
    _check(self.max_image_pixels > 0,
           f"data.max_image_pixels={self.max_image_pixels} must be > 0")
    _check(self.max_images_per_row >= 0,
           f"data.max_images_per_row={self.max_images_per_row} must be >= 0 (0: as many as fit)")
    _check(self.max_examples_per_row >= 1,
           f"data.max_examples_per_row={self.max_examples_per_row} must be >= 1")
    sources.check_data_config(self)  # what the named source adds (data/sources.py)

  def image_slots(self, num_image_tokens: int) -> int:
    """Images per batch row: 1 unpacked; packed, `max_images_per_row` or as many as fit."""
    if not self.packing:
      return 1
    return self.max_images_per_row or max(1, self.max_length // num_image_tokens)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Parameters whose path matches one of `patterns` (regexes, `re.search` on 'a/b/c')."""
  name: str
  patterns: tuple[str, ...]
  lr: Optional[float] = None
  frozen: bool = False
  param_dtype: DType = "float32"

  def __post_init__(self):
    _check(self.frozen or self.lr is not None,
           f"param group {self.name!r}: give an lr or set frozen: true")
    _check(not (self.frozen and self.lr is not None),
           f"param group {self.name!r}: frozen groups take no lr (lr={self.lr})")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes (-1: whatever is left) and the logical-axis -> mesh-axis rules."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Ordered rules: a logical axis maps to the first listed mesh axes not already used by
  # another dimension of the same array; an empty list replicates.
  rules: tuple[tuple[str, tuple[str, ...]], ...] = (
      ("batch", ("data", "fsdp")),
      ("length", ()),
      ("embed", ("fsdp",)),
      ("vocab", ("tensor",)),
      ("mlp", ("tensor",)),
      ("heads", ("tensor",)),
      ("kv_heads", ("tensor",)),
      ("head_dim", ()),
      # The LoRA rank axis shards over fsdp, so lora_b [r, out] is not replicated on every
      # device (lora_a [in, r] shards `in` over fsdp first and keeps r whole).
      ("lora", ("fsdp",)),
      ("layers", ()),
      ("vision_embed", ("fsdp",)),
      ("vision_mlp", ("tensor",)),
      ("vision_heads", ("tensor",)),
      ("prototypes", ()),
      ("channels", ()),
  )

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8}: mesh sizes as the commands' `--mesh` gives
  them (-1 fills the rest)."""
  sizes = {}
  for item in spec.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
      raise ConfigError(f"--mesh {spec!r}: expected data=N,fsdp=N,tensor=N (N an integer, "
                        f"-1 fills the rest), got {item!r}")
    sizes[key] = int(value)
  return sizes


# The paper's stage 2 (instruction tuning): adapters and projector train, the bases are frozen.
LORA_PARAM = r"/lora_[ab]$"
STAGE2_PARAM_GROUPS = (
    ParamGroup("llm_lora", (r"^llm/.*" + LORA_PARAM,), lr=2e-4),
    ParamGroup("projector", (r"^projector/",), lr=2e-5),
    ParamGroup("vit_lora", (r"^vision/.*" + LORA_PARAM,), lr=2e-5),
    ParamGroup("frozen_bases", (r"^(vision|llm)/(?!.*" + LORA_PARAM + ")",), frozen=True,
               param_dtype="bfloat16"),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  param_groups: tuple[ParamGroup, ...] = STAGE2_PARAM_GROUPS
  # Global batch = per_device_batch_size x devices x grad_accum_steps.
  per_device_batch_size: int = 1
  grad_accum_steps: int = 1
  # > 0: stop after this many steps (the data repeats if needed); 0: data.num_epochs passes.
  max_steps: int = 0
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  # `muon`: Muon (optax.contrib) for the dense layers' weight matrices (`kernel`: the
  # blocks' and the projector's), AdamW with Nesterov momentum (as optax pairs them) for
  # everything else (embeddings, heads, norms, biases, LoRA factors). Muon's momentum is
  # `adam_b1` and its updates are scaled to AdamW's size (RMS 0.2), so the groups' AdamW
  # learning rates carry over.
  optimizer: Literal["adamw", "muon"] = "adamw"
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0
  # Tokens per chunk of the vocabulary projection in the loss (no [B, T, V] fp32 logits).
  logits_chunk_size: int = 512
  # A non-finite loss or gradient norm: skip the update (counted), or save and stop.
  nonfinite: Literal["skip", "stop"] = "skip"
  log_every: int = 10
  save_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  # A save that fails (disk full, a write error; the steps before it stay intact): `stop`
  # training with the error, or `continue` and try again at the next save (a failed last
  # save, at the end or on SIGTERM, always stops the run with its error).
  on_save_error: Literal["stop", "continue"] = "stop"
  # A checkpoint to start from (e.g. stage 1 for stage 2, or a `convert import-hf` output):
  # parameters with the same path and shape are copied, except those matching
  # `init_from_exclude` (regexes), which keep their fresh initialisation.
  init_from: str = ""
  init_from_exclude: tuple[str, ...] = ()
  # Freeze the ViT-LoRA (as the reference does by running the tower under no_grad).
  freeze_vit_lora: bool = False

  def __post_init__(self):
    _check(self.per_device_batch_size >= 1,
           f"train.per_device_batch_size={self.per_device_batch_size} must be >= 1")
    _check(self.grad_accum_steps >= 1,
           f"train.grad_accum_steps={self.grad_accum_steps} must be >= 1")
    _check(0.0 <= self.warmup_ratio < 1.0,
           f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
    _check(self.logits_chunk_size >= 1,
           f"train.logits_chunk_size={self.logits_chunk_size} must be >= 1")
    names = [g.name for g in self.param_groups]
    _check(len(set(names)) == len(names), f"train.param_groups: duplicate names in {names}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  output_dir: str = "runs/default"
  seed: int = 0


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                cls: type = Config):
  """Loads `path` (YAML; `base:` chains allowed) and applies `key.sub=value` overrides."""
  data = configlib.load_yaml(path) if path else {}
  data = configlib.apply_overrides(data, overrides, cls)
  return configlib.from_dict(cls, data)


_Dataclass = TypeVar("_Dataclass", bound="DataclassInstance")


def replace(cfg: _Dataclass, **changes: Any) -> _Dataclass:
  """`dataclasses.replace` that takes dotted keys: replace(cfg, **{'model.llm.num_layers': 2})."""
  nested: dict = {}
  for key, value in changes.items():
    head, _, rest = key.partition(".")
    nested.setdefault(head, {})
    if rest:
      nested[head][rest] = value
    else:
      nested[head] = value
  out: dict[str, Any] = {}
  for head, value in nested.items():
    if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head)):
      out[head] = replace(getattr(cfg, head), **value)
    else:
      out[head] = value
  return dataclasses.replace(cfg, **out)
