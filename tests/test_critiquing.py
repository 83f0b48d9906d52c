"""FLARE's critiquing evaluation on a hand-made dataset and a fake model.

Eight items in three categories (plus one without), five users; the removed
items, compacted histories, critique ids and every rank are worked out by
hand below, and the metrics and lifts follow from those ranks.
"""

import json
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.core import partitioning
from recsys_jax.evaluation import critiquing
from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.model_lib import flare
from recsys_jax.models import bert4rec
from recsys_jax.models import flare as flare_lib
from recsys_jax.models import perceiver
from recsys_jax.text import item_text_cache

N, L, B = 8, 6, 4
MASK = N + 1
CATEGORIES = {1: "Serums", 2: "Serums", 3: "Serums", 4: "Masks", 5: "Masks",
              6: "Lipstick", 7: "Lipstick", 8: None}
# texts.json: row r is critique id r + 1.
TEXTS = ["Lipstick", "Masks", "Serums", "something cheaper"]
LIPSTICK, MASKS, SERUMS, CHEAPER = 1, 2, 3, 4
ITEM_CRITIQUE = [0, SERUMS, SERUMS, SERUMS, MASKS, MASKS, LIPSTICK, LIPSTICK,
                 0, 0]  # by item id 0..N + 1
# (history, target, data critique at the [MASK]); padding rows follow.
USERS = [([1, 4, 2, 6], 3, CHEAPER),   # removes 1, 2 (Serums)
         ([5, 7], 4, 0),               # removes 5 (Masks)
         ([1, 2], 6, LIPSTICK),        # removes nothing (Lipstick)
         ([3], 8, CHEAPER),            # target without category: skipped
         ([4, 5, 4], 5, 0)]            # removes all three (Masks)
WANT_HISTORY = [[4, 6], [7], [1, 2], [3], []]
WANT_REMOVED = [2, 1, 0, 0, 3]
# Fake model: item i scores i, +10 for the items of the critiqued category.
# Ranks, the ORIGINAL history excluded (the target never is):
#   user 0, candidates 3 5 7 8: (a) 5 7 8 beat 3 -> 3; (b) 3 scores 13 -> 0;
#     (c) "something cheaper" boosts nothing -> 3.
#   user 1, candidates 1 2 3 4 6 8: (a) 6 8 -> 2; (b) 4 scores 14 (5 is
#     excluded) -> 0; (c) none -> 2.
#   user 2, candidates 3..8: (a) 7 8 -> 2; (b) 7 scores 17 > 16 -> 1;
#     (c) Lipstick, as (b) -> 1.
#   user 4, candidates 1 2 3 5 6 7 8: (a) 6 7 8 -> 3; (b) 4 excluded -> 0;
#     (c) none -> 3.
RANKS = {"no_critique": [3, 2, 2, 3], "category_critique": [0, 0, 1, 0],
         "data_critique": [3, 2, 1, 3]}
SCORED = [0, 1, 2, 4]   # the users that are scored (3 is skipped)
OOD_USERS = [1, 4]      # targets in "Masks"


def _write_dataset(root):
  data_dir = os.path.join(root, "data")
  os.makedirs(data_dir)
  with open(os.path.join(data_dir, "items.jsonl"), "w") as f:
    for i in range(1, N + 1):
      cat = CATEGORIES[i]
      f.write(json.dumps({"index": i, "title": f"item {i}",
                          "categories": ["Beauty", cat] if cat else []})
              + "\n")
  cache = os.path.join(root, "critiques")
  _write_critique_cache(cache, TEXTS)
  return data_dir, cache


def _write_critique_cache(path, texts):
  """A complete critique cache of `texts` (the encodings are zeros: only
  texts.json is read here)."""
  n, t, d = len(texts), 2, 2
  writer = item_text_cache.CacheWriter(path, {
      "encoder": "test", "checkpoint_fingerprint": "none", "vocab": "none",
      "texts_kind": item_text_cache.CRITIQUES, "num_items": n,
      "max_text_len": t, "d_model": d, "dtype": "float32",
      "pooling": "mean", "store_tokens": False, "chunk_size": n},
                                      texts=texts)
  writer.write_chunk(0, {"mask": np.zeros((n, t), bool),
                         "token_ids": np.zeros((n, t), np.int32),
                         "pooled": np.zeros((n, d), np.float32)})


