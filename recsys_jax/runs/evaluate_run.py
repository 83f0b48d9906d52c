"""The evaluate run: metrics of a checkpoint or an export on each split."""

from typing import Any, Dict, Optional

import jax
import numpy as np

from recsys_jax.core import metric_writer
from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator as evaluation_lib
from recsys_jax.runs import restore


def run_evaluation(model, params, data, mesh, rules, cfg: evaluation_lib.EvalConfig
                    ) -> Dict[str, Any]:
  """Model (and popularity baseline) metrics on each configured split."""
  ev = evaluation_lib.Evaluator(model, mesh, rules, cfg)
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


def print_results(step: int, results: Dict[str, Any], ks):
  if jax.process_index() != 0:
    return
  for split, res in results.items():
    keys = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    vals = " ".join(f"{k}={res[k]:.4f}" for k in keys if k in res)
    print(f"[eval step {step}] {split} ({res.get('protocol')}, "
          f"{res.get('num_users')} users): {vals}", flush=True)


def evaluate(*, model_dir: str, data, model,
             mesh_config: partitioning.MeshConfig,
             evaluation: evaluation_lib.EvalConfig,
             checkpoint_step: Optional[int] = None,
             exported_dir: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint step (latest by default) or an exported model."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = restore.restore_params(model, model_dir, mesh, rules,
                                 checkpoint_step, exported_dir)
  results = run_evaluation(model, params, data, mesh, rules, evaluation)
  print_results(step, results, evaluation.ks)
  writer = metric_writer.MetricWriter(model_dir)
  name = "eval_exported" if exported_dir else "eval"
  path = evaluation_lib.write_results(model_dir, step, results, writer,
                                         name=name)
  writer.flush()
  if path:
    print(f"Wrote {path}", flush=True)
  return results
