"""Sharded, multi-host evaluation of a sequence model with ranking metrics.

Scores and ranks are computed in one jitted function on global arrays, so the
[batch, N] score matrix never leaves the devices (and stays sharded along the
item axis under vocab-parallel rules); only [batch] ranks come back, each
process keeps the ranks of its own rows, and the metric sums are reduced
across processes at the end.

Evaluation rows are right-padded to the task's length L, but most histories
are far shorter (Beauty: mean 8.9 of 50). With `EvalConfig.length_buckets`
the Evaluator regroups each window of batches by history length and cuts
every batch to its longest row (rounded up to a multiple of 8): attention
ignores padding, so every user's scores are unchanged, only which users
share a batch; short batches then cost a fraction of the FLOPs.

With `item_counts` (the train split's interaction counts) the metrics are
also reported per bucket of the TARGET item's training count
(`EvalConfig.frequency_buckets`, result key `by_frequency`), for the model
and the popularity baseline alike: how well cold and rare targets are
ranked, which the overall numbers (dominated by popular items) hide.

Baselines (`EvalConfig.baselines`): train popularity, EASE and a first-order
Markov chain (`baselines.py`) are ranked through the same path as the model,
each as `<split>_<name>`. They do not depend on the model, so a
`RankingEvaluation` fits them once and keeps their results for the later
(periodic) evaluations of the same data.

Beyond accuracy (`EvalConfig.beyond_accuracy_ks`): the jitted ranking also
returns each user's top-K item ids (history excluded as the protocol says),
accumulated on the host into per-item counts (`metrics.BeyondAccuracy`):
catalogue coverage@K and the training popularity of what is recommended,
result key `beyond_accuracy`.
"""

import copy
import dataclasses
import json
import os
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.core import distributed
from recsys_jax.core import partitioning
from recsys_jax.evaluation import baselines as baselines_lib
from recsys_jax.evaluation import metrics
from recsys_jax.evaluation import ranking

