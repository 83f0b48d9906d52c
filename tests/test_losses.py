"""Losses against NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.model_lib import losses


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_logsumexp(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1)
  return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def test_masked_softmax_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 7)).astype(np.float32) * 3
  logits[0, 0] += 1e4  # large shift: naive exp would overflow
  targets = rng.integers(0, 7, size=(3, 4))
  weights = (rng.random((3, 4)) > 0.4).astype(np.float32)
  weights[1, 2] = 0.5
  loss, wsum = losses.masked_softmax_cross_entropy(logits, targets, weights)
  lsm = np_log_softmax(logits)
  nll = -np.take_along_axis(lsm, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, (nll * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(wsum, weights.sum())
  assert np.isfinite(loss)

  z = 1e-3
  loss_z, _ = losses.masked_softmax_cross_entropy(logits, targets, weights,
                                                  z_loss=z)
  ref_z = ((nll + z * np_logsumexp(logits) ** 2) * weights).sum()
  np.testing.assert_allclose(loss_z, ref_z, rtol=1e-5)


def test_masked_softmax_cross_entropy_bfloat16_runs_in_float32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(5, 300)) * 4, jnp.bfloat16)
  targets = rng.integers(0, 300, size=(5,))
  weights = np.ones(5, np.float32)
  loss, _ = losses.masked_softmax_cross_entropy(logits, targets, weights)
  assert loss.dtype == jnp.float32
  lsm = np_log_softmax(np.asarray(logits.astype(jnp.float32)))
  ref = -lsm[np.arange(5), targets].sum()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_masked_softmax_cross_entropy_shape_error():
  with pytest.raises(ValueError, match="do not line up"):
    losses.masked_softmax_cross_entropy(np.zeros((2, 3, 5)), np.zeros((2, 4)),
                                        np.zeros((2, 4)))


def np_sampled_reference(query, targets, table, bias, negatives, neg_log_q,
                         tgt_log_q, weights, neg_mask):
  """Row by row: candidates = target + valid non-hit negatives."""
  total = 0.0
  for i in range(len(targets)):
    pos = query[i] @ table[targets[i]] + bias[targets[i]] - tgt_log_q[i]
    cands = [pos]
    for k, n in enumerate(negatives):
      if n == targets[i] or not neg_mask[k]:
        continue
      cands.append(query[i] @ table[n] + bias[n] - neg_log_q[k])
    cands = np.asarray(cands, np.float64)
    total += weights[i] * -(np_log_softmax(cands)[0])
  return total


def test_sampled_softmax_matches_numpy_with_logq_and_hits():
  rng = np.random.default_rng(2)
  v, e, m = 12, 5, 6
  table = rng.normal(size=(v, e)).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  query = rng.normal(size=(m, e)).astype(np.float32)
  targets = np.array([1, 2, 3, 3, 7, 11])
  negatives = np.array([3, 5, 7, 9, 3, 10, 2])  # contains targets: hits
  neg_log_q = np.log(rng.dirichlet(np.ones(len(negatives)))).astype(np.float32)
  tgt_log_q = np.log(rng.uniform(0.01, 0.5, size=m)).astype(np.float32)
  weights = np.array([1, 1, 0, 1, 1, 0.5], np.float32)
  neg_mask = np.array([1, 1, 1, 0, 1, 1, 1], bool)
  loss, wsum = losses.sampled_softmax_cross_entropy(
      query, targets, table, bias, negatives, negative_log_q=neg_log_q,
      target_log_q=tgt_log_q, weights=weights, negative_mask=neg_mask)
  ref = np_sampled_reference(query, targets, table, bias, negatives,
                             neg_log_q, tgt_log_q, weights, neg_mask)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(wsum, weights.sum())

  # Without hit removal, row 0 (target 1, no hit) is unchanged but row 2
  # (target 3, which appears twice among negatives) is not.
  logits = losses.sampled_softmax_logits(
      query, targets, table, bias, negatives, negative_log_q=neg_log_q,
      target_log_q=tgt_log_q, remove_accidental_hits=True)
  logits_hits = losses.sampled_softmax_logits(
      query, targets, table, bias, negatives, negative_log_q=neg_log_q,
      target_log_q=tgt_log_q, remove_accidental_hits=False)
  np.testing.assert_allclose(logits[0], logits_hits[0])
  assert logits[2, 1] == -1e9 and logits[2, 5] == -1e9
  assert logits_hits[2, 1] > -1e3


def test_in_batch_negatives_match_numpy():
  rng = np.random.default_rng(3)
  v, e = 9, 4
  table = rng.normal(size=(v, e)).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  targets = np.array([1, 4, 4, 0, 8, 2])  # a duplicate and a padding row
  weights = (targets > 0).astype(np.float32)
  query = rng.normal(size=(len(targets), e)).astype(np.float32)
  log_q = np.log(rng.uniform(0.05, 0.3, size=v)).astype(np.float32)[targets]
  loss, wsum = losses.sampled_softmax_cross_entropy(
      query, targets, table, bias, targets, negative_log_q=log_q,
      target_log_q=log_q, weights=weights, negative_mask=weights > 0)
  ref = 0.0
  for i in range(len(targets)):
    if not weights[i]:
      continue
    pos = query[i] @ table[targets[i]] + bias[targets[i]] - log_q[i]
    cands = [pos] + [query[i] @ table[t] + bias[t] - log_q[j]
                     for j, t in enumerate(targets)
                     if weights[j] > 0 and t != targets[i]]
    ref += -np_log_softmax(np.asarray(cands))[0]
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert wsum == 5


def test_sample_negatives_uniform_and_popularity():
  ids, log_q = losses.sample_negatives(jax.random.PRNGKey(0), 500, 7)
  ids = np.asarray(ids)
  assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() <= 7
  assert len(np.unique(ids)) == 7
  np.testing.assert_allclose(log_q, -math.log(7), rtol=1e-6)

  p = np.array([0.5, 0.25, 0.15, 0.1])
  ids, log_q = losses.sample_negatives(jax.random.PRNGKey(1), 20000, 4,
                                       np.log(p) + 3.0)  # unnormalised
  ids = np.asarray(ids)
  assert ids.min() >= 1 and ids.max() <= 4
  freq = np.bincount(ids, minlength=5)[1:] / len(ids)
  np.testing.assert_allclose(freq, p, atol=0.015)
  np.testing.assert_allclose(log_q, np.log(p)[ids - 1], rtol=1e-5)
  with pytest.raises(ValueError, match=r"expected \(5,\)"):
    losses.sample_negatives(jax.random.PRNGKey(1), 3, 5, np.zeros(4))


def test_alias_table_is_exact():
  rng = np.random.default_rng(2)
  p = rng.dirichlet(np.full(50, 0.3))
  p[7] = 0.0  # never drawn
  p /= p.sum()
  accept, alias = losses.alias_table(np.log(np.maximum(p, 1e-300)))
  # P(i) = (accept[i] + sum_{b: alias[b] = i} (1 - accept[b])) / N.
  implied = accept.astype(np.float64).copy()
  np.add.at(implied, alias, 1.0 - accept)
  np.testing.assert_allclose(implied / len(p), p, atol=1e-7)
  # And under jit with the table passed in (the training path).
  lp = jnp.asarray(np.log(np.maximum(p, 1e-300)), jnp.float32)
  draw = jax.jit(lambda key, lp: losses.sample_negatives(
      key, 40000, 50, lp, alias=(accept, alias)))
  ids, log_q = draw(jax.random.PRNGKey(3), lp)
  freq = np.bincount(np.asarray(ids) - 1, minlength=50) / 40000
  np.testing.assert_allclose(freq, p, atol=0.01)
  assert freq[7] == 0.0
  np.testing.assert_allclose(log_q, np.log(p[np.asarray(ids) - 1]), rtol=1e-4)
  with pytest.raises(ValueError, match="alias"):
    jax.jit(lambda key, lp: losses.sample_negatives(key, 3, 50, lp))(
        jax.random.PRNGKey(0), lp)


def np_info_nce_rows(a, b, t, normalize=True):
  """Per-row symmetric InfoNCE, float64: (CE(a_i -> b) + CE(b_i -> a)) / 2."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if normalize:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
  s = a @ b.T / t
  return 0.5 * (-np.diag(np_log_softmax(s)) - np.diag(np_log_softmax(s.T)))


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(6, 8)).astype(np.float32)
  b = rng.normal(size=(6, 8)).astype(np.float32)
  t = 0.1
  ref = np_info_nce_rows(a, b, t)
  for x, y in ((a, b), (b, a)):  # symmetric
    loss_sum, weight_sum = losses.info_nce(x, y, t)
    np.testing.assert_allclose(loss_sum, ref.sum(), rtol=1e-5)
    assert float(weight_sum) == 6.0
  loss_sum, weight_sum = losses.info_nce(a, b, t, normalize=False)
  np.testing.assert_allclose(loss_sum / weight_sum,
                             np_info_nce_rows(a, b, t, False).mean(),
                             rtol=1e-5)
  # Identical orthogonal rows at a low temperature: near-zero loss.
  eye = np.eye(6, 8, dtype=np.float32)
  assert float(losses.info_nce(eye, eye, 0.01)[0]) < 1e-6


