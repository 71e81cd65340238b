"""Sequence packing: packed rows hold whole examples (own positions, own images), train
exactly like the same examples one at a time, resume exactly, and still count bad records."""

import functools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from sqllava_jax.config import MeshConfig, replace
from sqllava_jax.data import images
from sqllava_jax.data.examples import collate
from sqllava_jax.data.pipeline import make_example_builder, make_pipeline
from sqllava_jax.demo import synthetic
from sqllava_jax.models.sqllava import SQLLaVA, check_image_placeholders
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training.step import forward_loss
from sqllava_jax.training.trainer import Trainer
from tests.train_helpers import metrics, tiny_cfg

PACKED = ("data.packing=true", "data.max_length=1024", "data.max_images_per_row=4",
          "data.shuffle=false", "model.llm.max_position_embeddings=1024")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, data_dir):
  """(config, builder, first packed batch of 2 rows)."""
  cfg = tiny_cfg(tmp_path_factory.mktemp("run"), data_dir, *PACKED)
  batch = next(iter(make_pipeline(cfg, batch_size=2, num_epochs=1)))
  return cfg, make_example_builder(cfg), batch


def segments(batch, row):
  """(segment id, example index) of the examples in a packed row, in order."""
  ids = [s for s in np.unique(batch["segment_ids"][row]) if s > 0]
  return list(zip(ids, [int(e) for e in batch["example_index"][row] if e >= 0]))


def test_packed_rows_hold_whole_examples(packed):
  cfg, builder, batch = packed
  assert batch["pixel_values"].shape[:2] == (2, 4) and batch["has_image"].shape == (2, 4)
  for row in range(2):
    found = segments(batch, row)
    assert len(found) >= 2, f"row {row} holds one example: nothing was packed"
    slot = 0
    for seg, index in found:
      ex = builder(index)
      at = batch["segment_ids"][row] == seg
      np.testing.assert_array_equal(batch["input_ids"][row][at], ex["input_ids"])
      np.testing.assert_array_equal(batch["labels"][row][at], ex["labels"])
      np.testing.assert_array_equal(batch["positions"][row][at], np.arange(at.sum()))
      if ex["pixels"] is not None:  # the row's k-th image is its k-th image example's
        np.testing.assert_array_equal(batch["pixel_values"][row, slot],
                                      images.normalize(ex["pixels"]), err_msg=f"slot {slot}")
        slot += 1
    assert batch["has_image"][row].sum() == slot
    np.testing.assert_array_equal(batch["attention_mask"][row], batch["segment_ids"][row] > 0)
  check_image_placeholders(batch["input_ids"], batch["has_image"], cfg.model.num_image_tokens,
                           cfg.model.image_token_id)


def _alone(cfg, builder, index, length):
  """The example as a batch of its own: one row right-padded to `length` (one shape for
  every example, so the loss compiles once), one image."""
  ex = builder(index)
  assert len(ex["input_ids"]) < length
  return collate([ex], batch_size=1, length=length,
                 image_size=cfg.model.vision.image_size, pad_id=builder.tokenizer.pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "packed"))
def _value_and_grad(graphdef, params, arrays, *, packed):
  fn = lambda p: forward_loss(graphdef, p, arrays, None, 7, packed=packed)
  return jax.value_and_grad(fn, has_aux=True)(params)


