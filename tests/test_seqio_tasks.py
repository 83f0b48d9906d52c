"""Tests of the leave-one-out source, registered tasks and batch helpers."""

import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recsys_jax.data import prepared
from recsys_jax.seqio_ext import batching as fc
from recsys_jax.seqio_ext import sources
from tasks import sequence_tasks
from tests import helpers

L = 5
# Raw ids are 1..15 and all used, so vocabulary index == raw id; [MASK] = 16.
USERS = {
    "u0": [1, 2, 3],
    "u1": [4, 5, 6, 7, 8, 9, 10, 11],
    "u2": [12, 13, 14, 15],
    "u3": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
    "u4": [2, 7, 1, 8, 2, 8],
    "u5": [14, 1, 4, 2],
    "u6": [9, 9, 9],
    "u7": [1, 6, 1, 8, 3, 3, 9, 8, 8, 7, 4, 9],
    "u8": [15, 13, 11, 9, 7],
    "u9": [10, 12, 14],
    "u10": [6, 5, 4, 3, 2, 1, 7],
    "u11": [11, 15, 2, 3],
}
NUM_ITEMS, MASK = 15, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("loo") / "prepared")
  users = [prepared.UserRecord(
      user_id=u, item_ids=[str(i) for i in ids],
      critiques=[f"{u}:{k}" for k in range(len(ids))])
           for u, ids in USERS.items()]
  prepared.write_prepared(d, users=users, num_shards=2, text_vocab_size=None)
  assert prepared.PreparedDataset(d).num_items == NUM_ITEMS
  return d


@pytest.fixture(scope="module")
def task(data_dir):
  names = sequence_tasks.register_sequence_tasks(
      "loo_test", data_dir, max_len=L, mask_prob=0.3, last_item_mask_prob=0.2,
      seed=3)
  assert names == ["loo_test"]
  return seqio.get_mixture_or_task("loo_test")


def _by_user(ds):
  return {ex["user_id"].decode(): ex for ex in ds.as_numpy_iterator()}


def _expected_split(ids, split):
  """Reference leave-one-out split: (inputs, target or None)."""
  if split == "train":
    return ids[:-2], None
  if split == "validation":
    return ids[:-2], ids[-2]
  return ids[:-1], ids[-1]


def _pad(x):
  return list(x) + [0] * (L - len(x))


def test_tf_never_sees_a_gpu():
  assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("split", sources.SPLITS)
def test_source_leave_one_out(data_dir, split):
  source = sources.PreparedSequenceSource(data_dir)
  got = _by_user(source.get_dataset(split, shuffle=False))
  assert set(got) == set(USERS)
  for u, ids in USERS.items():
    inputs, target = _expected_split(ids, split)
    assert list(got[u]["item_ids"]) == inputs, u
    assert [c.decode() for c in got[u]["critiques"]] == [
        f"{u}:{k}" for k in range(len(inputs))]
    if target is None:
      assert "target" not in got[u]
    else:
      assert got[u]["target"] == target
      assert got[u]["target_critique"].decode() == f"{u}:{len(inputs)}"
  assert source.num_input_examples(split) == len(USERS)


