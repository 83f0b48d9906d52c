"""Rank of the held-out item and top-k, by counting, so both shard over items.

Scores are `[batch, N]` with column `j` holding item `j + 1` (item vocabulary:
0 = padding, 1..N = items, N+1 = [MASK]). Nothing here sorts or gathers the
`[batch, N]` array: the rank is a sum of per-item comparisons, which XLA splits
into per-shard partial counts plus one all-reduce of `[batch]` integers when the
scores are sharded along the item axis; top-k runs per shard and merges
`shards * k` candidates.

Tie rule (pessimistic): the rank of the target is the number of other items
whose score is >= the target's score. A model that gives every item the same
score therefore ranks every target last, not first.
"""

import functools
from typing import Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def exclusion_mask(shape: Tuple[int, int],
                    exclude_ids: jax.Array) -> jax.Array:
  """[B, N] bool, True at columns of items named in `exclude_ids` [B, H]."""
  _, n = shape
  # Ids outside 1..N (padding 0, [MASK] N+1) point past the end and are
  # dropped by the scatter, so histories can be passed unfiltered.
  cols = jnp.where((exclude_ids >= 1) & (exclude_ids <= n), exclude_ids - 1, n)
  rows = jnp.arange(shape[0])[:, None]
  return jnp.zeros(shape, jnp.bool_).at[rows, cols].set(True, mode="drop")


def target_rank(scores: jax.Array,
                target_ids: jax.Array,
                exclude_ids: Optional[jax.Array] = None) -> jax.Array:
  """0-based pessimistic rank of each target among items 1..N.

  rank = #{items i != target, not excluded : score_i >= score_target}.

  Excluded items are removed from the candidate set (the same as giving them
  -inf, except that they also stop counting when the target itself scores
  -inf). The target is never excluded, even when it appears in `exclude_ids`
  (a re-consumed item is still a valid prediction). NaN scores count as -inf.
  Rows whose target is outside 1..N get rank N (worse than any real rank);
  mask such padding rows out when accumulating.

  Args:
    scores: [B, N] float scores; column j is item j + 1. May be sharded along
      N (and B); the result then needs only an all-reduce of [B] counts.
    target_ids: [B] int item ids in 1..N.
    exclude_ids: optional [B, H] int item ids to drop from the ranking (e.g.
      the user's history); ids outside 1..N are ignored.

  Returns:
    [B] int32 ranks in 0..N-1 (N for invalid targets).
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [batch, num_items], got {scores.shape}")
  b, n = scores.shape
  target_ids = jnp.asarray(target_ids).astype(jnp.int32)
  if target_ids.shape != (b,):
    raise ValueError(f"target_ids must be [{b}], got {target_ids.shape}")
  valid = (target_ids >= 1) & (target_ids <= n)
  col = jnp.where(valid, target_ids - 1, 0)
  # A gather of one column per row: under item sharding XLA lets the owning
  # shard supply it and all-reduces [B] values, no [B, N] movement.
  target_score = jnp.take_along_axis(scores, col[:, None], axis=1)
  neg_inf = jnp.array(-jnp.inf, scores.dtype)
  target_score = jnp.where(jnp.isnan(target_score), neg_inf, target_score)
  clean = jnp.where(jnp.isnan(scores), neg_inf, scores)
  item_col = lax.broadcasted_iota(jnp.int32, (b, n), 1)
  beats = (clean >= target_score) & (item_col != col[:, None])
  if exclude_ids is not None:
    exclude_ids = jnp.asarray(exclude_ids).astype(jnp.int32)
    if exclude_ids.ndim != 2 or exclude_ids.shape[0] != b:
      raise ValueError(
          f"exclude_ids must be [{b}, history_len], got {exclude_ids.shape}")
    beats &= ~exclusion_mask((b, n), exclude_ids)
  rank = jnp.sum(beats, axis=1, dtype=jnp.int32)
  return jnp.where(valid, rank, jnp.int32(n))


def candidate_rank(target_scores: jax.Array,
                   negative_scores: jax.Array) -> jax.Array:
  """Pessimistic 0-based rank of the target among itself plus M negatives.

  Args:
    target_scores: [B] scores of the held-out items.
    negative_scores: [B, M] scores of the sampled negatives.

  Returns:
    [B] int32 ranks in 0..M: #{negatives with score >= target score}.
  """
  neg_inf = jnp.array(-jnp.inf, negative_scores.dtype)
  t = jnp.where(jnp.isnan(target_scores), neg_inf, target_scores)
  neg = jnp.where(jnp.isnan(negative_scores), neg_inf, negative_scores)
  return jnp.sum(neg >= t[:, None], axis=1, dtype=jnp.int32)


def sampled_target_rank(scores: jax.Array, target_ids: jax.Array,
                        negative_ids: jax.Array) -> jax.Array:
  """Rank of each target among itself and its negatives, from full scores.

  Args:
    scores: [B, N] scores; column j is item j + 1.
    target_ids: [B] item ids in 1..N.
    negative_ids: [B, M] item ids in 1..N (see `metrics.sample_negatives`).

  Returns:
    [B] int32 ranks in 0..M (pessimistic ties).
  """
  target_ids = jnp.asarray(target_ids).astype(jnp.int32)
  negative_ids = jnp.asarray(negative_ids).astype(jnp.int32)
  t = jnp.take_along_axis(scores, target_ids[:, None] - 1, axis=1)[:, 0]
  neg = jnp.take_along_axis(scores, negative_ids - 1, axis=1)
  return candidate_rank(t, neg)


def _merge_top_k(values: jax.Array, indices: jax.Array,
                 k: int) -> Tuple[jax.Array, jax.Array]:
  """Top-k of per-shard candidates laid out shard-major along axis 1."""
  # Candidates are ordered by shard, hence by global column within equal
  # scores, so lax.top_k's lower-position-first tie rule keeps the same
  # tie order as a top-k over the unsharded row.
  top_values, pos = lax.top_k(values, k)
  return top_values, jnp.take_along_axis(indices, pos, axis=1)


def _local_top_k(local: jax.Array, k: int,
                 offset: jax.Array) -> Tuple[jax.Array, jax.Array]:
  kk = min(k, local.shape[1])
  v, i = lax.top_k(local, kk)
  return v, i + offset


@functools.partial(jax.jit, static_argnames=("k", "num_shards"))
def chunked_top_k(scores: jax.Array, k: int,
                  num_shards: int) -> Tuple[jax.Array, jax.Array]:
  """Top-k as `num_shards` per-chunk top-k's and one merge (no mesh needed)."""
  b, n = scores.shape
  pad = (-n) % num_shards
  x = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  per = x.shape[1] // num_shards
  kk = min(k, per)
  v, i = lax.top_k(x.reshape(b, num_shards, per), kk)
  i = i + (jnp.arange(num_shards) * per)[None, :, None]
  return _merge_top_k(v.reshape(b, -1), i.reshape(b, -1), k)


