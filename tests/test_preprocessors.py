"""Tests of the sequence preprocessors against hand-computed cases and NumPy."""

import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recsys_jax.data import prepared
from recsys_jax.seqio_ext import preprocessors as pp
from recsys_jax.seqio_ext import sources

NUM_ITEMS = 1000
MASK = NUM_ITEMS + 1


def _train_ds(histories):
  """Train-split examples (no `target`) with the given item histories."""
  return tf.data.Dataset.from_tensor_slices({
      "user_id": [f"u{i}" for i in range(len(histories))],
      "item_ids": tf.ragged.constant([list(h) for h in histories],
                                     dtype=tf.int32)})


def _rows(ds):
  """All rows of a dataset of fixed-shape examples (batched for speed)."""
  out = []
  for b in ds.batch(1024).as_numpy_iterator():
    out += [{k: v[i] for k, v in b.items()}
            for i in range(len(next(iter(b.values()))))]
  return out


def _random_histories(n, lo, hi, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, NUM_ITEMS + 1, size=rng.integers(lo, hi + 1))
          for _ in range(n)]


def _masked(histories, seed=1, max_len=50, **kw):
  kw.setdefault("mask_prob", 0.2)
  kw.setdefault("max_predictions", None)
  kw.setdefault("last_item_mask_prob", 0.0)
  with seqio.utils.map_seed_manager(seed):
    ds = pp.bert4rec_inputs(_train_ds(histories), num_items=NUM_ITEMS, **kw)
  return _rows(pp.pad_or_pack(ds, max_len=max_len))


def _expected_count(n, p, cap, q):
  """E[#masked] of one row of n items under the documented rule (NumPy ref)."""
  cap = n if cap is None else min(cap, n)
  pmf = [math.comb(n, k) * p**k * (1 - p)**(n - k) for k in range(n + 1)]
  normal = sum(min(max(k, 1), cap) * pmf[k] for k in range(n + 1))
  return q * 1.0 + (1 - q) * normal


def test_mask_rate_cap_padding_and_at_least_one():
  hist = _random_histories(2000, 1, 40)
  p, cap, q = 0.2, 6, 0.2
  rows = _masked(hist, mask_prob=p, max_predictions=cap, last_item_mask_prob=q)
  total_masked = total_expected = 0.0
  for h, r in zip(hist, rows):
    n = len(h)
    w = r["loss_weights"]
    m = w > 0
    assert 1 <= m.sum() <= min(cap, n)
    assert not m[n:].any(), "padding masked"
    np.testing.assert_array_equal(r["item_ids"][n:], 0)
    np.testing.assert_array_equal(r["targets"][n:], 0)
    # Targets hold the true items exactly where masked; inputs are [MASK].
    np.testing.assert_array_equal(r["targets"][:n], np.where(m[:n], h, 0))
    np.testing.assert_array_equal(r["item_ids"][:n], np.where(m[:n], MASK, h))
    assert r["item_ids"].dtype == np.int32 and w.dtype == np.float32
    total_masked += m.sum()
    total_expected += _expected_count(n, p, cap, q)
  # Each row's count has variance <= cap^2 / 4; 5 sd of the total.
  tol = 5 * math.sqrt(len(hist) * cap**2 / 4)
  assert abs(total_masked - total_expected) < tol, (total_masked,
                                                    total_expected)


def test_mask_rate_matches_mask_prob_without_cap():
  hist = _random_histories(1500, 30, 40, seed=3)
  rows = _masked(hist, mask_prob=0.3, seed=5)
  rate = sum(r["loss_weights"].sum() for r in rows) / sum(map(len, hist))
  # With n >= 30 the at-least-one rule adds < 0.7**30 per row.
  assert abs(rate - 0.3) < 0.01, rate


def test_last_item_only_fraction():
  # mask_prob=1 with cap 3: ordinary rows mask exactly 3 of n >= 5 items, so
  # a row with a single mask on its last item is a last-item-only row.
  hist = _random_histories(3000, 5, 20, seed=7)
  q = 0.3
  rows = _masked(hist, mask_prob=1.0, max_predictions=3, last_item_mask_prob=q)
  last_only = 0
  for h, r in zip(hist, rows):
    m = r["loss_weights"] > 0
    if m.sum() == 1:
      assert m[len(h) - 1]
      last_only += 1
    else:
      assert m.sum() == 3
  frac = last_only / len(hist)
  sd = math.sqrt(q * (1 - q) / len(hist))
  assert abs(frac - q) < 5 * sd, frac


