"""EASE and Markov baselines, beyond-accuracy metrics, through the evaluator.

References: EASE against its closed form in float64 NumPy; Markov counts and
the metrics of small cases by hand; ranks against an explicit loop.
"""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse

from recsys_jax.core import partitioning
from recsys_jax.evaluation import baselines
from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.evaluation import metrics
from recsys_jax.input_pipeline import sequence_data
from tests import helpers
from tests.helpers import restore_seqio_registry  # noqa: F401  pylint: disable=unused-import
from tests.helpers import tiny_data  # noqa: F401  pylint: disable=unused-import

N, L = 6, 5
MASK = N + 1
# Train sequences (items[:-2] of each user) and their counts by hand.
TRAIN = [[1, 2, 3], [2, 3, 4], [1, 2, 2, 5], [3, 1]]
COUNTS = np.array([3, 4, 3, 1, 1, 0])            # items 1..6
# Consecutive pairs by hand: (1,2) x2, (2,3) x2, (3,4), (2,2), (2,5), (3,1).
TRANSITIONS = {(1, 2): 2, (2, 3): 2, (3, 4): 1, (2, 2): 1, (2, 5): 1,
               (3, 1): 1}
# Evaluation rows (history, target); the last has no history.
ROWS = [([1, 2], 3), ([3], 1), ([2, 5], 6), ([], 2), ([4, 4], 5)]


def _batches(rows, batch_size):
  out = []
  for s in range(0, len(rows), batch_size):
    ids = np.zeros((batch_size, L), np.int32)
    tgt = np.zeros((batch_size, L), np.int32)
    valid = np.zeros(batch_size, np.float32)
    for r, (hist, target) in enumerate(rows[s:s + batch_size]):
      ids[r, :len(hist)] = hist
      ids[r, len(hist)] = MASK
      tgt[r, len(hist)] = target
      valid[r] = 1
    out.append({"item_ids": ids, "targets": tgt, "valid": valid})
  return out


class FakeData:
  """The data interface of RankingEvaluation, with its train sequences."""

  def __init__(self, train=TRAIN, counts=COUNTS):
    self.train, self.counts = train, counts

  def train_item_counts(self):
    return self.counts

  def train_sequences(self):
    return [np.asarray(s) for s in self.train]

  def eval_batches(self, split, batch_size):
    del split
    return iter(_batches(ROWS, batch_size))


class ConstantModel:
  """Scores item i as 7 - i for every row (params['scores'])."""
  num_items = N

  @staticmethod
  def score_fn(params, batch):
    b = batch["item_ids"].shape[0]
    return jnp.broadcast_to(params["scores"][None, :], (b, N))


PARAMS = {"scores": jnp.asarray([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])}


def reference_rank(scores, target, exclude=()):
  """Pessimistic rank by an explicit loop (the target never excluded)."""
  return sum(1 for i in range(1, len(scores) + 1)
             if i != target and i not in set(exclude) - {target}
             and scores[i - 1] >= scores[target - 1])


def expected_metrics(ranks, ks):
  r = np.asarray(ranks, np.float64)
  out = {f"HR@{k}": float(np.mean(r < k)) for k in ks}
  out.update({f"NDCG@{k}": float(np.mean(np.where(r < k, 1 / np.log2(r + 2),
                                                   0.0))) for k in ks})
  out["MRR"] = float(np.mean(1 / (r + 1)))
  return out


def ease_closed_form(x, l2):
  """Steck's EASE in float64 NumPy, written out from the paper."""
  x = np.asarray(x, np.float64)
  p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
  b = p / (-np.diag(p))[None, :]
  np.fill_diagonal(b, 0.0)
  return b


# -- EASE ---------------------------------------------------------------------


@pytest.mark.parametrize("as_sparse", [False, True])
def test_ease_weights_match_the_closed_form(as_sparse):
  rng = np.random.default_rng(0)
  x = (rng.random((30, 9)) < 0.3).astype(np.float32)
  x[:, 8] = 0  # an item no user has: all-zero weights
  got = baselines.ease_weights(sparse.csr_matrix(x) if as_sparse else x, 4.0)
  want = ease_closed_form(x, 4.0)
  assert got.dtype == np.float32 and got.shape == (9, 9)
  assert got.flags.c_contiguous  # what sparse @ dense reads without a copy
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (np.diag(got) == 0).all()
  assert not got[:, 8].any() and not got[8].any()


