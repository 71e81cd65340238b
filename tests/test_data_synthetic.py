"""The generated shapes set: deterministic, held out, images that match their scenes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sqllava_jax.config import SyntheticDataConfig
from sqllava_jax.data.templates import get_template
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.demo import synthetic
from sqllava_jax.demo.synthetic import Scene, SceneObject


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  root = tmp_path_factory.mktemp("syn")
  a = synthetic.generate(str(root / "a"), seed=5, num_train=60, num_eval=30, image_size=48)
  b = synthetic.generate(str(root / "b"), seed=5, num_train=60, num_eval=30, image_size=48)
  c = synthetic.generate(str(root / "c"), seed=6, num_train=60, num_eval=30, image_size=48)
  return a, b, c


def _files(paths):
  out = {}
  for root, _, files in os.walk(paths.root):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), paths.root)] = f.read()
  return out


def test_same_seed_same_bytes(made):
  a, b, c = made
  fa, fb = _files(a), _files(b)
  assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
  assert _files(c)[os.path.basename(a.json(2, "train"))] != fa[os.path.basename(a.json(2, "train"))]


def test_eval_scenes_are_held_out(made):
  a = made[0]
  train = {json.dumps(r["scene"]) for r in json.load(open(a.json(1, "train")))}
  held = [json.dumps(r["scene"]) for r in json.load(open(a.json(1, "eval")))]
  assert len(held) == 30 and not train.intersection(held)


def test_images_show_their_scenes(made):
  a = made[0]
  records = json.load(open(a.json(2, "train")))
  for r in records[:20]:
    img = np.asarray(Image.open(os.path.join(a.image_folder, r["image"])))
    assert img.shape == (48, 48, 3)
    scene = Scene.from_json(r["scene"])
    for k, position in enumerate(synthetic.POSITIONS):
      row, col = divmod(k, 2)
      centre = img[row * 24 + 12, col * 24 + 12].astype(int)
      obj = scene.at(position)
      if obj is None:
        assert centre.max() < 70 and np.ptp(centre) == 0, (r["id"], position, centre)
      else:
        np.testing.assert_array_equal(centre, synthetic.COLORS[obj.color], err_msg=r["id"])


def test_conversations_answer_from_the_scene(made):
  a = made[0]
  for r in json.load(open(a.json(2, "train"))):
    scene = Scene.from_json(r["scene"])
    turns = r["conversations"]
    assert turns[0]["value"].startswith("<image>\n") and len(turns) % 2 == 0
    for q, ans in zip(turns[::2], turns[1::2]):
      question = q["value"].replace("<image>\n", "")
      if question == synthetic.DESCRIBE_QUESTION:
        assert ans["value"] == synthetic.caption(scene)
        continue
      assert synthetic.question_is_valid(question, scene)
      assert synthetic.answer_text(question, scene) == ans["value"]
      # What the question names, then the single-word answer from the scene.
      *restated, answer = ans["value"].split(" ")
      assert answer == synthetic.answer_question(question, scene)
      _, slots = synthetic.parse_question(question)
      assert all(word in restated for word in slots), (question, ans)
  stage1 = json.load(open(a.json(1, "train")))
  assert all(r["conversations"][1]["value"] == synthetic.caption(Scene.from_json(r["scene"]))
             for r in stage1)


def _listed_cells(listing: str) -> dict[str, list[str]]:
  """{position: the other words of its item} of a grid listing."""
  prefix = f"{synthetic.GRID_PREFIX} "
  assert listing.startswith(prefix) and listing.endswith("."), listing
  cells = {}
  for item in listing[len(prefix):-1].split(", "):
    words = item.split(" ")
    assert words[0] in synthetic.POSITIONS, item
    cells[words[0]] = words[1:]
  return cells


def test_stage0_adds_a_position_question_a_grid_listing_and_an_asked_question(made):
  a = made[0]
  stage2 = json.load(open(a.json(2, "train")))
  stage0 = json.load(open(a.json(0, "train")))
  assert stage0[:len(stage2)] == stage2 and len(stage0) == 2 * len(stage2)
  orders, located = set(), []
  for qa, grid in zip(stage2, stage0[len(stage2):]):
    assert grid["image"] == qa["image"] and grid["scene"] == qa["scene"]
    where, there, human, gpt, ask, asked = grid["conversations"]
    scene = Scene.from_json(grid["scene"])
    # The position question: about a shape alone of its kind, or about one not in the image.
    assert where["value"].startswith("<image>\n")
    qtype, (color, shape) = synthetic.parse_question(where["value"].split("\n", 1)[1])
    found = scene.find(color, shape)
    assert qtype == "position" and len(found) < 2, grid
    expected = (f"the {color} {shape} is in the {found[0].position}" if found
                else f"the {color} {shape} is not in the image")
    assert there["value"] == expected
    located.append(bool(found))
    assert human["value"] == synthetic.GRID_QUESTION
    assert ask["value"] == synthetic.ASK_REQUEST and ask["from"] == "human"
    assert synthetic.question_is_valid(asked["value"], scene)
    cells = _listed_cells(gpt["value"])
    assert sorted(cells) == sorted(synthetic.POSITIONS)
    for position, words in cells.items():
      o = scene.at(position)
      assert sorted(words) == (sorted([o.color, o.shape]) if o else ["nothing"]), gpt["value"]
    orders.add(tuple(cells))
  assert len(orders) > 6  # the cells come in a random order
  assert 0.25 < np.mean(located) < 0.75, np.mean(located)


def test_stage0_puts_a_quarter_of_its_records_under_the_self_questioning_system_prompt(made):
  stage0 = json.load(open(made[0].json(0, "train")))
  half = len(stage0) // 2
  assert not any("system" in r for r in stage0[:half])
  own = [r.get("system") for r in stage0[half:]]
  assert own[1::2] == [get_template("v1_sq").system] * len(own[1::2]) and not any(own[::2])


def test_restated_answer_keeps_what_is_outside_the_grammar():
  assert synthetic.restated_answer("What color is the shape in the northwest?", "red") == \
      "northwest red"
  assert synthetic.restated_answer("What shape is in the southwest?", "circle") == \
      "southwest circle"
  assert synthetic.restated_answer("Where is the blue square?", "southeast") == \
      "the blue square is in the southeast"
  assert synthetic.restated_answer("How many shapes are there?", "two") == "two"
  assert synthetic.restated_answer(synthetic.DESCRIBE_QUESTION, "a caption.") == "a caption."


def test_vqa_items_cover_every_question_type(made):
  items = synthetic.load_vqa(made[0].root, "eval")
  assert {i.question_type for i in items} == set(synthetic.QUESTION_TYPES)
  for item in items:
    assert synthetic.answer_text(item.question, item.scene) == item.answer
    assert synthetic.is_correct(f" {item.answer.upper()}. ", item.answer)
  assert not synthetic.is_correct("blue", "red")
  assert not synthetic.is_correct("red", "northwest red")
  assert not synthetic.is_correct("northeast red", "northwest red")
  scenes = synthetic.load_scenes(made[0].root, "eval")
  assert len(scenes) == 30 and all(isinstance(s, Scene) for _, _, s in scenes)
  assert synthetic.CHANCE == {"color": 0.25, "shape": 1 / 3, "count": 0.25, "position": 0.25}


SCENE = Scene((SceneObject("red", "circle", "northwest"),
               SceneObject("blue", "square", "northeast"),
               SceneObject("blue", "square", "southeast")))


@pytest.mark.parametrize("question,valid,answer", [
    ("What color is the shape in the northwest?", True, "red"),
    ("what colour is the shape in the  northeast?", True, "blue"),
    ("What shape is in the southeast?", True, "square"),
    ("Where is the red circle?", True, "northwest"),
    ("How many shapes are there?", True, "three"),
    ("What color is the shape in the southwest?", False, None),  # empty cell
    ("Where is the green triangle?", False, None),  # not in the image
    ("Where is the blue square?", False, None),  # two of them: no single answer
    ("Where is the purple circle?", False, None),  # outside the vocabulary
    ("What is the meaning of this image?", False, None),
    ("What color is the shape in the northwest", False, None),
])
def test_question_scoring(question, valid, answer):
  assert synthetic.question_is_valid(question, SCENE) is valid
  assert synthetic.answer_question(question, SCENE) == answer


def test_tokenizer_has_llama_layout_and_whole_role_tags(made):
  tok = Tokenizer(made[0].tokenizer)
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size <= 512
  for word in ("ASSISTANT", "VUSER", "USER", "circle", "triangle", *synthetic.POSITIONS):
    assert len(tok.encode(word)) == 1, (word, tok.pieces(tok.encode(word)))
  for text in ("What shape is in the northwest?", "The cells: southeast nothing"):
    pieces = tok.pieces(tok.encode(text))
    assert any(p.endswith(("northwest", "southeast")) for p in pieces), pieces


def test_ensure_dataset_reuses_and_refuses_other_parameters(tmp_path):
  cfg = SyntheticDataConfig(dir=str(tmp_path / "s"), num_train=8, num_eval=4, image_size=32)
  paths = synthetic.ensure_dataset(cfg, image_size=336)
  stamp = os.path.getmtime(paths.manifest)
  assert synthetic.ensure_dataset(cfg, image_size=336).root == paths.root
  assert os.path.getmtime(paths.manifest) == stamp
  assert Image.open(os.path.join(paths.image_folder, "train_000000.png")).size == (32, 32)
  with pytest.raises(ValueError, match="delete it"):
    synthetic.ensure_dataset(SyntheticDataConfig(dir=cfg.dir, num_train=9, num_eval=4,
                                                 image_size=32), image_size=336)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic-")]
