"""Tests of the synthetic interaction store (recsys_jax/data/synthetic.py)."""

import collections
import json
import os

import numpy as np
import pytest

from recsys_jax.data import prepared
from recsys_jax.data import synthetic
from recsys_jax.data import synthetic_text


def _config(preset, **overrides):
  kwargs = {k: v for k, v in synthetic.PRESETS[preset].items()
            if k != "text_vocab_size"}
  kwargs.update(overrides)
  return synthetic.SyntheticConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  """The tiny preset written twice with seed 0 and once with seed 1."""
  root = tmp_path_factory.mktemp("synthetic")
  dirs = {}
  for name, seed, vocab in (("a", 0, 300), ("b", 0, None), ("c", 1, None)):
    d = str(root / name)
    kwargs = dict(synthetic.TINY, seed=seed, text_vocab_size=vocab)
    dirs[name] = (d, synthetic.generate(d, **kwargs))
  return dirs


@pytest.fixture(scope="module")
def default_world():
  """The default catalogue with 3,000 of its users, simulated in memory.

  (The default's 20,000 users take minutes here; the properties tested do
  not depend on the user count.)
  """
  catalog = synthetic.Catalog(_config("default", num_users=3000))
  return catalog, list(synthetic.iter_users(catalog))


def _read(d):
  data = prepared.PreparedDataset(d)
  return data.items(), list(data.iter_sequences())


def _files(d):
  return sorted(f for f in os.listdir(d) if f.startswith("sequences"))


def test_same_seed_same_bytes_other_seed_differs(tiny_dirs):
  (a, _), (b, _), (c, _) = tiny_dirs["a"], tiny_dirs["b"], tiny_dirs["c"]
  read = lambda d, f: open(os.path.join(d, f), "rb").read()
  assert read(a, "items.jsonl") == read(b, "items.jsonl")
  assert _files(a) == _files(b) == ["sequences.tfrecord-00000-of-00001"]
  assert read(a, _files(a)[0]) == read(b, _files(b)[0])
  assert read(a, "items.jsonl") != read(c, "items.jsonl")
  seq_a = [s[prepared.ITEM_IDS].tolist() for s in _read(a)[1]]
  seq_c = [s[prepared.ITEM_IDS].tolist() for s in _read(c)[1]]
  assert seq_a != seq_c


def test_written_dataset_is_valid(tiny_dirs):
  d, stats = tiny_dirs["a"]
  items, seqs = _read(d)
  n = synthetic.TINY["num_items"]
  assert stats["users"] == len(seqs) == synthetic.TINY["num_users"]
  assert stats["items"] == len(items) == n
  assert [it["index"] for it in items] == list(range(1, n + 1))
  assert stats["text_vocab"] == "spm.model"
  assert os.path.exists(os.path.join(d, "spm.model"))
  assert stats["generator"]["seed"] == 0
  assert sorted(stats["narrative_fields"]) == [
      "endorsement", "purchase_reason", "user_summary"]
  total = 0
  for s in seqs:
    ids, ts = s[prepared.ITEM_IDS], s[prepared.TIMESTAMPS]
    assert len(ids) >= 3
    assert ids.min() >= 1 and ids.max() <= n
    assert np.all(np.diff(ts) > 0)
    assert np.all(ids[1:] != ids[:-1])  # never the previous item again
    total += len(ids)
  assert stats["interactions"] == total
  for it in items:
    assert len(it["categories"]) == 3 and it["brand"] and it["title"]
    assert it["price"] > 0


def test_brands_belong_to_one_top_category(tiny_dirs):
  items, _ = _read(tiny_dirs["a"][0])
  tops = collections.defaultdict(set)
  for it in items:
    tops[it["brand"]].add(it["categories"][0])
  assert all(len(t) == 1 for t in tops.values())
  assert len(tops) > synthetic.TINY["num_top_categories"]


def test_critiques_exactly_where_subcategory_changes(tiny_dirs):
  items, seqs = _read(tiny_dirs["a"][0])
  leaf = {it["index"]: it["categories"][-1] for it in items}
  changes = 0
  for s in seqs:
    ids = s[prepared.ITEM_IDS]
    crit = [c.decode() for c in s[prepared.CRITIQUES]]
    assert len(crit) == len(ids) and crit[0] == ""
    for i in range(1, len(ids)):
      if leaf[ids[i]] != leaf[ids[i - 1]]:
        assert synthetic_text.display_name(leaf[ids[i]]) in crit[i]
        changes += 1
      else:
        assert crit[i] == ""
  assert changes > 100  # the check above was exercised


