"""Ranking metrics, sampled protocol, the Evaluator, sharded rank/top-k.

References are hand-computed cases and a NumPy loop re-implementation of the
pessimistic rank; multi-device checks run in a subprocess with 8 emulated CPU
devices so they do not depend on how jax was initialised in this process.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator
from recsys_jax.evaluation import metrics
from recsys_jax.evaluation import ranking

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_rank(scores, target_ids, exclude_ids=None):
  """Pessimistic rank by an explicit loop: others with score >= target's."""
  scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
  b, n = scores.shape
  out = np.zeros(b, np.int64)
  for row in range(b):
    t = int(target_ids[row])
    excluded = set()
    if exclude_ids is not None:
      excluded = {int(i) for i in exclude_ids[row] if 1 <= i <= n} - {t}
    out[row] = sum(1 for item in range(1, n + 1)
                   if item != t and item not in excluded
                   and scores[row, item - 1] >= scores[row, t - 1])
  return out


# ---------------------------------------------------------------- target_rank


def test_target_rank_hand_cases_with_pessimistic_ties():
  scores = jnp.array([
      [0.1, 0.5, 0.5, 0.3],   # target 2 ties with item 3 -> rank 1
      [0.1, 0.5, 0.5, 0.3],   # target 3 ties with item 2 -> rank 1
      [0.1, 0.5, 0.5, 0.3],   # target 1 is the lowest -> rank 3
      [0.9, 0.5, 0.5, 0.3],   # target 1 strictly best -> rank 0
      [0.2, 0.2, 0.2, 0.2],   # constant model -> last (rank N-1)
  ])
  ranks = ranking.target_rank(scores, jnp.array([2, 3, 1, 1, 4]))
  np.testing.assert_array_equal(ranks, [1, 1, 3, 0, 3])


def test_target_rank_exclusions():
  scores = jnp.array([[0.9, 0.8, 0.7, 0.1, 0.6]] * 4)
  # N = 5, so 0 (padding) and 6 ([MASK]) are ignored; item 1 listed twice.
  exclude = jnp.array([
      [1, 1, 0, 6],   # drops item 1 only: target 3 beaten by 2 -> rank 1
      [1, 2, 3, 0],   # target 3 in history is never excluded -> rank 0
      [0, 0, 0, 0],   # nothing excluded -> rank 2
      [4, 5, 0, 0],   # lower-scored items excluded: rank unchanged 2
  ])
  ranks = ranking.target_rank(scores, jnp.array([3, 3, 3, 3]), exclude)
  np.testing.assert_array_equal(ranks, [1, 0, 2, 2])


def test_excluded_items_do_not_tie_with_a_minus_inf_target():
  scores = jnp.array([[-jnp.inf, -jnp.inf, 0.5, -jnp.inf]])
  # Target 1 scores -inf; items 2 and 4 tie with it unless excluded.
  np.testing.assert_array_equal(
      ranking.target_rank(scores, jnp.array([1])), [3])
  np.testing.assert_array_equal(
      ranking.target_rank(scores, jnp.array([1]), jnp.array([[2, 4]])), [1])


def test_target_rank_nan_and_invalid_targets():
  scores = jnp.array([[jnp.nan, 0.1, 0.2], [0.3, jnp.nan, 0.2],
                      [0.3, 0.1, 0.2], [0.3, 0.1, 0.2]])
  # NaN target counts as -inf (ties everything -> last); NaN other -> -inf;
  # targets 0 and 4 are outside 1..3 -> rank N = 3.
  ranks = ranking.target_rank(scores, jnp.array([1, 3, 0, 4]))
  np.testing.assert_array_equal(ranks, [2, 1, 3, 3])


def test_target_rank_matches_numpy_reference_on_random_ties():
  rng = np.random.default_rng(0)
  b, n, h = 16, 40, 7
  scores = rng.integers(0, 5, size=(b, n)).astype(np.float32)  # many ties
  targets = rng.integers(1, n + 1, size=b)
  exclude = rng.integers(0, n + 2, size=(b, h))
  exclude[:4, 0] = targets[:4]  # some targets inside their own history
  got = jax.jit(ranking.target_rank)(scores, targets, exclude)
  np.testing.assert_array_equal(got, reference_rank(scores, targets, exclude))
  got = ranking.target_rank(jnp.asarray(scores, jnp.bfloat16), targets)
  np.testing.assert_array_equal(got, reference_rank(scores, targets))


