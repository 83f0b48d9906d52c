"""Losses for next-item prediction and embedding alignment (pure JAX, no Flax).

Losses return sums (loss sum, weight sum) so callers can average over any
number of devices, micro-batches and steps; log-softmax always runs in
float32.
"""

import functools
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


Constrain = Callable[[Array, Tuple[Optional[str], ...]], Array]


def _no_constraint(x: Array, axes) -> Array:  # pylint: disable=unused-argument
  return x


def loss_chunks(rows: int, chunk_rows: Optional[int]) -> int:
  """Chunks of `rows` output rows: the fewest that divide `rows` evenly and
  hold at most `chunk_rows` each (one chunk when `chunk_rows` is None or
  at least `rows`; a prime `rows` above `chunk_rows` gives one per row)."""
  if chunk_rows is None or chunk_rows >= rows:
    return 1
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows={chunk_rows}: expected a positive integer "
                     "or None")
  n = -(-rows // chunk_rows)
  while rows % n:
    n += 1
  return n


def _to_chunks(x: Array, n: int) -> Array:
  """`[M, ...] -> [n, M // n, ...]`, chunk i = rows i, i + n, i + 2n, ...

  Strided, so a row-sharded `x` stays local when n divides each shard's rows
  (rows are batch-major: n dividing the predictions per row suffices).
  """
  m = x.shape[0]
  return jnp.swapaxes(x.reshape((m // n, n) + x.shape[1:]), 0, 1)


def _from_chunks(x: Array) -> Array:
  n, c = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape((n * c,) + x.shape[2:])


def _ce_chunk(q, t, w, table, items, z_loss, constrain, with_grad):
  """One chunk of rows: per-row loss and correct flag (and the gradients).

  `q` is `[c, E]`; `table` `[V, E + 1]` carries the bias as a last column,
  against a constant-1 column appended to `q`: the bias add is inside the
  logits matmul and its gradient comes out of the table gradient's
  (`q^T g`).
  The query gradient `g @ items` uses `items` `[V, E]`, the table without
  that column: on XLA:CPU a matmul with E + 1 = 65 output columns ran at
  101 GFLOP/s against 154 with 64 (2 cores, benchmarks/README.md), while
  the bias column costs the other two matmuls much less (logits K = 65:
  135 against 155; `q^T g` 65 rows: 99 against 112), and adding the bias
  or summing its gradient in separate [c, V] passes costs more than that.
  """
  q = jnp.concatenate([q, jnp.ones_like(q[:, :1])], axis=1)  # [c, E + 1]
  logits = constrain(jnp.dot(q, table.T), ("batch", "vocab"))  # [c, V]
  row_max = jnp.max(logits, axis=-1)
  exp = jnp.exp(logits - row_max[:, None])
  total = jnp.sum(exp, axis=-1)
  lse = row_max + jnp.log(total)
  target_logit = jnp.sum(q * jnp.take(table, t, axis=0), axis=-1)
  loss = lse - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  # The gathered target logit and the matmul's can differ by rounding: a
  # relative slack of 1e-5 keeps a top-scoring target counted as correct.
  slack = 1e-5 * (1.0 + jnp.abs(row_max))
  correct = (target_logit >= row_max - slack).astype(jnp.float32)
  if not with_grad:
    return loss, correct, None
  # d loss / d logits = softmax * (1 + 2 z lse) - onehot(target), per row
  # weighted; the softmax reuses `exp`, the one-hot is a compare in the same
  # [c, V] pass.
  coef = w * (1.0 + 2.0 * z_loss * lse) if z_loss else w
  hit = jnp.arange(logits.shape[-1])[None, :] == t[:, None]
  g = constrain(exp * (coef / total)[:, None]
                - jnp.where(hit, w[:, None], 0.0), ("batch", "vocab"))
  d_query = jnp.dot(g, items)                       # [c, E]
  d_table_t = jnp.dot(q.T, g)                       # [E + 1, V]: q^T g, fast
  return loss, correct, (d_query, d_table_t)


def _fused_ce(z_loss, n, constrain, with_grad, query, items, bias, targets,
              weights):
  """Scan over n row chunks: ([M] loss, [M] correct, (d query, d table
  `[V, E + 1]`: the items' gradient, then the bias's as the last column))."""
  table = jnp.concatenate([items, bias[:, None]], axis=1)
  args = (table, items, z_loss, constrain, with_grad)
  if n == 1:
    loss, correct, grads = _ce_chunk(query, targets, weights, *args)
    if grads is not None:
      grads = (grads[0], grads[1].T)
    return loss, correct, grads
  xs = (_to_chunks(query, n), _to_chunks(targets, n), _to_chunks(weights, n))
  if not with_grad:
    def body(carry, x):
      loss, correct, _ = _ce_chunk(*x, *args)
      return carry, (loss, correct)
    _, (loss, correct) = jax.lax.scan(body, None, xs)
    return _from_chunks(loss), _from_chunks(correct), None

  def grad_body(d_table_t, x):
    loss, correct, (d_query, dt) = _ce_chunk(*x, *args)
    return (constrain(d_table_t + dt, (None, "vocab")),
            (loss, correct, d_query))

  init = constrain(jnp.zeros(table.shape[::-1], jnp.float32),
                   (None, "vocab"))
  d_table_t, (loss, correct, d_query) = jax.lax.scan(grad_body, init, xs)
  return (_from_chunks(loss), _from_chunks(correct),
          (_from_chunks(d_query), d_table_t.T))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tied_ce_sums(z_loss, n, constrain, query, items, bias, targets,
                  weights):
  loss, correct, _ = _fused_ce(z_loss, n, constrain, False, query, items,
                               bias, targets, weights)
  return jnp.sum(loss * weights), jnp.sum(correct * weights)


def _tied_ce_sums_fwd(z_loss, n, constrain, query, items, bias, targets,
                      weights):
  # The loss is a sum over rows, so its gradient is known in the forward
  # pass: each chunk's [c, V] softmax is used while it is in cache and never
  # stored (the backward pass only scales).
  loss, correct, grads = _fused_ce(z_loss, n, constrain, True, query, items,
                                   bias, targets, weights)
  sums = (jnp.sum(loss * weights), jnp.sum(correct * weights))
  return sums, (grads, loss, targets)


def _tied_ce_sums_bwd(z_loss, n, constrain, res, cotangents):
  del z_loss, n, constrain
  (d_query, d_table), loss, targets = res
  g = cotangents[0]  # correct_sum has no gradient
  d_targets = np.zeros(targets.shape, jax.dtypes.float0)
  return (g * d_query, g * d_table[:, :-1], g * d_table[:, -1], d_targets,
          g * loss)


_tied_ce_sums.defvjp(_tied_ce_sums_fwd, _tied_ce_sums_bwd)


def tied_softmax_cross_entropy(
    query: Array, table: Array, bias: Array, valid: Array, targets: Array,
    weights: Array, *, z_loss: float = 0.0,
    constrain: Optional[Constrain] = None,
    chunk_rows: Optional[int] = None
) -> Tuple[Array, Array, Array]:
  """Full-softmax cross-entropy of a tied output layer, fused and chunked.

  Logits are `query @ table.T + bias` with non-candidates (`valid` False)
  at -1e9. The rows are processed in chunks of at most `chunk_rows`
  (`loss_chunks`; a `lax.scan`), and under differentiation each chunk's
  gradients (query rows, table, bias) are computed right after its loss,
  from the `[c, V]` logits while they are in cache: no `[M, V]` array is
  ever materialised or kept for the backward pass, so memory is `c x V`
  whatever the number of rows, and on CPU the chunk's matmuls and softmax
  run from cache instead of memory (docs: benchmarks/README.md). The bias
  is an extra table column against a constant-1 query column (its add and
  gradient ride on the logits and table-gradient matmuls; the query
  gradient uses the table without it, `_ce_chunk`); the target logit is a
  `[M, E + 1]` gather;
  `correct` compares it with the row max (ties, up to float rounding, count
  as correct). `chunk_rows=None` is one chunk.

  Args:
    query: `[M, E]` output queries.
    table: `[V, E]` item table (may be vocab-sharded).
    bias: `[V]`.
    valid: `[V]` bool, the candidate columns.
    targets: `[M]` int ids.
    weights: `[M]` loss weights.
    z_loss: coefficient of `logsumexp**2`.
    constrain: `constrain(x, logical_axes)`, applied to each chunk's
      `[c, V]` logits and gradient (`('batch', 'vocab')`) and to the
      `[E + 1, V]` table-and-bias gradient accumulator (`(None, 'vocab')`:
      E + 1 is never split), e.g. a logical sharding constraint; None for
      none.
    chunk_rows: rows per chunk (None: all rows in one).

  Returns:
    (sum of weighted losses, sum of weights, weighted count of targets that
    score at least as high as every candidate), float32 scalars.
  """
  query = query.astype(jnp.float32)
  bias = jnp.where(valid, bias.astype(jnp.float32), jnp.float32(_EXCLUDED))
  weights = weights.astype(jnp.float32)
  n = loss_chunks(query.shape[0], chunk_rows)
  loss_sum, correct_sum = _tied_ce_sums(
      float(z_loss), n, constrain or _no_constraint, query,
      table.astype(jnp.float32), bias, targets.astype(jnp.int32), weights)
  return loss_sum, jnp.sum(weights), correct_sum


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
             weights: Optional[Array] = None,
             normalize: bool = True) -> Tuple[Array, Array]:
  """Symmetric InfoNCE (CLIP loss): row i of `a` matches row i of `b`.

  Each weighted row i contributes w_i (CE(a_i -> b) + CE(b_i -> a)) / 2,
  where CE(a_i -> b) is the cross-entropy of a_i's similarities to the rows
  of `b` against b_i. Rows with weight 0 (padding) neither contribute a
  loss nor serve as candidates for the other rows.

  Args:
    a: `[M, D]`.
    b: `[M, D]`.
    temperature: softmax temperature.
    weights: `[M]` row weights (default ones).
    normalize: L2-normalise rows first (cosine similarity).

  Returns:
    (sum of weighted losses, sum of weights), float32 scalars, like the
    other losses here: the mean is their ratio, and sums add up over
    micro-batches (each micro-batch's rows are then each other's only
    candidates, as in-batch negatives are).
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"info_nce expects two [M, D] arrays of the same shape; "
                     f"got {a.shape} and {b.shape}")
  if weights is None:
    weights = jnp.ones(a.shape[:1], jnp.float32)
  weights = weights.astype(jnp.float32)
  if weights.shape != a.shape[:1]:
    raise ValueError(f"info_nce weights have shape {weights.shape}; expected "
                     f"({a.shape[0]},) (one per row)")
  if normalize:
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  logits = a @ b.T / temperature
  # Padding rows are no candidates (a weighted row always keeps its own
  # positive on the diagonal, so no row is left without one).
  # Symmetric, so that the b -> a direction (logits.T) is masked alike.
  candidate = weights > 0
  keep = ((candidate[:, None] & candidate[None, :])
          | jnp.eye(a.shape[0], dtype=bool))
  logits = jnp.where(keep, logits, _EXCLUDED)
  labels = jnp.arange(a.shape[0])
  ab, n = masked_softmax_cross_entropy(logits, labels, weights)
  ba, _ = masked_softmax_cross_entropy(logits.T, labels, weights)
  return 0.5 * (ab + ba), n