def test_task_examples_exact(task):
  seq = {"item_ids": L}
  val = _by_user(task.get_dataset(seq, "validation", shuffle=False))
  test = _by_user(task.get_dataset(seq, "test", shuffle=False))
  # Hand-written: u1 = 4..11, L = 5 -> 4 most recent inputs + [MASK].
  assert list(val["u1"]["item_ids"]) == [6, 7, 8, 9, MASK]
  assert list(val["u1"]["targets"]) == [0, 0, 0, 0, 10]
  assert list(test["u1"]["item_ids"]) == [7, 8, 9, 10, MASK]
  assert list(test["u1"]["targets"]) == [0, 0, 0, 0, 11]
  assert list(val["u0"]["item_ids"]) == [1, MASK, 0, 0, 0]
  assert list(val["u0"]["targets"]) == [0, 2, 0, 0, 0]
  assert list(test["u0"]["item_ids"]) == [1, 2, MASK, 0, 0]
  assert list(test["u0"]["loss_weights"]) == [0, 0, 1, 0, 0]
  # u1's critiques: inputs' critiques, then the target's at the [MASK].
  assert [c.decode() for c in test["u1"]["critiques"]] == [
      "u1:3", "u1:4", "u1:5", "u1:6", "u1:7"]
  for split, got in (("validation", val), ("test", test)):
    for u, ids in USERS.items():
      inputs, target = _expected_split(ids, split)
      ex = got[u]
      assert list(ex["item_ids"]) == _pad(inputs[-(L - 1):] + [MASK]), u
      assert list(ex["targets"]) == _pad([0] * len(inputs[-(L - 1):])
                                         + [target])
      np.testing.assert_array_equal(ex["loss_weights"], ex["targets"] > 0)
  train = _by_user(task.get_dataset(seq, "train", shuffle=False))
  for u, ids in USERS.items():
    ex = train[u]
    m = ex["loss_weights"] > 0
    assert m.any()
    assert (ex["item_ids"][m] == MASK).all()
    unmasked = np.where(m, ex["targets"], ex["item_ids"])
    assert list(unmasked) == _pad(ids[:-2][-L:]), u
  assert list(np.where(train["u1"]["loss_weights"] > 0, train["u1"]["targets"],
                       train["u1"]["item_ids"])) == [5, 6, 7, 8, 9]


def test_output_features_and_shapes(task):
  assert task.output_features["item_ids"].vocabulary.vocab_size == MASK + 1
  for split in sources.SPLITS:
    spec = task.get_dataset({"item_ids": L}, split, shuffle=False).element_spec
    for k in ("item_ids", "targets"):
      assert spec[k].dtype == tf.int32 and spec[k].shape == [L]
    assert spec["loss_weights"].dtype == tf.float32
    assert spec["loss_weights"].shape == [L]


def test_sequence_length_overrides_max_len(task):
  ds = task.get_dataset({"item_ids": 3, "targets": 3}, "test", shuffle=False)
  ex = _by_user(ds)["u1"]
  assert list(ex["item_ids"]) == [9, 10, MASK]
  with pytest.raises(ValueError, match="share one length"):
    task.get_dataset({"item_ids": 3, "targets": 4}, "test", shuffle=False)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_shards_cover_every_user_once(task, num_shards):
  seen = []
  for index in range(num_shards):
    ds = task.get_dataset({"item_ids": L}, "test", shuffle=True, seed=1,
                          shard_info=seqio.ShardInfo(index, num_shards))
    seen += [ex["user_id"].decode() for ex in ds.as_numpy_iterator()]
  assert sorted(seen) == sorted(USERS)


def test_source_shuffle_deterministic(data_dir):
  source = sources.PreparedSequenceSource(data_dir)
  order = lambda **kw: [ex["user_id"] for ex in source.get_dataset(
      "train", **kw).as_numpy_iterator()]
  a, b, c = order(seed=5), order(seed=5), order(seed=6)
  assert a == b and a != c and sorted(a) == sorted(c)
  assert order(shuffle=False) != a


def test_task_masks_deterministic_per_seed(task):
  def weights(seed):
    ds = task.get_dataset({"item_ids": L}, "train", shuffle=False, seed=seed)
    return np.stack([ex["loss_weights"] for ex in ds.as_numpy_iterator()])
  # seed=None uses the registered seed (3): two separate pipelines agree.
  w3 = weights(3)
  np.testing.assert_array_equal(weights(None), w3)
  assert (weights(4) != w3).any()


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("stride,packing,epochs_per_chunk", [
    (None, False, 1), (2, False, 2), (None, False, None), (None, True, 3)])
