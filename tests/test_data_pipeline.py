"""The Grain pipeline: batch format, determinism, sharding, resume, workers, bad records."""

import json
import logging
import os

import grain
import numpy as np
import pytest
from etils import epath

from sqllava_jax.config import Config, replace
from sqllava_jax.data import images
from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.pipeline import make_example_builder, make_pipeline
from sqllava_jax.demo import synthetic

IMAGE_SIZE = 28  # vision tower input; patch 14 -> 4 image tokens
NUM_IMAGE_TOKENS = 4
GOOD = 24  # good records in the mixed file: 20 image records, 4 text-only

BAD_RECORDS = {
    "missing_image": {"image": "nope.png"},
    "corrupt_image": {"image": "corrupt.png"},
    "empty_image_file": {"image": "zero.png"},
    "unsafe_image_path": {"image": "../outside.png"},
    "malformed_record": {"conversations": "hello"},
    "image_without_image_token": {"drop_image_token": True},
    "image_token_without_image": {"image": None},
    "roles_out_of_order": {"swap_roles": True},
    "empty_turn": {"empty_turn": True},
}


def _bad(base: dict, how: dict) -> dict:
  record = json.loads(json.dumps(base))
  if "image" in how:
    if how["image"] is None:
      del record["image"]
    else:
      record["image"] = how["image"]
  if "conversations" in how:
    record["conversations"] = how["conversations"]
  turns = record["conversations"]
  if how.get("drop_image_token"):
    turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
  if how.get("swap_roles"):
    turns[2]["from"], turns[3]["from"] = "gpt", "human"
  if how.get("empty_turn"):
    turns[2]["value"] = "  "
  return record


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  paths = synthetic.generate(str(root / "synthetic"), seed=3, num_train=20, num_eval=4,
                             image_size=32, vocab_size=512)
  records = json.load(open(paths.json(2, "train")))
  for r in records:
    while len(r["conversations"]) < 4:  # every record has a third turn to break
      r["conversations"] += [{"from": "human", "value": "How many shapes are there?"},
                             {"from": "gpt", "value": "two"}]
  text_only = [{"id": f"text-{i}", "conversations": [
      {"from": "human", "value": "What is two and two?"}, {"from": "gpt", "value": "four"},
      {"from": "human", "value": "And one more?"}, {"from": "gpt", "value": "five"}]}
      for i in range(4)]
  bad = [dict(_bad(records[k], how), id=f"bad-{reason}")
         for k, (reason, how) in enumerate(BAD_RECORDS.items())]
  mixed = records + text_only
  for k, record in enumerate(bad):  # spread the bad records through the file
    mixed.insert(3 * k + 1, record)
  image_dir = paths.image_folder
  (epath.Path(image_dir) / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (epath.Path(image_dir) / "zero.png").write_bytes(b"")
  (root / "outside.png").write_bytes(
      open(os.path.join(image_dir, records[0]["image"]), "rb").read())
  with open(root / "mixed.json", "w") as f:
    json.dump(mixed, f)
  with open(root / "good.json", "w") as f:
    json.dump(records + text_only, f)
  return {"root": str(root), "images": image_dir, "tokenizer": paths.tokenizer,
          "mixed": str(root / "mixed.json"), "good": str(root / "good.json"),
          "num_mixed": len(mixed)}


def _cfg(data_dir, json_name="good", **overrides):
  changes = {"data.source": "json", "data.json_path": data_dir[json_name],
             "data.image_folder": data_dir["images"], "data.tokenizer": data_dir["tokenizer"],
             "data.template": "v1_sq", "data.sq_r": 0.5, "data.max_length": 320,
             "data.seed": 1, "model.vision.image_size": IMAGE_SIZE, "model.vision.patch_size": 14}
  changes.update(overrides)
  return replace(Config(), **changes)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format(data_dir):
  cfg = _cfg(data_dir)
  assert cfg.model.num_image_tokens == NUM_IMAGE_TOKENS
  it = iter(make_pipeline(cfg, batch_size=7, shuffle=False))
  batches = list(it)
  assert len(batches) == GOOD // 7
  b = batches[-1]  # rows 14..20: image records and text-only ones together
  assert b["input_ids"].shape == (7, 320) and b["input_ids"].dtype == np.int32
  for key in ("labels", "attention_mask", "positions", "segment_ids"):
    assert b[key].shape == (7, 320) and b[key].dtype == np.int32, key
  assert b["pixel_values"].shape == (7, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert b["pixel_values"].dtype == np.float32
  assert b["has_image"].dtype == bool and b["example_index"].dtype == np.int64
  np.testing.assert_array_equal(b["example_index"], np.arange(14, 21))
  np.testing.assert_array_equal(b["has_image"], [True] * 6 + [False])
  lengths = b["attention_mask"].sum(1)
  for row in range(7):
    n = lengths[row]
    assert (b["attention_mask"][row, :n] == 1).all() and (b["attention_mask"][row, n:] == 0).all()
    np.testing.assert_array_equal(b["positions"][row, :n], np.arange(n))
    np.testing.assert_array_equal(b["segment_ids"][row], b["attention_mask"][row])
    assert (b["input_ids"][row, n:] == 0).all() and (b["labels"][row, n:] == -100).all()
    assert b["input_ids"][row, 0] == 1
    image_positions = (b["input_ids"][row] == -200).sum()
    assert image_positions == (NUM_IMAGE_TOKENS if b["has_image"][row] else 0)
    assert (b["labels"][row][b["input_ids"][row] == -200] == -100).all()
    assert (b["labels"][row] != -100).sum() > 0
  assert not b["pixel_values"][6].any()  # text-only row: zeros
  assert b["pixel_values"][0].std() > 0.1


def test_matches_the_example_builder(data_dir):
  cfg = _cfg(data_dir)
  builder = make_example_builder(cfg)
  b = next(iter(make_pipeline(cfg, batch_size=4, shuffle=True)))
  for row, index in enumerate(b["example_index"]):
    ex = builder.explain(int(index))
    n = len(ex.tokens.input_ids)
    np.testing.assert_array_equal(b["input_ids"][row, :n], ex.tokens.input_ids)
    np.testing.assert_array_equal(b["labels"][row, :n], ex.tokens.labels)
    if ex.pixels is not None:
      mean, std = np.asarray((0.48145466, 0.4578275, 0.40821073)), np.asarray(
          (0.26862954, 0.26130258, 0.27577711))
      np.testing.assert_allclose(b["pixel_values"][row], (ex.pixels / 255.0 - mean) / std,
                                 rtol=1e-5, atol=1e-5)


def test_shuffle_epochs_and_shards(data_dir):
  cfg = _cfg(data_dir, **{"data.num_epochs": 2})
  shards = []
  for process in range(2):
    it = iter(make_pipeline(cfg, batch_size=3, process_index=process, process_count=2))
    shards.append(np.concatenate([b["example_index"] for b in it]))
  assert len(shards[0]) == len(shards[1]) == GOOD
  both = np.concatenate(shards)
  assert sorted(both.tolist()) == sorted(list(range(GOOD)) * 2)
  again = np.concatenate([b["example_index"] for b in iter(
      make_pipeline(cfg, batch_size=3, process_index=0, process_count=2))])
  np.testing.assert_array_equal(shards[0], again)
  other_seed = np.concatenate([b["example_index"] for b in iter(make_pipeline(
      _cfg(data_dir, **{"data.num_epochs": 2, "data.seed": 2}), batch_size=3,
      process_index=0, process_count=2))])
  assert (other_seed != shards[0]).any()
  single = np.concatenate([b["example_index"] for b in iter(
      make_pipeline(cfg, batch_size=4, process_index=0, process_count=1))])
  first, second = single[:GOOD], single[GOOD:]
  assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(GOOD))
  assert (first != second).any()  # each epoch is shuffled differently


def test_forever_and_buckets(data_dir):
  cfg = _cfg(data_dir, **{"data.num_epochs": 0, "data.length_buckets": [200, 260, 300]})
  ds = make_pipeline(cfg, batch_size=4)
  assert ds.num_records is None
  it = iter(ds)
  lengths = set()
  for _ in range(15):  # 60 rows: past the end of one epoch
    b = next(it)
    lengths.add(b["input_ids"].shape[1])
    assert b["attention_mask"].sum(1).max() <= b["input_ids"].shape[1]
  assert lengths <= {200, 260, 300, 320} and len(lengths) >= 1


def test_keep_remainder_pads_with_empty_rows(data_dir):
  it = iter(make_pipeline(_cfg(data_dir), batch_size=5, shuffle=False, drop_remainder=False))
  batches = list(it)
  assert len(batches) == 5
  last = batches[-1]
  np.testing.assert_array_equal(last["example_index"], [20, 21, 22, 23, -1])
  assert last["attention_mask"][4].sum() == 0 and (last["labels"][4] == -100).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_next_batch(data_dir, num_workers):
  cfg = _cfg(data_dir, **{"data.num_epochs": 2})
  ds = make_pipeline(cfg, batch_size=3, num_workers=num_workers)
  it = iter(ds)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 6)
  it.close()
  fresh = iter(make_pipeline(cfg, batch_size=3, num_workers=num_workers))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 6), expected)
  fresh.close()


