"""Real data: Amazon Beauty (S3-Rec 5-core split) and MovieLens-100K.

Read in place from <repo>/../shared/data; skipped when that folder is absent
(a fresh clone has none). Expected counts are the published ones (see the
PROVENANCE.md files there); sequences are checked against the raw files.
"""

import collections
import json
import os

import pytest

from recsys_jax.data import prepared
from recsys_jax.data import readers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")
BEAUTY = os.path.join(SHARED_DATA, "amazon_beauty")
ML100K = os.path.join(SHARED_DATA, "movielens_100k")


def need(path, *files):
  for f in files:
    if not os.path.exists(os.path.join(path, f)):
      pytest.skip(f"real data not present: {os.path.join(path, f)} (see "
                  "shared/data/README.md)")


def read_prepared(out_dir):
  """user_id -> (item indices, timestamps), parsed with tf.train.Example."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = prepared.PreparedDataset(str(out_dir))
  users = {}
  for path in ds.sequence_files:
    for rec in tf.compat.v1.io.tf_record_iterator(path):
      f = tf.train.Example.FromString(rec).features.feature
      users[f[prepared.USER_ID].bytes_list.value[0].decode()] = (
          list(f[prepared.ITEM_IDS].int64_list.value),
          list(f[prepared.TIMESTAMPS].int64_list.value))
  return ds, users


def test_beauty_prepared_matches_published_split(tmp_path):
  need(BEAUTY, "Beauty.txt", "beauty_items.jsonl")
  seq_path = os.path.join(BEAUTY, "Beauty.txt")
  out = tmp_path / "beauty"
  users, items, source = readers.read_sequence_file(
      seq_path, item_metadata_path=os.path.join(BEAUTY, "beauty_items.jsonl"))
  stats = prepared.write_prepared(str(out), users, items, source=source,
                                  text_vocab_size=None)
  assert (stats["users"], stats["items"], stats["interactions"]) == (
      22363, 12101, 198502)
  assert stats["skipped"] == {}
  ds, seqs = read_prepared(out)
  rows = ds.items()
  # Raw ids are 1..12101, so index i is raw id i.
  assert all(r["index"] == int(r["item_id"]) for r in rows)
  assert [r["index"] for r in rows] == list(range(1, 12102))
  with open(os.path.join(BEAUTY, "beauty_items.jsonl")) as f:
    meta = {str(m["item_id"]): m for m in map(json.loads, f)}
  # Titles are attached, surrounding whitespace (2 have a trailing NBSP)
  # stripped.
  assert all(r["title"] == meta[r["item_id"]]["title"].strip() for r in rows)
  assert sum(bool(r["title"]) for r in rows) >= 12101 - 7  # 7 lack titles
  assert rows[0]["asin"] == meta["1"]["asin"]
  # Every sequence equals its Beauty.txt line; in particular the last item
  # (the leave-one-out test target) is the line's last item.
  with open(seq_path) as f:
    for line in f:
      user, *raw_items = line.split()
      got = seqs[user][0]
      assert got[-1] == int(raw_items[-1]), user
      assert got == [int(i) for i in raw_items], user
  assert len(seqs) == 22363


def test_movielens_100k_prepared(tmp_path):
  need(ML100K, "u.data", "u.item")
  out = tmp_path / "ml"
  users, items, source = readers.read_movielens(ML100K)
  stats = prepared.write_prepared(str(out), users, items, source=source,
                                  text_vocab_size=None)
  assert (stats["users"], stats["items"], stats["interactions"]) == (
      943, 1682, 100000)
  ds, seqs = read_prepared(out)
  rows = ds.items()
  assert rows[0]["title"] == "Toy Story (1995)"
  assert rows[0]["categories"] == ["Animation", "Children's", "Comedy"]
  assert rows[0]["year"] == 1995
  # Reference: group u.data by user, stable sort by timestamp.
  ref = collections.defaultdict(list)
  with open(os.path.join(ML100K, "u.data")) as f:
    for line in f:
      u, i, _, t = line.split("\t")
      ref[u].append((int(t), int(i)))
  for u, events in ref.items():
    events.sort(key=lambda e: e[0])
    assert seqs[u][0] == [i for _, i in events], u
    assert seqs[u][1] == [t for t, _ in events], u
