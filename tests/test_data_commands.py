"""`show-example` and `build-dataset`, and the TFDS source read back without TensorFlow."""

import importlib.util
import json
import pickle
import sys

import numpy as np
import pytest

from sqllava_jax import cli
from sqllava_jax.config import load_config, replace
from sqllava_jax.data.pipeline import make_example_builder, make_pipeline
from sqllava_jax.demo import synthetic

CONFIG = """
data:
  source: json
  json_path: {json}
  image_folder: {images}
  tokenizer: {tokenizer}
  template: v1_sq
  sq_r: 0.5
  max_length: 320
model:
  vision: {{image_size: 28, patch_size: 14}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("cmd")
  paths = synthetic.generate(str(root / "syn"), seed=2, num_train=16, num_eval=4, image_size=32)
  records = json.load(open(paths.json(2, "train")))
  records[5]["image"] = "missing.png"
  records[9]["conversations"][0]["from"] = "robot"
  data = root / "data.json"
  data.write_text(json.dumps(records))
  config = root / "config.yaml"
  config.write_text(CONFIG.format(json=data, images=paths.image_folder, tokenizer=paths.tokenizer))
  return {"root": root, "config": str(config), "paths": paths, "json": str(data)}


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def _with_vuser(setup):
  builder = make_example_builder(_cfg(setup))
  for i in range(len(builder)):
    if i not in (5, 9) and "vuser" in [r for r, _ in builder.explain(i).turns]:
      return i
  raise AssertionError("no record relabelled")


def _cfg(setup, **changes):
  return replace(load_config(setup["config"]), **changes)


def test_show_example_json_is_what_training_sees(setup, capsys):
  index = _with_vuser(setup)
  code, out, _ = _run(capsys, "show-example", setup["config"], "--index", str(index), "--json")
  assert code == 0
  shown = json.loads(out)
  explained = make_example_builder(_cfg(setup)).explain(index)
  assert shown["prompt"] == explained.tokens.prompt
  assert shown["input_ids"] == explained.tokens.input_ids.tolist()
  assert shown["labels"] == explained.tokens.labels.tolist()
  assert "</s>VUSER: " in shown["prompt"] and shown["vuser_turns"]
  start, end = shown["image_span"]
  assert end - start == 4 and set(shown["input_ids"][start:end]) == {-200}
  batch = next(iter(make_pipeline(_cfg(setup), batch_size=16, shuffle=False,
                                  drop_remainder=False)))
  row = list(batch["example_index"]).index(index)
  n = len(shown["input_ids"])
  assert batch["input_ids"][row, :n].tolist() == shown["input_ids"]
  assert batch["labels"][row, :n].tolist() == shown["labels"]


def test_show_example_text_marks_trained_spans(setup, capsys):
  index = _with_vuser(setup)
  code, out, _ = _run(capsys, "show-example", setup["config"], "--index", str(index),
                      "--no-color")
  assert code == 0
  assert "relabelled as VUSER" in out and "<image x4>" in out
  assert "VUSER:{{ " in out and "?</s>}} ASSISTANT:[[ " in out
  assert "USER: " in out and "[[ USER" not in out


def test_show_example_reports_a_skipped_record(setup, capsys):
  code, _, err = _run(capsys, "show-example", setup["config"], "--index", "5")
  assert code == 1 and "missing_image" in err and "missing.png" in err
  code, out, _ = _run(capsys, "show-example", setup["config"], "--index", "9", "--json")
  assert code == 1 and json.loads(out)["reason"] == "malformed_record"
  code, _, err = _run(capsys, "show-example", setup["config"], "--index", "99")
  assert code == 2 and "out of range" in err


def test_build_dataset_reads_back_like_the_json(setup, capsys):
  out_dir = setup["root"] / "tfds"
  code, out, _ = _run(capsys, "build-dataset", "--json", f"train={setup['json']}",
                      "--json", f"eval={setup['paths'].json(2, 'eval')}",
                      "--images", setup["paths"].image_folder, "--out", str(out_dir))
  assert code == 0 and "train: 16 records" in out and "missing_image 1" in out
  tfds_dir = out.split("data.tfds_dir=")[1].split()[0]
  from_json = _cfg(setup)
  from_tfds = replace(from_json, **{"data.source": "tfds", "data.tfds_dir": str(out_dir),
                                    "data.json_path": ""})
  a = iter(make_pipeline(from_json, batch_size=3))
  b = iter(make_pipeline(from_tfds, batch_size=3))
  batches_a, batches_b = list(a), list(b)
  assert len(batches_a) == len(batches_b) == 14 // 3
  for x, y in zip(batches_a, batches_b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  assert a.skipped == b.skipped == {"missing_image": 1, "malformed_record": 1}
  shipped = pickle.loads(pickle.dumps(make_example_builder(from_tfds)))  # as to a worker
  np.testing.assert_array_equal(shipped(0)["input_ids"],
                                make_example_builder(from_json)(0)["input_ids"])
  eval_cfg = replace(from_tfds, **{"data.tfds_dir": tfds_dir, "data.split": "eval"})
  assert len(make_example_builder(eval_cfg)) == 4
  assert "tensorflow" not in sys.modules
  assert importlib.util.find_spec("tensorflow") is None
  code, _, _ = _run(capsys, "show-example", setup["config"], "data.source=tfds",
                    f"data.tfds_dir={tfds_dir}", "--index", "0", "--json")
  assert code == 0


def test_build_dataset_refuses_to_overwrite(setup, capsys, tmp_path):
  args = ["build-dataset", "--json", setup["json"], "--images", setup["paths"].image_folder,
          "--out", str(tmp_path)]
  assert _run(capsys, *args)[0] == 0
  with pytest.raises(ValueError, match="already holds"):
    cli.main(args)