def test_resume_through_grain_checkpoint_handler(data_dir, tmp_path):
  cfg = _cfg(data_dir, "mixed", **{"data.num_epochs": 2})
  it = iter(make_pipeline(cfg, batch_size=4))
  _take(it, 3)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  skipped_at_save = it.skipped
  assert skipped_at_save  # the mixed file has bad records early on
  expected = _take(it, 4)
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), item=iter(make_pipeline(cfg, batch_size=4)))
  assert restored.skipped == skipped_at_save
  _assert_batches_equal(_take(restored, 4), expected)
  assert restored.skipped == it.skipped


def test_bad_records_are_skipped_and_counted(data_dir, caplog):
  cfg = _cfg(data_dir, "mixed", **{"data.log_first_bad": 3})
  with caplog.at_level(logging.WARNING, logger="sqllava_jax.data"):
    it = iter(make_pipeline(cfg, batch_size=4, shuffle=False, drop_remainder=False))
    seen = np.concatenate([b["example_index"] for b in it])
  assert it.skipped == {reason: 1 for reason in BAD_RECORDS}
  assert len(seen[seen >= 0]) == GOOD
  assert it.examples_seen == GOOD
  summary = it.skip_summary()
  assert summary.startswith(f"skipped {len(BAD_RECORDS)} records") and "missing_image 1" in summary
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 3
  assert "record 'bad-missing_image'" in warnings[0] and "nope.png" in warnings[0]
  assert "mixed.json" in warnings[1] and "Fix:" in warnings[1]


