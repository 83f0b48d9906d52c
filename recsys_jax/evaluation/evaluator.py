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
"""

import dataclasses
import json
import os
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.core import distributed
from recsys_jax.evaluation import metrics
from recsys_jax.core import partitioning
from recsys_jax.evaluation import ranking


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
    popularity_baseline: also evaluate the train-popularity baseline.
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

  def __post_init__(self):
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
    self._rank = self._jit_rank(model.score_fn)

  def _jit_rank(self, score_fn):
    """jit of (params, batch, negatives) -> ranks [B], batch-sharded."""
    cfg = self.cfg

    def rank_fn(params, batch, negatives):
      return target_ranks(score_fn(params, batch), batch, negatives, cfg)
    return jax.jit(rank_fn, out_shardings=partitioning.batch_sharding(
        self.mesh))

  def evaluate(self, params, batches: Iterable[Mapping[str, np.ndarray]],
               item_counts: Optional[np.ndarray] = None,
               score_override=None) -> Dict[str, Any]:
    """Metrics over host-local batches (each process passes its own shard).

    Args:
      params: model parameters (global arrays).
      batches: this process's eval batches, each with a float `valid` mask.
      item_counts: [N] training counts (popularity-sampled negatives, and
        the target-frequency buckets of `cfg.frequency_buckets`).
      score_override: if given, `[N]` scores used for every user instead of
        the model (the popularity baseline through the same path).

    Returns:
      `RankingMetrics.result()`; with `item_counts` and frequency buckets
      also 'by_frequency' ({label: {metrics..., 'num_users'}}, see
      `bucket_results`) and 'frequency_buckets' (the boundaries).
    """
    cfg = self.cfg
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
          ranks = compiled[shape](params, global_batch, negs)
        else:
          ranks = rank_fn(params, global_batch, negs)
      local_ranks = partitioning.process_local_rows(ranks)
      acc.add(local_ranks, valid=valid)
      if by_freq:
        bucket = frequency_bucket(target_counts(targets, item_counts), bounds)
        for b, bucket_acc in enumerate(by_freq):
          bucket_acc.add(local_ranks, valid=valid & (bucket == b))
    merged = metrics.merge_all_across_processes([acc] + by_freq)
    result = merged[0].result()
    if by_freq:
      result["by_frequency"] = bucket_results(merged[1:], bounds)
      result["frequency_buckets"] = bounds
    return result


class RankingEvaluation:
  """A run's ranking evaluation: the model (and the popularity baseline) on
  each configured split, through `Evaluator`.

  Same interface as `generation.GenerationEvaluator`, so the runs treat
  every evaluation alike: `evaluate(model, params, data, mesh, rules) ->
  {split: metrics}` and `format_results(step, results) -> log lines`.
  """

  def __init__(self, config: EvalConfig):
    self.config = config

  def evaluate(self, model, params, data, mesh, rules) -> Dict[str, Any]:
    cfg = self.config
    ev = Evaluator(model, mesh, rules, cfg)
    counts = data.train_item_counts()
    results = {}
    for split in cfg.splits:
      results[split] = ev.evaluate(
          params, data.eval_batches(split, cfg.batch_size), counts)
      if cfg.popularity_baseline:
        results[f"{split}_popularity"] = ev.evaluate(
            params, data.eval_batches(split, cfg.batch_size), counts,
            score_override=np.log1p(counts.astype(np.float64)))
    return results

  def format_results(self, step: int, results: Mapping[str, Any]
                     ) -> List[str]:
    """One line per split, then (model splits only, not `*_popularity`)
    one per target-frequency bucket."""
    ks = self.config.ks
    keys = ([f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"])
    lines = result_lines(
        step, results, keys,
        lambda res: f"{res.get('protocol')}, {res.get('num_users')} users")
    for split, res in results.items():
      if split.endswith("_popularity") or not isinstance(res, Mapping):
        continue
      lines += result_lines(
          step, {f"{split} by frequency {label}": bucket
                 for label, bucket in res.get("by_frequency", {}).items()},
          keys, lambda b: f"{b.get('num_users')} users")
    return lines


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