def test_target_rank_rejects_bad_shapes():
  with pytest.raises(ValueError, match="target_ids"):
    ranking.target_rank(jnp.zeros((2, 3)), jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="exclude_ids"):
    ranking.target_rank(jnp.zeros((2, 3)), jnp.array([1, 2]),
                        jnp.array([1, 2]))


def test_candidate_rank_hand_cases():
  t = jnp.array([0.5, 0.5, 0.9])
  neg = jnp.array([[0.1, 0.5, 0.2], [0.6, 0.7, 0.4], [0.1, 0.1, 0.1]])
  np.testing.assert_array_equal(ranking.candidate_rank(t, neg), [1, 2, 0])
  scores = jnp.array([[0.4, 0.3, 0.3, 0.9, 0.0]])
  # target 2 (0.3) among negatives 3 (0.3, tie) and 5 (0.0) -> rank 1.
  np.testing.assert_array_equal(
      ranking.sampled_target_rank(scores, jnp.array([2]),
                                  jnp.array([[3, 5]])), [1])


# ---------------------------------------------------------------- metrics


def test_per_row_metrics_k_boundaries_and_hand_values():
  ranks = np.array([0, 1, 4, 5, 9, 10])
  m = metrics.per_row_metrics(ranks, ks=(1, 5, 10))
  np.testing.assert_array_equal(m["HR@1"], [1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(m["HR@5"], [1, 1, 1, 0, 0, 0])  # 4 in, 5 out
  np.testing.assert_array_equal(m["HR@10"], [1, 1, 1, 1, 1, 0])
  assert m["NDCG@5"][0] == 1.0
  assert m["NDCG@5"][1] == pytest.approx(1 / math.log2(3))
  assert m["NDCG@5"][2] == pytest.approx(1 / math.log2(6))
  assert m["NDCG@5"][3] == 0.0
  assert m["NDCG@10"][4] == pytest.approx(1 / math.log2(11))
  assert m["NDCG@10"][5] == 0.0
  np.testing.assert_allclose(m["MRR"], 1 / (ranks + 1.0))


def test_ranking_metrics_padding_weights_merge_and_serialisation():
  ks = (1, 5)
  acc = metrics.RankingMetrics(ks)
  acc.add([0, 1, 7], valid=[True, True, False])       # row 3 is padding
  acc.add([4, 5], weights=[1.0, 3.0])
  res = acc.result()
  w = np.array([1, 1, 1, 3.0])
  r = np.array([0, 1, 4, 5])
  assert res["num_users"] == 4
  assert res["protocol"] == "full_ranking"
  assert res["HR@1"] == pytest.approx(np.dot(w, r < 1) / w.sum())
  assert res["HR@5"] == pytest.approx(np.dot(w, r < 5) / w.sum())
  ndcg5 = np.where(r < 5, 1 / np.log2(r + 2), 0)
  assert res["NDCG@5"] == pytest.approx(np.dot(w, ndcg5) / w.sum())
  assert res["MRR"] == pytest.approx(np.dot(w, 1 / (r + 1)) / w.sum())
  assert set(res) == {"HR@1", "HR@5", "NDCG@1", "NDCG@5", "MRR",
                      "num_users", "protocol"}

  a, b = metrics.RankingMetrics(ks), metrics.RankingMetrics(ks)
  a.add([0, 1, 7], valid=[True, True, False])
  b.add([4, 5], weights=[1.0, 3.0])
  assert a.merge(b).result() == res
  back = metrics.RankingMetrics.from_numpy(acc.to_numpy(), ks)
  assert back.result() == res
  # Host merge path: float64 vectors as uint32 bits, summed exactly.
  bits = np.stack([a.to_numpy().view(np.uint32), b.to_numpy().view(np.uint32)])
  summed = metrics.RankingMetrics.from_numpy(metrics.sum_bit_vectors(bits), ks)
  assert summed.result() == res
  assert acc.merge_across_processes() is acc  # one process: itself

  with pytest.raises(ValueError, match="cannot merge"):
    acc.merge(metrics.RankingMetrics(ks, protocol="sampled_100_uniform"))
  assert math.isnan(metrics.RankingMetrics(ks).result()["MRR"])


def test_constant_model_scores_zero_below_n():
  n = 30
  scores = jnp.zeros((6, n))
  ranks = ranking.target_rank(scores, jnp.arange(1, 7))
  acc = metrics.RankingMetrics((1, 5, 10, 20, n))
  acc.add(ranks)
  res = acc.result()
  for k in (1, 5, 10, 20):
    assert res[f"HR@{k}"] == 0.0 and res[f"NDCG@{k}"] == 0.0
  assert res[f"HR@{n}"] == 1.0
  assert res["MRR"] == pytest.approx(1 / n)


# ---------------------------------------------------------------- sampled


def test_sample_negatives_deterministic_and_never_target_or_history():
  n, m = 60, 20
  rng = np.random.default_rng(1)
  targets = rng.integers(1, n + 1, size=12)
  history = rng.integers(0, n + 2, size=(12, 15))  # includes pad 0, [MASK]
  counts = rng.integers(0, 9, size=n)
  for mode in ("uniform", "popularity"):
    neg = metrics.sample_negatives(7, targets, history, n, m, mode, counts)
    again = metrics.sample_negatives(7, targets, history, n, m, mode, counts)
    np.testing.assert_array_equal(neg, again)
    other = metrics.sample_negatives(8, targets, history, n, m, mode, counts)
    assert not np.array_equal(neg, other)
    assert neg.shape == (12, m) and neg.min() >= 1 and neg.max() <= n
    for row in range(12):
      assert len(set(neg[row])) == m
      assert targets[row] not in neg[row]
      assert not set(neg[row]) & set(history[row].tolist())
      if mode == "popularity":
        assert (counts[neg[row] - 1] > 0).all()


def test_popularity_sampling_follows_counts():
  n = 10
  counts = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 40])
  neg = metrics.sample_negatives(0, np.full(4000, 1), None, n, 1,
                                 "popularity", counts)
  freq = np.bincount(neg[:, 0], minlength=n + 1)[1:] / neg.shape[0]
  # Item 1 is the target and has count 0; item 10 holds 40/48 of the mass.
  assert freq[0] == 0
  assert freq[9] == pytest.approx(40 / 48, abs=0.03)