def test_info_nce_weights_drop_rows_as_losses_and_candidates():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(7, 4)).astype(np.float32)
  b = rng.normal(size=(7, 4)).astype(np.float32)
  w = np.array([1, 0, 2, 1, 0, 1, 0.5], np.float32)
  keep = w > 0
  # The padding rows are as good as absent: the same as the loss over the
  # weighted rows alone.
  ref = np_info_nce_rows(a[keep], b[keep], 0.2)
  loss_sum, weight_sum = losses.info_nce(a, b, 0.2, weights=w)
  np.testing.assert_allclose(loss_sum, (w[keep] * ref).sum(), rtol=1e-5)
  np.testing.assert_allclose(weight_sum, w.sum())
  with pytest.raises(ValueError, match=r"weights have shape \(6,\)"):
    losses.info_nce(a, b, weights=w[:6])


def test_info_nce_sums_add_up_over_micro_batches():
  """Sums (not means) make accumulation exact: two halves' sums add up to
  the sum of the per-half losses, whatever their weight sums."""
  rng = np.random.default_rng(6)
  a = rng.normal(size=(8, 4)).astype(np.float32)
  b = rng.normal(size=(8, 4)).astype(np.float32)
  w = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  halves = [losses.info_nce(a[i::2], b[i::2], 0.5, weights=w[i::2])
            for i in range(2)]
  total = sum(float(l) for l, _ in halves) / sum(float(n) for _, n in halves)
  ref = np.concatenate([np_info_nce_rows(a[i::2][w[i::2] > 0],
                                         b[i::2][w[i::2] > 0], 0.5)
                        for i in range(2)])
  np.testing.assert_allclose(total, ref.mean(), rtol=1e-5)
  # The weight sums differ (3 and 2): the mean of the halves' means is not
  # the accumulated mean, so this test separates sums from means.
  assert [float(n) for _, n in halves] == [3.0, 2.0]
  means = [float(l) / float(n) for l, n in halves]
  assert abs(np.mean(means) - total) > 1e-3


