"""Losses for next-item prediction and embedding alignment (pure JAX, no Flax).

Losses return sums (`sum_loss`, `sum_weights`) so callers can average over
any number of devices and steps; log-softmax always runs in float32.
"""

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Fill for excluded candidates: finite so a fully excluded row stays NaN-free.
_EXCLUDED = -1e9


def masked_softmax_cross_entropy(
    logits: Array, targets: Array, weights: Array, *, z_loss: float = 0.0
) -> Tuple[Array, Array]:
  """Weighted softmax cross-entropy over the last axis.

  Args:
    logits: `[..., V]` (any float dtype; cast to float32).
    targets: `[...]` int class ids in [0, V).
    weights: `[...]` per-example weights (0 = no loss).
    z_loss: coefficient of `logsumexp(logits)**2` (PaLM-style) added per
      example, keeping the normaliser near 0.

  Returns:
    (sum of weighted losses, sum of weights), float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
    raise ValueError(f"logits {logits.shape}, targets {targets.shape} and "
                     f"weights {weights.shape} do not line up")
  lse = jax.nn.logsumexp(logits, axis=-1)
  # One-hot product instead of a gather keeps a vocab-sharded `logits`
  # sharded (a local multiply + all-reduce of [..] scalars).
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  target_logit = jnp.sum(logits * onehot, axis=-1)
  loss = lse - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  weights = weights.astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(weights)


@jax.custom_vjp
def tied_logits(query: Array, table: Array) -> Array:
  """`[M, E] x [V, E] -> [M, V]` with a layout-friendly backward pass."""
  return jnp.dot(query, table.T)


def _tied_logits_fwd(query, table):
  return tied_logits(query, table), (query, table)


def _tied_logits_bwd(res, g):
  query, table = res
  # d table = (q^T g)^T: XLA:CPU otherwise materialises g^T, a transposed
  # [V, M] copy of the whole logits gradient (the step's costliest op).
  return jnp.dot(g, table), jnp.dot(query.T, g).T


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def tied_softmax_cross_entropy(
    query: Array, table: Array, bias: Array, valid: Array, targets: Array,
    weights: Array, *, z_loss: float = 0.0,
    constrain: Optional[Callable[[Array], Array]] = None
) -> Tuple[Array, Array, Array]:
  """Full-softmax cross-entropy of a tied output layer, computed lean.

  Logits are `query @ table.T + bias` with non-candidates (`valid` False)
  at -1e9. Compared with building the logits and calling
  `masked_softmax_cross_entropy`, the `[M, V]` passes are cut down: the bias
  is an extra column of the table against a constant-1 column of the query
  (its gradient comes out of the table's matmul), the table gradient is
  `(q^T g)^T` (`tied_logits`), the target logit is a `[M, E]` gather, and
  `correct` compares it with the row max (ties, up to float rounding,
  count as correct).

  Args:
    query: `[M, E]` output queries.
    table: `[V, E]` item table (may be vocab-sharded).
    bias: `[V]`.
    valid: `[V]` bool, the candidate columns.
    targets: `[M]` int ids.
    weights: `[M]` loss weights.
    z_loss: coefficient of `logsumexp**2`.
    constrain: applied to the `[M, V]` logits (e.g. a logical sharding
      constraint to `('batch', 'vocab')`), or None.

  Returns:
    (sum of weighted losses, sum of weights, weighted count of targets that
    score at least as high as every candidate), float32 scalars.
  """
  query = query.astype(jnp.float32)
  bias = jnp.where(valid, bias.astype(jnp.float32), jnp.float32(_EXCLUDED))
  query = jnp.concatenate([query, jnp.ones_like(query[:, :1])], axis=1)
  table = jnp.concatenate([table.astype(jnp.float32), bias[:, None]], axis=1)
  logits = tied_logits(query, table)  # [M, V]
  if constrain is not None:
    logits = constrain(logits)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.sum(query * jnp.take(table, targets, axis=0), axis=-1)
  loss = lse - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  weights = weights.astype(jnp.float32)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  # The gathered target logit and the matmul's can differ by rounding: a
  # relative slack of 1e-5 keeps a top-scoring target counted as correct.
  slack = 1e-5 * (1.0 + jnp.abs(row_max))
  correct = (jax.lax.stop_gradient(target_logit) >= row_max - slack).astype(
      jnp.float32)
  return (jnp.sum(loss * weights), jnp.sum(weights),
          jnp.sum(correct * weights))


def alias_table(log_probs) -> Tuple[np.ndarray, np.ndarray]:
  """Walker/Vose alias table of a categorical distribution (NumPy, once).

  Args:
    log_probs: `[N]` (unnormalised) log-probabilities.

  Returns:
    (accept `[N]` float32, alias `[N]` int32): draw a bucket b uniformly and
    u ~ U[0, 1); the sample is b if u < accept[b], else alias[b]. Exact for
    any N in O(N) memory (Gumbel-max over N would need [K, N] noise).
  """
  lp = np.asarray(log_probs, np.float64)
  if lp.ndim != 1 or not np.all(np.isfinite(lp)):
    raise ValueError(f"log_probs must be a finite [N] vector; got shape "
                     f"{lp.shape}")
  p = np.exp(lp - lp.max())
  n = p.size
  scaled = p * (n / p.sum())
  accept = np.ones(n, np.float64)
  alias = np.arange(n, dtype=np.int64)
  small = [i for i in range(n) if scaled[i] < 1.0]
  large = [i for i in range(n) if scaled[i] >= 1.0]
  while small and large:
    s_i, l_i = small.pop(), large.pop()
    accept[s_i], alias[s_i] = scaled[s_i], l_i
    scaled[l_i] -= 1.0 - scaled[s_i]
    (small if scaled[l_i] < 1.0 else large).append(l_i)
  return accept.astype(np.float32), alias.astype(np.int32)


def sample_negatives(rng: Array, num_negatives: int, num_items: int,
                     log_probs: Optional[Array] = None, *,
                     alias: Optional[Tuple[Array, Array]] = None
                     ) -> Tuple[Array, Array]:
  """Draws negative item ids in 1..N with replacement.

  Args:
    rng: PRNG key.
    num_negatives: K.
    num_items: N.
    log_probs: optional `[N]` log-probabilities of items 1..N (e.g. log
      popularity); uniform if None.
    alias: `alias_table(log_probs)`, precomputed (callers that sample every
      step pass it); built here from a concrete `log_probs` otherwise.

  Returns:
    (ids `[K]` int32 in 1..N, log q `[K]` float32: each draw's log-probability).
    Non-uniform draws use the alias method: O(N) memory and O(K) work per
    draw set, whatever N.
  """
  if log_probs is None:
    ids = jax.random.randint(rng, (num_negatives,), 1, num_items + 1,
                             dtype=jnp.int32)
    return ids, jnp.full((num_negatives,), -math.log(num_items), jnp.float32)
  if log_probs.shape != (num_items,):
    raise ValueError(f"log_probs has shape {log_probs.shape}; expected "
                     f"({num_items},) for items 1..{num_items}")
  if alias is None:
    if isinstance(log_probs, jax.core.Tracer):
      raise ValueError("sample_negatives under jit needs alias="
                       "alias_table(log_probs) computed outside")
    alias = alias_table(log_probs)
  accept, other = (jnp.asarray(a) for a in alias)
  log_probs = jax.nn.log_softmax(jnp.asarray(log_probs, jnp.float32))
  r_bucket, r_accept = jax.random.split(rng)
  bucket = jax.random.randint(r_bucket, (num_negatives,), 0, num_items,
                              dtype=jnp.int32)
  u = jax.random.uniform(r_accept, (num_negatives,))
  idx = jnp.where(u < jnp.take(accept, bucket), bucket,
                  jnp.take(other, bucket))
  return (idx + 1).astype(jnp.int32), jnp.take(log_probs, idx)


def sampled_softmax_logits(
    query: Array, target_ids: Array, item_table: Array, bias: Array,
    negatives: Array, *, negative_log_q: Optional[Array] = None,
    target_log_q: Optional[Array] = None,
    negative_mask: Optional[Array] = None,
    remove_accidental_hits: bool = True) -> Array:
  """Candidate logits `[M, 1 + K]`: column 0 the target, then K negatives.

  Each logit is `query . item + bias - log q(item)` (the logQ correction of
  Bengio & Senecal / Yi et al. 2019), applied to the target and negatives
  alike when given. A negative equal to the row's target (accidental hit)
  or with `negative_mask` False gets -1e9.

  Args:
    query: `[M, E]`.
    target_ids: `[M]` ids into `item_table`.
    item_table: `[V, E]` (may be vocab-sharded; only rows are gathered).
    bias: `[V]`.
    negatives: `[K]` ids shared by all rows.
    negative_log_q: `[K]` log sampling probabilities of the negatives.
    target_log_q: `[M]` log sampling probabilities of the targets.
    negative_mask: `[K]` bool, False = not a candidate.
    remove_accidental_hits: mask negatives equal to the target.
  """
  query = query.astype(jnp.float32)
  pos_emb = jnp.take(item_table, target_ids, axis=0).astype(jnp.float32)
  neg_emb = jnp.take(item_table, negatives, axis=0).astype(jnp.float32)
  bias = bias.astype(jnp.float32)
  pos = jnp.sum(query * pos_emb, axis=-1) + jnp.take(bias, target_ids)  # [M]
  neg = query @ neg_emb.T + jnp.take(bias, negatives)[None, :]  # [M, K]
  if target_log_q is not None:
    pos = pos - target_log_q.astype(jnp.float32)
  if negative_log_q is not None:
    neg = neg - negative_log_q.astype(jnp.float32)[None, :]
  excluded = jnp.zeros(neg.shape, bool)
  if remove_accidental_hits:
    excluded = excluded | (negatives[None, :] == target_ids[:, None])
  if negative_mask is not None:
    excluded = excluded | ~negative_mask[None, :]
  neg = jnp.where(excluded, _EXCLUDED, neg)
  return jnp.concatenate([pos[:, None], neg], axis=1)


def sampled_softmax_cross_entropy(
    query: Array, target_ids: Array, item_table: Array, bias: Array,
    negatives: Array, *, negative_log_q: Optional[Array] = None,
    target_log_q: Optional[Array] = None, weights: Optional[Array] = None,
    negative_mask: Optional[Array] = None,
    remove_accidental_hits: bool = True) -> Tuple[Array, Array]:
  """Sampled softmax with logQ correction; returns (sum_loss, sum_weights).

  Shapes as in `sampled_softmax_logits`; `weights` `[M]` (default ones).
  For in-batch negatives pass `negatives=target_ids`, `negative_log_q =
  target_log_q` and `negative_mask = weights > 0`: each row's own target then
  drops out as an accidental hit.
  """
  logits = sampled_softmax_logits(
      query, target_ids, item_table, bias, negatives,
      negative_log_q=negative_log_q, target_log_q=target_log_q,
      negative_mask=negative_mask,
      remove_accidental_hits=remove_accidental_hits)
  if weights is None:
    weights = jnp.ones(target_ids.shape, jnp.float32)
  return masked_softmax_cross_entropy(
      logits, jnp.zeros(target_ids.shape, jnp.int32), weights)


def info_nce(a: Array, b: Array, temperature: float = 0.07, *,
             normalize: bool = True) -> Array:
  """Symmetric InfoNCE (CLIP loss): row i of `a` matches row i of `b`.

  Args:
    a: `[M, D]`.
    b: `[M, D]`.
    temperature: softmax temperature.
    normalize: L2-normalise rows first (cosine similarity).

  Returns:
    Mean over rows of (CE(a -> b) + CE(b -> a)) / 2, a float32 scalar.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"info_nce expects two [M, D] arrays of the same shape; "
                     f"got {a.shape} and {b.shape}")
  if normalize:
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  logits = a @ b.T / temperature
  labels = jnp.arange(a.shape[0])
  weights = jnp.ones(a.shape[:1], jnp.float32)
  ab, n = masked_softmax_cross_entropy(logits, labels, weights)
  ba, _ = masked_softmax_cross_entropy(logits.T, labels, weights)
  return 0.5 * (ab + ba) / n