def test_sample_negatives_errors():
  with pytest.raises(ValueError, match="only 2 items"):
    metrics.sample_negatives(0, [1], [[2, 3]], 5, num_negatives=3)
  with pytest.raises(ValueError, match="item_counts"):
    metrics.sample_negatives(0, [1], None, 5, 2, "popularity")
  with pytest.raises(ValueError, match="mode"):
    metrics.sample_negatives(0, [1], None, 5, 2, "zipf")


# ---------------------------------------------------------------- Evaluator
# The device path (evaluator.Evaluator: jitted score + rank, host-sampled
# negatives) against hand-computed ranks and a NumPy reference.


class _ConstantModel:
  """A model scoring every row with the same [N] vector (its params)."""

  def __init__(self, num_items):
    self.num_items = num_items

  def score_fn(self, params, batch):
    return jnp.broadcast_to(params, (batch["item_ids"].shape[0],
                                     self.num_items))


def _eval_batch(histories, targets):
  """Rows: history items then [MASK]; target at the [MASK] position.

  A target of 0 makes a padding row (valid 0).
  """
  n_mask = 99
  length = max(len(h) for h in histories) + 1
  item_ids = np.zeros((len(histories), length), np.int32)
  tgt = np.zeros_like(item_ids)
  for row, (h, t) in enumerate(zip(histories, targets)):
    item_ids[row, :len(h)] = h
    if t:
      item_ids[row, len(h)] = n_mask
      tgt[row, len(h)] = t
  valid = (np.asarray(targets) > 0).astype(np.float32)
  return {"item_ids": item_ids, "targets": tgt, "valid": valid}


def _expected(ranks, ks, protocol):
  """Metric means of 0-based ranks by the definitions (NumPy, float64)."""
  r = np.asarray(ranks, np.float64)
  out = {f"HR@{k}": float(np.mean(r < k)) for k in ks}
  out.update({f"NDCG@{k}": float(np.mean(np.where(r < k, 1 / np.log2(r + 2),
                                                   0.0))) for k in ks})
  out.update(MRR=float(np.mean(1 / (r + 1))), num_users=len(r),
             protocol=protocol)
  return out


def _assert_results(got, want):
  assert set(got) == set(want)
  for k, v in want.items():
    if isinstance(v, float):
      assert got[k] == pytest.approx(v, abs=1e-12), k
    else:
      assert got[k] == v, k


def _evaluator(num_items, **cfg_kwargs):
  return evaluator.Evaluator(
      _ConstantModel(num_items), partitioning.make_mesh(1),
      partitioning.DATA_PARALLEL_RULES,
      evaluator.EvalConfig(**{"frequency_buckets": (),
                              "beyond_accuracy_ks": (), **cfg_kwargs}))


