"""ILM tasks and data (issue 20): phase-1 pairs, phase-2 item slots, resume
and the bad-input errors, against NumPy references built from the prepared
TFRecords."""

import collections
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.input_pipeline import ilm_data
from recsys_jax.input_pipeline import mixture
from recsys_jax.text import item_texts
from tasks import ilm_tasks
from tasks import text_tasks
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

SPLITS = ("train", "validation", "test")


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def _users(data_dir):
  """[(user_id, item ids, critiques)] in file order (the reference reader)."""
  out = []
  for u in prepared.PreparedDataset(data_dir).iter_sequences():
    out.append((_text(u["user_id"]), [int(i) for i in u["item_ids"]],
                [_text(c) for c in u["critiques"]]))
  return out


def _vocab(data_dir):
  return text_tasks.dataset_vocabulary(data_dir, extra_ids=100)


def _take(it, n):
  out = list(itertools.islice(it, n))
  it.close()
  return out


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- special tokens -----------------------------------------------------------


def test_special_tokens_are_single_sentinel_ids(tiny_data):
  v = _vocab(tiny_data)
  top = v.vocab_size - 1  # <extra_id_0>
  assert ilm_tasks.special_id(v, ilm_tasks.CLS_TOKEN) == top
  assert ilm_tasks.special_id(v, ilm_tasks.DEC_TOKEN) == top - 1
  slot = ilm_tasks.slot_token_id(v)
  assert slot == top - 99
  ids = np.asarray(v.encode(ilm_tasks.history_inputs(3, 2, "show me pens")))
  assert np.sum(ids == slot) == 6
  run = np.flatnonzero(ids == slot)
  np.testing.assert_array_equal(run, np.arange(run[0], run[0] + 6))
  with pytest.raises(ValueError, match="extra_ids >= 100"):
    ilm_tasks.slot_token_id(text_tasks.dataset_vocabulary(tiny_data,
                                                          extra_ids=10))


# -- phase 1 ------------------------------------------------------------------


def test_item_text_uses_the_text_item_split_and_cls_tokens(tiny_data):
  data = ilm_data.ILMItemTextData("t", tiny_data, max_text_len=12)
  v = _vocab(tiny_data)
  rows = item_texts.read_rows(tiny_data)
  split = text_tasks.split_items(len(rows), seed=0, validation_fraction=0.05,
                                 test_fraction=0.05)
  seen = set()
  for s in SPLITS:
    cols = data.source.columns(s)
    items = cols[ilm_tasks.ITEM].tolist()
    assert items == split[s].tolist()  # every synthetic item has a title
    assert not seen & set(items)
    seen |= set(items)
    for item, tokens, text in zip(items, cols[ilm_tasks.TEXT_TOKENS],
                                  cols[ilm_tasks.TEXT]):
      assert text == rows[item - 1]["title"]
      want = [data.cls_id] + list(v.encode(text))[:10] + [1]
      np.testing.assert_array_equal(
          tokens, want + [0] * (12 - len(want)))
  assert seen == set(range(1, len(rows) + 1))
  assert data.cls_id == v.vocab_size - 1 and data.dec_id == v.vocab_size - 2
  fields = ("title", "categories", "brand")
  wide = ilm_data.ILMItemTextData("w", tiny_data, text_fields=fields)
  cols = wide.source.columns("validation")
  assert [_text(t) for t in cols[ilm_tasks.TEXT]] == [
      item_texts.render(rows[i - 1], fields) for i in cols[ilm_tasks.ITEM]]
  assert "category: " in _text(cols[ilm_tasks.TEXT][0])


@pytest.mark.parametrize("window", [1, 2])
def test_item_item_pairs_co_occur_in_training_parts_only(tiny_data, window):
  data = ilm_data.ILMItemItemData("t", tiny_data, window=window)
  users = _users(tiny_data)
  want = collections.Counter()
  with_held_out = collections.Counter()
  for _, ids, _ in users:
    for seq, counter in ((ids[:-2], want), (ids, with_held_out)):
      for i, j in itertools.combinations(range(len(seq)), 2):
        if j - i <= window and seq[i] != seq[j]:
          counter[(seq[i], seq[j])] += 1
  cols = data.source.columns("train")
  got = collections.Counter(zip(cols[ilm_tasks.ITEM].tolist(),
                                cols[ilm_tasks.PAIR_ITEM].tolist()))
  assert got == want
  # The held-out items would add pairs: the reference is not vacuous.
  assert sum(with_held_out.values()) > sum(want.values())
  for s, back in (("validation", 2), ("test", 1)):
    cols = data.source.columns(s)
    want_eval = []
    for _, ids, _ in users:
      p = len(ids) - back
      want_eval += [(ids[j], ids[p]) for j in range(max(0, p - window), p)
                    if ids[j] != ids[p]]
    assert list(zip(cols[ilm_tasks.ITEM].tolist(),
                    cols[ilm_tasks.PAIR_ITEM].tolist())) == want_eval


