"""A generated shapes data set for tests and the CPU demo: learnable from scratch in minutes.

Each image shows one to four shapes (circle, square, triangle) in four colours, one per
cell of a 2 x 2 grid, on a dark background. Records are LLaVA-format JSON:

- stage 1 (template `plain`): `<image>` -> a caption listing every shape;
- stage 2 (templates `vicuna_v1` / `v1_sq`): two to four questions about colour, shape,
  count and position, answered in a few words that restate what the question names before
  the answer ("northwest red" for the colour in the northwest, "the red circle is in the
  northwest" for where the red circle is, "three" for the count), sometimes preceded by the
  self-questioning protocol's opening question, answered with the caption;
- stage 0 (the demo's from-scratch pretraining, `vicuna_v1`): the stage-2 records plus, per
  image, a position question (`locate_question`: half of them about a shape that is not in
  the image), a grid listing ("The cells: southwest nothing, northwest red circle, northeast
  square blue, ..."; cells in a random order, each content right after its cell's name)
  and then a question about the image asked by the assistant. The grid records of every
  other image carry the self-questioning system prompt as their own (`stage0_records`).

Why two system prompts in stage 0: a pretrained chat LLM answers the same whatever its
system prompt says, and the tiny one trained here does not unless it has seen more than one.
Trained under Vicuna's prompt alone, the demo's stage-0 model asked under `v1_sq`'s fell from
0.97-1.00 to 0.53 on counts and 0.18 on positions; stage 2 (which trains under `v1_sq`) then
bent its LoRA to that prompt and lost counts under `vicuna_v1`, the evaluation protocol.
A quarter of the records is enough; half of them cost stage 0 a quarter of its trained tokens
per step (the `v1_sq` prompt is 63 tokens longer), and positions, learned last, suffered.

Why the answers restate: a single-word answer needs two steps at once (carry the question's
words to the answer, look them up in the image), and a model trained from nothing does not
find them in the demo's budget: it names a colour of the image, any cell. The restated
answer and the listing teach each step on its own (copy the words; from a cell's name, its
content). The listing starts with "The cells:" so that an answer never starts like a
listing. Cell names are single words (compass points) so that each is one token to copy
and look up. The asked question stands in for what a pretrained LLM brings: words it can
say. Without it the question words ("What", "How", "?") only ever appear in unlabelled USER
turns, stage 0 teaches the output layer never to emit them, and stage 2 (output layer
frozen, LoRA only) cannot learn to ask.

Every record carries its `scene`, so evaluation can score answers (`answer_text`, exact
match of the whole restated answer) and self-asked questions (`question_is_valid`). The
`eval` split holds scenes that never occur in `train`; `vqa_eval.json` asks one question of
each type about each of them. Uniform-guess chance per question type is `CHANCE`.
Everything is a function of the seed.

The set is the data source `synthetic` (`data.source: synthetic`, its parameters under
`data.synthetic`), registered below: built in `data.synthetic.dir` on first use, its own
tokenizer the default `data.tokenizer`.

    paths = generate("data/synthetic", seed=0, num_train=4000, num_eval=500, image_size=64)
    paths.json(2, "train"), paths.image_folder, paths.tokenizer
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

from sqllava_jax.configlib import ConfigError
from sqllava_jax.data.conversations import parse_record
from sqllava_jax.data.sources import JsonSource, register_source
from sqllava_jax.data.templates import USER, VUSER, build_prompt, get_template

COLORS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 100, 240),
          "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")
# The cells of the 2 x 2 grid, in grid order; one word each (see `train_tokenizer`).
POSITIONS = ("northwest", "northeast", "southwest", "southeast")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position")
# Uniform-guess accuracy per question type (counts are one..four).
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / 4,
          "position": 1 / len(POSITIONS)}
DESCRIBE_QUESTION = "Can you describe the image in detail?"
CAPTION_PROMPT = "Describe the image briefly."
GRID_QUESTION = "What is in each cell of the grid?"
GRID_PREFIX = "The cells:"
ASK_REQUEST = "Ask a question about the image."
ABSENT = "not in the image"
SPLITS = ("train", "eval")
FORMAT_VERSION = 5

_QUESTION_FORMS = {
    "color": "What color is the shape in the {position}?",
    "shape": "What shape is in the {position}?",
    "count": "How many shapes are there?",
    "position": "Where is the {color} {shape}?",
}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  color: str
  shape: str
  position: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """Shapes in grid order (northwest, northeast, southwest, southeast)."""
  objects: tuple[SceneObject, ...]

  def at(self, position: str) -> Optional[SceneObject]:
    return next((o for o in self.objects if o.position == position), None)

  def find(self, color: str, shape: str) -> list[SceneObject]:
    return [o for o in self.objects if o.color == color and o.shape == shape]

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(o) for o in self.objects]

  @classmethod
  def from_json(cls, objects: Sequence[dict]) -> "Scene":
    return cls(tuple(SceneObject(**o) for o in objects))


def random_scene(rng: np.random.Generator) -> Scene:
  count = int(rng.integers(1, len(POSITIONS) + 1))
  cells = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
  colors, shapes = list(COLORS), list(SHAPES)
  return Scene(tuple(SceneObject(colors[int(rng.integers(len(colors)))],
                                 shapes[int(rng.integers(len(shapes)))], POSITIONS[c])
                     for c in cells))


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
  """RGB image [size, size]: each shape fills about 70% of its grid cell, jittered a little."""
  shade = int(rng.integers(20, 60))
  img = Image.new("RGB", (size, size), (shade, shade, shade))
  draw = ImageDraw.Draw(img)
  cell = size / 2
  for obj in scene.objects:
    row, col = divmod(POSITIONS.index(obj.position), 2)
    half = 0.35 * cell
    cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    box = (cx - half, cy - half, cx + half, cy + half)
    color = COLORS[obj.color]
    if obj.shape == "circle":
      draw.ellipse(box, fill=color)
    elif obj.shape == "square":
      draw.rectangle(box, fill=color)
    else:
      draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)
  return img


def caption(scene: Scene) -> str:
  """'two shapes: a red circle in the northwest and a blue square in the southeast.'"""
  parts = [f"a {o.color} {o.shape} in the {o.position}" for o in scene.objects]
  listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  noun = "shape" if len(parts) == 1 else "shapes"
  return f"{NUMBERS[len(parts)]} {noun}: {listed}."


def grid_listing(scene: Scene, rng: np.random.Generator) -> str:
  """'The cells: southwest nothing, northwest red circle, northeast square blue, ...': the
  four cells in a random order, each one's colour and shape (in a random order) right after
  its name. (Listing half the cells after their content instead, 'blue square northeast',
  left the demo's shapes at chance: 0.32 against 0.99.)"""
  cells = []
  for k in rng.permutation(len(POSITIONS)):
    position = POSITIONS[int(k)]
    o = scene.at(position)
    words = ["nothing"] if o is None else [o.color, o.shape]
    if o is not None and rng.integers(2):
      words.reverse()
    cells.append(" ".join([position, *words]))
  return f"{GRID_PREFIX} " + ", ".join(cells) + "."


def questions(scene: Scene) -> list[tuple[str, str, str]]:
  """Every well-posed (question, answer, question_type) about `scene`."""
  out = []
  for o in scene.objects:
    out.append((_QUESTION_FORMS["color"].format(position=o.position), o.color, "color"))
    out.append((_QUESTION_FORMS["shape"].format(position=o.position), o.shape, "shape"))
    if len(scene.find(o.color, o.shape)) == 1:
      out.append((_QUESTION_FORMS["position"].format(color=o.color, shape=o.shape), o.position,
                  "position"))
  out.append((_QUESTION_FORMS["count"], NUMBERS[len(scene.objects)], "count"))
  return out


def _word(options: Iterable[str]) -> str:
  return "(" + "|".join(re.escape(o) for o in options) + ")"


_PARSERS = {
    "color": re.compile(r"what colou?r is the shape in the " + _word(POSITIONS) + r"\?"),
    "shape": re.compile(r"what shape is in the " + _word(POSITIONS) + r"\?"),
    "count": re.compile(r"how many shapes are there\?"),
    "position": re.compile(r"where is the " + _word(COLORS) + " " + _word(SHAPES) + r"\?"),
}


def parse_question(question: str) -> Optional[tuple[str, tuple[str, ...]]]:
  """(question_type, slots) for a question in the set's closed grammar, else None."""
  text = " ".join(question.strip().lower().split())
  for qtype, pattern in _PARSERS.items():
    m = pattern.fullmatch(text)
    if m:
      return qtype, m.groups()
  return None


def answer_question(question: str, scene: Scene) -> Optional[str]:
  """The gold single-word answer, or None when the question is malformed or not about
  something in the image (no shape at that position; no unique shape of that kind)."""
  parsed = parse_question(question)
  if parsed is None:
    return None
  qtype, slots = parsed
  if qtype == "count":
    return NUMBERS[len(scene.objects)]
  if qtype == "position":
    found = scene.find(*slots)
    return found[0].position if len(found) == 1 else None
  obj = scene.at(slots[0])
  if obj is None:
    return None
  return obj.color if qtype == "color" else obj.shape


def answer_text(question: str, scene: Scene) -> Optional[str]:
  """The gold answer as the set writes it (`restated_answer` of `answer_question`)."""
  answer = answer_question(question, scene)
  return None if answer is None else restated_answer(question, answer)


def question_is_valid(question: str, scene: Scene) -> bool:
  """A well-formed question about objects actually in the image (the `synthetic_sq` score)."""
  return answer_question(question, scene) is not None


def restated_answer(question: str, answer: str) -> str:
  """`answer` after the words of `question` it depends on: 'northwest red' (colour),
  'northwest circle' (shape), 'the red circle is in the northwest' (position); counts stay
  one word. A question outside the set's grammar keeps `answer`."""
  parsed = parse_question(question)
  if parsed is None:
    return answer
  qtype, slots = parsed
  if qtype == "position":
    color, shape = slots
    return _located(color, shape, f"in the {answer}")
  return " ".join((*slots, answer))


def _located(color: str, shape: str, where: str) -> str:
  return f"the {color} {shape} is {where}"


def is_correct(prediction: str, gold: str) -> bool:
  """Exact match after trimming whitespace, case and a final full stop."""
  return prediction.strip().rstrip(".").strip().lower() == gold.lower()


def stage1_record(rid: str, image: str, scene: Scene) -> dict:
  """A caption record (template `plain`)."""
  return {"id": rid, "image": image, "scene": scene.to_json(),
          "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                            {"from": "gpt", "value": caption(scene)}]}


def locate_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """A position question for stage 0 and its answer: half the time about a shape that is
  alone of its kind in the image ('the red circle is in the northwest'), otherwise about a
  colour and shape that are not in it ('the green square is not in the image'). The absent
  half is what makes the answer copy the question's words: when every asked shape is in the
  image, naming any shape of the image is right often enough that the demo's model learns
  that instead (after stage 0, held-out position answers named the asked shape 0.16 of the
  time without these questions, 1.00 with them)."""
  present = [(q, a) for q, a, t in questions(scene) if t == "position"]
  if present and rng.random() < 0.5:
    question, answer = present[int(rng.integers(len(present)))]
    return question, restated_answer(question, answer)
  absent = [(c, s) for c in COLORS for s in SHAPES if not scene.find(c, s)]
  color, shape = absent[int(rng.integers(len(absent)))]
  return _QUESTION_FORMS["position"].format(color=color, shape=shape), \
      _located(color, shape, ABSENT)


def grid_record(rid: str, image: str, scene: Scene, rng: np.random.Generator) -> dict:
  """A stage-0 record (`vicuna_v1`): a position question (`locate_question`), the grid
  listing, then a question the assistant asks about the image (one of the well-posed ones,
  drawn with `rng`). The position question comes first, so the listing cannot answer it."""
  located, location = locate_question(scene, rng)
  pool = questions(scene)
  asked = pool[int(rng.integers(len(pool)))][0]
  return {"id": f"{rid}-grid", "image": image, "scene": scene.to_json(),
          "conversations": [{"from": "human", "value": f"<image>\n{located}"},
                            {"from": "gpt", "value": location},
                            {"from": "human", "value": GRID_QUESTION},
                            {"from": "gpt", "value": grid_listing(scene, rng)},
                            {"from": "human", "value": ASK_REQUEST},
                            {"from": "gpt", "value": asked}]}


def stage2_record(rid: str, image: str, scene: Scene, rng: np.random.Generator) -> dict:
  """A multi-turn question-answer record; the first question carries the image."""
  pool = questions(scene)
  picks = rng.permutation(len(pool))[:int(rng.integers(2, 5))]
  qa = [(pool[i][0], restated_answer(pool[i][0], pool[i][1])) for i in picks]
  if rng.random() < 0.25:
    qa.insert(0, (DESCRIBE_QUESTION, caption(scene)))
  conversations = []
  for k, (q, a) in enumerate(qa):
    conversations.append({"from": "human", "value": f"<image>\n{q}" if k == 0 else q})
    conversations.append({"from": "gpt", "value": a})
  return {"id": rid, "image": image, "scene": scene.to_json(), "conversations": conversations}


def stage0_records(stage2: Sequence[dict], grids: Sequence[dict]) -> list[dict]:
  """The stage-0 records: the stage-2 records, then the grid records, those of every other
  image (a quarter of all) with the self-questioning prompt of `v1_sq` as their own
  `system`; the rest keep the template's (Vicuna's)."""
  own = get_template("v1_sq").system
  return list(stage2) + [dict(r, system=own) if k % 2 else r for k, r in enumerate(grids)]


def _vqa_records(rid: str, image: str, scene: Scene, rng: np.random.Generator) -> list[dict]:
  by_type: dict[str, list] = {}
  for q, a, t in questions(scene):
    by_type.setdefault(t, []).append((q, restated_answer(q, a)))
  out = []
  for qtype in QUESTION_TYPES:
    if qtype in by_type:
      q, a = by_type[qtype][int(rng.integers(len(by_type[qtype])))]
      out.append({"id": f"{rid}-{qtype}", "image": image, "scene": scene.to_json(),
                  "question": q, "answer": a, "question_type": qtype,
                  "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                    {"from": "gpt", "value": a}]})
  return out


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
  root: str

  @property
  def image_folder(self) -> str:
    return os.path.join(self.root, "images")

  @property
  def tokenizer(self) -> str:
    return os.path.join(self.root, "tokenizer.model")

  @property
  def manifest(self) -> str:
    return os.path.join(self.root, "manifest.json")

  def json(self, stage: int, split: str) -> str:
    if split not in SPLITS:
      raise ValueError(f"synthetic split {split!r} does not exist; choose one of "
                       f"{', '.join(SPLITS)}")
    return os.path.join(self.root, f"stage{stage}_{split}.json")

  def vqa(self, split: str = "eval") -> str:
    return os.path.join(self.root, f"vqa_{split}.json")


def dataset_paths(root: str) -> SyntheticPaths:
  return SyntheticPaths(os.fspath(root))


def _scenes(seed: int, split: str, count: int,
            exclude: set) -> list[tuple[Scene, np.random.Generator]]:
  split_id = SPLITS.index(split)
  out: list[tuple[Scene, np.random.Generator]] = []
  k = 0
  while len(out) < count:
    rng = np.random.default_rng([seed, split_id, k])
    k += 1
    scene = random_scene(rng)
    if scene in exclude:
      continue
    out.append((scene, rng))
  return out


def generate(root: str, *, seed: int = 0, num_train: int = 4000, num_eval: int = 500,
             image_size: int = 64, vocab_size: int = 512) -> SyntheticPaths:
  """Writes images, the JSON files and `tokenizer.model` under `root` (overwriting them)."""
  params = dict(version=FORMAT_VERSION, seed=seed, num_train=num_train, num_eval=num_eval,
                image_size=image_size, vocab_size=vocab_size)
  paths = dataset_paths(root)
  os.makedirs(paths.image_folder, exist_ok=True)
  train = _scenes(seed, "train", num_train, exclude=set())
  held_out = _scenes(seed, "eval", num_eval, exclude={s for s, _ in train})
  files: dict[str, list] = {}
  for split, scenes in (("train", train), ("eval", held_out)):
    stage1, stage2, vqa = [], [], []
    for i, (scene, rng) in enumerate(scenes):
      rid, image = f"{split}-{i:06d}", f"{split}_{i:06d}.png"
      render_scene(scene, image_size, rng).save(os.path.join(paths.image_folder, image))
      stage1.append(stage1_record(rid, image, scene))
      stage2.append(stage2_record(rid, image, scene, rng))
      vqa.extend(_vqa_records(rid, image, scene, rng))
    grids = [grid_record(r["id"], r["image"], scene, rng)
             for r, (scene, rng) in zip(stage2, scenes)]
    files[paths.json(0, split)] = stage0_records(stage2, grids)
    files[paths.json(1, split)] = stage1
    files[paths.json(2, split)] = stage2
    files[paths.vqa(split)] = vqa
  for path, records in files.items():
    with open(path, "w") as f:
      json.dump(records, f, indent=0)
  # A thousand records already hold every word of the closed vocabulary many times.
  lines = corpus(files[paths.json(1, "train")][:1000],
                 files[paths.json(2, "train")][:1000] + files[paths.json(0, "train")][-200:])
  train_tokenizer(lines, paths.tokenizer, vocab_size=vocab_size)
  with open(paths.manifest, "w") as f:
    json.dump({"params": params, "chance": CHANCE,
               "counts": {os.path.basename(p): len(r) for p, r in files.items()}}, f, indent=1)
  return paths


def ensure_dataset(cfg, *, image_size: int) -> SyntheticPaths:
  """The set `cfg` (a `SyntheticDataConfig`) describes, generated on first use.

  Generation writes to a temporary folder renamed into place, so processes that start
  together do not see half a set; an existing set with other parameters is an error.
  """
  size = cfg.image_size or image_size
  params = dict(version=FORMAT_VERSION, seed=cfg.seed, num_train=cfg.num_train,
                num_eval=cfg.num_eval, image_size=size, vocab_size=cfg.vocab_size)
  paths = dataset_paths(cfg.dir)
  if not os.path.exists(paths.manifest):
    parent = os.path.dirname(os.path.abspath(cfg.dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
      generate(tmp, **{k: v for k, v in params.items() if k != "version"})
      try:
        os.rename(tmp, cfg.dir)
      except OSError:
        if not os.path.exists(paths.manifest):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  with open(paths.manifest) as f:
    found = json.load(f)["params"]
  if found != params:
    raise ValueError(f"{cfg.dir} holds a synthetic set made with {found}, not {params}; "
                     "delete it or set data.synthetic.dir elsewhere")
  return paths


def corpus(stage1: Sequence[dict], stage2: Sequence[dict]) -> list[str]:
  """Text a tokenizer for this set should know: captions and whole prompts, system prompt
  and role tags included, in the layouts of `vicuna_v1` and `v1_sq`."""
  lines = [r["conversations"][1]["value"] for r in stage1]
  for r in stage2:
    turns = parse_record(r, index=0).turns
    asked = tuple((VUSER if i and role == USER else role, text)
                  for i, (role, text) in enumerate(turns))
    lines.append(build_prompt("vicuna_v1", turns))
    lines.append(build_prompt("v1_sq", asked))
  # The tokenizer never sees `</s>` or `<image>` as text: it encodes the pieces between.
  return [piece for line in lines for piece in re.split("</s>|<image>", line) if piece]


def train_tokenizer(lines: Sequence[str], model_path: str, *, vocab_size: int = 512) -> str:
  """Trains a byte-fallback BPE SentencePiece model in LLaMA's layout (unk 0, bos 1, eos 2,
  no pad, dummy prefix, no whitespace normalisation) and writes it to `model_path`. The
  position names are plain words that it learns as one piece each (' northwest'), so a cell
  is one token to copy and look up, and transformers' LLaMA tokenizer splits the text the
  same way (hyphenated names such as 'top-left' split into three pieces; forcing them whole
  with user-defined symbols makes the two tokenizers disagree)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
      add_dummy_prefix=True, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1,
      shuffle_input_sentence=False, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())
  return model_path


@dataclasses.dataclass(frozen=True)
class VQAItem:
  id: str
  image: str  # path under the image folder
  question: str
  answer: str
  question_type: str
  scene: Scene


def load_vqa(root: str, split: str = "eval") -> list[VQAItem]:
  """The held-out single questions with gold answers (task `synthetic_vqa`)."""
  with open(dataset_paths(root).vqa(split)) as f:
    return [VQAItem(r["id"], r["image"], r["question"], r["answer"], r["question_type"],
                    Scene.from_json(r["scene"])) for r in json.load(f)]


def load_scenes(root: str, split: str = "eval") -> list[tuple[str, str, Scene]]:
  """(id, image path under the image folder, scene) of every image (task `synthetic_sq`)."""
  with open(dataset_paths(root).json(2, split)) as f:
    return [(r["id"], r["image"], Scene.from_json(r["scene"])) for r in json.load(f)]


def _source(data, split: str, image_size: int) -> JsonSource:
  """The records of `data.synthetic.stage` for `split`, the set generated on first use."""
  paths = ensure_dataset(data.synthetic, image_size=image_size)
  return JsonSource(paths.json(data.synthetic.stage, split), paths.image_folder)


def _tokenizer(data) -> str:
  return dataset_paths(data.synthetic.dir).tokenizer


def _check(data) -> None:
  """Stage 1's captions are trained under `plain`; the conversations under a chat template."""
  if (data.synthetic.stage == 1) != (data.template == "plain"):
    raise ConfigError(f"data.synthetic.stage={data.synthetic.stage} needs template "
                      f"{'plain' if data.synthetic.stage == 1 else 'vicuna_v1 or v1_sq'} "
                      f"(data.template={data.template})")


register_source("synthetic", _source, tokenizer=_tokenizer, check=_check)
