"""Ranking metrics by target-item training frequency; exclude_ids ranking."""

import json
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.evaluation import metrics

N, L, B = 6, 4, 4
MASK = N + 1
# Train counts of items 1..6 and (history, target) rows, by hand.
COUNTS = np.array([0, 2, 7, 30, 1, 0])
ROWS = [([3], 1), ([1, 2], 2), ([4], 3), ([], 4), ([1, 1, 1], 5), ([2], 6),
        ([5], 2), ([6, 6], 4), ([3], 1)]
# Scores 7 - t: the target t has rank t - 1 (no history excluded).
SCORES = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], np.float32)


class ConstantModel:
  """score_fn: the same [N] scores (params['scores']) for every row."""
  num_items = N

  @staticmethod
  def score_fn(params, batch):
    b = batch["item_ids"].shape[0]
    return jnp.broadcast_to(params["scores"][None, :], (b, N))


class FakeData:
  """The data interface RankingEvaluation reads."""

  def train_item_counts(self):
    return COUNTS

  def eval_batches(self, split, batch_size):
    del split
    out = []
    for s in range(0, len(ROWS), batch_size):
      ids = np.zeros((batch_size, L), np.int32)
      tgt = np.zeros((batch_size, L), np.int32)
      valid = np.zeros(batch_size, np.float32)
      for r, (hist, target) in enumerate(ROWS[s:s + batch_size]):
        ids[r, :len(hist)] = hist
        ids[r, len(hist)] = MASK
        tgt[r, len(hist)] = target
        valid[r] = 1
      out.append({"item_ids": ids, "targets": tgt, "valid": valid})
    return iter(out)


def _ndcg(rank):
  return 1.0 / math.log2(rank + 2)


# Hand-computed from the ranks t - 1 of each bucket's targets.
WANT = {
    "0": dict(ranks=[0, 5, 0], **{"HR@1": 2 / 3, "HR@5": 2 / 3,
                                  "NDCG@5": 2 / 3, "MRR": (2 + 1 / 6) / 3}),
    "1-4": dict(ranks=[1, 4, 1], **{
        "HR@1": 0.0, "HR@5": 1.0,
        "NDCG@5": (2 * _ndcg(1) + _ndcg(4)) / 3, "MRR": (0.5 + 0.2 + 0.5) / 3}),
    "5-19": dict(ranks=[2], **{"HR@1": 0.0, "HR@5": 1.0, "NDCG@5": 0.5,
                               "MRR": 1 / 3}),
    "20-99": dict(ranks=[3, 3], **{"HR@1": 0.0, "HR@5": 1.0,
                                   "NDCG@5": _ndcg(3), "MRR": 0.25}),
}