def test_user_item_prefixes_and_held_out_targets(tiny_data):
  data = ilm_data.ILMUserItemData("t", tiny_data, max_history=3)
  users = _users(tiny_data)

  def pad(h):
    return h[-3:] + [0] * (3 - len(h[-3:]))
  want = {"train": [(pad(ids[:t]), ids[t]) for _, ids, _ in users
                    for t in range(1, len(ids) - 2)],
          "validation": [(pad(ids[:-2]), ids[-2]) for _, ids, _ in users],
          "test": [(pad(ids[:-1]), ids[-1]) for _, ids, _ in users]}
  for s in SPLITS:
    cols = data.source.columns(s)
    got = list(zip(cols[ilm_tasks.USER_ITEMS].tolist(),
                   cols[ilm_tasks.ITEM].tolist()))
    assert got == want[s], s
  last = ilm_data.ILMUserItemData("l", tiny_data, max_history=3,
                                  train_prefixes=False)
  assert last.source.columns("train")[ilm_tasks.ITEM].tolist() == [
      ids[-3] for _, ids, _ in users if len(ids) >= 4]


def test_phase1_mixture_resumes_exactly(tiny_data):
  entries = [ilm_data.ILMItemTextData("t", tiny_data, max_text_len=16),
             ilm_data.ILMItemItemData("t", tiny_data),
             ilm_data.ILMUserItemData("t", tiny_data, max_history=5)]
  assert len({e.name for e in entries}) == 3
  data = mixture.MixtureData([(e, 1.0) for e in entries], seed=3,
                             eval_entry=0)
  full = _take(data.train_batches(0, 8), 9)
  resumed = _take(data.train_batches(5, 8), 4)
  _assert_same_batches(full[5:], resumed)
  shapes = {0: {"item": (8,), "text_tokens": (8, 16)},
            1: {"item": (8,), "pair_item": (8,)},
            2: {"user_items": (8, 5), "item": (8,)}}
  for batch in full:
    t = int(batch[mixture.TASK_INDEX][0])
    assert {k: v.shape for k, v in batch.items()
            if k != mixture.TASK_INDEX} == shapes[t]
    assert batch["item"].dtype == np.int32 and batch["item"].min() >= 1
  assert len({int(b[mixture.TASK_INDEX][0]) for b in full}) > 1
  evals = list(data.eval_batches("validation", 16))
  valid = np.concatenate([b["valid"] for b in evals]) > 0
  items = np.concatenate([b["item"] for b in evals])[valid]
  np.testing.assert_array_equal(
      items, entries[0].source.columns("validation")[ilm_tasks.ITEM])


# -- phase 2 ------------------------------------------------------------------


def _slot_runs_ok(tokens, slot_id, n_slots):
  """The row's slot tokens are n_slots consecutive positions."""
  pos = np.flatnonzero(tokens == slot_id)
  return len(pos) == n_slots and (
      n_slots == 0 or pos[-1] - pos[0] == n_slots - 1)


