"""The tokenizer wrapper against transformers' LlamaTokenizer on the same tokenizer.model."""

import pickle

import pytest
from data_helpers import (
  IMAGE_ID,
  hf_llama_tokenizer,
  hf_llama_tokenizer_v4_layout,
  reference_image_tokenize,
  train_tiny_tokenizer,
)

from sqllava_jax.data.templates import ASSISTANT, USER, VUSER, build_prompt
from sqllava_jax.data.tokenizer import Tokenizer

CONVERSATIONS = {
    "plain": [(USER, "<image>\nDescribe the image briefly."),
              (ASSISTANT, "A dog runs across a green field.")],
    "vicuna_v1": [(USER, "<image>\nWhat is in the picture?"), (ASSISTANT, "A cat on a sofa."),
                  (USER, "How many people are there?"), (ASSISTANT, "There are 2 people.")],
    "v1_sq": [(USER, "<image>\nWhat is in the picture?"), (ASSISTANT, "A cat on a sofa."),
              (VUSER, "What colour is the sofa?"), (ASSISTANT, "The sofa is red."),
              (USER, "Is it raining?"), (ASSISTANT, "Yes, it is.")],
}
TEXT_ONLY = [(USER, "How many people are there?"), (ASSISTANT, "There are 2 people.")]
ODD_TEXTS = ["", " ", "  leading spaces", "tab\there", "a\n\nb  \n c", "é ü 中文 🙂",
             "x </s> y", "hi<s>there<unk>x", "</s></s>", "A1</s>VUSER: Q2</s> ASSISTANT: A2</s>"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  train_tiny_tokenizer(str(directory))
  return str(directory)


@pytest.fixture(scope="module")
def tok(model_dir):
  return Tokenizer(f"{model_dir}/tokenizer.model")


@pytest.fixture(scope="module")
def hf_v4(model_dir):
  return hf_llama_tokenizer_v4_layout(model_dir)


@pytest.fixture(scope="module")
def hf_v5(model_dir):
  return hf_llama_tokenizer(model_dir)


def _prompts():
  for name, turns in CONVERSATIONS.items():
    yield name, build_prompt(name, turns)
    yield f"{name}-generation", build_prompt(name, turns[:-1], next_role=ASSISTANT)
  yield "v1_sq-self-question", build_prompt("v1_sq", CONVERSATIONS["v1_sq"][:2], next_role=VUSER)
  yield "vicuna_v1-text-only", build_prompt("vicuna_v1", TEXT_ONLY)


def test_special_ids_follow_llama_layout(tok):
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  assert tok.vocab_size > 259


@pytest.mark.parametrize("name,prompt", list(_prompts()))
def test_prompt_ids_match_legacy_llama_tokenizer(tok, hf_v4, name, prompt):
  ours = tok.encode_prompt(prompt, num_image_tokens=1, image_token_id=IMAGE_ID)
  assert ours == reference_image_tokenize(prompt, hf_v4), name


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_text_matches_legacy_llama_tokenizer(tok, hf_v4, text):
  assert [tok.bos_id] + tok.encode(text) == hf_v4(text).input_ids


@pytest.mark.parametrize("name,prompt", list(_prompts()))
def test_prompt_ids_match_transformers5_where_layouts_agree(tok, hf_v5, name, prompt):
  """transformers 5's `legacy=True` tokenizer differs from the reference's only on a piece
  that starts with a space right after a special token (v1_sq's `</s> ASSISTANT:`): there it
  encodes one '▁' fewer. Everywhere else the ids must be equal."""
  ours = tok.encode_prompt(prompt, num_image_tokens=1, image_token_id=IMAGE_ID)
  theirs = reference_image_tokenize(prompt, hf_v5)
  if "</s> " not in prompt:
    assert ours == theirs, name
    return
  assert ours != theirs
  pieces = prompt.replace("<image>", "</s>").split("</s>")
  for piece in pieces:
    if piece and not piece.startswith(" "):
      assert tok.encode(piece) == hf_v5(piece).input_ids[1:], piece
    elif piece:
      assert tok.encode(piece) == hf_v5("▁" + piece).input_ids[1:], piece


def test_after_eos_words_get_the_dummy_prefix(tok):
  pieces = tok.pieces(tok.encode("A1</s>VUSER: Q"))
  i = pieces.index("</s>")
  assert pieces[i + 1].startswith("▁"), pieces


def test_image_expands_to_placeholders(tok):
  ids = tok.encode_prompt("USER: <image>\nHi ASSISTANT:", num_image_tokens=576, image_token_id=-200)
  assert ids.count(-200) == 576
  start = ids.index(-200)
  assert ids[start:start + 576] == [-200] * 576
  assert ids[0] == tok.bos_id
  assert "<image>" not in tok.decode(ids)


def test_decode_round_trip(tok):
  text = "USER: What is in the picture? ASSISTANT: A cat."
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([tok.bos_id] + tok.encode("A cat.") + [tok.eos_id]) == "A cat."
  assert tok.decode(tok.encode("A cat.") + [tok.eos_id], skip_special_tokens=False) == "A cat.</s>"


def test_pickles_without_the_file(tok, tmp_path):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("What colour is the sofa?") == tok.encode("What colour is the sofa?")


def test_missing_model_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer"):
    Tokenizer(tmp_path / "nope.model")
