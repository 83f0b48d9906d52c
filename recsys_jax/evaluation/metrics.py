"""Ranking metrics for next-item evaluation: full ranking and sampled protocols.

Every metric is a function of the target's 0-based rank (see `ranking.py` for
how ranks are computed and the pessimistic tie rule):

  HR@K   = 1 if rank < K                 (= Recall@K with one held-out item)
  NDCG@K = 1 / log2(rank + 2) if rank < K, else 0
  MRR    = 1 / (rank + 1)                (over the whole candidate set)

`RankingMetrics` accumulates weighted sums on the host and merges across
batches and processes; its `result()` names the protocol the numbers come
from, since full-ranking and sampled numbers are not comparable.
`sample_negatives` draws the sampled protocol's negatives on the host. The
ranks themselves are computed on device by `evaluator.Evaluator`.
`BeyondAccuracy` accumulates the same way what the top-K lists hold:
catalogue coverage@K and the training popularity of recommended items. See
docs/EVALUATION.md.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10, 20)
FULL_RANKING = "full_ranking"
FULL_RANKING_EXCLUDING_HISTORY = "full_ranking_excluding_history"
SAMPLING_MODES = ("uniform", "popularity")

RngLike = Union[int, np.random.Generator, None]


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> Tuple[str, ...]:
  """Names in the fixed order used by `RankingMetrics.to_numpy`."""
  return (tuple(f"HR@{k}" for k in ks) + tuple(f"NDCG@{k}" for k in ks) +
          ("MRR",))


def sampled_protocol_name(num_negatives: int, mode: str) -> str:
  """E.g. 'sampled_100_popularity' (the original BERT4Rec protocol)."""
  return f"sampled_{num_negatives}_{mode}"


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
    raise ValueError(f"ks must be distinct positive cutoffs, got {ks}")
  return ks


def per_row_metrics(ranks: Any,
                    ks: Sequence[int] = DEFAULT_KS) -> Dict[str, np.ndarray]:
  """Per-row metric values [B] (float64) from 0-based ranks [B]."""
  ks = _check_ks(ks)
  r = np.asarray(ranks, dtype=np.int64)
  if r.ndim != 1 or (r < 0).any():
    raise ValueError(f"ranks must be a 1-D array of ranks >= 0, got {r}")
  gain = 1.0 / np.log2(r + 2.0)
  out = {}
  for k in ks:
    out[f"HR@{k}"] = (r < k).astype(np.float64)
  for k in ks:
    out[f"NDCG@{k}"] = np.where(r < k, gain, 0.0)
  out["MRR"] = 1.0 / (r + 1.0)
  return out


@dataclasses.dataclass(eq=False)
class RankingMetrics:
  """Streaming, mergeable weighted means of HR@K, NDCG@K and MRR.

  State is a vector of weighted sums plus the weight total and user count, so
  shards of an evaluation (batches, hosts) combine by addition.
  """
  ks: Tuple[int, ...] = DEFAULT_KS
  protocol: str = FULL_RANKING
  sums: Optional[np.ndarray] = None  # float64 [len(metric_names(ks))]
  weight_sum: float = 0.0
  num_users: int = 0

  def __post_init__(self):
    self.ks = _check_ks(self.ks)
    if self.sums is None:
      self.sums = np.zeros(len(self.names), np.float64)
    self.sums = np.asarray(self.sums, np.float64)
    if self.sums.shape != (len(self.names),):
      raise ValueError(f"sums must have shape ({len(self.names)},) for ks="
                       f"{self.ks}, got {self.sums.shape}")

  @property
  def names(self) -> Tuple[str, ...]:
    return metric_names(self.ks)

  def add(self, ranks: Any, weights: Any = None, valid: Any = None) -> None:
    """Adds a batch of ranks [B]; rows with valid=False or weight 0 are skipped.

    Args:
      ranks: [B] 0-based ranks (from `ranking.target_rank` or
        `ranking.candidate_rank`). Values of invalid rows are ignored.
      weights: optional [B] non-negative per-user weights (default 1).
      valid: optional [B] bool; False for padding rows of the last batch.
    """
    r = np.asarray(ranks, np.int64).reshape(-1)
    w = (np.ones(r.shape, np.float64) if weights is None else
         np.asarray(weights, np.float64).reshape(-1))
    if w.shape != r.shape:
      raise ValueError(f"weights shape {w.shape} != ranks shape {r.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
      raise ValueError("weights must be finite and >= 0")
    if valid is not None:
      v = np.asarray(valid, bool).reshape(-1)
      if v.shape != r.shape:
        raise ValueError(f"valid shape {v.shape} != ranks shape {r.shape}")
      w = np.where(v, w, 0.0)
    keep = w > 0
    if not keep.any():
      return
    r, w = r[keep], w[keep]
    values = per_row_metrics(r, self.ks)
    self.sums += np.array([np.dot(w, values[n]) for n in self.names])
    self.weight_sum += float(w.sum())
    self.num_users += int(keep.sum())

  def _check_compatible(self, other: "RankingMetrics") -> None:
    if other.ks != self.ks or other.protocol != self.protocol:
      raise ValueError(
          f"cannot merge metrics with ks={other.ks} protocol={other.protocol!r}"
          f" into ks={self.ks} protocol={self.protocol!r}")

  def merge(self, other: "RankingMetrics") -> "RankingMetrics":
    """A new accumulator holding both; ks and protocol must match."""
    self._check_compatible(other)
    return RankingMetrics(self.ks, self.protocol, self.sums + other.sums,
                          self.weight_sum + other.weight_sum,
                          self.num_users + other.num_users)

  def to_numpy(self) -> np.ndarray:
    """float64 [len(names) + 2]: metric sums, weight total, user count."""
    return np.concatenate(
        [self.sums, [self.weight_sum, float(self.num_users)]]).astype(
            np.float64)

  @classmethod
  def from_numpy(cls, vector: Any, ks: Sequence[int] = DEFAULT_KS,
                 protocol: str = FULL_RANKING) -> "RankingMetrics":
    """Inverse of `to_numpy` (e.g. after summing vectors of all hosts)."""
    ks = _check_ks(ks)
    v = np.asarray(vector, np.float64).reshape(-1)
    n = len(metric_names(ks))
    if v.shape != (n + 2,):
      raise ValueError(f"expected a vector of {n + 2} values for ks={ks}, got "
                       f"shape {v.shape}")
    return cls(ks, protocol, v[:n].copy(), float(v[n]), int(round(v[n + 1])))

  def merge_across_processes(self) -> "RankingMetrics":
    """Sums every JAX process's accumulator; all processes get the total.

    The float64 vector travels bit-exactly as uint32 pairs, so the result does
    not depend on whether jax_enable_x64 is set.
    """
    if jax.process_count() == 1:
      return self
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    bits = self.to_numpy().view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(bits))
    return RankingMetrics.from_numpy(
        sum_bit_vectors(gathered), self.ks, self.protocol)

  def result(self) -> Dict[str, Any]:
    """{'HR@K', 'NDCG@K', 'MRR': weighted means, 'num_users', 'protocol'}.

    Means are NaN when nothing was added.
    """
    out: Dict[str, Any] = {}
    for name, total in zip(self.names, self.sums):
      out[name] = (float(total / self.weight_sum) if self.weight_sum else
                   float("nan"))
    out["num_users"] = self.num_users
    out["protocol"] = self.protocol
    return out


def merge_all_across_processes(accs: Sequence[RankingMetrics]
                               ) -> List[RankingMetrics]:
  """`merge_across_processes` of several accumulators in one collective.

  E.g. an evaluation's total and its per-bucket accumulators; every process
  must pass the same number of accumulators with the same ks and protocols.
  """
  accs = list(accs)
  if jax.process_count() == 1 or not accs:
    return accs
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  vectors = [a.to_numpy() for a in accs]
  bits = np.concatenate(vectors).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(bits))
  total = sum_bit_vectors(gathered)
  out, start = [], 0
  for acc, vec in zip(accs, vectors):
    part = total[start:start + len(vec)]
    start += len(vec)
    out.append(RankingMetrics.from_numpy(part, acc.ks, acc.protocol))
  return out


def sum_bit_vectors(gathered_u32: np.ndarray) -> np.ndarray:
  """Sums [P, 2L] uint32 rows that are float64 [L] vectors' raw bits."""
  rows = np.ascontiguousarray(gathered_u32, np.uint32)
  return rows.view(np.float64).reshape(rows.shape[0], -1).sum(axis=0)