def test_narratives_state_the_truth(default_world):
  catalog, users = default_world
  for su in users[:300]:
    nar = su.record.narratives
    top_leaf = catalog.leaves[int(np.argmax(su.category_preference))]["name"]
    assert synthetic_text.display_name(top_leaf) in nar["user_summary"]
    top_brand = catalog.brand_names[int(np.argmax(su.brand_affinity))]
    assert top_brand in nar["user_summary"]
    last_leaf = catalog.leaves[su.leaves[-1]]["name"]
    assert synthetic_text.display_name(last_leaf).lower() in (
        nar["purchase_reason"].lower())
    title = catalog.item_title(int(su.items[-1]))
    assert title.split(", ")[0] in nar["endorsement"]
  # The routine cause is explained as such.
  routine = [su for su in users if su.causes[-1] == "routine"]
  assert routine and all("usual next step" in su.record.narratives[
      "purchase_reason"] for su in routine)


def _loglog_slope(counts):
  c = np.sort(counts)[::-1]
  c = c[c > 0][:len(c) // 2]
  return np.polyfit(np.log(np.arange(1, len(c) + 1)), np.log(c), 1)[0]


def test_item_popularity_is_zipf(default_world):
  catalog, users = default_world
  counts = np.bincount(np.concatenate([su.items for su in users]),
                       minlength=catalog.num_items)
  assert -1.3 < _loglog_slope(counts) < -0.6
  # Within the largest sub-categories too.
  for leaf in np.argsort(-np.bincount(catalog.item_leaf))[:3]:
    assert -1.6 < _loglog_slope(counts[catalog.item_leaf == leaf]) < -0.4
  # Heavy head: top 10% of items take a large share of interactions.
  top = np.sort(counts)[::-1][:catalog.num_items // 10].sum()
  assert top / counts.sum() > 0.3


def test_markov_beats_popularity_so_order_matters(default_world):
  _, users = default_world
  res = synthetic.next_item_baselines([su.items + 1 for su in users],
                                      synthetic.DEFAULT["num_items"])
  assert res["users"] == len(users)
  assert res["markov_hr"] >= 1.5 * res["popularity_hr"]
  assert res["markov_ndcg"] >= 1.5 * res["popularity_ndcg"]
  # Destroying the order of each user's history destroys the advantage.
  rng = np.random.default_rng(0)
  shuffled = [rng.permutation(su.items + 1) for su in users]
  res_shuffled = synthetic.next_item_baselines(
      shuffled, synthetic.DEFAULT["num_items"])
  assert res_shuffled["markov_hr"] < 0.8 * res["markov_hr"]


def test_next_item_baselines_hand_case():
  # Train prefixes [1,2], [1,2], [3,1]: popularity 1:3, 2:2, 3:1, 4:0 and
  # transitions 1->2 (twice), 3->1. Queries (prev -> target): 2->3, 2->3,
  # 1->2. Popularity ranks (0-based) of the targets: 2, 2, 1. Markov from 2
  # has no counts (popularity order: rank 2); from 1 it puts 2 first (rank 0).
  seqs = [[1, 2, 3], [1, 2, 3], [3, 1, 2]]
  res = synthetic.next_item_baselines(seqs, num_items=4, k=1)
  assert res["popularity_hr"] == 0.0
  assert res["markov_hr"] == pytest.approx(1 / 3)
  res = synthetic.next_item_baselines(seqs, num_items=4, k=3)
  assert res["popularity_hr"] == 1.0 and res["markov_hr"] == 1.0
  assert res["popularity_ndcg"] == pytest.approx(
      np.mean([1 / np.log2(4), 1 / np.log2(4), 1 / np.log2(3)]))
  assert res["markov_ndcg"] == pytest.approx(
      np.mean([1 / np.log2(4), 1 / np.log2(4), 1.0]))
  # Ties: items 1 and 2 both seen twice; the lower index ranks first.
  res = synthetic.next_item_baselines([[2, 1, 1], [1, 2, 2]], 3, k=1)
  assert res["popularity_hr"] == 0.5


def test_routine_transition_is_the_most_frequent(default_world):
  catalog, users = default_world
  c = catalog.config
  trans = np.zeros((c.num_categories, c.num_categories))
  for su in users:
    np.add.at(trans, (su.leaves[:-1], su.leaves[1:]), 1)
  for s in range(c.num_categories):
    if trans[s].sum() >= 30:
      assert np.argmax(trans[s]) == catalog.leaf_next[s]
  # The transition rows are distributions with the configured routine mass.
  row = catalog.transition_row(0)
  assert row.sum() == pytest.approx(1.0)
  assert row[catalog.leaf_next[0]] >= c.transition_next


def test_routine_chain_follows_the_named_order():
  catalog = synthetic.Catalog(_config("tiny"))
  names = [l["name"] for l in catalog.leaves]
  nxt = {names[s]: names[catalog.leaf_next[s]] for s in range(len(names))}
  assert nxt["Cleansers"] == "Toners" and nxt["Toners"] == "Serums"
  assert nxt["Serums"] == "Moisturizers"
  assert nxt["Moisturizers"] == "Cleansers"  # 4 Beauty leaves, cyclic


def test_draw_item_matches_popularity_times_brand_weight():
  catalog = synthetic.Catalog(_config("tiny"))
  c = catalog.config
  leaf = int(np.argmax(np.bincount(catalog.item_leaf)))
  top = catalog.leaf_top[leaf]
  bw = np.array([0.05, 1.0, 0.3, 0.0])[:c.brands_per_top]
  rng = np.random.default_rng(1)
  n = 20000
  draws = [catalog.draw_item(leaf, bw, *rng.random(2)) for _ in range(n)]
  freq = np.bincount(draws, minlength=catalog.num_items) / n
  in_leaf = catalog.item_leaf == leaf
  expected = np.zeros(catalog.num_items)
  local_brand = catalog.item_brand[in_leaf] - top * c.brands_per_top
  expected[in_leaf] = catalog.item_pop[in_leaf] * bw[local_brand]
  expected /= expected.sum()
  assert freq[~in_leaf].sum() == 0
  assert freq[expected == 0].sum() == 0  # brand weight 0 is never drawn
  assert np.abs(freq - expected).sum() / 2 < 0.03  # total variation


def test_titles_share_words_within_subcategory():
  catalog = synthetic.Catalog(_config("default"))
  words = [set(catalog.item_title(i).lower().replace(",", "").split())
           for i in range(400)]
  leaf = catalog.item_leaf[:400]
  same, diff = [], []
  for i in range(400):
    for j in range(i + 1, 400):
      jac = len(words[i] & words[j]) / len(words[i] | words[j])
      (same if leaf[i] == leaf[j] else diff).append(jac)
  assert np.mean(same) > 3 * np.mean(diff)
  # The brand name is in the title; the description names the head noun.
  meta = catalog.item_meta(7)
  assert meta.title.startswith(meta.brand)
  head = catalog.leaves[catalog.item_leaf[7]]["head"].lower()
  assert head in meta.description


def test_lengths_heavy_tailed_and_capped(default_world):
  _, users = default_world
  lengths = np.array([len(su.items) for su in users])
  assert lengths.min() >= 3
  assert 8.5 < lengths.mean() < 11.5
  assert np.percentile(lengths, 99) > 3 * np.median(lengths)
  catalog = synthetic.Catalog(_config("tiny", max_length=8, mean_length=6))
  assert max(len(su.items) for su in synthetic.iter_users(catalog)) <= 8


def test_preferences_are_sparse(default_world):
  _, users = default_world
  prefs = np.stack([su.category_preference for su in users])
  assert np.allclose(prefs.sum(1), 1.0)
  # A uniform user would put 3 / 48 = 0.06 on any 3; ours put most mass there.
  top3 = np.sort(prefs, axis=1)[:, -3:].sum(1)
  assert np.median(top3) > 0.6


def test_large_taxonomy_with_made_up_names():
  config = synthetic.SyntheticConfig(num_users=20, num_items=400,
                                     num_categories=90, num_top_categories=9)
  catalog = synthetic.Catalog(config)
  names = [l["name"] for l in catalog.leaves]
  assert len(set(names)) == 90
  assert np.bincount(catalog.item_leaf, minlength=90).min() >= 2
  assert len(set(catalog.brand_names)) == catalog.num_brands
  users = list(synthetic.iter_users(catalog))
  assert all(len(su.items) >= 3 for su in users)
  assert all(catalog.item_title(i) for i in range(0, 400, 37))


def test_bad_arguments_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="num_items=10"):
    synthetic.SyntheticConfig(num_items=10, num_categories=12)
  with pytest.raises(ValueError, match="transition"):
    synthetic.SyntheticConfig(transition_next=0.9, transition_stay=0.2)
  with pytest.raises(TypeError, match="num_categoriez"):
    synthetic.generate(str(tmp_path), num_categoriez=3)