def test_strict_fails_on_the_first_bad_record(data_dir):
  cfg = _cfg(data_dir, "mixed", **{"data.strict": True})
  it = iter(make_pipeline(cfg, batch_size=4, shuffle=False))
  with pytest.raises(BadRecord) as e:
    list(it)
  assert e.value.reason == "missing_image"
  assert "record 'bad-missing_image'" in str(e.value) and "Fix:" in str(e.value)


def test_workers_see_every_record_and_report_skips(data_dir):
  cfg = _cfg(data_dir, "mixed")
  it = iter(make_pipeline(cfg, batch_size=4, num_workers=2, drop_remainder=False))
  batches = list(it)
  it.close()
  seen = np.concatenate([b["example_index"] for b in batches])
  builder = make_example_builder(cfg)
  for row, index in enumerate(batches[0]["example_index"]):  # images came through shared memory
    pixels = builder(int(index))["pixels"]
    expected = 0.0 if pixels is None else images.normalize(pixels)
    np.testing.assert_array_equal(batches[0]["pixel_values"][row], expected)
  assert sorted(seen[seen >= 0].tolist()) == sorted(
      i for i in range(data_dir["num_mixed"]) if i not in _bad_indices(data_dir))
  assert it.skipped == {reason: 1 for reason in BAD_RECORDS}


def _bad_indices(data_dir):
  return {i for i, r in enumerate(json.load(open(data_dir["mixed"])))
          if str(r.get("id", "")).startswith("bad-")}


def test_json_lines_with_a_broken_line(data_dir, tmp_path):
  records = json.load(open(data_dir["good"]))[:6]
  lines = [json.dumps(r) for r in records]
  lines.insert(2, '{"id": "broken", "conversations": [')
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  it = iter(make_pipeline(_cfg(data_dir, **{"data.json_path": str(path)}), batch_size=2,
                          shuffle=False))
  seen = np.concatenate([b["example_index"] for b in it])
  np.testing.assert_array_equal(seen, [0, 1, 3, 4, 5, 6])
  assert it.skipped == {"malformed_record": 1}


def test_a_source_with_no_good_record_stops_with_the_reason(data_dir, tmp_path, monkeypatch):
  from sqllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline, "MAX_SKIPS_IN_A_ROW", 20)
  image_records = tmp_path / "images_only.json"
  image_records.write_text(json.dumps(json.load(open(data_dir["good"]))[:10]))
  cfg = _cfg(data_dir, **{"data.num_epochs": 0, "data.json_path": str(image_records),
                          "data.image_folder": str(tmp_path)})  # no image is there
  it = iter(make_pipeline(cfg, batch_size=2))
  with pytest.raises(ValueError, match="in a row were skipped.*missing_image"):
    next(it)


@pytest.mark.parametrize("changes,message", [
    ({"data.template": "vicuna_v1", "data.sq_r": 0.5}, "only template v1_sq"),
    ({"data.source": "synthetic", "data.template": "v1_sq", "data.synthetic.stage": 1},
     "needs template plain"),
    ({"data.length_buckets": [4096]}, "length_buckets"),
    ({"data.num_threads": -1}, "num_threads"),
])
def test_config_checks(changes, message):
  from sqllava_jax.config import load_config  # pylint: disable=g-import-not-at-top
  overrides = [f"{k}={json.dumps(v)}" for k, v in changes.items()]
  with pytest.raises(ValueError, match=message):
    load_config(None, overrides)


def test_thread_count_does_not_change_the_batches(data_dir):
  batches = [list(iter(make_pipeline(_cfg(data_dir, **{"data.num_threads": n}), batch_size=5)))
             for n in (0, 1, 3)]
  _assert_batches_equal(batches[0], batches[1])
  _assert_batches_equal(batches[0], batches[2])
