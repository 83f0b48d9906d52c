"""Critique ids in SequenceData batches (critique_ids.CritiqueIndex)."""

import json
import os

import numpy as np
import pytest

from recsys_jax.data import prepared
from recsys_jax.input_pipeline import critique_ids
from recsys_jax.input_pipeline import sequence_data
from tests.helpers import tiny_data  # noqa: F401  pylint: disable=unused-import

L = 12


def _text(t) -> str:
  return t.decode() if isinstance(t, bytes) else str(t)


def _users(data_dir):
  """{user_id: (item ids, critique strings)} read from the prepared files."""
  out = {}
  for u in prepared.PreparedDataset(data_dir).iter_sequences():
    out[_text(u[prepared.USER_ID])] = (
        [int(i) for i in u[prepared.ITEM_IDS]],
        [_text(c) for c in u[prepared.CRITIQUES]])
  return out


def _write_cache(path, texts):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, critique_ids.TEXTS_FILE), "w") as f:
    json.dump(list(texts), f)
  return str(path)


@pytest.fixture(scope="module")
def cache(tiny_data, tmp_path_factory):
  """(cache dir, texts) holding every critique of the tiny dataset."""
  texts = sorted({c for _, cs in _users(tiny_data).values() for c in cs
                  if c})
  path = _write_cache(tmp_path_factory.mktemp("critique_cache"), texts)
  return path, texts


def test_index_maps_strings_to_rows_plus_one():
  index = critique_ids.CritiqueIndex(["cheaper", "in red", "cheaper"], "c/")
  got = index.ids(np.array([[b"in red", b""], [b"cheaper", b"in red"]],
                           dtype=object))
  np.testing.assert_array_equal(got, [[2, 0], [1, 2]])
  assert got.dtype == np.int32
  assert index.ids(np.array(["cheaper"], dtype=object)).tolist() == [1]
  with pytest.raises(ValueError, match=r"'bigger'.*c/.*embed_items "
                     r"--texts=critiques"):
    index.ids(np.array([b"cheaper", b"bigger"], dtype=object))


def test_missing_cache_names_the_rebuild_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="--texts=critiques"):
    critique_ids.load(str(tmp_path))


def test_eval_batches_hold_the_target_critique_at_the_mask(tiny_data, cache):
  path, texts = cache
  row = {t: r + 1 for r, t in enumerate(texts)}
  data = sequence_data.SequenceData("critique_ids_eval", tiny_data,
                                    max_len=L, critique_texts=path)
  users = _users(tiny_data)
  mask = data.num_items + 1
  for split, end in (("validation", -2), ("test", -1)):
    seen = 0
    batches = list(data.eval_batches(split, 64, extra_features=("user_id",)))
    for b in batches:
      assert "critiques" not in b
      ids = b[sequence_data.CRITIQUE_IDS]
      assert ids.dtype == np.int32 and ids.shape == b["item_ids"].shape
      for r in np.flatnonzero(b["valid"] > 0):
        items, crits = users[_text(b["user_id"][r])]
        history = crits[:len(items) + end][-(L - 1):]
        want = [row.get(c, 0) for c in history] + [row.get(crits[end], 0)]
        want += [0] * (L - len(want))
        np.testing.assert_array_equal(ids[r], want)
        at_mask = int(np.flatnonzero(b["item_ids"][r] == mask)[0])
        assert ids[r, at_mask] == row.get(crits[end], 0)
        seen += 1
      assert not ids[b["valid"] == 0].any()
    assert seen == len(users)
    # Kept batches (the second pass) hold the same ints.
    again = list(data.eval_batches(split, 64, extra_features=("user_id",)))
    for a, b in zip(batches, again):
      np.testing.assert_array_equal(a[sequence_data.CRITIQUE_IDS],
                                    b[sequence_data.CRITIQUE_IDS])
  # Asking for the strings keeps them beside the ids.
  b = next(data.eval_batches("test", 64, extra_features=("critiques",)))
  index = critique_ids.load(path)
  np.testing.assert_array_equal(b[sequence_data.CRITIQUE_IDS],
                                index.ids(b["critiques"]))


def test_train_batches_keep_critiques_at_masked_positions(tiny_data, cache):
  path, texts = cache
  row = {t: r + 1 for r, t in enumerate(texts)}
  # Every (item, critique id) pair that occurs in the data.
  pairs = {(i, row.get(c, 0)) for items, crits in _users(tiny_data).values()
           for i, c in zip(items, crits)}
  data = sequence_data.SequenceData("critique_ids_train", tiny_data,
                                    max_len=L, critique_texts=path)
  mask = data.num_items + 1
  it = data.train_batches(0, 16)
  masked_with_critique = 0
  for _ in range(4):
    b = next(it)
    assert "critiques" not in b
    ids = b[sequence_data.CRITIQUE_IDS]
    assert ids.dtype == np.int32 and ids.shape == b["item_ids"].shape
    masked = b["loss_weights"] > 0
    assert (b["item_ids"][masked] == mask).all()
    true_items = np.where(masked, b["targets"], b["item_ids"])
    for item, cid in zip(true_items[true_items > 0], ids[true_items > 0]):
      assert (int(item), int(cid)) in pairs
    assert not ids[true_items == 0].any()  # padding
    masked_with_critique += int((ids[masked] > 0).sum())
  assert masked_with_critique > 0


def test_unknown_critique_names_cache_and_string(tiny_data, cache, tmp_path):
  _, texts = cache
  # A test split target's critique: always in the test batches.
  gone = next(crits[-1] for _, crits in _users(tiny_data).values()
              if crits[-1])
  short = _write_cache(tmp_path / "short", [t for t in texts if t != gone])
  data = sequence_data.SequenceData("critique_ids_unknown", tiny_data,
                                    max_len=L, critique_texts=short)
  with pytest.raises(ValueError) as err:
    list(data.eval_batches("test", 64))
  assert short in str(err.value) and "--texts=critiques" in str(err.value)
  assert f"critique {gone!r} is not in the critique text cache" in str(
      err.value)


def test_packing_with_critiques_is_refused(tiny_data, cache):
  with pytest.raises(ValueError, match="packing"):
    sequence_data.SequenceData("critique_ids_packed", tiny_data, max_len=L,
                               packing=True, critique_texts=cache[0])


def test_dataset_without_critiques_gives_zero_ids(tmp_path, capsys, cache):
  d = str(tmp_path / "no_critiques")
  users = [prepared.UserRecord(user_id=f"u{k}",
                               item_ids=[str(1 + (k + j) % 9)
                                         for j in range(3 + k % 5)])
           for k in range(20)]
  prepared.write_prepared(d, users=users, num_shards=1, text_vocab_size=None)
  assert not prepared.PreparedDataset(d).stats["has_critiques"]
  data = sequence_data.SequenceData("critique_ids_none", d, max_len=6,
                                    critique_texts=cache[0])
  assert "no critiques" in capsys.readouterr().out
  b = next(data.train_batches(0, 4))
  assert b[sequence_data.CRITIQUE_IDS].shape == b["item_ids"].shape == (4, 6)
  assert not b[sequence_data.CRITIQUE_IDS].any()
  for b in data.eval_batches("validation", 8):
    assert b[sequence_data.CRITIQUE_IDS].dtype == np.int32
    assert b[sequence_data.CRITIQUE_IDS].shape == b["item_ids"].shape
    assert not b[sequence_data.CRITIQUE_IDS].any()