def _batches(with_critiques=True):
  rows = USERS + [None] * (2 * B - len(USERS))
  out = []
  for s in range(0, len(rows), B):
    ids = np.zeros((B, L), np.int32)
    tgt = np.zeros((B, L), np.int32)
    crit = np.zeros((B, L), np.int32)
    valid = np.zeros((B,), np.float32)
    for r, user in enumerate(rows[s:s + B]):
      if user is None:
        continue
      hist, target, critique = user
      ids[r, :len(hist)] = hist
      ids[r, len(hist)] = MASK
      tgt[r, len(hist)] = target
      crit[r, :len(hist)] = CHEAPER  # critiques of history items: not used
      crit[r, len(hist)] = critique
      valid[r] = 1
    batch = {"item_ids": ids, "targets": tgt, "valid": valid}
    if with_critiques:
      batch["critique_ids"] = crit
    out.append(batch)
  return out


class FakeData:
  """The data interface the evaluations read."""

  def __init__(self, data_dir, with_critiques=True):
    self.data_dir = data_dir
    self.with_critiques = with_critiques

  def eval_batches(self, split, batch_size):
    assert split == "test" and batch_size == B
    return iter(_batches(self.with_critiques))

  def train_item_counts(self):
    return np.arange(1, N + 1)


class CategoryBoostModel:
  """Scores item i as i, plus 10 for the items whose category critique id
  equals the row's critique (`input_critique_ids`; 0: none)."""
  num_items = N

  @staticmethod
  def score_fn(params, batch):
    b = batch["item_ids"].shape[0]
    scores = jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (b, N))
    if "input_critique_ids" not in batch:
      return scores
    critique = batch["input_critique_ids"].max(axis=1)  # one per row
    hit = (params["item_critique"][None, :] == critique[:, None]) & (
        critique[:, None] > 0)
    return scores + 10.0 * hit


PARAMS = {"item_critique": jnp.asarray(ITEM_CRITIQUE[1:N + 1])}


def _metrics(ranks, ks=(1, 5, 10)):
  r = np.asarray(ranks, np.float64)
  out = {f"HR@{k}": float(np.mean(r < k)) for k in ks}
  out.update({f"NDCG@{k}": float(np.mean(
      np.where(r < k, 1.0 / np.log2(r + 2), 0.0))) for k in ks})
  out["MRR"] = float(np.mean(1.0 / (r + 1)))
  return out


@pytest.fixture
def files(tmp_path):
  return _write_dataset(str(tmp_path))


def _evaluate(files, with_critiques=True, **kw):
  data_dir, cache = files
  cfg = evaluation.EvalConfig(ks=(1, 5, 10), batch_size=B, splits=("test",))
  ev = critiquing.CritiquingEvaluation(cfg, cache, **kw)
  results = ev.evaluate(CategoryBoostModel(), PARAMS,
                        FakeData(data_dir, with_critiques),
                        partitioning.make_mesh(1),
                        partitioning.DATA_PARALLEL_RULES)
  return ev, results


def test_category_critique_ids(files):
  data_dir, cache = files
  ev = critiquing.CritiquingEvaluation(evaluation.EvalConfig(), cache,
                                       ood_categories=["Masks"])
  item_critique, item_ood = ev.tables(data_dir, N)
  np.testing.assert_array_equal(item_critique, ITEM_CRITIQUE)
  np.testing.assert_array_equal(item_ood, [0, 0, 0, 1, 1, 0, 0, 0])