def test_cap_keeps_a_uniform_subset():
  hist = [list(range(1, 11))] * 4000
  rows = _masked(hist, mask_prob=1.0, max_predictions=3)
  freq = np.mean([r["loss_weights"][:10] for r in rows], axis=0)
  np.testing.assert_allclose(freq, 0.3, atol=0.035)


def test_masks_deterministic_per_seed_and_differ_across_seeds():
  hist = _random_histories(200, 5, 30, seed=11)
  a = _masked(hist, seed=123)
  b = _masked(hist, seed=123)
  c = _masked(hist, seed=124)
  wa = np.stack([r["loss_weights"] for r in a])
  np.testing.assert_array_equal(wa, np.stack([r["loss_weights"] for r in b]))
  assert (wa != np.stack([r["loss_weights"] for r in c])).any()


def test_random_replace_80_10_10():
  hist = _random_histories(600, 40, 40, seed=13)
  rows = _masked(hist, mask_prob=1.0, random_replace=True)
  inputs = np.concatenate([r["item_ids"][:40] for r in rows])
  truth = np.concatenate([r["targets"][:40] for r in rows])
  assert (truth > 0).all()  # everything masked
  is_mask = inputs == MASK
  kept = inputs == truth
  rand = ~is_mask & ~kept
  assert abs(is_mask.mean() - 0.8) < 0.01
  assert abs(kept.mean() - (0.1 + 0.1 / NUM_ITEMS)) < 0.01
  assert abs(rand.mean() - 0.1) < 0.01
  assert inputs[rand].min() >= 1 and inputs[rand].max() <= NUM_ITEMS


def test_default_max_predictions():
  assert pp.default_max_predictions(0.2, 50) == 11
  assert pp.default_max_predictions(1.0, 5) == 5


@pytest.mark.parametrize("n,max_len,stride,expected", [
    (10, 4, 3, [(6, 10), (3, 7), (0, 4)]),
    (10, 4, 4, [(6, 10), (2, 6), (0, 4)]),
    (5, 4, 3, [(1, 5), (0, 4)]),
    (4, 4, 1, [(0, 4)]),
    (2, 4, 2, [(0, 2)]),
])
def test_sliding_windows(n, max_len, stride, expected):
  hist = list(range(101, 101 + n))
  ds = pp.truncate_or_window(_train_ds([hist]), max_len=max_len,
                             sliding_window_stride=stride)
  got = [list(ex["item_ids"]) for ex in ds.as_numpy_iterator()]
  assert got == [hist[s:e] for s, e in expected]
  assert len(got) == 1 + math.ceil(max(n - max_len, 0) / stride)


def test_train_prefixes():
  hist = list(range(101, 108))  # 7 items
  ds = pp.truncate_or_window(_train_ds([hist, [1, 2]]), max_len=4,
                             train_prefixes=True)
  got = [list(ex["item_ids"]) for ex in ds.as_numpy_iterator()]
  # Prefixes of 2..n items, each cut to its last max_len items.
  want = [hist[max(0, e - 4):e] for e in range(2, 8)] + [[1, 2]]
  assert got == want
  # With last-item-only masking every item but the first is a target once.
  masked = pp.bert4rec_inputs(ds, num_items=NUM_ITEMS, mask_prob=0.2,
                              last_item_mask_prob=1.0)
  targets = [int(ex["targets"][-1]) for ex in masked.as_numpy_iterator()]
  assert targets == hist[1:] + [2]
  with pytest.raises(ValueError, match="exclude each other"):
    pp.truncate_or_window(_train_ds([hist]), max_len=4, train_prefixes=True,
                          sliding_window_stride=2)