def _loss_and_grads(graphdef, params, batch, *, packed):
  """(sum of token losses, trained tokens, gradient of the sum) of one batch."""
  keys = ("input_ids", "labels", "positions", "segment_ids", "pixel_values")
  arrays = {k: jnp.asarray(batch[k]) for k in keys}
  (total, count), grads = _value_and_grad(graphdef, params, arrays, packed=packed)
  return float(total), float(count), grads


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_packed_loss_equals_the_examples_one_at_a_time(packed, impl):
  cfg, builder, batch = packed
  cfg = replace(cfg, **{"model.attention_impl": impl, "model.attention_block_size": 64})
  graphdef, state = nnx.split(SQLLaVA(cfg.model, rngs=nnx.Rngs(0)))
  # Shifted away from the initialisation so the (zero-initialised) adapters carry signal.
  params = jax.tree.map(lambda p: p + 0.01 * jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(
      p.shape), nnx.to_pure_dict(state))
  total, count, grads = _loss_and_grads(graphdef, params, batch, packed=True)
  length = batch["input_ids"].shape[1] + 3
  alone = [_loss_and_grads(graphdef, params, _alone(cfg, builder, index, length), packed=False)
           for row in range(2) for _, index in segments(batch, row)]
  assert count == sum(c for _, c, _ in alone)
  # The loss is normalised over trained tokens: the packed mean is the token-weighted mean.
  np.testing.assert_allclose(total / count, sum(t for t, _, _ in alone) / count, rtol=1e-5)
  # Gradients: the packed sum over ~1000 positions against a sum of per-example sums, float32
  # accumulated in another order, hence looser than the loss.
  summed = jax.tree.map(lambda *g: sum(g), *[g for _, _, g in alone])
  flat_p, flat_a = jax.tree.leaves_with_path(grads), jax.tree.leaves(summed)
  for (path, g), expected in zip(flat_p, flat_a):
    np.testing.assert_allclose(g, expected, rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def mixed(packed, data_dir, tmp_path_factory):
  """A packing config over 12 good records with a missing image inside and a malformed
  record last (bad records after the last good one must still be counted)."""
  cfg, _, _ = packed
  paths = synthetic.dataset_paths(data_dir)
  records = json.load(open(paths.json(2, "train")))[:12]
  missing = dict(records[0], id="bad-missing", image="nope.png")
  records = records[:5] + [missing] + records[5:] + [{"id": "bad-malformed", "conversations": "x"}]
  path = tmp_path_factory.mktemp("mixed") / "mixed.json"
  path.write_text(json.dumps(records))
  return replace(cfg, **{"data.source": "json", "data.json_path": str(path),
                         "data.image_folder": paths.image_folder,
                         "data.tokenizer": paths.tokenizer})


def test_bad_records_are_counted_when_packing(mixed):
  it = iter(make_pipeline(mixed, batch_size=2, num_epochs=1, drop_remainder=False))
  seen = np.concatenate([b["example_index"].ravel() for b in it])
  assert it.skipped == {"missing_image": 1, "malformed_record": 1}
  assert sorted(seen[seen >= 0].tolist()) == [i for i in range(14) if i not in (5, 13)]
  assert it.examples_seen == 12


def test_packed_pipeline_resumes_exactly(mixed, tmp_path):
  cfg = replace(mixed, **{"data.max_length": 512})  # more rows, so the resume lands mid-epoch
  it = iter(make_pipeline(cfg, batch_size=2, num_epochs=2))
  next(it)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = [next(it) for _ in range(4)]
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), item=iter(make_pipeline(cfg, batch_size=2, num_epochs=2)))
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert restored.skipped == it.skipped and restored.examples_seen == it.examples_seen


def test_trainer_trains_on_packed_rows(tmp_path, data_dir):
  mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="packing needs train.max_steps"):
    Trainer(tiny_cfg(tmp_path, data_dir, *PACKED, "train.max_steps=0"), mesh=mesh)
  cfg = tiny_cfg(tmp_path, data_dir, *PACKED, "train.max_steps=3", "train.save_every=1000",
                 "train.per_device_batch_size=1")
  trainer = Trainer(cfg, mesh=mesh)
  assert trainer.program.abstract_batch(1, 1024)["pixel_values"].shape == (1, 1, 4, 32, 32, 3)
  first = next(iter(make_pipeline(cfg, batch_size=1, num_epochs=0)))
  trainer.run()
  logged = metrics(tmp_path)
  # The last token of each example predicts nothing (the next one starts another example).
  ends = np.diff(first["segment_ids"][0]) != 0
  expected = int(((first["labels"][0, 1:] != -100) & ~ends).sum())
  assert logged[0]["trained_tokens"] == expected
  assert all(np.isfinite(m["loss"]) for m in logged) and logged[-1]["loss"] < logged[0]["loss"]