@pytest.mark.parametrize("length_buckets", [False, True])
def test_popularity_baseline_full_and_sampled(length_buckets):
  counts = np.array([5, 3, 3, 1, 0])  # items 1..5
  batch = _eval_batch([[1], [2, 3], [4], [1]], [2, 4, 1, 0])  # last: padding
  common = dict(ks=(1, 2), length_buckets=length_buckets, bucket_multiple=1)
  res = _evaluator(5, **common).evaluate(None, [batch], score_override=counts)
  # Ranks: item 2 ties item 3 -> 2; item 4 -> 3; item 1 -> 0.
  _assert_results(res, _expected([2, 3, 0], (1, 2), "full_ranking"))

  res = _evaluator(5, exclude_history=True, **common).evaluate(
      None, [batch], score_override=counts)
  # Without history: row 0 drops item 1 -> 1; row 1 drops 2, 3 -> item 4
  # beats only 1 -> 1; row 2 drops 4 -> 0.
  _assert_results(res, _expected([1, 1, 0], (1, 2),
                                 "full_ranking_excluding_history"))

  sampled = dict(common, ks=(1,), protocol="sampled", num_negatives=1,
                 negative_sampling="uniform", seed=3)
  res = _evaluator(5, **sampled).evaluate(None, [batch], score_override=counts)
  again = _evaluator(5, **sampled).evaluate(None, [batch],
                                            score_override=counts)
  assert res == again
  # NumPy reference: the same negatives (seed + process index 0, padding
  # rows drawn for target 1), ranked by counting negatives scoring >= target.
  targets = np.array([2, 4, 1, 1])
  neg = metrics.sample_negatives(np.random.default_rng(3), targets,
                                 batch["item_ids"], 5, 1, "uniform")
  ranks = [(counts[neg[i] - 1] >= counts[t - 1]).sum()
           for i, t in enumerate(targets[:3])]
  if not length_buckets:  # bucketing reorders rows, hence which draw is whose
    _assert_results(res, _expected(ranks, (1,), "sampled_1_uniform"))
  assert res["protocol"] == "sampled_1_uniform" and res["num_users"] == 3


def test_evaluator_sampled_matches_numpy_reference():
  n = 50
  rng = np.random.default_rng(3)
  w = rng.normal(size=n).astype(np.float32)
  histories = [rng.integers(1, n + 1, size=5).tolist() for _ in range(6)]
  targets = rng.integers(1, n + 1, size=6).tolist()
  batch = _eval_batch(histories, targets)
  batch["item_ids"][batch["item_ids"] == 99] = n + 1
  counts = rng.integers(1, 10, size=n)
  ev = _evaluator(n, ks=(1, 10), protocol="sampled", num_negatives=8,
                  negative_sampling="popularity", seed=5,
                  length_buckets=False)
  res = ev.evaluate(jnp.asarray(w), [batch], item_counts=counts)
  neg = metrics.sample_negatives(np.random.default_rng(5), targets,
                                 batch["item_ids"], n, 8, "popularity", counts)
  manual = [(w[neg[i] - 1] >= w[t - 1]).sum() for i, t in enumerate(targets)]
  _assert_results(res, _expected(manual, (1, 10), "sampled_8_popularity"))


def test_evaluator_full_ranking_matches_numpy_reference():
  n, b = 30, 12
  rng = np.random.default_rng(7)
  w = rng.integers(0, 4, size=n).astype(np.float32)  # many ties
  histories = [rng.integers(1, n + 1, size=rng.integers(1, 6)).tolist()
               for _ in range(b)]
  targets = rng.integers(1, n + 1, size=b).tolist()
  batch = _eval_batch(histories, targets)
  batch["item_ids"][batch["item_ids"] == 99] = n + 1
  for exclude in (False, True):
    res = _evaluator(n, ks=(1, 5, 10), exclude_history=exclude,
                     bucket_multiple=2).evaluate(jnp.asarray(w), [batch])
    ranks = reference_rank(np.tile(w, (b, 1)), targets,
                           batch["item_ids"] if exclude else None)
    protocol = ("full_ranking_excluding_history" if exclude
                else "full_ranking")
    _assert_results(res, _expected(ranks, (1, 5, 10), protocol))