def test_truncation_train_and_eval():
  hist = list(range(1, 9))
  train = pp.truncate_or_window(_train_ds([hist]), max_len=5)
  assert list(next(train.as_numpy_iterator())["item_ids"]) == [4, 5, 6, 7, 8]
  ev = _train_ds([hist]).map(lambda ex: dict(ex, target=tf.constant(9)))
  ev = pp.truncate_or_window(ev, {"item_ids": 5})
  ev = pp.bert4rec_inputs(ev, num_items=NUM_ITEMS)
  ex = next(pp.pad_or_pack(ev, max_len=5).as_numpy_iterator())
  np.testing.assert_array_equal(ex["item_ids"], [5, 6, 7, 8, MASK])
  np.testing.assert_array_equal(ex["targets"], [0, 0, 0, 0, 9])
  np.testing.assert_array_equal(ex["loss_weights"], [0, 0, 0, 0, 1])


def test_resolve_length_rejects_mismatch():
  assert pp.resolve_length({"item_ids": 7}, 50) == 7
  assert pp.resolve_length(None, 50) == 50
  with pytest.raises(ValueError, match="targets"):
    pp.resolve_length({"item_ids": 7, "targets": 6}, 50)


def _numpy_pack(examples, length, max_predictions=None):
  """Reference greedy first-fit-in-order packer."""
  cap = length if max_predictions is None else max_predictions
  rows, cur = [], []
  for ex in examples:
    full = sum(len(e[0]) for e in cur) + len(ex[0]) > length
    full = full or sum(int((np.asarray(e[2]) > 0).sum()) for e in cur + [ex]
                       ) > cap
    if cur and full:
      rows.append(cur)
      cur = []
    cur.append(ex)
  if cur:
    rows.append(cur)
  out = []
  for row in rows:
    r = {k: np.zeros(length, np.float32 if k == "loss_weights" else np.int32)
         for k in pp.PACKED_FEATURES}
    pos = 0
    for seg, (ids, tg, w) in enumerate(row, start=1):
      n = len(ids)
      r["item_ids"][pos:pos + n] = ids
      r["targets"][pos:pos + n] = tg
      r["loss_weights"][pos:pos + n] = w
      r["segment_ids"][pos:pos + n] = seg
      r["positions"][pos:pos + n] = np.arange(n)
      pos += n
    out.append(r)
  return out


def _masked_examples_ds(examples):
  def gen():
    for ids, tg, w in examples:
      yield {"item_ids": np.asarray(ids, np.int32),
             "targets": np.asarray(tg, np.int32),
             "loss_weights": np.asarray(w, np.float32),
             "user_id": b"x"}
  return tf.data.Dataset.from_generator(gen, output_signature={
      "item_ids": tf.TensorSpec([None], tf.int32),
      "targets": tf.TensorSpec([None], tf.int32),
      "loss_weights": tf.TensorSpec([None], tf.float32),
      "user_id": tf.TensorSpec([], tf.string)})