def test_resume_equals_uninterrupted(data_dir, stride, packing,
                                     epochs_per_chunk):
  name = f"resume_{stride}_{packing}_{epochs_per_chunk}"
  sequence_tasks.register_sequence_tasks(
      name, data_dir, max_len=4, sliding_window_stride=stride,
      packing=packing, seed=9)
  batches = lambda **kw: fc.batches(name, "train", 3,
                                    epochs_per_chunk=epochs_per_chunk, **kw)
  full = _take(batches(), 10)
  if packing:
    assert "segment_ids" in full[0]
  else:
    # Examples per epoch (windows of 4 over the train histories).
    n = [len(ids) - 2 for ids in USERS.values()]
    examples = sum(1 + (-(-max(k - 4, 0) // stride) if stride else 0)
                   for k in n)
    assert fc.examples_per_epoch(seqio.get_mixture_or_task(name)) == examples
    if epochs_per_chunk == 1:
      # Epoch 1 is reshuffled and re-masked, not a repeat of epoch 0.
      per_epoch = examples // 3
      assert 2 * per_epoch <= len(full)
      assert any((full[i]["item_ids"] != full[i + per_epoch]["item_ids"]).any()
                 for i in range(per_epoch))
  for start in (2, 7):
    resumed = _take(batches(start_step=start), 3)
    for got, want in zip(resumed, full[start:start + 3]):
      assert set(got) == set(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{start} {k}")


def test_train_batches_are_full_and_sharded(task):
  shard = seqio.ShardInfo(1, 2)
  for b in _take(fc.batches(task, "train", 2, shard_info=shard), 5):
    assert set(b) == {"item_ids", "targets", "loss_weights"}
    assert b["item_ids"].shape == (2, L) and b["item_ids"].dtype == np.int32
    assert b["loss_weights"].dtype == np.float32


def test_eval_batches_padded_with_valid(task):
  got = list(fc.batches(task, "test", 5, extra_features=("user_id",)))
  assert len(got) == 3
  assert [b["valid"].sum() for b in got] == [5, 5, 2]
  last = got[-1]
  assert not last["item_ids"][2:].any() and not last["targets"][2:].any()
  seen = {}
  for b in got:
    for row in np.nonzero(b["valid"])[0]:
      seen[b["user_id"][row].decode()] = b["targets"][row].max()
  assert seen == {u: ids[-1] for u, ids in USERS.items()}


def test_eval_shards_yield_equal_batch_counts(task):
  counts, valid = [], 0
  for index in range(5):  # 12 users: shards of 3, 3, 2, 2, 2
    bs = list(fc.batches(task, "validation", 2,
                         shard_info=seqio.ShardInfo(index, 5)))
    counts.append(len(bs))
    valid += sum(b["valid"].sum() for b in bs)
    assert all(b["item_ids"].shape == (2, L) for b in bs)
  assert counts == [2] * 5 and valid == len(USERS)


def test_batches_of_a_plain_dataset():
  ds = tf.data.Dataset.range(10).map(
      lambda i: {"item_ids": tf.fill([3], tf.cast(i, tf.int32))})
  full = _take(fc.batches(ds, "train", 4, num_epochs=None), 6)
  again = _take(fc.batches(ds, "train", 4, num_epochs=None, start_step=3), 3)
  for g, w in zip(again, full[3:]):
    np.testing.assert_array_equal(g["item_ids"], w["item_ids"])
  ev = list(fc.batches(ds, "test", 4))
  assert [b["valid"].sum() for b in ev] == [4, 4, 2]


def test_missing_directory_fails_lazily(tmp_path):
  missing = str(tmp_path / "not_prepared")
  sequence_tasks.register_sequence_tasks("missing_dir_test", missing)
  t = seqio.get_mixture_or_task("missing_dir_test")
  with pytest.raises(FileNotFoundError,
                     match="python -m recsys_jax.data.prepare"):
    t.get_dataset({"item_ids": 50}, "train")
  with pytest.raises(FileNotFoundError, match="not_prepared"):
    t.num_input_examples("test")


def test_importing_registers_no_task():
  # Registration is explicit (SequenceData, register_builtin_tasks); a fresh
  # process importing the tasks and the input pipeline registers nothing.
  res = helpers.run_script(
      "import seqio, tasks\n"
      "from tasks import sequence_tasks\n"
      "from recsys_jax.input_pipeline import sequence_data\n"
      "print('TASKS', sorted(seqio.TaskRegistry.names()))\n"
      "sequence_tasks.register_builtin_tasks()\n"
      "print('BUILTIN', sorted(seqio.TaskRegistry.names()))\n").check()
  lines = dict(l.split(" ", 1) for l in res.stdout.splitlines()
               if l.startswith(("TASKS", "BUILTIN")))
  assert lines["TASKS"] == "[]"
  assert lines["BUILTIN"] == str(sorted(sequence_tasks.BUILTIN))


def test_builtin_tasks(data_dir, tmp_path):
  assert sorted(sequence_tasks.register_builtin_tasks()) == sorted(
      sequence_tasks.BUILTIN)
  for name in sequence_tasks.BUILTIN:
    assert name in seqio.TaskRegistry.names()
  root = tmp_path / "root"
  root.mkdir()
  os.symlink(data_dir, root / "synthetic")
  try:
    sequence_tasks.register_builtin_tasks(str(root))
    ds = seqio.get_mixture_or_task("synthetic_bert4rec").get_dataset(
        {"item_ids": 50}, "test", shuffle=False)
    ex = _by_user(ds)["u1"]
    assert list(ex["item_ids"][:8]) == [4, 5, 6, 7, 8, 9, 10, MASK]
    with pytest.raises(FileNotFoundError, match="--format=movielens"):
      seqio.get_mixture_or_task("movielens100k_bert4rec").get_dataset(
          {"item_ids": 50}, "test")
  finally:
    sequence_tasks.register_builtin_tasks()


def _example(user: str, ids, critiques=None) -> bytes:
  """A sequence record as `prepared.write_prepared` writes it."""
  if critiques is None:
    critiques = [f"{user}:{k}" for k in range(len(ids))]
  feature = {
      prepared.USER_ID: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[user.encode()])),
      prepared.ITEM_IDS: tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(ids))),
      prepared.TIMESTAMPS: tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(range(len(ids))))),
      prepared.CRITIQUES: tf.train.Feature(
          bytes_list=tf.train.BytesList(
              value=[c.encode() for c in critiques])),
  }
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def _source_with(out: str, data_dir: str,
                 records) -> sources.PreparedSequenceSource:
  """A source over `records` (serialized Examples), with `data_dir`'s stats."""
  with open(os.path.join(data_dir, prepared.STATS_FILE)) as f, \
      open(os.path.join(out, prepared.STATS_FILE), "w") as g:
    g.write(f.read())
  with tf.io.TFRecordWriter(
      os.path.join(out, prepared.SEQUENCES_PREFIX + "-00000-of-00001")) as w:
    for record in records:
      w.write(record)
  return sources.PreparedSequenceSource(out)


