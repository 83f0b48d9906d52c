"""The train run: trains a model on its data, resuming in MODEL_DIR."""

import os
from typing import Optional

from recsys_jax.core import checkpoints
from recsys_jax.core import metric_writer
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.evaluation import evaluator as evaluation_lib
from recsys_jax.runs import evaluate_run


def train(*, model_dir: str, data, model, optimizer: trainer.OptimizerConfig,
          loop: trainer.TrainLoopConfig,
          mesh_config: partitioning.MeshConfig,
          evaluation: Optional[evaluation_lib.EvalConfig] = None):
  """Trains `model` on `data`, resuming in `model_dir`; evaluates at the end."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  writer = metric_writer.MetricWriter(model_dir)
  eval_fn = None
  if evaluation is not None:
    def eval_fn(params, step):
      res = evaluate_run.run_evaluation(model, params, data, mesh, rules, evaluation)
      evaluate_run.print_results(step, res, evaluation.ks)
      evaluation_lib.write_results(model_dir, step, res, writer)
      return res
  local_bs = partitioning.local_batch_size(loop.batch_size)

  def batches(start_step):
    return data.train_batches(start_step, local_bs)

  meta = {"data_dir": os.path.abspath(data.data_dir),
          "num_items": model.num_items,
          checkpoints.ARCHITECTURE_KEY: model.architecture()}
  state = trainer.train_loop(model, optimizer, batches, loop,
                             model_dir=model_dir, mesh=mesh, rules=rules,
                             writer=writer, eval_fn=eval_fn, meta=meta)
  writer.flush()
  return state