def test_loss_chunks():
  assert losses.loss_chunks(2816, None) == 1
  assert losses.loss_chunks(2816, 4096) == 1
  assert losses.loss_chunks(2816, 256) == 11   # 2816 = 11 x 256
  assert losses.loss_chunks(1600, 256) == 8    # chunks of 200
  assert losses.loss_chunks(12, 5) == 3        # chunks of 4
  assert losses.loss_chunks(7, 3) == 7         # prime: one row a chunk
  with pytest.raises(ValueError, match="chunk_rows=0"):
    losses.loss_chunks(8, 0)


@pytest.mark.parametrize("chunk_rows", [None, 1, 2, 3, 4, 100])
def test_tied_softmax_cross_entropy_matches_numpy_and_explicit_logits(
    chunk_rows):
  rng = np.random.default_rng(3)
  m, v, e = 6, 11, 5
  query = rng.normal(size=(m, e)).astype(np.float32)
  table = rng.normal(size=(v, e)).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  valid = np.ones(v, bool)
  valid[[0, 9, 10]] = False  # pad, [MASK], vocabulary padding
  targets = rng.integers(1, 9, size=(m,))
  weights = (rng.random(m) > 0.3).astype(np.float32)
  weights[0] = 1.0
  query[1] = table[targets[1]] * 50  # a confidently right row
  z = 1e-3
  loss_sum, weight_sum, correct_sum = losses.tied_softmax_cross_entropy(
      query, table, bias, valid, targets, weights, z_loss=z,
      chunk_rows=chunk_rows)
  logits = query.astype(np.float64) @ table.T + bias
  logits[:, ~valid] = -1e9
  lse = np_logsumexp(logits)
  ref = lse - logits[np.arange(m), targets] + z * lse**2
  np.testing.assert_allclose(loss_sum, np.sum(ref * weights), rtol=1e-5)
  assert float(weight_sum) == weights.sum()
  best = logits.argmax(-1) == targets
  np.testing.assert_allclose(correct_sum, np.sum(best * weights))

  # Gradients equal those of the explicit-logits loss.
  # Gradients (query, table, bias, weights) equal those of the
  # explicit-logits loss, scaled by an upstream cotangent; under jit too.
  def explicit(q, t, b, w):
    lg = jnp.where(valid, q @ t.T + b, -1e9)
    return 3.0 * losses.masked_softmax_cross_entropy(lg, targets, w,
                                                     z_loss=z)[0]

  def lean(q, t, b, w):
    loss, _, correct = losses.tied_softmax_cross_entropy(
        q, t, b, valid, targets, w, z_loss=z, chunk_rows=chunk_rows)
    return 3.0 * loss + correct  # correct_sum carries no gradient

  args = (query, table, bias, weights)
  g1 = jax.grad(explicit, argnums=(0, 1, 2, 3))(*args)
  g2 = jax.jit(jax.grad(lean, argnums=(0, 1, 2, 3)))(*args)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # value_and_grad's value is the primal loss.
  value, _ = jax.value_and_grad(lean)(*args)
  np.testing.assert_allclose(value, 3.0 * loss_sum + correct_sum, rtol=1e-6)