def sharded_top_k(scores: jax.Array,
                  k: int,
                  mesh: Optional[Mesh] = None,
                  *,
                  item_axis: str = "model",
                  batch_axis: Optional[str] = None
                  ) -> Tuple[jax.Array, jax.Array]:
  """Top-k columns per row: top-k within each item shard, then one merge.

  Each device keeps its k best of its N / shards columns; only those
  `[B, shards * k]` candidates are all-gathered over `item_axis` and merged.
  Equals `lax.top_k(scores, k)` including tie order (lower column first).

  Args:
    scores: [B, N] scores; N need not be a multiple of the shard count
      (the last shard is padded with -inf).
    k: how many to return; 1 <= k <= N.
    mesh: the device mesh. When None it is taken from `scores.sharding` if
      that is a NamedSharding, else a plain `lax.top_k` is used.
    item_axis: mesh axis that splits the item (column) dimension.
    batch_axis: mesh axis that splits rows, if any (e.g. 'data'). Inferred
      from the sharding when `mesh` is inferred.

  Returns:
    (values [B, k], column indices [B, k] int32); item id = column + 1.
  """
  b, n = scores.shape
  if not 1 <= k <= n:
    raise ValueError(f"k must be in 1..{n} (number of items), got {k}")
  if mesh is None:
    try:
      sharding = scores.sharding
    except Exception:  # pylint: disable=broad-except
      sharding = None  # a tracer inside jit: no concrete layout to read
    if not isinstance(sharding, NamedSharding):
      return lax.top_k(scores, k)
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    batch_axis, item_axis = spec
    if not isinstance(item_axis, str) or (
        batch_axis is not None and not isinstance(batch_axis, str)):
      # Unsharded items, or several mesh axes on one dimension: let XLA do it.
      return lax.top_k(scores, k)
  if item_axis not in mesh.shape:
    raise ValueError(f"item_axis {item_axis!r} not in mesh axes "
                     f"{tuple(mesh.shape)}")
  return _sharded_top_k_fn(mesh, k, n, item_axis, batch_axis)(scores)


@functools.lru_cache(maxsize=64)
def _sharded_top_k_fn(mesh: Mesh, k: int, n: int, item_axis: str,
                      batch_axis: Optional[str]):
  """One jitted shard_map top-k per (mesh, k, N, axes), reused across calls."""
  shards = mesh.shape[item_axis]
  pad = (-n) % shards
  per = (n + pad) // shards

  def per_shard(local):
    offset = lax.axis_index(item_axis) * per
    v, i = _local_top_k(local, k, offset)
    v = lax.all_gather(v, item_axis, axis=1, tiled=True)
    i = lax.all_gather(i, item_axis, axis=1, tiled=True)
    return _merge_top_k(v, i, k)

  spec = P(batch_axis, item_axis)
  out_spec = P(batch_axis, None)

  @jax.jit
  def run(x):
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,),
                         out_specs=(out_spec, out_spec), check_vma=False)(x)

  return run


def top_k_items(scores: jax.Array, k: int, **kwargs) -> Tuple[jax.Array,
                                                             jax.Array]:
  """Like `sharded_top_k` but returns item ids (column + 1)."""
  values, cols = sharded_top_k(scores, k, **kwargs)
  return values, cols + 1
