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
ranks themselves are computed on device by `evaluator.Evaluator`. See
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