def test_history_slots_follow_the_history_order(tiny_data):
  data = ilm_data.ILMData("t", tiny_data, task="history_to_next_title",
                          tokens_per_item=3, max_history=4, max_input_len=24)
  assert data.tokens_per_item == 3 and data.max_slot_items == 4
  assert data.slot_id == _vocab(tiny_data).vocab_size - 100
  users = _users(tiny_data)
  titles = item_texts.texts_by_index(tiny_data, ("title",))

  def pad(h):
    return h[-4:] + [0] * (4 - len(h[-4:]))
  train = data.source.columns("train")
  want = [(pad(ids[:t]), ids[t]) for _, ids, _ in users
          for t in range(1, len(ids) - 2)]
  assert list(zip(train[ilm_tasks.SLOT_ITEMS].tolist(),
                  train[ilm_tasks.TARGET_ITEM][:, 0].tolist())) == want
  rows = 0
  for batch in data.eval_batches("validation", 64):
    for r in np.flatnonzero(batch["valid"]):
      uid, ids, _ = users[rows]
      rows += 1
      assert _text(batch["user_id"][r]) == uid
      hist = pad(ids[:-2])
      np.testing.assert_array_equal(batch[ilm_tasks.SLOT_ITEMS][r], hist)
      np.testing.assert_array_equal(batch[ilm_tasks.HISTORY_ITEMS][r], hist)
      assert batch[ilm_tasks.TARGET_ITEM][r, 0] == ids[-2]
      assert _text(batch["targets_pretokenized"][r]) == titles[ids[-2]]
      n = sum(1 for i in hist if i)
      assert _text(batch["inputs_pretokenized"][r]) == (
          ilm_tasks.history_inputs(n, 3))
      assert _slot_runs_ok(batch["encoder_input_tokens"][r], data.slot_id,
                           3 * n)
  assert rows == len(users)
  batch = next(iter(data.train_batches(0, 16)))
  slots = np.sum(batch["encoder_input_tokens"] == data.slot_id, axis=1)
  np.testing.assert_array_equal(
      slots, 3 * np.sum(batch[ilm_tasks.SLOT_ITEMS] != 0, axis=1))


def test_item_to_title_slots_one_item_of_the_item_split(tiny_data):
  data = ilm_data.ILMData("t", tiny_data, task="item_to_title",
                          tokens_per_item=4, max_history=2, max_input_len=16)
  split = text_tasks.split_items(150, seed=0, validation_fraction=0.05,
                                 test_fraction=0.05)
  titles = item_texts.texts_by_index(tiny_data, ("title",))
  for s in SPLITS:
    cols = data.source.columns(s)
    np.testing.assert_array_equal(cols[ilm_tasks.SLOT_ITEMS][:, 0], split[s])
    np.testing.assert_array_equal(cols[ilm_tasks.TARGET_ITEM][:, 0], split[s])
    assert not cols[ilm_tasks.HISTORY_ITEMS].any()
    assert [_text(t) for t in cols["targets"]] == [titles[i]
                                                   for i in split[s]]
  batch = next(iter(data.eval_batches("test", 16)))
  for r in np.flatnonzero(batch["valid"]):
    assert _slot_runs_ok(batch["encoder_input_tokens"][r], data.slot_id, 4)
    assert _text(batch["inputs_pretokenized"][r]) == (
        "item: " + " ".join(["<extra_id_99>"] * 4))


def test_critique_task_reads_the_target_critique_and_resumes(tiny_data):
  data = ilm_data.ILMData("t", tiny_data, task="critique_next_title",
                          tokens_per_item=2, max_history=3, max_input_len=48)
  users = _users(tiny_data)
  for s, back in (("validation", 2), ("test", 1)):
    want = [(u, c[-back]) for u, _, c in users if c[-back]]
    cols = data.source.columns(s)
    assert list(zip(cols[ilm_tasks.USER_ID].tolist(),
                    cols[ilm_tasks.CRITIQUE].tolist())) == want
    assert data.source.stats(s)["skipped_no_critique"] == len(users) - len(
        want)
  want_train = sum(1 for _, ids, c in users
                   for t in range(1, len(ids) - 2) if c[t])
  assert data.num_examples("train") == want_train > 0
  v = _vocab(tiny_data)
  cols = data.source.columns("validation")
  rows = 0
  for batch in data.eval_batches("validation", 64):
    for r in np.flatnonzero(batch["valid"]):
      crit = cols[ilm_tasks.CRITIQUE][rows]
      n = int(np.sum(cols[ilm_tasks.SLOT_ITEMS][rows] != 0))
      rows += 1
      assert _text(batch[ilm_tasks.CRITIQUE][r]) == crit
      assert _text(batch["inputs_pretokenized"][r]) == (
          "history: " + " ".join(["<extra_id_99>"] * 2 * n)
          + f" critique: {crit}")
      tokens = batch["encoder_input_tokens"][r]
      assert _slot_runs_ok(tokens, data.slot_id, 2 * n)
      # The critique's tokens end the row (as the vocabulary spells them:
      # pieces unknown to the item-text vocabulary, such as '?', are unk).
      assert v.decode([int(i) for i in tokens]).endswith(
          v.decode(v.encode(crit)))
  assert rows == len(cols[ilm_tasks.CRITIQUE])
  full = _take(data.train_batches(0, 8), 5)
  _assert_same_batches(full[2:], _take(data.train_batches(2, 8), 3))


