"""Templates, self-questioning relabel and loss labels, against the reference procedure."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
from data_helpers import (
  IGNORE,
  IMAGE_ID,
  hf_llama_tokenizer_v4_layout,
  reference_labels,
  train_tiny_tokenizer,
  trained_spans,
)
from PIL import Image

from sqllava_jax.data.conversations import parse_record, relabel_self_questions
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.examples import ExampleBuilder
from sqllava_jax.data.labels import tokenize_conversation
from sqllava_jax.data.sources import JsonSource
from sqllava_jax.data.templates import ASSISTANT, USER, VUSER, build_prompt, get_template
from sqllava_jax.data.tokenizer import Tokenizer
from sqllava_jax.demo import synthetic

SQ_TURNS = [(USER, "<image>\nWhat is in the picture?"), (ASSISTANT, "A cat on a sofa."),
            (VUSER, "What colour is the sofa?"), (ASSISTANT, "The sofa is red."),
            (USER, "Is it raining?"), (ASSISTANT, "Yes, it is.")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  train_tiny_tokenizer(str(directory))
  return str(directory)


@pytest.fixture(scope="module")
def tok(model_dir):
  return Tokenizer(f"{model_dir}/tokenizer.model")


@pytest.fixture(scope="module")
def hf(model_dir):
  return hf_llama_tokenizer_v4_layout(model_dir)


def _tokenize(tok, template, turns, num_image_tokens=3, **kw):
  return tokenize_conversation(tok, template, turns, num_image_tokens=num_image_tokens,
                               image_token_id=IMAGE_ID, **kw)


def test_v1_sq_trains_answers_and_self_questions_only(tok):
  out = _tokenize(tok, "v1_sq", SQ_TURNS)
  assert trained_spans(tok, out.input_ids, out.labels) == [
      "A cat on a sofa.</s>", "What colour is the sofa?</s>", "The sofa is red.</s>",
      "Yes, it is.</s>"]
  assert out.prompt.endswith("A cat on a sofa.</s>VUSER: What colour is the sofa?</s> "
                             "ASSISTANT: The sofa is red.</s>USER: Is it raining? "
                             "ASSISTANT: Yes, it is.</s>")
  image = out.input_ids == IMAGE_ID
  assert image.sum() == 3 and (out.labels[image] == IGNORE).all()
  assert out.input_ids[0] == tok.bos_id and out.labels[0] == IGNORE
  # The role tags VUSER, ASSISTANT and USER never carry loss.
  for tag in ("▁VUSER", "▁ASSISTANT", "▁USER"):
    ids = tok.encode(tag.replace("▁", ""))
    at = [k for k in range(len(out.input_ids)) if list(out.input_ids[k:k + len(ids)]) == ids]
    assert at, tag
    assert all((out.labels[k:k + len(ids)] == IGNORE).all() for k in at), tag


def test_vicuna_trains_every_answer(tok):
  turns = [(USER, "<image>\nWhat is in the picture?"), (ASSISTANT, "A cat."),
           (USER, "Is it raining?"), (ASSISTANT, "Yes.")]
  out = _tokenize(tok, "vicuna_v1", turns)
  assert trained_spans(tok, out.input_ids, out.labels) == ["A cat.</s>", "Yes.</s>"]
  assert "A cat.</s>USER: Is it raining? ASSISTANT: Yes.</s>" in out.prompt


def test_plain_trains_the_caption_and_newline(tok):
  turns = [(USER, "<image>\nDescribe the image briefly."), (ASSISTANT, "A dog runs.")]
  out = _tokenize(tok, "plain", turns)
  assert out.prompt == "<image>A dog runs.\n"
  assert trained_spans(tok, out.input_ids, out.labels) == ["A dog runs.\n"]
  assert list(out.input_ids[:4]) == [tok.bos_id, IMAGE_ID, IMAGE_ID, IMAGE_ID]


def test_generation_prompts():
  first = build_prompt("v1_sq", SQ_TURNS[:1], next_role=ASSISTANT)
  assert first.endswith(" USER: <image>\nWhat is in the picture? ASSISTANT:")
  ask = build_prompt("v1_sq", SQ_TURNS[:2], next_role=VUSER)
  assert ask.endswith("ASSISTANT: A cat on a sofa.</s>VUSER:")
  assert build_prompt("vicuna_v1", SQ_TURNS[:1], next_role=ASSISTANT).startswith(
      get_template("vicuna_v1").system + " USER: <image>\n")
  assert build_prompt("plain", SQ_TURNS[:1], next_role=ASSISTANT) == "<image>"


def _synthetic_conversations(n=24):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    scene = synthetic.random_scene(rng)
    record = synthetic.stage2_record(f"r{i}", "x.png", scene, rng)
    out.append(record)
  return out


HAND_WRITTEN = [
    {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A cat sleeping on a red sofa."}]},
    {"image": "a.png", "conversations": [
        {"from": "human", "value": "What is the man holding? <image>"},
        {"from": "gpt", "value": "He holds an umbrella."},
        {"from": "human", "value": "Is it raining?"},
        {"from": "gpt", "value": "Yes, it is raining heavily in the city streets at night."},
        {"from": "human", "value": "How many people are there?"},
        {"from": "gpt", "value": "There are 2 people, a man and a woman."}]},
    {"conversations": [
        {"from": "human", "value": "How many people are there?"},
        {"from": "gpt", "value": "There are 2 people."},
        {"from": "human", "value": "What colour is the sofa?"},
        {"from": "gpt", "value": "The sofa is red."}]},
]


@pytest.mark.parametrize("template,sq_r", [("vicuna_v1", 0.0), ("v1_sq", 0.0), ("v1_sq", 0.5),
                                            ("v1_sq", 1.0)])
def test_labels_agree_with_reference_round_by_round_masking(tok, hf, template, sq_r):
  compared = 0
  for i, raw in enumerate(HAND_WRITTEN + _synthetic_conversations()):
    record = parse_record(raw, index=i)
    turns = relabel_self_questions(record, sq_r=sq_r, seed=7)
    ours = _tokenize(tok, template, turns, num_image_tokens=1)
    ids, labels = reference_labels(ours.prompt, hf, template, record.image is not None)
    assert list(ours.input_ids) == ids, raw
    assert list(ours.labels) == labels, raw
    assert ours.num_trained > 0
    compared += 1
  assert compared == len(HAND_WRITTEN) + 24


def test_plain_labels_agree_with_reference(tok, hf):
  for i, raw in enumerate(_synthetic_conversations(8)):
    scene = synthetic.Scene.from_json(raw["scene"])
    record = parse_record(synthetic.stage1_record("r", "x.png", scene), index=i)
    ours = _tokenize(tok, "plain", record.turns, num_image_tokens=1)
    ids, labels = reference_labels(ours.prompt, hf, "plain", True)
    assert (list(ours.input_ids), list(ours.labels)) == (ids, labels)


OWN_SYSTEM = "You are a terse assistant. Answer in few words."


@pytest.mark.parametrize("template", ["vicuna_v1", "v1_sq"])
def test_a_records_own_system_prompt_replaces_the_templates(tok, hf, template, tmp_path):
  raw = dict(HAND_WRITTEN[1], system=OWN_SYSTEM)
  record = parse_record(raw, index=0)
  assert record.system == OWN_SYSTEM
  turns = relabel_self_questions(record, sq_r=1.0 if template == "v1_sq" else 0.0, seed=0)
  ours = _tokenize(tok, template, turns, num_image_tokens=1, system=record.system)
  assert ours.prompt.startswith(OWN_SYSTEM + " USER: <image>\nWhat is the man holding?")
  assert get_template(template).system not in ours.prompt
  ids, labels = reference_labels(ours.prompt, hf, template, True)
  assert (list(ours.input_ids), list(ours.labels)) == (ids, labels)
  # The example builder reads the record's prompt from a JSON file; without one, the
  # template's.
  (tmp_path / "train.json").write_text(json.dumps([raw, HAND_WRITTEN[2]]))
  Image.new("RGB", (4, 4), (128, 128, 128)).save(tmp_path / raw["image"])
  built = ExampleBuilder(JsonSource(str(tmp_path / "train.json"), str(tmp_path)), tok,
                         template=template, sq_r=0.0, seed=0, image_size=8,
                         aspect_ratio="square", max_length=512, num_image_tokens=1,
                         image_token_id=IMAGE_ID, max_image_pixels=1 << 20)
  assert built.explain(0).tokens.prompt.startswith(OWN_SYSTEM + " USER:")
  assert built.explain(1).tokens.prompt.startswith(get_template(template).system + " USER:")


def test_a_records_system_prompt_must_be_text_and_needs_a_chat_template(tok):
  with pytest.raises(BadRecord) as e:
    parse_record(dict(HAND_WRITTEN[0], system=["not", "text"]), index=3)
  assert e.value.reason == "malformed_record" and "'system'" in str(e.value)
  record = parse_record(dict(HAND_WRITTEN[0], system=OWN_SYSTEM), index=0)
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "plain", record.turns, system=record.system)
  assert e.value.reason == "template_mismatch" and "system prompt" in str(e.value)


def test_relabel_is_seeded_per_record():
  raw = {"image": "a.png", "conversations": [
      {"from": "human" if k % 2 == 0 else "gpt", "value": f"turn {k}"} for k in range(40)]}
  raw["conversations"][0]["value"] = "<image>\nfirst"
  record = parse_record(raw, index=5)
  a = relabel_self_questions(record, sq_r=0.5, seed=1)
  assert a == relabel_self_questions(record, sq_r=0.5, seed=1)
  assert a != relabel_self_questions(record, sq_r=0.5, seed=2)
  assert a != relabel_self_questions(parse_record(raw, index=6), sq_r=0.5, seed=1)
  roles = [r for r, _ in a]
  assert roles[0] == USER and roles[1::2] == [ASSISTANT] * 20
  assert 3 <= roles.count(VUSER) <= 17
  assert all(r == USER for r, _ in relabel_self_questions(record, sq_r=0.0, seed=1)[::2])
  assert [r for r, _ in relabel_self_questions(record, sq_r=1.0, seed=1)][2::2] == [VUSER] * 19


def test_relabel_rate_and_text_only_records():
  hits = total = 0
  for index in range(400):
    raw = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    turns = relabel_self_questions(parse_record(raw, index=index), sq_r=0.3, seed=0)
    hits += turns[2][0] == VUSER
    total += 1
  assert 0.23 < hits / total < 0.37
  text_only = parse_record({"conversations": [
      {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
      {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}, index=0)
  assert relabel_self_questions(text_only, sq_r=1.0, seed=0) == text_only.turns


def test_image_moves_to_the_front_of_its_turn():
  record = parse_record({"image": "a.png", "conversations": [
      {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "A cat."}]},
      index=0)
  assert record.turns[0] == (USER, "<image>\nWhat is this?")


@pytest.mark.parametrize("turns,reason", [
    ([(ASSISTANT, "a"), (USER, "q")], "roles_out_of_order"),
    ([(USER, "q"), (USER, "q2"), (ASSISTANT, "a")], "roles_out_of_order"),
    ([(USER, "q"), (ASSISTANT, "a"), (USER, "q2")], "roles_out_of_order"),
    ([(VUSER, "q"), (ASSISTANT, "a")], "roles_out_of_order"),
    ([(USER, "q"), (ASSISTANT, "a"), (ASSISTANT, "b")], "roles_out_of_order"),
])
def test_bad_turn_orders_are_refused(tok, turns, reason):
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "v1_sq", turns)
  assert e.value.reason == reason


def test_vuser_needs_the_sq_template(tok):
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "vicuna_v1", [(USER, "q"), (ASSISTANT, "a"), (VUSER, "q"), (ASSISTANT, "a")])
  assert e.value.reason == "template_mismatch"


def test_plain_needs_one_image_and_one_caption(tok):
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "plain", [(USER, "q"), (ASSISTANT, "a")])
  assert e.value.reason == "template_mismatch"
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "plain", SQ_TURNS)
  assert e.value.reason == "template_mismatch"


def test_truncation(tok):
  full = _tokenize(tok, "v1_sq", SQ_TURNS)
  cut = _tokenize(tok, "v1_sq", SQ_TURNS, max_length=len(full.input_ids) - 3)
  assert len(cut.input_ids) == len(full.input_ids) - 3
  assert (cut.labels == full.labels[:len(cut.labels)]).all()
  first_answer = int(np.argmax(full.labels != IGNORE))
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "v1_sq", SQ_TURNS, max_length=first_answer)
  assert e.value.reason == "nothing_to_train"
  image_start = int(np.argmax(full.input_ids == IMAGE_ID))
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "v1_sq", SQ_TURNS, max_length=image_start + 1)
  assert e.value.reason == "image_truncated"


def test_a_tokenizer_that_merges_across_spaces_is_refused(tmp_path):
  """A SentencePiece model with a piece that straddles the end of a role tag and the start
  of an answer (here a user-defined ':▁A') admits no right mask, so the example is refused
  (the reference would train on a shifted mask)."""
  model = io.BytesIO()
  lines = ["USER: Q ASSISTANT: A cat. ASSISTANT: A dog. ASSISTANT: A bird."] * 50
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="bpe",
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[":▁A"],
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  tok = Tokenizer(tmp_path / "tokenizer.model")
  assert ":▁A" in tok.pieces(tok.encode("ASSISTANT: A cat."))
  with pytest.raises(BadRecord) as e:
    _tokenize(tok, "vicuna_v1", [(USER, "Q"), (ASSISTANT, "A cat.")])
  assert e.value.reason == "tokenization_mismatch"
  assert "Fix:" in str(e.value)


def test_bad_record_message_names_the_record():
  err = BadRecord("missing_image", "image 'a.png' not found", image_file="/data/img/a.png")
  err = err.with_context(record_id="r7", index=7, file="train.json")
  assert "record 'r7'" in str(err) and "index 7" in str(err) and "/data/img/a.png" in str(err)
  assert "train.json" in str(err)
  assert "data.image_folder" in str(err)
  assert json.dumps(str(err))
