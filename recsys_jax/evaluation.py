"""Sharded, multi-host evaluation of a sequence model with ranking metrics.

Scores and ranks are computed in one jitted function on global arrays, so the
[batch, N] score matrix never leaves the devices (and stays sharded along the
item axis under vocab-parallel rules); only [batch] ranks come back, each
process keeps the ranks of its own rows, and the metric sums are reduced
across processes at the end.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax import distributed
from recsys_jax import metrics
from recsys_jax import partitioning
from recsys_jax import ranking


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

  def __post_init__(self):
    if self.protocol not in ("full", "sampled"):
      raise ValueError(f"EvalConfig.protocol={self.protocol!r}: expected "
                       "'full' or 'sampled'")


def protocol_name(cfg: EvalConfig) -> str:
  if cfg.protocol == "sampled":
    return metrics.sampled_protocol_name(cfg.num_negatives,
                                         cfg.negative_sampling)
  return (metrics.FULL_RANKING_EXCLUDING_HISTORY if cfg.exclude_history
          else metrics.FULL_RANKING)


def _local_rows(global_array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local order."""
  shards = sorted(global_array.addressable_shards,
                  key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # replicas along `model` hold the same rows
      continue
    seen.add(start)
    rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)


class Evaluator:
  """Scores eval batches with a model's `score_fn` and ranks the targets."""

  def __init__(self, model, mesh, rules, cfg: EvalConfig):
    self.model, self.mesh, self.rules, self.cfg = model, mesh, rules, cfg

    def rank_fn(params, batch, negatives):
      scores = model.score_fn(params, batch)              # [B, N]
      targets = jnp.max(batch["targets"], axis=1)         # one per row
      safe = jnp.maximum(targets, 1)
      if cfg.protocol == "sampled":
        return ranking.sampled_target_rank(scores, safe, negatives)
      exclude = batch["item_ids"] if cfg.exclude_history else None
      return ranking.target_rank(scores, safe, exclude)

    self._rank = jax.jit(rank_fn, out_shardings=partitioning.batch_sharding(
        mesh))

  def evaluate(self, params, batches: Iterable[Mapping[str, np.ndarray]],
               item_counts: Optional[np.ndarray] = None,
               score_override=None) -> Dict[str, Any]:
    """Metrics over host-local batches (each process passes its own shard).

    Args:
      params: model parameters (global arrays).
      batches: this process's eval batches, each with a float `valid` mask.
      item_counts: [N] training counts (popularity-sampled negatives).
      score_override: if given, `[N]` scores used for every user instead of
        the model (the popularity baseline through the same path).
    """
    cfg = self.cfg
    acc = metrics.RankingMetrics(tuple(cfg.ks), protocol_name(cfg))
    gen = np.random.default_rng(cfg.seed + jax.process_index())
    rank_fn = self._rank
    if score_override is not None:
      pop = jnp.asarray(score_override, jnp.float32)

      def pop_rank(_, batch, negatives):
        b = batch["targets"].shape[0]
        scores = jnp.broadcast_to(pop[None, :], (b, pop.shape[0]))
        safe = jnp.maximum(jnp.max(batch["targets"], axis=1), 1)
        if cfg.protocol == "sampled":
          return ranking.sampled_target_rank(scores, safe, negatives)
        exclude = batch["item_ids"] if cfg.exclude_history else None
        return ranking.target_rank(scores, safe, exclude)
      rank_fn = jax.jit(pop_rank, out_shardings=partitioning.batch_sharding(
          self.mesh))
    compiled = False
    for local in batches:
      valid = np.asarray(local["valid"]) > 0
      model_batch = {k: v for k, v in local.items() if k != "valid"}
      targets, history, _ = metrics.eval_batch_targets(model_batch)
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
        if jax.process_count() > 1 and not compiled:
          # Compile, then line the hosts up before the first collective
          # (see distributed.barrier); every eval batch has this shape.
          rank_fn = rank_fn.lower(params, global_batch, negs).compile()
          compiled = True
          distributed.barrier("eval_start")
        ranks = rank_fn(params, global_batch, negs)
      acc.add(_local_rows(ranks), valid=valid)
    return acc.merge_across_processes().result()


def write_results(model_dir: str, step: int, results: Dict[str, Any],
                  writer=None, name: str = "eval") -> Optional[str]:
  """Writes `MODEL_DIR/eval/<name>_step<step>.json` (process 0) and TB."""
  if writer is not None:
    flat = {}
    for split, res in results.items():
      if isinstance(res, dict):
        for k, v in res.items():
          if isinstance(v, (int, float)) and k != "num_users":
            flat[f"{name}/{split}/{k}"] = v
    writer.write_scalars(step, flat)
  if jax.process_index() != 0:
    return None
  out_dir = os.path.join(model_dir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}_step{step}.json")
  with open(path, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  return path