# The batch feature carrying host-computed scores [B, N] (baselines).
HOST_SCORES = "host_scores"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What and how to evaluate.

  Attributes:
    ks: cutoffs for HR@K / NDCG@K.
    batch_size: global evaluation batch size.
    exclude_history: drop the user's input items from the full ranking.
    protocol: 'full' (rank among all N items) or 'sampled' (the literature's
      target + `num_negatives` sampled negatives).
    num_negatives: negatives per user for the sampled protocol.
    negative_sampling: 'uniform' or 'popularity' (sampled protocol).
    splits: which leave-one-out splits to evaluate.
    popularity_baseline: False drops 'popularity' from `baselines` (the
      switch of configs written before `baselines` existed).
    baselines: baselines evaluated beside the model on every split, as
      `<split>_<name>`: 'popularity' (log1p train counts), 'ease' (Steck
      2019) and 'markov' (first-order transitions), see `baselines.py`;
      () for none.
    ease_l2: EASE's L2 penalty lambda (100: the best validation NDCG@10 of
      20-2,000 on the synthetic default, within 1% of the best (50) on
      Amazon Beauty; Steck used 500 on the denser ML-20M and Netflix;
      docs/EVALUATION.md).
    ease_max_items: EASE is skipped (with a warning, and the reason in the
      results) for catalogues larger than this: it needs a dense N x N
      float32 matrix (4 N^2 bytes, 1.6 GB at 20,000) and ~N^3 flops.
    seed: seed of the sampled negatives.
    length_buckets: regroup rows by history length and cut each batch's
      trailing padding (module docstring); needs a model whose `score_fn`
      accepts any row length up to L (Bert4Rec does).
    bucket_multiple: bucketed row lengths are multiples of this (bounds the
      number of compiled shapes to L / bucket_multiple).
    bucket_window: batches regrouped together (bounds host memory: the rows
      of this many batches are held at once).
    frequency_buckets: increasing boundaries b0 < b1 < ... (b0 >= 1) of the
      target item's train count: buckets [0, b0), [b0, b1), ..., [bK, inf),
      labelled "0", "1-4", "5-19", "20+" for (1, 5, 20) (`frequency_labels`);
      empty: no per-bucket metrics.
    beyond_accuracy_ks: cutoffs K of the beyond-accuracy metrics of each
      user's top-K list (coverage@K, popularity@K; `metrics.BeyondAccuracy`);
      () turns them (and the top-K they need) off.
  """
  ks: Sequence[int] = (1, 5, 10, 20)
  batch_size: int = 256
  exclude_history: bool = False
  protocol: str = "full"
  num_negatives: int = 100
  negative_sampling: str = "popularity"
  splits: Sequence[str] = ("validation", "test")
  popularity_baseline: bool = True
  seed: int = 0
  length_buckets: bool = True
  bucket_multiple: int = 8
  bucket_window: int = 64
  frequency_buckets: Sequence[int] = (1, 5, 20)
  baselines: Sequence[str] = baselines_lib.BASELINES
  ease_l2: float = 100.0
  ease_max_items: int = 20_000
  beyond_accuracy_ks: Sequence[int] = (10,)

  def __post_init__(self):
    baselines_lib.names_in_order(self.baselines)
    if not float(self.ease_l2) > 0:
      raise ValueError(f"EvalConfig.ease_l2={self.ease_l2!r}: expected a "
                       "positive L2 penalty (e.g. 100)")
    if int(self.ease_max_items) != self.ease_max_items or (
        self.ease_max_items < 1):
      raise ValueError(f"EvalConfig.ease_max_items={self.ease_max_items!r}: "
                       "expected a positive integer")
    ks = tuple(self.beyond_accuracy_ks)
    if any(int(k) != k or k < 1 for k in ks) or len(set(ks)) != len(ks):
      raise ValueError(f"EvalConfig.beyond_accuracy_ks={ks!r}: expected "
                       "distinct positive cutoffs (e.g. (10,)), or () for "
                       "none")
    if self.protocol not in ("full", "sampled"):
      raise ValueError(f"EvalConfig.protocol={self.protocol!r}: expected "
                       "'full' or 'sampled'")
    for name in ("bucket_multiple", "bucket_window"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"EvalConfig.{name}={getattr(self, name)!r}: "
                         "expected a positive integer")
    bounds = list(self.frequency_buckets)
    if any(int(b) != b for b in bounds) or any(
        b < 1 for b in bounds) or any(
            x >= y for x, y in zip(bounds, bounds[1:])):
      raise ValueError(
          f"EvalConfig.frequency_buckets={tuple(bounds)!r}: expected "
          "strictly increasing integers >= 1 (e.g. (1, 5, 20)), or () to "
          "disable per-frequency metrics")

  @property
  def active_baselines(self) -> List[str]:
    """`baselines` in order, without 'popularity' if popularity_baseline is
    False."""
    return [b for b in baselines_lib.names_in_order(self.baselines)
            if b != "popularity" or self.popularity_baseline]


def frequency_labels(boundaries: Sequence[int]) -> List[str]:
  """Labels of the buckets [0, b0), [b0, b1), ..., [bK, inf) of a count.

  [a, a + 1) is labelled "a", [a, b) "a-(b-1)", the last "bK+"; e.g.
  (1, 5, 20) -> ["0", "1-4", "5-19", "20+"]; () -> [] (no buckets).
  """
  bounds = [int(b) for b in boundaries]
  if not bounds:
    return []
  labels = []
  for lo, hi in zip([0] + bounds[:-1], bounds):
    labels.append(str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")
  labels.append(f"{bounds[-1]}+")
  return labels


def frequency_bucket(counts: np.ndarray, boundaries: Sequence[int]
                     ) -> np.ndarray:
  """Bucket index (0..len(boundaries)) of each count; see frequency_labels."""
  return np.searchsorted(np.asarray(boundaries, np.int64),
                         np.asarray(counts, np.int64), side="right")


def target_counts(target_ids: np.ndarray, item_counts: np.ndarray
                  ) -> np.ndarray:
  """Train count of each target id in 1..N (0 for padding rows' id 0)."""
  counts = np.asarray(item_counts).reshape(-1)
  ids = np.asarray(target_ids, np.int64)
  safe = np.clip(ids, 1, len(counts)) - 1
  return np.where((ids >= 1) & (ids <= len(counts)), counts[safe], 0)


def bucket_results(accs: Sequence[metrics.RankingMetrics],
                   boundaries: Sequence[int]) -> Dict[str, Dict[str, Any]]:
  """{label: {metrics..., 'num_users'}}; an empty bucket has only
  num_users 0 (no NaN means)."""
  out = {}
  for label, acc in zip(frequency_labels(boundaries), accs):
    res = acc.result() if acc.num_users else {"num_users": 0}
    res.pop("protocol", None)
    out[label] = res
  return out


def recommended_ids(scores: jax.Array, batch: Mapping[str, jax.Array],
                    cfg: EvalConfig, k: int, mesh=None) -> jax.Array:
  """[B, k] int32 ids of each row's k best items, best first (ties: lower
  id first), without the items `cfg.exclude_history` excludes; 0 where
  fewer than k items are left (or score above -inf).

  With `mesh`, the top-k runs per item shard (`ranking.sharded_top_k` over
  `model`, rows over `data`), so item-sharded scores are never gathered.
  """
  neg_inf = jnp.array(-jnp.inf, scores.dtype)
  clean = jnp.where(jnp.isnan(scores), neg_inf, scores)
  if cfg.exclude_history:
    excluded = ranking.exclusion_mask(
        clean.shape, batch.get("exclude_ids", batch["item_ids"]))
    clean = jnp.where(excluded, neg_inf, clean)
  kwargs = {}
  if mesh is not None:
    kwargs = dict(mesh=mesh, item_axis=partitioning.MODEL_AXIS,
                  batch_axis=partitioning.DATA_AXIS)
  values, ids = ranking.top_k_items(clean, k, **kwargs)
  return jnp.where(values > neg_inf, ids, 0).astype(jnp.int32)


def protocol_name(cfg: EvalConfig) -> str:
  if cfg.protocol == "sampled":
    return metrics.sampled_protocol_name(cfg.num_negatives,
                                         cfg.negative_sampling)
  return (metrics.FULL_RANKING_EXCLUDING_HISTORY if cfg.exclude_history
          else metrics.FULL_RANKING)


def _bucket_width(length: int, multiple: int, full: int) -> int:
  return max(1, min(full, -(-int(length) // multiple) * multiple))


def _agree_across_processes(widths: List[int]) -> List[int]:
  """The per-batch maximum over processes (global batches need one shape)."""
  if jax.process_count() == 1:
    return widths
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Hosts read their input at different speeds: meet first (see
  # distributed.barrier) so the collective below does not time out.
  distributed.barrier("eval_bucket_widths")
  gathered = multihost_utils.process_allgather(np.asarray(widths, np.int32))
  return [int(w) for w in np.asarray(gathered).reshape(-1, len(widths)).max(0)]


def length_bucketed(batches: Iterable[Mapping[str, np.ndarray]], *,
                    multiple: int = 8, window: int = 64
                    ) -> Iterator[Dict[str, np.ndarray]]:
  """The same rows regrouped by history length, batches cut to their longest.

  Each `window` consecutive batches are pooled; their valid rows are sorted
  by length (stable) and dealt back into the same number of batches of the
  same size, each cut to its longest row rounded up to `multiple`. Features
  whose first two dimensions equal `item_ids`' are cut along the second; the
  others are only reordered. Row length is the count of nonzero `item_ids`
  (right padding; the trailing columns cut are padding in every row).
  Across processes the batch widths are the maximum over hosts, so global
  batches keep one shape; every process must pass the same number of batches
  (`batching.eval_batches` ensures it).
  """
  it = iter(batches)
  while True:
    chunk = []
    for b in it:
      chunk.append(b)
      if len(chunk) == window:
        break
    count = len(chunk)
    if count == 0:
      return
    size, full = chunk[0]["item_ids"].shape[:2]
    keys = list(chunk[0])
    aligned = [k for k in keys if k != "valid" and
               np.ndim(chunk[0][k]) >= 2 and
               np.shape(chunk[0][k])[:2] == (size, full)]
    valid = np.concatenate([np.asarray(b["valid"]) > 0 for b in chunk])
    rows = {k: np.concatenate([np.asarray(b[k]) for b in chunk])[valid]
            for k in keys if k != "valid"}
    lengths = (rows["item_ids"] != 0).sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    starts = range(0, count * size, size)
    widths = [_bucket_width(lengths[order[s:s + size]].max(initial=1),
                            multiple, full) for s in starts]
    widths = _agree_across_processes(widths)
    for start, width in zip(starts, widths):
      idx = order[start:start + size]
      out = {}
      for k, v in rows.items():
        part = v[idx]
        if k in aligned:
          part = part[:, :width]
        pad = np.zeros((size - len(idx),) + part.shape[1:], part.dtype)
        out[k] = np.concatenate([part, pad])
      out["valid"] = (np.arange(size) < len(idx)).astype(np.float32)
      yield out


def eval_batch_targets(
    batch: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(target_ids [B], history [B, L], has_target [B]) of an evaluation batch.

  Evaluation batches (docs/FEATURES.md) hold one [MASK] per row in
  `item_ids` and the held-out item at that position of `targets`; rows with
  no target are padding.
  """
  for key in ("item_ids", "targets"):
    if key not in batch:
      raise KeyError(f"evaluation batch lacks {key!r}; has {sorted(batch)}")
  targets = np.asarray(batch["targets"])
  if targets.ndim != 2:
    raise ValueError(f"batch['targets'] must be [batch, len], got "
                     f"{targets.shape}")
  per_row = (targets > 0).sum(axis=1)
  if (per_row > 1).any():
    row = int(np.argmax(per_row > 1))
    raise ValueError(f"evaluation batch row {row} has {per_row[row]} targets;"
                     " expected one held-out item per row")
  target_ids = targets.max(axis=1).astype(np.int32)
  return target_ids, np.asarray(batch["item_ids"], np.int32), target_ids > 0


def target_ranks(scores: jax.Array, batch: Mapping[str, jax.Array],
                 negatives: jax.Array, cfg: EvalConfig) -> jax.Array:
  """0-based ranks [B] of each row's target under the configured protocol.

  Args:
    scores: [B, N] scores, column j = item j + 1.
    batch: `targets` [B, L] (one held-out item per row, 0 in padding rows:
      ranked as item 1, and dropped by the caller's `valid`) and `item_ids`
      [B, L] (the history excluded when `cfg.exclude_history`). With
      `exclude_ids` [B, M] (0 = none) those ids are excluded instead of
      `item_ids` (e.g. the original history when `item_ids` were edited).
      `length_bucketed` cuts every feature whose first two dims equal
      `item_ids`': `exclude_ids` must not have that shape (use M != L, e.g.
      L + 1 with a 0 column) or `length_buckets` must be off.
    negatives: [B, M] item ids (sampled protocol; ignored otherwise).
    cfg: the protocol.
  """
  safe = jnp.maximum(jnp.max(batch["targets"], axis=1), 1)
  if cfg.protocol == "sampled":
    return ranking.sampled_target_rank(scores, safe, negatives)
  exclude = None
  if cfg.exclude_history:
    exclude = batch.get("exclude_ids", batch["item_ids"])
  return ranking.target_rank(scores, safe, exclude)


class Evaluator:
  """Scores eval batches with a model's `score_fn` and ranks the targets."""

  def __init__(self, model, mesh, rules, cfg: EvalConfig):
    self.model, self.mesh, self.rules, self.cfg = model, mesh, rules, cfg
    ks = tuple(cfg.beyond_accuracy_ks)
    # A list longer than the catalogue is the whole catalogue.
    self.top_k = min(max(ks), int(model.num_items)) if ks else 0
    self._rank = self._jit_rank(model.score_fn)
    self._rank_host_scores = None

  def _jit_rank(self, score_fn):
    """jit of (params, batch, negatives) -> ranks [B] (and top-k ids
    [B, top_k] with beyond-accuracy metrics), batch-sharded."""
    cfg, k = self.cfg, self.top_k

    def rank_fn(params, batch, negatives):
      scores = score_fn(params, batch)
      ranks = target_ranks(scores, batch, negatives, cfg)
      if not k:
        return ranks
      return ranks, recommended_ids(scores, batch, cfg, k, self.mesh)
    rows = partitioning.batch_sharding(self.mesh)
    return jax.jit(rank_fn, out_shardings=(rows, rows) if k else rows)

  def evaluate(self, params, batches: Iterable[Mapping[str, np.ndarray]],
               item_counts: Optional[np.ndarray] = None,
               score_override=None, *,
               host_scores: Optional[Callable[[np.ndarray], np.ndarray]]
               = None,
               popularity_counts: Optional[np.ndarray] = None
               ) -> Dict[str, Any]:
    """Metrics over host-local batches (each process passes its own shard).

    Args:
      params: model parameters (global arrays).
      batches: this process's eval batches, each with a float `valid` mask.
      item_counts: [N] training counts (popularity-sampled negatives, and
        the target-frequency buckets of `cfg.frequency_buckets`).
      score_override: if given, `[N]` scores used for every user instead of
        the model (the popularity baseline through the same path).
      host_scores: if given, `fn(item_ids [B, L]) -> [B, N]` scores of each
        row computed on the host instead of the model (EASE, Markov), sent
        with the batch and ranked by the same jitted path.
      popularity_counts: [N] training counts for the beyond-accuracy
        popularity of recommended items (without them only coverage).

    Returns:
      `RankingMetrics.result()`; with `item_counts` and frequency buckets
      also 'by_frequency' ({label: {metrics..., 'num_users'}}, see
      `bucket_results`) and 'frequency_buckets' (the boundaries); with
      `cfg.beyond_accuracy_ks` also 'beyond_accuracy'
      (`metrics.BeyondAccuracy.result()`).
    """
    cfg = self.cfg
    num_items = int(self.model.num_items)
    beyond = None
    if self.top_k:
      beyond = metrics.BeyondAccuracy(tuple(cfg.beyond_accuracy_ks),
                                      num_items, popularity_counts)
    acc = metrics.RankingMetrics(tuple(cfg.ks), protocol_name(cfg))
    bounds = [int(b) for b in cfg.frequency_buckets]
    by_freq = []
    if item_counts is not None and bounds:
      by_freq = [metrics.RankingMetrics(tuple(cfg.ks), protocol_name(cfg))
                 for _ in range(len(bounds) + 1)]
    gen = np.random.default_rng(cfg.seed + jax.process_index())
    rank_fn = self._rank
    if score_override is not None:
      constant = jnp.asarray(score_override, jnp.float32)  # [N]

      def constant_scores(_, batch):
        b = batch["targets"].shape[0]
        return jnp.broadcast_to(constant[None, :], (b, constant.shape[0]))
      rank_fn = self._jit_rank(constant_scores)
    elif host_scores is not None:
      if self._rank_host_scores is None:  # one jit for every baseline
        self._rank_host_scores = self._jit_rank(
            lambda _, batch: batch[HOST_SCORES])
      rank_fn = self._rank_host_scores
    compiled = {}
    if cfg.length_buckets:
      batches = length_bucketed(batches, multiple=cfg.bucket_multiple,
                                window=cfg.bucket_window)
    for local in batches:
      valid = np.asarray(local["valid"]) > 0
      model_batch = {k: v for k, v in local.items() if k != "valid"}
      targets, history, _ = eval_batch_targets(model_batch)
      negatives = np.zeros((len(targets), 1), np.int32)
      if cfg.protocol == "sampled":
        negatives = metrics.sample_negatives(
            gen, np.where(valid, targets, 1), history,
            self.model.num_items, cfg.num_negatives, cfg.negative_sampling,
            item_counts)
      model_batch["negatives"] = negatives
      if host_scores is not None:
        model_batch[HOST_SCORES] = self._host_scores(host_scores, history)
      global_batch = partitioning.host_to_global(model_batch, self.mesh)
      negs = global_batch.pop("negatives")
      with partitioning.with_rules(self.rules, self.mesh):
        if jax.process_count() > 1:
          shape = global_batch["item_ids"].shape
          if shape not in compiled:
            # Compile, then line the hosts up before the first collective of
            # this shape (see distributed.barrier).
            compiled[shape] = rank_fn.lower(params, global_batch,
                                            negs).compile()
            distributed.barrier(f"eval_start_{shape[1]}")
          out = compiled[shape](params, global_batch, negs)
        else:
          out = rank_fn(params, global_batch, negs)
      ranks, top = out if self.top_k else (out, None)
      local_ranks = partitioning.process_local_rows(ranks)
      acc.add(local_ranks, valid=valid)
      if beyond is not None:
        beyond.add(partitioning.process_local_rows(top), valid, targets)
      if by_freq:
        bucket = frequency_bucket(target_counts(targets, item_counts), bounds)
        for b, bucket_acc in enumerate(by_freq):
          bucket_acc.add(local_ranks, valid=valid & (bucket == b))
    merged = metrics.merge_all_across_processes([acc] + by_freq)
    result = merged[0].result()
    if by_freq:
      result["by_frequency"] = bucket_results(merged[1:], bounds)
      result["frequency_buckets"] = bounds
    if beyond is not None:
      result["beyond_accuracy"] = beyond.merge_across_processes().result()
    return result

  def _host_scores(self, fn, history: np.ndarray) -> np.ndarray:
    scores = np.asarray(fn(history), np.float32)
    want = (history.shape[0], int(self.model.num_items))
    if scores.shape != want:
      raise ValueError(f"host scores have shape {scores.shape}; expected "
                       f"{want} ([batch, num_items])")
    return scores


class RankingEvaluation:
  """A run's ranking evaluation: the model and the baselines
  (`EvalConfig.baselines`) on each configured split, through `Evaluator`.

  Same interface as `generation.GenerationEvaluator`, so the runs treat
  every evaluation alike: `evaluate(model, params, data, mesh, rules) ->
  {split: metrics}` and `format_results(step, results) -> log lines`.

  Baselines do not depend on the model: they are fitted at the first
  evaluation and their results kept for later ones of the same data object
  (a training run's periodic evaluations).
  """

  def __init__(self, config: EvalConfig):
    self.config = config
    self._data = None          # the data object the cache below belongs to
    self._fitted: Dict[str, Any] = {}
    self._baseline_results: Dict[str, Dict[str, Any]] = {}
    self._evaluator: Optional[Evaluator] = None

  def _evaluator_for(self, model, mesh, rules) -> "Evaluator":
    """The Evaluator of the last call when model, mesh and rules are the
    same objects: its jitted functions (compiled per batch shape) are
    reused by periodic evaluations instead of compiled again."""
    ev = self._evaluator
    if ev is None or not (ev.model is model and ev.mesh is mesh and
                          ev.rules is rules):
      ev = self._evaluator = Evaluator(model, mesh, rules, self.config)
    return ev

  def evaluate(self, model, params, data, mesh, rules) -> Dict[str, Any]:
    cfg = self.config
    ev = self._evaluator_for(model, mesh, rules)
    counts = np.asarray(data.train_item_counts())
    if data is not self._data:
      self._data, self._baseline_results = data, {}
      self._fitted = _agree_on_skips(baselines_lib.fit(
          cfg.active_baselines, data, counts, ease_l2=cfg.ease_l2,
          ease_max_items=cfg.ease_max_items, log=_log_baseline))
    results = {}
    for split in cfg.splits:
      results[split] = ev.evaluate(
          params, data.eval_batches(split, cfg.batch_size), counts,
          popularity_counts=counts)
      for name in cfg.active_baselines:
        key = f"{split}_{name}"
        if key not in self._baseline_results:
          self._baseline_results[key] = self._evaluate_baseline(
              ev, params, data, split, name, counts)
        results[key] = copy.deepcopy(self._baseline_results[key])
    return results

  def _evaluate_baseline(self, ev: "Evaluator", params, data, split: str,
                         name: str, counts: np.ndarray) -> Dict[str, Any]:
    """`<split>_<name>`: the baseline's metrics (with a 'baseline' block
    describing the fit), or {'skipped': why}."""
    batches = data.eval_batches(split, self.config.batch_size)
    if name == "popularity":
      return ev.evaluate(params, batches, counts,
                         score_override=np.log1p(counts.astype(np.float64)),
                         popularity_counts=counts)
    fitted = self._fitted[name]
    if isinstance(fitted, baselines_lib.Skipped):
      return {"skipped": fitted.reason}
    t0 = time.perf_counter()
    res = ev.evaluate(params, batches, counts,
                      host_scores=fitted.score_history,
                      popularity_counts=counts)
    res["baseline"] = dict(fitted.describe(),
                           eval_seconds=round(time.perf_counter() - t0, 3))
    return res

  def format_results(self, step: int, results: Mapping[str, Any]
                     ) -> List[str]:
    """One line per split (beyond-accuracy values appended), then (model
    splits only, not the baselines') one per target-frequency bucket."""
    ks = self.config.ks
    keys = ([f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"])
    beyond = [f"{m}@{k}" for k in self.config.beyond_accuracy_ks
              for m in ("coverage", "popularity", "popularity_percentile")]
    lines = []
    for split, res in results.items():
      if not isinstance(res, Mapping):
        continue
      if "skipped" in res:
        lines.append(f"[eval step {step}] {split} skipped: {res['skipped']}")
        continue
      flat = dict(res)
      flat.update({k: v for k, v in res.get("beyond_accuracy", {}).items()
                   if v is not None})
      lines += result_lines(
          step, {split: flat}, keys + beyond,
          lambda r: f"{r.get('protocol')}, {r.get('num_users')} users")
    for split, res in results.items():
      if (not isinstance(res, Mapping) or
          split.endswith(tuple(f"_{b}" for b in baselines_lib.BASELINES))):
        continue
      lines += result_lines(
          step, {f"{split} by frequency {label}": bucket
                 for label, bucket in res.get("by_frequency", {}).items()},
          keys, lambda b: f"{b.get('num_users')} users")
    return lines


def _agree_on_skips(fitted: Dict[str, Any]) -> Dict[str, Any]:
  """Baselines skipped on any process are skipped on all (each evaluation
  pass runs collectives every process must join)."""
  if jax.process_count() == 1 or not fitted:
    return fitted
  names = sorted(fitted)
  ok = [0.0 if isinstance(fitted[n], baselines_lib.Skipped) else 1.0
        for n in names]
  total = metrics.sum_across_processes(np.asarray(ok))
  for name, count in zip(names, total):
    if count < jax.process_count() and not isinstance(
        fitted[name], baselines_lib.Skipped):
      fitted[name] = baselines_lib.Skipped(
          f"skipped on {jax.process_count() - int(count)} other process(es)"
          " (see their log)")
  return fitted


def _log_baseline(line: str) -> None:
  """Process 0 logs the fits; every process its own warnings."""
  if jax.process_index() == 0 or line.startswith("WARNING"):
    print(line, flush=True)


def result_lines(step: int, results: Mapping[str, Mapping[str, Any]],
                 keys: Sequence[str], describe: Callable[[Mapping], str]
                 ) -> List[str]:
  """One log line per split: `[eval step S] split (describe(res)): k=v ...`
  with the `keys` its results have."""
  lines = []
  for split, res in results.items():
    vals = " ".join(f"{k}={res[k]:.4f}" for k in keys if k in res)
    lines.append(
        f"[eval step {step}] {split} ({describe(res)}): {vals}".rstrip())
  return lines


def as_evaluation(evaluation):
  """The run's evaluation object: an `EvalConfig` (the ranking protocol, as
  gin/runs/evaluation.gin binds it) becomes a `RankingEvaluation`; objects
  with `evaluate` and `format_results` (e.g. `GenerationEvaluator`) pass."""
  if evaluation is None:
    return None
  if isinstance(evaluation, EvalConfig):
    return RankingEvaluation(evaluation)
  missing = [m for m in ("evaluate", "format_results")
             if not callable(getattr(evaluation, m, None))]
  if missing:
    raise TypeError(f"EVALUATION={evaluation!r} is neither an EvalConfig nor "
                    f"an evaluator (it lacks {missing})")
  return evaluation


def write_results(model_dir: str, step: int, results: Dict[str, Any],
                  writer=None, name: str = "eval") -> Optional[str]:
  """Writes `MODEL_DIR/eval/<name>_step<step>.json` (process 0) and TB."""
  if writer is not None:
    flat = {}

    def add(prefix, res):
      for k, v in res.items():
        if k == "baseline":  # how a baseline was fitted: not a metric
          continue
        if isinstance(v, dict):  # e.g. by_frequency/<label>/HR@10
          add(f"{prefix}/{k}", v)
        elif (isinstance(v, (int, float)) and not isinstance(v, bool)
              and k != "num_users"):
          flat[f"{prefix}/{k}"] = v
    for split, res in results.items():
      if isinstance(res, dict):
        add(f"{name}/{split}", res)
    writer.write_scalars(step, flat)
  if jax.process_index() != 0:
    return None
  out_dir = os.path.join(model_dir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}_step{step}.json")
  with open(path, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  return path