def test_remove_target_category_by_hand():
  batch = _batches()[0]
  rows = critiquing.remove_target_category(batch, np.asarray(ITEM_CRITIQUE),
                                           MASK)
  for r in range(B):
    hist = WANT_HISTORY[r]
    want_ids = np.zeros(L, np.int32)
    want_ids[:len(hist)] = hist
    want_ids[len(hist)] = MASK
    np.testing.assert_array_equal(rows.item_ids[r], want_ids, err_msg=str(r))
    want_tgt = np.zeros(L, np.int32)
    want_tgt[len(hist)] = USERS[r][1]
    np.testing.assert_array_equal(rows.targets[r], want_tgt)
    assert rows.mask_pos[r] == len(hist)
  # The original history (with its [MASK]) is what ranking excludes.
  np.testing.assert_array_equal(rows.exclude_ids, batch["item_ids"])
  np.testing.assert_array_equal(rows.valid, [True, True, True, False])
  np.testing.assert_array_equal(rows.skipped, [False, False, False, True])
  np.testing.assert_array_equal(rows.removed, [2, 1, 0, 0])
  np.testing.assert_array_equal(rows.category_critique,
                                [SERUMS, MASKS, LIPSTICK, 0])
  # The data critique is the one at the [MASK], not the history's.
  np.testing.assert_array_equal(rows.data_critique, [CHEAPER, 0, LIPSTICK, 0])

  # Second batch: one user whose whole history goes, three padding rows.
  rows = critiquing.remove_target_category(_batches()[1],
                                           np.asarray(ITEM_CRITIQUE), MASK)
  np.testing.assert_array_equal(rows.item_ids[0], [MASK, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows.targets[0], [5, 0, 0, 0, 0, 0])
  assert not rows.item_ids[1:].any() and not rows.targets[1:].any()
  np.testing.assert_array_equal(rows.valid, [True, False, False, False])
  np.testing.assert_array_equal(rows.skipped, [False] * 4)
  np.testing.assert_array_equal(rows.removed, [3, 0, 0, 0])


def test_critiqued_batch_places_the_critique_at_the_mask():
  rows = critiquing.remove_target_category(
      _batches()[0], np.asarray(ITEM_CRITIQUE), MASK)
  batch = critiquing.critiqued_batch(rows, rows.category_critique)
  want = np.zeros((B, L), np.int32)
  want[0, 2], want[1, 1], want[2, 2] = SERUMS, MASKS, LIPSTICK
  np.testing.assert_array_equal(batch["input_critique_ids"], want)
  assert set(batch) == {"item_ids", "targets", "exclude_ids",
                        "input_critique_ids", "valid"}
  np.testing.assert_array_equal(batch["valid"], [1, 1, 1, 0])
  none = critiquing.critiqued_batch(rows, np.zeros(B, np.int32))
  assert not none["input_critique_ids"].any()


def _check_block(block, users, ks=(1, 5, 10)):
  idx = [SCORED.index(u) for u in users]
  for variant, ranks in RANKS.items():
    want = _metrics(np.asarray(ranks)[idx], ks)
    got = block[variant]
    assert got["num_users"] == len(users), variant
    for name, value in want.items():
      assert got[name] == pytest.approx(value, abs=1e-12), (variant, name)
  a, b, c = (_metrics(np.asarray(RANKS[v])[idx], ks) for v in RANKS)
  for name in ("NDCG@10", "HR@10", "MRR", "NDCG@5"):
    assert block[f"lift_{name}"] == pytest.approx(b[name] / a[name])
    assert block[f"data_lift_{name}"] == pytest.approx(c[name] / a[name])
  assert block["num_users"] == len(users)
  assert block["removed_items_mean"] == pytest.approx(
      np.mean([WANT_REMOVED[u] for u in users]))
  assert block["data_critique_missing"] == sum(
      USERS[u][2] == 0 for u in users)


def test_protocol_metrics_and_lift_by_hand(files, tmp_path):
  ev, results = _evaluate(files, ood_categories=["Masks"])
  res = results["test_critiquing"]
  _check_block(res, SCORED)
  assert res["skipped_no_category"] == 1
  # Overall by hand: NDCG@10 (a) = mean(1/log2 5, 1/log2 4, 1/log2 4,
  # 1/log2 5), (b) = mean(1, 1, 1/log2 3, 1).
  a = (2 / math.log2(5) + 2 / math.log2(4)) / 4
  b = (3 + 1 / math.log2(3)) / 4
  assert res["lift_NDCG@10"] == pytest.approx(b / a)
  assert res["lift_HR@10"] == pytest.approx(1.0)  # every rank < 10
  assert res["removed_items_mean"] == pytest.approx(6 / 4)
  # Out of domain: users 1 and 4 (Masks); in domain 0 and 2 (+ the skipped).
  _check_block(res["ood"], OOD_USERS)
  _check_block(res["in_domain"], [0, 2])
  assert res["ood"]["skipped_no_category"] == 0
  assert res["in_domain"]["skipped_no_category"] == 1
  assert res["ood"]["lift_MRR"] == pytest.approx(1 / ((1 / 3 + 1 / 4) / 2))
  assert "by_frequency" not in res["no_critique"]
  assert res["no_critique"]["protocol"] == (
      "full_ranking_excluding_history")
  # The ordinary ranking ran first (the config as given: history kept).
  assert results["test"]["num_users"] == 5
  assert results["test"]["protocol"] == "full_ranking"
  assert "test_popularity" in results
  # Log lines and the eval JSON (strict: no NaN).
  lines = ev.format_results(7, results)
  assert any(x.startswith("[eval step 7] test (full_ranking, 5 users)")
             for x in lines)
  assert any(x.startswith("[eval step 7] test_critiquing ood "
                          "category_critique (2 users): HR@1=1.0000")
             for x in lines)
  summary = [x for x in lines if x.startswith("[eval step 7] test_critiquing:")]
  assert len(summary) == 1 and f"lift NDCG@10 x{b / a:.3f}" in summary[0]
  assert "4 users, 1 skipped (no category)" in summary[0]
  path = evaluation.write_results(str(tmp_path), 7, results)
  with open(path) as f:
    loaded = json.loads(f.read(), parse_constant=pytest.fail)
  assert loaded["test_critiquing"]["ood"]["num_users"] == 2


def test_without_ood_data_critiques_or_ranking(files):
  _, results = _evaluate(files, ranking=False, data_critiques=False)
  assert list(results) == ["test_critiquing"]
  res = results["test_critiquing"]
  assert set(res) & {"ood", "in_domain", "data_critique",
                     "data_critique_missing", "data_lift_NDCG@10"} == set()
  for variant in ("no_critique", "category_critique"):
    want = _metrics(RANKS[variant])
    for name, value in want.items():
      assert res[variant][name] == pytest.approx(value)
  assert "by_frequency" not in res["no_critique"]


def test_batches_without_critique_ids_skip_the_data_variant(files):
  _, results = _evaluate(files, ranking=False, with_critiques=False)
  res = results["test_critiquing"]
  assert "data_critique" not in res and res["num_users"] == 4
  assert res["lift_NDCG@10"] > 1


def test_id_only_model_has_lift_one(files):
  data_dir, cache = files

  class IdOnly(CategoryBoostModel):

    @staticmethod
    def score_fn(params, batch):
      b = batch["item_ids"].shape[0]
      return jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (b, N))
  ev = critiquing.CritiquingEvaluation(
      evaluation.EvalConfig(ks=(10,), batch_size=B), cache, ranking=False)
  res = ev.evaluate(IdOnly(), PARAMS, FakeData(data_dir),
                    partitioning.make_mesh(1),
                    partitioning.DATA_PARALLEL_RULES)["test_critiquing"]
  assert res["lift_NDCG@10"] == pytest.approx(1.0)
  assert res["lift_HR@10"] == pytest.approx(1.0)