def test_packing_hand_case():
  ex = [([1, 2, 3], [0, 2, 0], [0, 1, 0]),
        ([4, 5, 6, 7], [4, 0, 0, 0], [1, 0, 0, 0]),
        ([8, 9], [0, 9], [0, 1]),
        ([10, 11, 12, 13, 14], [0, 0, 0, 0, 14], [0, 0, 0, 0, 1])]
  rows = list(pp.pad_or_pack(_masked_examples_ds(ex), max_len=8,
                             packing=True).as_numpy_iterator())
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["item_ids"], [1, 2, 3, 4, 5, 6, 7, 0])
  np.testing.assert_array_equal(rows[0]["segment_ids"],
                                [1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows[1]["item_ids"],
                                [8, 9, 10, 11, 12, 13, 14, 0])
  np.testing.assert_array_equal(rows[1]["targets"], [0, 9, 0, 0, 0, 0, 14, 0])
  np.testing.assert_array_equal(rows[1]["segment_ids"],
                                [1, 1, 2, 2, 2, 2, 2, 0])
  assert set(rows[0]) == set(pp.PACKED_FEATURES)


@pytest.mark.parametrize("max_predictions", [None, 3])
def test_packing_matches_numpy_reference(max_predictions):
  rng = np.random.default_rng(0)
  ex = []
  for _ in range(60):
    n = int(rng.integers(1, 13))
    ids = rng.integers(1, 50, n)
    w = (rng.random(n) < 0.3).astype(np.float32)
    w[np.cumsum(w) > 3] = 0  # mask_example's per-example cap
    ex.append((ids, np.where(w > 0, ids, 0), w))
  got = list(pp.pack_examples(_masked_examples_ds(ex), 12,
                              max_predictions).as_numpy_iterator())
  want = _numpy_pack(ex, 12, max_predictions)
  if max_predictions:
    masks = [int((g["loss_weights"] > 0).sum()) for g in got]
    assert max(masks) <= max_predictions
    assert sum(masks) == sum(int((e[2] > 0).sum()) for e in ex)  # none cut
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in pp.PACKED_FEATURES:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_packed_rows_never_span_two_batches():
  # Given single examples, every BLOCK of them is packed on its own: the
  # NumPy packer restarted every BLOCK examples gives the same rows.
  rng = np.random.default_rng(1)
  ex = []
  for _ in range(2 * pp.BLOCK + 37):
    n = int(rng.integers(1, 10))
    ids = rng.integers(1, 50, n)
    w = np.zeros(n, np.float32)
    w[rng.integers(0, n)] = 1.0
    ex.append((ids, np.where(w > 0, ids, 0), w))
  got = list(pp.pack_examples(_masked_examples_ds(ex), 12, 3)
             .as_numpy_iterator())
  want = []
  for i in range(0, len(ex), pp.BLOCK):
    want += _numpy_pack(ex[i:i + pp.BLOCK], 12, 3)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in pp.PACKED_FEATURES:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_pack_batch_one_example_per_row_and_cut_to_length():
  # Examples longer than the row are cut; ones that fill it get a row each.
  ids = tf.ragged.constant([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11]],
                           dtype=tf.int32)
  weights = tf.ragged.constant([[0, 0, 0, 1, 0, 1], [1, 0, 0, 0], [1]],
                               dtype=tf.float32)
  ex = {"item_ids": ids, "targets": ids * tf.cast(weights, tf.int32),
        "loss_weights": weights}
  rows = {k: v.numpy() for k, v in pp.pack_batch(ex, 4).items()}
  np.testing.assert_array_equal(rows["item_ids"],
                                [[1, 2, 3, 4], [7, 8, 9, 10], [11, 0, 0, 0]])
  np.testing.assert_array_equal(rows["loss_weights"],
                                [[0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"],
                                [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
  empty = pp.pack_batch({k: v[:0] for k, v in ex.items()}, 4)
  assert empty["item_ids"].shape == (0, 4)


def _batched(ds, size):
  """`ds` as batches of `size` examples, the form the task's source emits."""
  return ds.ragged_batch(size)


@pytest.mark.parametrize("kwargs", [
    dict(max_len=5), dict(max_len=5, sliding_window_stride=2),
    dict(max_len=5, train_prefixes=True)])
def test_batches_and_single_examples_give_the_same_rows(kwargs):
  hist = _random_histories(300, 2, 14, seed=3)
  rows = {}
  for form in ("single", "batched"):
    ds = _train_ds(hist)
    if form == "batched":
      ds = _batched(ds, 37)
    ds = pp.pad_or_pack(pp.truncate_or_window(ds, **kwargs), max_len=5)
    rows[form] = _rows(ds)
  assert len(rows["single"]) == len(rows["batched"]) > len(hist) - 1
  for a, b in zip(rows["single"], rows["batched"]):
    assert a["user_id"] == b["user_id"]
    np.testing.assert_array_equal(a["item_ids"], b["item_ids"])


def test_batched_eval_rows_match_single_examples():
  hist = _random_histories(100, 1, 9, seed=4)
  rows = {}
  for form in ("single", "batched"):
    ds = _train_ds(hist).map(
        lambda ex: dict(ex, target=tf.size(ex["item_ids"]) + 500,
                        critiques=tf.strings.as_string(ex["item_ids"]),
                        target_critique=tf.constant("next")))
    if form == "batched":
      ds = _batched(ds, 16)
    ds = pp.bert4rec_inputs(pp.truncate_or_window(ds, max_len=6),
                            num_items=NUM_ITEMS)
    rows[form] = _rows(pp.pad_or_pack(ds, max_len=6))
  for h, a, b in zip(hist, rows["single"], rows["batched"]):
    kept = list(h[-5:])
    n = len(kept)
    want = kept + [MASK] + [0] * (5 - n)
    np.testing.assert_array_equal(a["item_ids"], want)
    np.testing.assert_array_equal(a["targets"][n], len(h) + 500)
    assert list(a["critiques"]) == [str(i).encode() for i in kept] + [
        b"next"] + [b""] * (5 - n)
    for k in ("item_ids", "targets", "loss_weights", "critiques"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mask_rules_hold_on_batches():
  # The task's source emits batches; masking sees them whole.
  hist = _random_histories(1500, 1, 30, seed=5)
  p, cap = 0.3, 4
  with seqio.utils.map_seed_manager(2):
    ds = pp.bert4rec_inputs(_batched(_train_ds(hist), 64), num_items=NUM_ITEMS,
                            mask_prob=p, max_predictions=cap,
                            last_item_mask_prob=0.0)
  rows = _rows(pp.pad_or_pack(ds, max_len=30))
  total = expected = 0.0
  for h, r in zip(hist, rows):
    n = len(h)
    m = r["loss_weights"][:n] > 0
    assert 1 <= m.sum() <= min(cap, n) and not r["loss_weights"][n:].any()
    np.testing.assert_array_equal(r["targets"][:n], np.where(m, h, 0))
    total += m.sum()
    expected += _expected_count(n, p, cap, 0.0)
  assert abs(total - expected) < 5 * math.sqrt(len(hist) * cap**2 / 4)


def test_eval_ignores_packing_and_pads():
  ev = _train_ds([[1, 2]]).map(lambda ex: dict(ex, target=tf.constant(3)))
  ev = pp.bert4rec_inputs(pp.truncate_or_window(ev, max_len=4),
                          num_items=NUM_ITEMS)
  ex = next(pp.pad_or_pack(ev, max_len=4, packing=True).as_numpy_iterator())
  np.testing.assert_array_equal(ex["item_ids"], [1, 2, MASK, 0])
  assert "segment_ids" not in ex


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("text"))
  titles = ["red running shoe", "blue cotton shirt", "green wool hat",
            "black leather belt", "white canvas bag", "red wool scarf"]
  items = {str(i + 1): prepared.ItemMeta(
      item_id=str(i + 1), title=t, brand="acme", categories=["clothing"])
           for i, t in enumerate(titles)}
  users = [prepared.UserRecord(
      user_id=f"u{i}", item_ids=[str(1 + (i + j) % 6) for j in range(4)],
      critiques=["", "something warmer", "", "in red wool"])
           for i in range(4)]
  prepared.write_prepared(d, users=users, items=items, text_vocab_size=60)
  return d


def test_item_text_tokens_decode_back(text_dir):
  data = prepared.PreparedDataset(text_dir)
  vocab = seqio.SentencePieceVocabulary(data.text_vocab_path)
  tokens = pp.item_text_tokens(text_dir, max_tokens=64)
  texts = pp.item_texts(text_dir)
  assert tokens.shape == (data.num_items + 2, 64) and tokens.dtype == np.int32
  assert not tokens[0].any() and not tokens[-1].any()
  for j, item in enumerate(data.items(), start=1):
    assert texts[j] == prepared.item_text(item)
    assert pp.decode_tokens(vocab, tokens[j]) == texts[j]
    n = int((tokens[j] > 0).sum())
    assert tokens[j, n - 1] == vocab.eos_id
  short = pp.item_text_tokens(text_dir, max_tokens=4)
  assert (short[1:-1, -1] == vocab.eos_id).all()
  np.testing.assert_array_equal(short[1:-1, :3], tokens[1:-1, :3])


def test_critique_tokens_decode_back(text_dir):
  data = prepared.PreparedDataset(text_dir)
  vocab = seqio.SentencePieceVocabulary(data.text_vocab_path)
  source = sources.PreparedSequenceSource(text_dir)
  ds = source.get_dataset("test", shuffle=False)
  ds = pp.tokenize_texts(
      ds, vocabulary=vocab, max_tokens=16,
      features={"critiques": "critique_tokens",
                "target_critique": "target_critique_tokens"})
  ex = next(ds.as_numpy_iterator())
  assert ex["critique_tokens"].shape == (3, 16)
  assert not ex["critique_tokens"][0].any()  # "" stays all padding
  assert pp.decode_tokens(vocab, ex["critique_tokens"][1]) == "something warmer"
  assert pp.decode_tokens(vocab, ex["target_critique_tokens"]) == (
      "in red wool")