def test_spd_inverse_works_in_place():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(40, 40))
  a = (m @ m.T + 40 * np.eye(40)).astype(np.float32)
  want = np.linalg.inv(a.astype(np.float64))
  work = a.copy()
  inv = baselines.spd_inverse_(work)
  assert np.shares_memory(inv, work)
  np.testing.assert_allclose(inv, want, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(inv, inv.T)
  with pytest.raises(np.linalg.LinAlgError, match="ease_l2"):
    baselines.spd_inverse_(-np.eye(3, dtype=np.float32))
  with pytest.raises(ValueError, match="l2"):
    baselines.ease_weights(np.eye(3), 0.0)


def test_ease_fits_binary_train_matrix_and_scores_histories():
  ease = baselines.EASE([np.asarray(s) for s in TRAIN], N, l2=2.0)
  x = np.zeros((len(TRAIN), N))
  for u, s in enumerate(TRAIN):
    x[u, np.asarray(s) - 1] = 1  # item 2 twice in user 3: still 1
  weights = ease_closed_form(x, 2.0)
  np.testing.assert_allclose(ease.weights, weights, rtol=1e-5, atol=1e-6)
  ids = np.array([[1, 2, 2, MASK, 0], [0, 0, 0, 0, 0], [6, MASK, 0, 0, 0]])
  want = np.stack([weights[0] + weights[1], np.zeros(N), weights[5]])
  np.testing.assert_allclose(ease.score_history(ids), want, rtol=1e-5,
                             atol=1e-6)
  assert ease.describe()["l2"] == 2.0


# -- Markov -------------------------------------------------------------------


def test_transition_counts_by_hand():
  got = baselines.transition_counts([np.asarray(s) for s in TRAIN],
                                    N).toarray()
  want = np.zeros((N, N))
  for (i, j), c in TRANSITIONS.items():
    want[i - 1, j - 1] = c
  np.testing.assert_array_equal(got, want)


def test_markov_scores_last_item_then_popularity():
  chain = baselines.MarkovChain([np.asarray(s) for s in TRAIN], N, COUNTS)
  tie = np.log1p(COUNTS) / (np.log1p(4) + 1)
  ids = np.array([[1, 2, MASK, 0, 0],     # last 2: 2 -> {2: 1, 3: 2, 5: 1}
                  [3, MASK, 0, 0, 0],     # last 3: {1: 1, 4: 1}
                  [2, 5, MASK, 0, 0],     # 5 has no successor
                  [MASK, 0, 0, 0, 0]])    # no history
  scores = chain.score_history(ids)
  np.testing.assert_allclose(scores[0], tie + [0, 1, 2, 0, 1, 0], rtol=1e-6)
  np.testing.assert_allclose(scores[1], tie + [1, 0, 0, 1, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(scores[2], tie, rtol=1e-6)
  np.testing.assert_allclose(scores[3], tie, rtol=1e-6)
  # The tie-break orders equal counts by popularity (1 before 4), never
  # across counts (count 1 + most popular < count 2 + least popular).
  assert scores[1, 0] > scores[1, 3] > scores[1, 1]
  assert tie.max() < 1 - 1 / (np.log1p(4) + 1) + 1e-12


def test_history_features():
  ids = np.array([[3, 3, 1, MASK, 0], [0, 0, 0, 0, 0], [MASK, 0, 0, 0, 0],
                  [2, 0, 5, 0, 0]])
  np.testing.assert_array_equal(baselines.last_items(ids, N), [1, 0, 0, 5])
  np.testing.assert_array_equal(
      baselines.history_matrix(ids, N).toarray(),
      [[1, 0, 1, 0, 0, 0], [0] * 6, [0] * 6, [0, 1, 0, 0, 1, 0]])


# -- beyond-accuracy metrics ---------------------------------------------------


def test_popularity_percentiles_by_hand():
  # Sorted counts 0 1 1 3 3 4: (below + equal / 2) / 6.
  np.testing.assert_allclose(metrics.popularity_percentiles(COUNTS),
                             np.array([4, 5.5, 4, 2, 2, 0.5]) / 6)
  np.testing.assert_allclose(metrics.popularity_percentiles([2, 2, 2]), 0.5)


def test_beyond_accuracy_accumulates_and_merges_by_hand():
  top = np.array([[3, 4], [1, 2], [1, 3], [1, 2], [6, 0]])
  valid = np.array([True, True, True, True, False])
  targets = np.array([3, 1, 6, 2, 5])
  acc = metrics.BeyondAccuracy((1, 2), N, COUNTS)
  acc.add(top, valid, targets)
  res = acc.result()
  # Top-1: {3, 1}; top-2: {3, 4, 1, 2} (the padding row's 6 not counted).
  assert res["coverage@1"] == pytest.approx(2 / 6)
  assert res["covered_items@2"] == 4 and res["coverage@2"] == pytest.approx(
      4 / 6)
  assert res["popularity@1"] == pytest.approx((3 + 3 + 3 + 3) / 4)
  assert res["popularity@2"] == pytest.approx(24 / 8)
  pct = np.array([4, 5.5, 4, 2, 2, 0.5]) / 6
  assert res["popularity_percentile@2"] == pytest.approx(
      pct[[2, 3, 0, 1, 0, 2, 0, 1]].mean())
  assert res["target_popularity"] == pytest.approx((3 + 3 + 0 + 4) / 4)
  assert res["target_popularity_percentile"] == pytest.approx(
      pct[[2, 0, 5, 1]].mean())
  # Two halves summed (as across processes) give the same state.
  a = metrics.BeyondAccuracy((1, 2), N, COUNTS)
  b = metrics.BeyondAccuracy((1, 2), N, COUNTS)
  a.add(top[:2], valid[:2], targets[:2])
  b.add(top[2:], valid[2:], targets[2:])
  merged = metrics.BeyondAccuracy((1, 2), N, COUNTS).load_numpy(
      a.to_numpy() + b.to_numpy())
  assert merged.result() == res
  # Without counts only coverage; without users no mean (None, not NaN).
  assert set(metrics.BeyondAccuracy((2,), N).result()) == {
      "coverage@2", "covered_items@2"}
  assert metrics.BeyondAccuracy((2,), N, COUNTS).result()[
      "popularity@2"] is None


@pytest.mark.parametrize("length_buckets", [False, True])
def test_evaluator_top_k_lists_by_hand(length_buckets):
  cfg = evaluation.EvalConfig(ks=(1,), batch_size=2, exclude_history=True,
                              beyond_accuracy_ks=(2, 10), frequency_buckets=(),
                              length_buckets=length_buckets, bucket_window=2,
                              bucket_multiple=1)
  ev = evaluation.Evaluator(ConstantModel(), partitioning.make_mesh(1),
                            partitioning.DATA_PARALLEL_RULES, cfg)
  rows = ROWS[:4]
  res = ev.evaluate(PARAMS, _batches(rows, 2), COUNTS,
                    popularity_counts=COUNTS)["beyond_accuracy"]
  # Item 1 best; history excluded: top-2 [3, 4], [1, 2], [1, 3], [1, 2].
  assert res["covered_items@2"] == 4
  assert res["popularity@2"] == pytest.approx(24 / 8)
  # K=10 > N: every list is the catalogue minus the history.
  assert res["coverage@10"] == 1.0
  assert res["popularity@10"] == pytest.approx(
      (COUNTS.sum() * 4 - 7 - 3 - 5) / (6 * 4 - 5))
  assert res["target_popularity"] == pytest.approx(10 / 4)


# -- through RankingEvaluation ------------------------------------------------


def _ranking(**kw):
  cfg = evaluation.EvalConfig(**{
      "ks": (1, 5), "batch_size": 2, "splits": ("test",),
      "exclude_history": True, "ease_l2": 2.0, "beyond_accuracy_ks": (2,),
      "frequency_buckets": (1,), "length_buckets": False, **kw})
  return evaluation.RankingEvaluation(cfg)


def _evaluate(ranking, data=None):
  return ranking.evaluate(ConstantModel(), PARAMS, data or FakeData(),
                          partitioning.make_mesh(1),
                          partitioning.DATA_PARALLEL_RULES)


def test_baselines_rank_like_the_model(tmp_path):
  ranking = _ranking()
  results = _evaluate(ranking)
  assert list(results) == ["test", "test_popularity", "test_ease",
                           "test_markov"]
  x = np.zeros((len(TRAIN), N))
  for u, s in enumerate(TRAIN):
    x[u, np.asarray(s) - 1] = 1
  weights = ease_closed_form(x, 2.0)
  tie = np.log1p(COUNTS) / (np.log1p(4) + 1)
  markov = np.zeros((N + 1, N))
  for (i, j), c in TRANSITIONS.items():
    markov[i, j - 1] = c
  score_of = {
      "ease": lambda h: weights[np.unique(h).astype(int) - 1].sum(0)
              if h else np.zeros(N),
      "markov": lambda h: markov[h[-1] if h else 0] + tie,
  }
  for name, scores in score_of.items():
    res = results[f"test_{name}"]
    ranks = [reference_rank(scores(h), t, h) for h, t in ROWS]
    for k, v in expected_metrics(ranks, (1, 5)).items():
      assert res[k] == pytest.approx(v, abs=1e-9), (name, k)
    assert res["num_users"] == 5
    assert res["protocol"] == "full_ranking_excluding_history"
    assert "by_frequency" in res and "beyond_accuracy" in res
  # Markov by hand: 3 after 2 (rank 0); 1 after 3 beats 4 by popularity
  # (0); 6 after 5 (no successor): popularity, 1, 3, 4 ahead (2, 5
  # excluded); no history: 2 most popular (0); 5 after 4: 1, 2, 3 (3).
  assert [reference_rank(score_of["markov"](h), t, h) for h, t in ROWS] == [
      0, 0, 3, 0, 3]
  assert results["test_ease"]["baseline"]["l2"] == 2.0
  assert "fit_seconds" in results["test_markov"]["baseline"]
  # Log: one line per split and baseline, beyond accuracy appended.
  lines = ranking.format_results(4, results)
  assert [x.split(" (")[0] for x in lines if "by frequency" not in x] == [
      f"[eval step 4] test{s}" for s in ("", "_popularity", "_ease",
                                         "_markov")]
  assert "coverage@2=" in lines[0] and "popularity_percentile@2=" in lines[0]
  # JSON (strict, no NaN) and TensorBoard (no fit description).
  written = {}

  class Writer:

    def write_scalars(self, step, scalars):
      del step
      written.update(scalars)
  path = evaluation.write_results(str(tmp_path), 4, results, Writer())
  with open(path) as f:
    loaded = json.loads(f.read(), parse_constant=pytest.fail)
  assert loaded["test_ease"]["beyond_accuracy"]["covered_items@2"] >= 1
  assert "eval/test_markov/beyond_accuracy/coverage@2" in written
  assert not any("/baseline/" in k for k in written)


def test_baselines_are_fitted_once_per_data(monkeypatch):
  ranking = _ranking(splits=("validation", "test"))
  data = FakeData()
  first = _evaluate(ranking, data)
  calls = []
  monkeypatch.setattr(baselines, "fit", lambda *a, **k: calls.append(a))
  again = _evaluate(ranking, data)
  assert not calls
  for key in ("validation_ease", "test_markov", "test_popularity"):
    assert again[key] == first[key]
  again["test_ease"]["HR@1"] = -1.0  # results are copies of the kept ones
  assert _evaluate(ranking, data)["test_ease"]["HR@1"] != -1.0


def test_baselines_config_and_skips(capsys):
  assert evaluation.EvalConfig(popularity_baseline=False).active_baselines == [
      "ease", "markov"]
  assert evaluation.EvalConfig(baselines=()).active_baselines == []
  for bad in ({"baselines": "ease"}, {"baselines": ("ease", "knn")},
              {"baselines": ("ease", "ease")}, {"ease_l2": 0},
              {"ease_max_items": 0}, {"beyond_accuracy_ks": (0,)},
              {"beyond_accuracy_ks": (5, 5)}):
    with pytest.raises(ValueError, match="EvalConfig." + next(iter(bad))):
      evaluation.EvalConfig(**bad)
  # Too many items for EASE: skipped, said in the log and the results.
  results = _evaluate(_ranking(baselines=("ease", "markov"),
                               ease_max_items=5))
  assert list(results) == ["test", "test_ease", "test_markov"]
  assert "ease_max_items=5" in results["test_ease"]["skipped"]
  assert "HR@1" in results["test_markov"]
  lines = _ranking().format_results(1, results)
  assert any(x.startswith("[eval step 1] test_ease skipped: N=6 items")
             for x in lines)
  assert "WARNING: baseline ease skipped" in capsys.readouterr().out
  # Sequences that do not count like train_item_counts: both skipped.
  results = _evaluate(_ranking(baselines=("ease", "markov")),
                      FakeData(counts=COUNTS + 1))
  assert "count 6 of 6 items differently" in results["test_markov"]["skipped"]

  class NoSequences:
    eval_batches = FakeData.eval_batches

    def train_item_counts(self):
      return COUNTS
  results = _evaluate(_ranking(baselines=("ease",)), NoSequences())
  assert "neither train_sequences() nor a data_dir" in (
      results["test_ease"]["skipped"])


def test_train_sequences_are_the_train_split(tiny_data):
  plain = sequence_data.SequenceData("baselines_plain", tiny_data, max_len=20)
  cold = sequence_data.SequenceData("baselines_cold", tiny_data, max_len=20,
                                    cold_item_fraction=0.2)
  for data in (plain, cold):
    seqs, why = baselines.train_sequences_of(data)
    assert not why
    counts = data.train_item_counts()
    assert not baselines.check_counts(seqs, counts)
    assert sum(len(s) for s in seqs) == counts.sum()
  cold_ids = cold.cold_items()
  seqs, _ = baselines.train_sequences_of(cold)
  assert not np.isin(np.concatenate(seqs), cold_ids).any()
  # Markov on the real split equals counting pairs in Python.
  seqs, _ = baselines.train_sequences_of(plain)
  chain = baselines.MarkovChain(seqs, plain.num_items,
                                plain.train_item_counts())
  pairs = {}
  for s in seqs:
    for i, j in zip(s[:-1], s[1:]):
      pairs[(int(i), int(j))] = pairs.get((int(i), int(j)), 0) + 1
  coo = chain.counts.tocoo()
  assert {(int(i) + 1, int(j) + 1): int(c) for i, j, c in
          zip(coo.row, coo.col, coo.data)} == pairs


# -- item-sharded scores -------------------------------------------------------

_SHARDED_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator as evaluation

N, B, L = 40, 8, 6

class Model:
  num_items = N
  def __init__(self, mesh):
    self.mesh = mesh
  def score_fn(self, params, batch):
    first = batch["item_ids"][:, :1].astype(jnp.float32)
    scores = params[None, :] * (1.0 + first)   # [B, N], rows differ
    return jax.lax.with_sharding_constraint(
        scores, NamedSharding(self.mesh, P("data", "model")))

rng = np.random.default_rng(0)
params = np.round(rng.normal(size=N), 1).astype(np.float32)  # ties
batches = []
for _ in range(3):
  ids = np.zeros((B, L), np.int32)
  tgt = np.zeros((B, L), np.int32)
  for r in range(B):
    n = int(rng.integers(1, L))
    ids[r, :n] = rng.integers(1, N + 1, n)
    ids[r, n] = N + 1
    tgt[r, n] = rng.integers(1, N + 1)
  batches.append({"item_ids": ids, "targets": tgt,
                  "valid": np.ones(B, np.float32)})
counts = rng.integers(0, 9, N)
cfg = evaluation.EvalConfig(ks=(1, 10), batch_size=B, exclude_history=True,
                            beyond_accuracy_ks=(3, 7), frequency_buckets=(),
                            length_buckets=False)
out = {}
for mp, rules in ((1, "data_parallel"), (4, "vocab_parallel")):
  mesh = partitioning.make_mesh(mp)
  ev = evaluation.Evaluator(Model(mesh), mesh, partitioning.get_rules(rules),
                            cfg)
  p = jax.device_put(params, NamedSharding(mesh, P()))
  out[mp] = ev.evaluate(p, batches, counts, popularity_counts=counts)
  if mp == 4:
    gb = partitioning.host_to_global(
        {"item_ids": batches[0]["item_ids"], "targets": batches[0]["targets"],
         "negatives": np.zeros((B, 1), np.int32)}, mesh)
    negs = gb.pop("negatives")
    with partitioning.with_rules(partitioning.get_rules(rules), mesh):
      hlo = ev._rank.lower(p, gb, negs).compile().as_text()
    gathers = [l for l in hlo.splitlines()
               if "all-gather" in l or "all-to-all" in l]
    out["gathers"] = gathers
print("RESULT" + json.dumps(out))
"""


def test_top_k_lists_of_item_sharded_scores_on_8_emulated_devices():
  env = helpers.subprocess_env(xla_devices=8)
  res = helpers.run_script(_SHARDED_SCRIPT, env=env, timeout=240).check()
  line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert out["1"] == out["4"]  # data parallel == items over 4 devices
  assert out["1"]["beyond_accuracy"]["covered_items@7"] > 7
  # Only top-k candidates travel ([B/2 rows, 4 shards x 7]), never the N
  # score columns.
  shapes = [tuple(int(d) for d in re.search(r"= [a-z0-9]+\[([0-9,]*)\]",
                                            g).group(1).split(",") if d)
            for g in out["gathers"]]
  assert (4, 28) in shapes and not [s for s in shapes if 40 in s], shapes
  assert math.isfinite(out["4"]["MRR"])