def test_bad_ood_category_is_named(files):
  data_dir, cache = files
  ev = critiquing.CritiquingEvaluation(evaluation.EvalConfig(), cache,
                                       ood_categories=["Masks", "Perfume"])
  with pytest.raises(ValueError, match=r"\['Perfume'\].*'Lipstick'"):
    ev.tables(data_dir, N)


def test_category_missing_from_the_cache_is_refused(files, tmp_path):
  data_dir, _ = files
  other = tmp_path / "other"
  _write_critique_cache(str(other), ["Lipstick", "Masks"])
  ev = critiquing.CritiquingEvaluation(evaluation.EvalConfig(), str(other))
  with pytest.raises(ValueError, match=r"\['Serums'\].*embed_items"):
    ev.tables(data_dir, N)


def test_model_with_another_critique_table_is_refused(files):
  data_dir, cache = files
  ev = critiquing.CritiquingEvaluation(evaluation.EvalConfig(), cache)
  good = types.SimpleNamespace(host_tables=types.SimpleNamespace(
      num_critiques=len(TEXTS), item_category=np.asarray(ITEM_CRITIQUE)))
  ev.tables(data_dir, N, good)
  bad = types.SimpleNamespace(host_tables=types.SimpleNamespace(
      num_critiques=len(TEXTS), item_category=np.roll(ITEM_CRITIQUE, 1)))
  with pytest.raises(ValueError, match="model's critique table"):
    ev.tables(data_dir, N, bad)


