"""Cold-item protocol: items removed from training only (cold_items.py)."""

import numpy as np
import pytest
import tensorflow as tf

from recsys_jax.input_pipeline import cold_items
from recsys_jax.input_pipeline import sequence_data
from recsys_jax.seqio_ext import preprocessors
from tests.helpers import tiny_data  # noqa: F401  pylint: disable=unused-import

L = 12


def test_cold_items_is_a_fixed_seeded_subset():
  got = cold_items.cold_items(150, 0.1, seed=3)
  assert len(got) == 15
  assert (np.diff(got) > 0).all() and got[0] >= 1 and got[-1] <= 150
  np.testing.assert_array_equal(got, cold_items.cold_items(150, 0.1, seed=3))
  want = np.sort(np.random.default_rng([3, 7]).choice(150, 15, replace=False)
                 + 1)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, cold_items.cold_items(150, 0.1, seed=4))
  assert len(cold_items.cold_items(150, 0.0, seed=3)) == 0
  assert len(cold_items.cold_items(7, 0.5, seed=0)) == 4  # round(3.5)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_fraction_out_of_range_is_refused(fraction):
  with pytest.raises(ValueError, match="0 <= fraction < 1"):
    cold_items.cold_items(10, fraction, 0)


def test_remove_items_batch_by_hand():
  ex = {
      "user_id": tf.constant([b"a", b"b", b"c"]),
      "item_ids": tf.ragged.constant([[1, 2, 3, 2], [2, 5], [4, 5, 6]],
                                     tf.int32),
      "critiques": tf.ragged.constant(
          [[b"a1", b"a2", b"a3", b"a4"], [b"b1", b"b2"], [b"c1", b"c2",
                                                          b"c3"]]),
  }
  out = preprocessors.remove_items_batch(ex, [5, 2])
  # "b" held only removed items: dropped with all its features.
  assert out["user_id"].numpy().tolist() == [b"a", b"c"]
  assert out["item_ids"].to_list() == [[1, 3], [4, 6]]
  assert out["critiques"].to_list() == [[b"a1", b"a3"], [b"c1", b"c3"]]
  # Single examples (not batched) give the same result.
  ds = tf.data.Dataset.from_tensor_slices(ex)
  got = list(preprocessors.remove_train_items(ds, items=[2, 5])
             .as_numpy_iterator())
  assert [g["item_ids"].tolist() for g in got] == [[1, 3], [4, 6]]
  # Evaluation examples (with a target) pass unchanged.
  eval_ds = tf.data.Dataset.from_tensor_slices(
      dict(ex, target=tf.constant([1, 2, 3])))
  same = preprocessors.remove_train_items(eval_ds, items=[2, 5])
  assert [g["item_ids"].tolist() for g in same.as_numpy_iterator()] == [
      [1, 2, 3, 2], [2, 5], [4, 5, 6]]


def test_train_split_has_no_cold_items_eval_unchanged(tiny_data, capsys):
  cold_data = sequence_data.SequenceData(
      "cold_items_on", tiny_data, max_len=L, cold_item_fraction=0.2,
      cold_item_seed=1)
  assert "30 of 150 items" in capsys.readouterr().out
  plain = sequence_data.SequenceData("cold_items_off", tiny_data, max_len=L)
  cold = cold_data.cold_items()
  np.testing.assert_array_equal(cold, cold_items.cold_items(150, 0.2, 1))
  it = cold_data.train_batches(0, 32)
  for _ in range(6):
    b = next(it)
    assert not np.isin(b["item_ids"], cold).any()
    assert not np.isin(b["targets"], cold).any()
  # Validation / test: histories and targets as without the protocol.
  cold_targets = 0
  for split in ("validation", "test"):
    got = list(cold_data.eval_batches(split, 64))
    want = list(plain.eval_batches(split, 64))
    assert len(got) == len(want)
    for g, w in zip(got, want):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=f"{split} {k}")
      cold_targets += int(np.isin(g["targets"][g["valid"] > 0].max(1),
                                  cold).sum())
  assert cold_targets > 0
  # Train counts: cold items 0, the others unchanged.
  counts = cold_data.train_item_counts()
  plain_counts = sequence_data.train_item_counts(tiny_data)
  assert (counts[cold - 1] == 0).all()
  assert plain_counts[cold - 1].sum() > 0
  warm = np.setdiff1d(np.arange(1, 151), cold)
  np.testing.assert_array_equal(counts[warm - 1], plain_counts[warm - 1])
  np.testing.assert_array_equal(plain.train_item_counts(), plain_counts)


def test_sequence_data_rejects_bad_fraction(tiny_data):
  with pytest.raises(ValueError, match="cold_item_fraction=1.0"):
    sequence_data.SequenceData("cold_items_bad", tiny_data, max_len=L,
                               cold_item_fraction=1.0)