def test_frequency_labels():
  assert evaluation.frequency_labels((1, 5, 20)) == ["0", "1-4", "5-19", "20+"]
  assert evaluation.frequency_labels((2, 3)) == ["0-1", "2", "3+"]
  assert evaluation.frequency_labels(()) == []
  np.testing.assert_array_equal(
      evaluation.frequency_bucket([0, 1, 4, 5, 19, 20, 99], (1, 5, 20)),
      [0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("bounds", [(5, 1), (0, 3), (1, 1), (1.5,)])
def test_bad_boundaries_are_refused(bounds):
  with pytest.raises(ValueError, match="frequency_buckets"):
    evaluation.EvalConfig(frequency_buckets=bounds)


@pytest.mark.parametrize("length_buckets", [False, True])
def test_metrics_by_target_frequency(length_buckets, tmp_path):
  cfg = evaluation.EvalConfig(ks=(1, 5), batch_size=B, splits=("test",),
                              frequency_buckets=(1, 5, 20, 100),
                              length_buckets=length_buckets, bucket_window=2,
                              bucket_multiple=2)
  ranking = evaluation.RankingEvaluation(cfg)
  mesh = partitioning.make_mesh(1)
  results = ranking.evaluate(ConstantModel(), {"scores": jnp.asarray(SCORES)},
                             FakeData(), mesh, partitioning.DATA_PARALLEL_RULES)
  res = results["test"]
  assert res["frequency_buckets"] == [1, 5, 20, 100]
  by = res["by_frequency"]
  assert list(by) == ["0", "1-4", "5-19", "20-99", "100+"]
  for label, want in WANT.items():
    assert by[label]["num_users"] == len(want["ranks"]), label
    for k in ("HR@1", "HR@5", "NDCG@5", "MRR"):
      assert by[label][k] == pytest.approx(want[k], abs=1e-12), (label, k)
  assert by["100+"] == {"num_users": 0}  # empty: no NaN means
  assert sum(b["num_users"] for b in by.values()) == res["num_users"] == 9
  # The overall numbers are the user-weighted mean of the buckets'.
  assert res["MRR"] == pytest.approx(
      sum(w["MRR"] * len(w["ranks"]) for w in WANT.values()) / 9)
  # The popularity baseline gets buckets too (scores log1p(counts)).
  pop = results["test_popularity"]["by_frequency"]
  assert sum(b["num_users"] for b in pop.values()) == 9
  # Log lines: one per bucket of the model split, none for the baseline.
  lines = ranking.format_results(3, results)
  freq = [x for x in lines if "by frequency" in x]
  assert len(freq) == 5 and all(x.startswith("[eval step 3] test by ")
                                for x in freq)
  assert "[eval step 3] test by frequency 1-4 (3 users): HR@1=0.0000" in (
      freq[1])
  assert freq[4] == "[eval step 3] test by frequency 100+ (0 users):"
  # JSON (strict: no NaN) and TensorBoard scalars (numbers only).
  written = {}

  class Writer:

    def write_scalars(self, step, scalars):
      written.update(scalars)
  path = evaluation.write_results(str(tmp_path), 3, results, Writer())
  with open(path) as f:
    loaded = json.loads(f.read(), parse_constant=pytest.fail)
  assert loaded["test"]["by_frequency"]["5-19"]["num_users"] == 1
  assert written["eval/test/by_frequency/5-19/NDCG@5"] == pytest.approx(0.5)
  assert not any(k.endswith("num_users") or k.endswith("frequency_buckets")
                 for k in written)


def test_no_counts_or_no_boundaries_no_buckets():
  mesh = partitioning.make_mesh(1)
  params = {"scores": jnp.asarray(SCORES)}
  for cfg, counts in ((evaluation.EvalConfig(ks=(1,), batch_size=B), None),
                      (evaluation.EvalConfig(ks=(1,), batch_size=B,
                                             frequency_buckets=()), COUNTS)):
    ev = evaluation.Evaluator(ConstantModel(), mesh,
                              partitioning.DATA_PARALLEL_RULES, cfg)
    res = ev.evaluate(params, FakeData().eval_batches("test", B), counts)
    assert "by_frequency" not in res and res["num_users"] == 9


def test_target_ranks_excludes_exclude_ids_instead_of_item_ids():
  scores = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 1.0],
                        [1.0, 2.0, 3.0, 4.0, 5.0]])
  batch = {"item_ids": jnp.asarray([[1, 2, 6], [5, 6, 0]]),
           "targets": jnp.asarray([[0, 0, 3], [0, 1, 0]])}
  # [B, L + 1]: not aligned with item_ids (see target_ranks).
  exclude_ids = jnp.asarray([[2, 0, 0, 0], [3, 4, 0, 0]])
  cfg = evaluation.EvalConfig(exclude_history=True)
  # Target 3 (score 3): items 1, 2 beat it; item_ids exclude both.
  # Target 1 (score 1): all four others beat it; item_ids exclude 5.
  np.testing.assert_array_equal(
      evaluation.target_ranks(scores, batch, None, cfg), [0, 3])
  # exclude_ids instead: item 2 (row 0), items 3 and 4 (row 1).
  np.testing.assert_array_equal(
      evaluation.target_ranks(scores, dict(batch, exclude_ids=exclude_ids),
                              None, cfg), [1, 2])
  # Without exclude_history neither is excluded.
  np.testing.assert_array_equal(
      evaluation.target_ranks(scores, dict(batch, exclude_ids=exclude_ids),
                              None, evaluation.EvalConfig()), [2, 4])


def test_bucket_accumulators_merge_across_processes(monkeypatch):
  """Two processes: the total and every bucket add up in one collective."""
  a = metrics.RankingMetrics((1, 5))
  a.add([0, 5, 2])
  b = metrics.RankingMetrics((1, 5))
  b.add([3])
  other = {0: [1], 1: []}  # the other process's ranks per accumulator
  gathered_calls = []

  def allgather(bits):
    gathered_calls.append(bits.shape)
    theirs = []
    for k, acc in enumerate((a, b)):
      t = metrics.RankingMetrics(acc.ks, acc.protocol)
      if other[k]:
        t.add(other[k])
      theirs.append(t.to_numpy())
    return np.stack([bits, np.concatenate(theirs).view(np.uint32)])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  merged = metrics.merge_all_across_processes([a, b])
  assert len(gathered_calls) == 1
  want_a = metrics.RankingMetrics((1, 5))
  want_a.add([0, 5, 2, 1])
  assert merged[0].num_users == 4 and merged[1].num_users == 1
  np.testing.assert_allclose(merged[0].sums, want_a.sums, rtol=1e-12)
  np.testing.assert_allclose(merged[1].sums, b.sums, rtol=1e-12)