def test_real_flare_model_against_a_numpy_reference(files):
  """A randomly initialised FlareModel through the protocol: every variant's
  metrics equal ranks computed in NumPy from `score_fn` on hand-built
  (compacted) rows, the ORIGINAL history excluded."""
  data_dir, cache = files
  bc = bert4rec.Bert4RecConfig(num_items=N, max_len=L, hidden=16,
                               num_heads=2, mlp_dim=32)
  v, t, d, tc = bc.padded_vocab, 3, 4, 2
  rng = np.random.default_rng(0)
  item_mask = np.zeros((v, t), bool)
  item_mask[1:N + 1] = True
  crit_mask = np.ones((len(TEXTS) + 1, tc), bool)
  crit_mask[0] = False
  category = np.zeros((v,), np.int32)
  category[:N + 2] = ITEM_CRITIQUE
  tables = flare.FlareTextTables(
      item_tokens=rng.normal(size=(v, t, d)).astype(np.float32) *
      item_mask[..., None],
      item_mask=item_mask,
      critique_tokens=rng.normal(size=(len(TEXTS) + 1, tc, d)).astype(
          np.float32),
      critique_mask=crit_mask, item_category=category)
  cfg = flare_lib.FlareConfig(
      backbone=bc, perceiver=perceiver.PerceiverConfig(width=16, mlp_dim=32),
      text_dim=d)
  model = flare.FlareModel(cfg, tables)
  # One compiled init (op by op it compiles every layer separately).
  params = nn.meta.unbox(jax.jit(model.get_initial_variables)(
      jax.random.PRNGKey(0))["params"])
  ev = critiquing.CritiquingEvaluation(
      evaluation.EvalConfig(ks=(1, 5, 10), batch_size=B), cache,
      ranking=False)
  res = ev.evaluate(model, params, FakeData(data_dir),
                    partitioning.make_mesh(1),
                    partitioning.DATA_PARALLEL_RULES)["test_critiquing"]

  score = jax.jit(model.score_fn)
  critique_of = {"no_critique": lambda u: 0,
                 "category_critique": lambda u: ITEM_CRITIQUE[USERS[u][1]],
                 "data_critique": lambda u: USERS[u][2]}
  for variant, pick in critique_of.items():
    ranks = []
    for u in SCORED:
      hist, target, _ = USERS[u]
      kept = WANT_HISTORY[u]
      ids = np.zeros((1, L), np.int32)
      ids[0, :len(kept)] = kept
      ids[0, len(kept)] = MASK
      tgt = np.zeros((1, L), np.int32)
      tgt[0, len(kept)] = target
      crit = np.zeros((1, L), np.int32)
      crit[0, len(kept)] = pick(u)
      s = np.asarray(score(params, {"item_ids": ids, "targets": tgt,
                                    "input_critique_ids": crit}))[0]
      others = [j for j in range(1, N + 1) if j != target and j not in hist]
      ranks.append(sum(s[j - 1] >= s[target - 1] for j in others))
    want = _metrics(ranks)
    for name, value in want.items():
      assert res[variant][name] == pytest.approx(value, abs=1e-9), (
          variant, name)
  assert res["num_users"] == 4 and res["data_critique_missing"] == 2