def test_eval_batch_targets_rejects_two_targets():
  batch = {"item_ids": np.array([[1, 9, 9]]), "targets": np.array([[0, 2, 3]])}
  with pytest.raises(ValueError, match="row 0 has 2 targets"):
    evaluator.eval_batch_targets(batch)
  with pytest.raises(KeyError, match="targets"):
    evaluator.eval_batch_targets({"item_ids": batch["item_ids"]})
  ids, history, has_target = evaluator.eval_batch_targets(
      {"item_ids": np.array([[1, 9], [0, 0]]),
       "targets": np.array([[0, 4], [0, 0]])})
  np.testing.assert_array_equal(ids, [4, 0])
  np.testing.assert_array_equal(history, [[1, 9], [0, 0]])
  np.testing.assert_array_equal(has_target, [True, False])


# ---------------------------------------------------------------- top-k


def test_top_k_single_device_paths_equal_lax_top_k():
  rng = np.random.default_rng(4)
  scores = jnp.asarray(rng.integers(0, 6, size=(5, 37)).astype(np.float32))
  want_v, want_i = jax.lax.top_k(scores, 9)
  for shards in (1, 4, 8):  # 37 is not a multiple of 4 or 8: padded
    v, i = ranking.chunked_top_k(scores, 9, shards)
    np.testing.assert_array_equal(v, want_v)
    np.testing.assert_array_equal(i, want_i)
  v, i = ranking.sharded_top_k(scores, 9)
  np.testing.assert_array_equal(i, want_i)
  _, items = ranking.top_k_items(scores, 9)
  np.testing.assert_array_equal(items, want_i + 1)
  with pytest.raises(ValueError, match="k must be"):
    ranking.sharded_top_k(scores, 38)


_SHARDED_SCRIPT = textwrap.dedent(r"""
    import json, os, re
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from recsys_jax.evaluation import ranking

    def max_collective_elements(hlo):
      # Largest result (elements per device) of any cross-device op.
      ops = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
             "reduce-scatter")
      biggest = 0
      for line in hlo.splitlines():
        for op in ops:
          at = line.find(" " + op)
          if "=" in line and at > line.find("=") and (
              line[at + 1 + len(op):].startswith(("(", "-start("))):
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", line[:at]):
              size = np.prod([int(d) for d in dims.split(",") if d] or [1])
              biggest = max(biggest, int(size))
      return biggest

    assert jax.device_count() == 8, jax.devices()
    out = {}
    rng = np.random.default_rng(0)
    b, n, h = 8, 256, 9
    scores = rng.integers(0, 7, size=(b, n)).astype(np.float32)
    targets = rng.integers(1, n + 1, size=b).astype(np.int32)
    exclude = rng.integers(0, n + 2, size=(b, h)).astype(np.int32)
    want = np.asarray(ranking.target_rank(scores, targets, exclude))
    want_v, want_i = jax.lax.top_k(scores, 10)
    devices = np.array(jax.devices())
    for shape in ((1, 8), (2, 4)):
      mesh = Mesh(devices.reshape(shape), ("data", "model"))
      sh = NamedSharding(mesh, P("data", "model"))
      s = jax.device_put(scores, sh)
      assert len(s.sharding.device_set) == 8
      f = jax.jit(ranking.target_rank)
      hlo = f.lower(s, targets, exclude).compile().as_text()
      key = "x".join(map(str, shape))
      out["rank_" + key] = np.asarray(f(s, targets, exclude)).tolist()
      out["collective_max_" + key] = max_collective_elements(hlo)
      v, i = ranking.sharded_top_k(s, 10)
      out["topk_v_" + key] = np.array_equal(np.asarray(v), want_v)
      out["topk_i_" + key] = np.array_equal(np.asarray(i), want_i)
    # Explicit mesh, N not a multiple of the 8 shards (padded inside).
    mesh = Mesh(devices.reshape(1, 8), ("data", "model"))
    odd = scores[:, :250]
    v, i = ranking.sharded_top_k(odd, 10, mesh, batch_axis="data")
    wv, wi = jax.lax.top_k(odd, 10)
    out["topk_odd"] = bool(np.array_equal(v, wv) and np.array_equal(i, wi))
    out["want"] = want.tolist()
    print("RESULT" + json.dumps(out))
""")


def test_sharded_rank_and_top_k_on_8_emulated_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=240,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  for key in ("1x8", "2x4"):
    assert out["rank_" + key] == out["want"], key  # exact, int ranks
    # Only [B]-sized partial results cross devices, never score columns.
    assert 0 < out["collective_max_" + key] <= 8, (key, out)
    assert out["topk_v_" + key] and out["topk_i_" + key], key
  assert out["topk_odd"]
