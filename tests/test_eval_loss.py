"""Teacher-forced loss: against transformers' loss, and the perplexity command end to end."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sqllava_jax import cli
from sqllava_jax.convert.hf import llama_from_hf
from sqllava_jax.data.labels import IGNORE_INDEX
from sqllava_jax.data.pipeline import make_example_builder
from sqllava_jax.training.loss import next_token_loss
from tests.eval_helpers import make_tiny_run, tiny_config
from tests.hf_fixtures import save_llama, tiny_llama_config


@pytest.mark.parametrize("chunk", [7, 64])  # 7: the last chunk is padded
def test_next_token_loss_matches_transformers(tmp_path, chunk):
  hf = save_llama(tmp_path, tiny_llama_config(), seed=3)
  ours = llama_from_hf(str(tmp_path))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, size=(3, 40))
  mask = np.ones_like(ids)
  mask[1, 25:] = 0  # right padding
  mask[2, 33:] = 0
  labels = np.where(mask == 1, ids, IGNORE_INDEX)
  labels[:, :10] = IGNORE_INDEX  # a prompt without loss
  with torch.no_grad():
    want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              labels=torch.from_numpy(labels)).loss.item()
  positions = np.broadcast_to(np.arange(40), ids.shape)
  hidden, _ = ours.decode(ours.embed(jnp.asarray(ids)), jnp.asarray(positions),
                          segment_ids=jnp.asarray(mask))
  total, count = next_token_loss(hidden, ours.output_kernel(), jnp.asarray(labels), chunk=chunk)
  assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
  np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_tiny_run(str(tmp_path_factory.mktemp("loss_run")))


def perplexity(run, out, batch, capsys):
  argv = ["eval", "--ckpt", run.ckpt, "--task", "perplexity", "--data", run.data.json(2, "eval"),
          "--images", run.data.image_folder, "--out", str(out), "--batch-size", str(batch),
          "--no-progress"]
  assert cli.main(argv) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perplexity_counts_every_trained_token(run, tmp_path, capsys):
  cfg = tiny_config(run.data.root, f"data.tokenizer={run.data.tokenizer}", "data.source=json",
                    f"data.json_path={run.data.json(2, 'eval')}",
                    f"data.image_folder={run.data.image_folder}")
  builder = make_example_builder(cfg)
  trained = sum(int((builder(i)["labels"] != IGNORE_INDEX).sum()) for i in range(len(builder)))
  # 6 records in a batch of 8: padding rows must add no tokens.
  a = perplexity(run, tmp_path / "a", 8, capsys)
  assert a["tokens"] == trained
  assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
  assert 0 < a["loss"] < 3 * math.log(400), "random model: about log(vocab)"