# -- errors -------------------------------------------------------------------


def test_dataset_without_critiques_is_refused(tiny_data, tmp_path):
  d = str(tmp_path / "no_critiques")
  shutil.copytree(tiny_data, d)
  path = os.path.join(d, prepared.STATS_FILE)
  with open(path) as f:
    stats = json.load(f)
  stats["has_critiques"] = False
  with open(path, "w") as f:
    json.dump(stats, f)
  with pytest.raises(bad_input.BadInputError) as e:
    ilm_data.ILMData("t", d, task="critique_next_title", max_input_len=64)
  message = str(e.value)
  assert "\n" not in message
  assert d in message and "critique_next_title" in message


def test_check_slots_names_the_bad_example():
  slot = 300
  good = {"encoder_input_tokens": np.array([[5, slot, slot, 1, 0],
                                            [5, slot, slot, slot, slot]]),
          "slot_items": np.array([[7, 0], [7, 9]])}
  ilm_data.check_slots(good, slot_id=slot, tokens_per_item=2, where="w")
  short = dict(good, slot_items=np.array([[7, 0], [7, 9]]),
               encoder_input_tokens=np.array([[5, slot, slot, 1, 0],
                                              [5, slot, slot, slot, 6]]))
  with pytest.raises(bad_input.BadInputError,
                     match=r"^w: example 11 \(row 1 .*3 slot tokens.*= 4 "
                           r".*raise max_input_len"):
    ilm_data.check_slots(short, slot_id=slot, tokens_per_item=2, where="w",
                         first_example=10)
  orphan = dict(good, slot_items=np.array([[0, 0], [7, 9]]))
  with pytest.raises(bad_input.BadInputError,
                     match=r"example 0 .*slot without an item id"):
    ilm_data.check_slots(orphan, slot_id=slot, tokens_per_item=2, where="w")
  gap = dict(good, slot_items=np.array([[7, 0], [0, 9]]),
             encoder_input_tokens=np.array([[5, slot, slot, 1, 0],
                                            [5, slot, slot, 1, 0]]))
  with pytest.raises(bad_input.BadInputError, match=r"example 1 .*after a 0"):
    ilm_data.check_slots(gap, slot_id=slot, tokens_per_item=2, where="w")


def test_mismatched_slots_fail_where_batches_are_made(tiny_data):
  data = ilm_data.ILMData("t", tiny_data, task="history_to_next_title",
                          tokens_per_item=3, max_history=2, max_input_len=16)
  data.tokens_per_item = 2  # rows were written with 3 slots per item
  with pytest.raises(bad_input.BadInputError,
                     match=r"t_ilm_history_to_next_title, train, step 4\)"
                           r": example 32 \(row 0"):
    next(iter(data.train_batches(4, 8)))
  with pytest.raises(bad_input.BadInputError,
                     match=r"validation, batch 0\): example 0 "):
    next(iter(data.eval_batches("validation", 8)))


def test_bad_arguments(tiny_data):
  with pytest.raises(ValueError, match="max_input_len=20.*raise"):
    ilm_data.ILMData("t", tiny_data, task="history_to_next_title",
                     tokens_per_item=8, max_history=4, max_input_len=20)
  with pytest.raises(ValueError, match="extra_ids=10"):
    ilm_data.ILMData("t", tiny_data, task="item_to_title", extra_ids=10)
  with pytest.raises(ValueError, match="ILMData.task='nope'"):
    ilm_data.ILMData("t", tiny_data, task="nope")
  with pytest.raises(ValueError, match="tokens_per_item=0"):
    ilm_tasks.register_ilm_task("t", tiny_data, task="item_to_title",
                                tokens_per_item=0)
  with pytest.raises(ValueError, match="window=0"):
    ilm_data.ILMItemItemData("t", tiny_data, window=0)
  with pytest.raises(ValueError, match="text_fields"):
    ilm_data.ILMItemTextData("t", tiny_data, text_fields=("colour",))
