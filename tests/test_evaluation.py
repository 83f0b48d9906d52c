"""Evaluator input paths: length bucketing and the in-memory eval cache."""

import jax
import numpy as np
import optax
import pytest

from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.models import bert4rec
from recsys_jax.seqio_ext import batching
from tests.helpers import tiny_data  # noqa: F401  pylint: disable=unused-import

N, L, B = 40, 16, 8


def _eval_batches(num_users: int, seed: int = 0):
  """Right-padded eval rows (history + [MASK]) in batches of B, `valid`."""
  rng = np.random.default_rng(seed)
  rows_ids, rows_targets = [], []
  for _ in range(num_users):
    n = int(rng.integers(1, L))  # history items, then the [MASK]
    ids = np.zeros(L, np.int32)
    ids[:n] = rng.integers(1, N + 1, n)
    ids[n] = N + 1
    tgt = np.zeros(L, np.int32)
    tgt[n] = rng.integers(1, N + 1)
    rows_ids.append(ids)
    rows_targets.append(tgt)
  out = []
  for s in range(0, num_users, B):
    ids = np.stack(rows_ids[s:s + B])
    tgt = np.stack(rows_targets[s:s + B])
    valid = np.ones(len(ids), np.float32)
    pad = B - len(ids)
    out.append({
        "item_ids": np.pad(ids, ((0, pad), (0, 0))),
        "targets": np.pad(tgt, ((0, pad), (0, 0))),
        "valid": np.pad(valid, (0, pad))})
  return out


def _rows(batches):
  """{(ids without padding, target): count} over valid rows."""
  out = {}
  for b in batches:
    for ids, tgt, v in zip(b["item_ids"], b["targets"], b["valid"]):
      if v > 0:
        key = (tuple(int(i) for i in ids if i), int(tgt.max()))
        out[key] = out.get(key, 0) + 1
  return out


def test_length_bucketed_keeps_every_row_and_cuts_only_padding():
  batches = _eval_batches(61)  # 8 batches, the last one partial
  bucketed = list(evaluation.length_bucketed(batches, multiple=4, window=3))
  assert len(bucketed) == len(batches)
  assert _rows(bucketed) == _rows(batches)
  for b in bucketed:
    width = b["item_ids"].shape[1]
    assert width % 4 == 0 or width == L
    assert b["targets"].shape == b["item_ids"].shape
    lengths = (b["item_ids"] != 0).sum(1)
    assert lengths.max() <= width < lengths.max() + 4
    assert b["item_ids"].shape[0] == B
    # Valid rows first, then zero padding rows.
    v = b["valid"]
    assert (np.diff(v) <= 0).all()
    assert not b["item_ids"][v == 0].any()
  # Sorted within each window: widths never decrease inside one.
  widths = [b["item_ids"].shape[1] for b in bucketed]
  for w in range(0, len(widths), 3):
    assert widths[w:w + 3] == sorted(widths[w:w + 3])
  assert min(widths) < L


@pytest.mark.parametrize("exclude_history", [False, True])
def test_bucketed_evaluation_equals_padded(exclude_history):
  config = bert4rec.Bert4RecConfig(num_items=N, max_len=L, hidden=16,
                                   num_layers=2, num_heads=2, mlp_dim=32,
                                   positions_from_end=False)
  model = model_lib.Bert4RecModel(config)
  mesh = partitioning.make_mesh(1)
  rules = partitioning.DATA_PARALLEL_RULES
  state, _, _ = trainer.init_state(model, optax.identity(),
                                   jax.random.PRNGKey(3), mesh, rules)
  batches = _eval_batches(45, seed=1)
  results = {}
  for buckets in (False, True):
    cfg = evaluation.EvalConfig(batch_size=B, exclude_history=exclude_history,
                                length_buckets=buckets, bucket_window=2,
                                ks=(1, 5, 10))
    ev = evaluation.Evaluator(model, mesh, rules, cfg)
    results[buckets] = ev.evaluate(state.params, batches)
  assert results[True]["num_users"] == results[False]["num_users"] == 45
  for k, v in results[False].items():
    if isinstance(v, float):
      assert results[True][k] == pytest.approx(v, abs=1e-9), k
    else:
      assert results[True][k] == v, k


def test_eval_config_rejects_bad_bucket_settings():
  with pytest.raises(ValueError, match="bucket_multiple"):
    evaluation.EvalConfig(bucket_multiple=0)


def test_eval_batches_are_cached_after_a_full_pass(tiny_data, monkeypatch):
  data = input_pipeline.SequenceData("test_eval_cache", tiny_data, max_len=12)
  calls = []
  original = batching.eval_batches

  def counting(*args, **kwargs):
    calls.append(args[1])
    return original(*args, **kwargs)
  monkeypatch.setattr(batching, "eval_batches", counting)
  partial = data.eval_batches("validation", 32)
  next(partial)  # an unfinished pass is not cached
  del partial
  first = list(data.eval_batches("validation", 32))
  second = list(data.eval_batches("validation", 32))
  assert calls == ["validation", "validation"]
  assert len(first) == len(second) > 1
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  list(data.eval_batches("test", 32))
  assert calls[-1] == "test"
  # Over the byte budget: nothing is kept, every pass reads the pipeline.
  small = input_pipeline.SequenceData("test_eval_nocache", tiny_data,
                                      max_len=12, eval_cache_bytes=100)
  calls.clear()
  list(small.eval_batches("validation", 32))
  list(small.eval_batches("validation", 32))
  assert calls == ["validation", "validation"]