# --------------------------------------------------------------------------
# Sampled protocol.


def _as_generator(rng: RngLike) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if rng is None or isinstance(rng, (int, np.integer)):
    return np.random.default_rng(rng)
  raise TypeError(f"rng must be an int seed or np.random.Generator, got "
                  f"{type(rng).__name__}")


def sample_negatives(rng: RngLike,
                     target_ids: Any,
                     history: Any,
                     num_items: int,
                     num_negatives: int = 100,
                     mode: str = "uniform",
                     item_counts: Any = None) -> np.ndarray:
  """Distinct negatives per user, never the target nor a history item.

  'uniform' draws items 1..N equally; 'popularity' draws item i with
  probability proportional to item_counts[i - 1] (items never seen are never
  drawn), as in the original BERT4Rec evaluation. Both draw without
  replacement by rejecting repeats and forbidden items, which equals
  successive sampling from the distribution restricted to allowed items.

  Args:
    rng: int seed or np.random.Generator; the same seed and inputs give the
      same negatives.
    target_ids: [B] held-out item ids in 1..N.
    history: [B, H] item ids the user has seen (ids outside 1..N, such as
      padding 0 and [MASK] N+1, are ignored), or None.
    num_items: N.
    num_negatives: M, negatives per user.
    mode: 'uniform' or 'popularity'.
    item_counts: [N] non-negative counts (training interactions), required
      for 'popularity'.

  Returns:
    [B, M] int32 item ids.
  """
  if mode not in SAMPLING_MODES:
    raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
  gen = _as_generator(rng)
  targets = np.asarray(target_ids, np.int64).reshape(-1)
  b = targets.shape[0]
  hist = (np.zeros((b, 0), np.int64) if history is None else
          np.asarray(history, np.int64))
  if hist.ndim != 2 or hist.shape[0] != b:
    raise ValueError(f"history must be [{b}, history_len], got {hist.shape}")
  if num_negatives < 1:
    raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
  cdf = None
  if mode == "popularity":
    if item_counts is None:
      raise ValueError("mode='popularity' needs item_counts [num_items]")
    counts = np.asarray(item_counts, np.float64).reshape(-1)
    if counts.shape != (num_items,):
      raise ValueError(f"item_counts must have shape ({num_items},) (items "
                       f"1..N, no padding/[MASK] slots), got {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
      raise ValueError("item_counts must be finite and >= 0")
    cdf = np.cumsum(counts)
    drawable = counts > 0
  else:
    drawable = np.ones(num_items, bool)

  out = np.empty((b, num_negatives), np.int32)
  for row in range(b):
    forbidden = {int(x) for x in hist[row] if 1 <= x <= num_items}
    if 1 <= targets[row] <= num_items:
      forbidden.add(int(targets[row]))
    available = int(drawable.sum()) - sum(drawable[i - 1] for i in forbidden)
    if available < num_negatives:
      raise ValueError(
          f"row {row}: only {available} items can be drawn as negatives "
          f"(mode={mode!r}, {len(forbidden)} excluded), need {num_negatives}")
    chosen = []
    seen = set(forbidden)
    while len(chosen) < num_negatives:
      need = num_negatives - len(chosen)
      size = 2 * need + 16
      if cdf is None:
        draw = gen.integers(1, num_items + 1, size=size)
      else:
        # side='right' skips zero-count items: their cdf step is empty.
        draw = np.searchsorted(cdf, gen.random(size) * cdf[-1],
                               side="right") + 1
        draw = np.minimum(draw, num_items)
      for item in draw.tolist():
        if item not in seen:
          seen.add(item)
          chosen.append(item)
          if len(chosen) == num_negatives:
            break
    out[row] = chosen
  return out


# --------------------------------------------------------------------------
# Beyond-accuracy metrics of the recommended top-K lists.


def sum_across_processes(vector: Any) -> np.ndarray:
  """Elementwise sum of a float64 vector over every JAX process (exact:
  the bits travel as uint32, as in `merge_across_processes`)."""
  v = np.ascontiguousarray(vector, np.float64).reshape(-1)
  if jax.process_count() == 1:
    return v
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  gathered = np.asarray(multihost_utils.process_allgather(v.view(np.uint32)))
  return sum_bit_vectors(gathered)


def popularity_percentiles(item_counts: Any) -> np.ndarray:
  """[N] mid-rank percentile in [0, 1] of each item's training count.

  percentile_i = (#{j : c_j < c_i} + #{j : c_j == c_i} / 2) / N, the
  usual percentile rank: every item of an all-equal catalogue gets 0.5, the
  single most popular item 1 - 1 / (2N). Unlike raw counts it does not
  depend on the dataset's scale, so runs on different data compare.
  """
  c = np.asarray(item_counts, np.float64).reshape(-1)
  if not c.size:
    return np.zeros(0, np.float64)
  ordered = np.sort(c)
  below = np.searchsorted(ordered, c, side="left")
  up_to = np.searchsorted(ordered, c, side="right")
  return (below + 0.5 * (up_to - below)) / c.size


@dataclasses.dataclass(eq=False)
class BeyondAccuracy:
  """Streaming, mergeable coverage and popularity of recommended top-K lists.

  For each cutoff K: a per-item count of the evaluated users whose top-K
  holds the item (catalogue coverage@K is the share of items with a
  nonzero count: the union of all users' lists, which per-item counts keep
  exact across batches and processes), and sums of the training count and
  count percentile (`popularity_percentiles`) over every recommended slot.
  The targets' popularity is accumulated too, as the reference a
  recommender's popularity is read against. State is a float64 vector, so
  shards combine by addition (`to_numpy`, `sum_across_processes`).

  Attributes:
    ks: cutoffs K.
    num_items: catalogue size N (items 1..N).
    item_counts: optional [N] training counts; without them only coverage
      is computed.
  """
  ks: Tuple[int, ...]
  num_items: int
  item_counts: Optional[np.ndarray] = None

  def __post_init__(self):
    self.ks = _check_ks(self.ks)
    self.num_items = int(self.num_items)
    if self.num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {self.num_items}")
    self._pct = None
    if self.item_counts is not None:
      counts = np.asarray(self.item_counts, np.float64).reshape(-1)
      if counts.shape != (self.num_items,):
        raise ValueError(f"item_counts must have shape ({self.num_items},), "
                         f"got {counts.shape}")
      self.item_counts = counts
      self._pct = popularity_percentiles(counts)
    n, nk = self.num_items, len(self.ks)
    self.hits = np.zeros((nk, n), np.float64)     # users per item in top-K
    self.slots = np.zeros(nk, np.float64)          # recommended items
    self.count_sum = np.zeros(nk, np.float64)      # their train counts
    self.percentile_sum = np.zeros(nk, np.float64)
    self.users = 0.0
    self.target_count_sum = 0.0
    self.target_percentile_sum = 0.0

  def add(self, top_ids: Any, valid: Any = None, target_ids: Any = None
          ) -> None:
    """Adds a batch of recommended lists.

    Args:
      top_ids: [B, K'] item ids best first (0 = no item, e.g. when fewer
        than K' candidates were left); K' >= max(ks) unless the catalogue
        is smaller (a list is then all it has).
      valid: optional [B] bool; False rows (padding) are skipped.
      target_ids: optional [B] held-out items (their popularity is the
        reference, with `item_counts`).
    """
    ids = np.asarray(top_ids, np.int64)
    if ids.ndim != 2:
      raise ValueError(f"top_ids must be [batch, k], got {ids.shape}")
    keep = (np.ones(len(ids), bool) if valid is None else
            np.asarray(valid, bool).reshape(-1))
    if keep.shape != (len(ids),):
      raise ValueError(f"valid shape {keep.shape} != ({len(ids)},)")
    ids = ids[keep]
    self.users += float(len(ids))
    for i, k in enumerate(self.ks):
      top = ids[:, :k]
      top = top[(top >= 1) & (top <= self.num_items)] - 1
      self.hits[i] += np.bincount(top, minlength=self.num_items)
      self.slots[i] += top.size
      if self.item_counts is not None:
        self.count_sum[i] += self.item_counts[top].sum()
        self.percentile_sum[i] += self._pct[top].sum()
    if target_ids is not None and self.item_counts is not None:
      t = np.asarray(target_ids, np.int64).reshape(-1)[keep]
      t = t[(t >= 1) & (t <= self.num_items)] - 1
      self.target_count_sum += self.item_counts[t].sum()
      self.target_percentile_sum += self._pct[t].sum()

  def to_numpy(self) -> np.ndarray:
    """float64 [len(ks) * (N + 3) + 3]: the whole state, for summing."""
    return np.concatenate([
        self.hits.reshape(-1), self.slots, self.count_sum,
        self.percentile_sum,
        [self.users, self.target_count_sum, self.target_percentile_sum]])

  def load_numpy(self, vector: Any) -> "BeyondAccuracy":
    """Replaces the state by `vector` (a `to_numpy` layout, e.g. summed)."""
    v = np.asarray(vector, np.float64).reshape(-1)
    nk, n = len(self.ks), self.num_items
    if v.shape != (nk * (n + 3) + 3,):
      raise ValueError(f"expected {nk * (n + 3) + 3} values for ks="
                       f"{self.ks}, N={n}; got shape {v.shape}")
    self.hits = v[:nk * n].reshape(nk, n).copy()
    rest = v[nk * n:]
    self.slots, self.count_sum, self.percentile_sum = (
        rest[:nk].copy(), rest[nk:2 * nk].copy(), rest[2 * nk:3 * nk].copy())
    self.users, self.target_count_sum, self.target_percentile_sum = (
        float(x) for x in rest[3 * nk:])
    return self

  def merge_across_processes(self) -> "BeyondAccuracy":
    """Sums every process's state into this one (all get the total)."""
    if jax.process_count() > 1:
      self.load_numpy(sum_across_processes(self.to_numpy()))
    return self

  def result(self) -> Dict[str, Any]:
    """{'coverage@K', 'covered_items@K'} and, with item counts,
    {'popularity@K', 'popularity_percentile@K', 'target_popularity',
    'target_popularity_percentile'}; means over no slot are None."""

    def mean(total, count):
      return float(total / count) if count else None
    out: Dict[str, Any] = {}
    for i, k in enumerate(self.ks):
      covered = int((self.hits[i] > 0).sum())
      out[f"coverage@{k}"] = covered / self.num_items
      out[f"covered_items@{k}"] = covered
    if self.item_counts is not None:
      for i, k in enumerate(self.ks):
        out[f"popularity@{k}"] = mean(self.count_sum[i], self.slots[i])
        out[f"popularity_percentile@{k}"] = mean(self.percentile_sum[i],
                                                 self.slots[i])
      out["target_popularity"] = mean(self.target_count_sum, self.users)
      out["target_popularity_percentile"] = mean(
          self.target_percentile_sum, self.users)
    return out