@pytest.mark.parametrize("split", sources.SPLITS)
def test_source_batched_parse_splits_and_drops_short_users(tmp_path, data_dir,
                                                           split):
  """Users are parsed a batch at a time: leave-one-out per user, too-short
  users dropped, order kept, across a batch boundary."""
  rows = [(f"u{i}", list(range(1, 2 + i % 7))) for i in range(600)]
  source = _source_with(str(tmp_path), data_dir,
                        [_example(user, ids) for user, ids in rows])
  got = list(source.get_dataset(split, shuffle=False).as_numpy_iterator())
  min_len = 3 if split == "train" else 2
  want = [(u, ids) for u, ids in rows if len(ids) >= min_len]
  assert [g[prepared.USER_ID].decode() for g in got] == [u for u, _ in want]
  end = {"train": -2, "validation": -2, "test": -1}[split]
  for g, (_, ids) in zip(got, want):
    np.testing.assert_array_equal(g[prepared.ITEM_IDS], ids[:end])
    assert g[prepared.TIMESTAMPS].shape == g[prepared.ITEM_IDS].shape
    if split != "train":
      assert g[sources.TARGET] == ids[end]
      user = g[prepared.USER_ID].decode()
      assert g[sources.TARGET_CRITIQUE] == f"{user}:{len(ids) + end}".encode()


def test_source_bad_item_id_names_the_user(tmp_path, data_dir):
  n = prepared.PreparedDataset(data_dir).num_items
  source = _source_with(str(tmp_path), data_dir, [
      _example("fine", [1, 2, 3]), _example("culprit", [1, n + 1, 2])])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"item_ids must lie in 1\.\.\d+; bad user.*culprit"):
    list(source.get_dataset("train", shuffle=False).as_numpy_iterator())


def test_source_misaligned_feature_names_the_user(tmp_path, data_dir):
  source = _source_with(str(tmp_path), data_dir, [
      _example("fine", [1, 2, 3]),
      _example("short_critiques", [1, 2, 3], critiques=["a", "b"])])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"critiques must have one entry per item of "
                     r"item_ids; bad user.*short_critiques"):
    list(source.get_dataset("test", shuffle=False).as_numpy_iterator())
