"""The train run: trains a model on its data, resuming in MODEL_DIR."""

import os
from typing import Optional

from recsys_jax.core import init_from as init_from_lib
from recsys_jax.core import metric_writer
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.evaluation import evaluator as evaluation_lib
from recsys_jax.runs import evaluate_run


def train(*, model_dir: str, data, model, optimizer: trainer.OptimizerConfig,
          loop: trainer.TrainLoopConfig,
          mesh_config: partitioning.MeshConfig,
          evaluation=None,
          init_from: Optional[init_from_lib.InitFromArg] = None):
  """Trains `model` on `data`, resuming in `model_dir`; evaluates at the end.

  `evaluation` (optional) is an `EvalConfig` (ranking) or an evaluator object
  (`evaluator.as_evaluation`), run every `loop.eval_every` steps and last.

  `init_from` initialises parameters of a fresh run (no checkpoint in
  `model_dir`) from another run, an export or an imported checkpoint
  (core/init_from.py); a list of `InitFrom` applies each in order.
  """
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  writer = metric_writer.MetricWriter(model_dir)
  evaluation = evaluation_lib.as_evaluation(evaluation)
  eval_fn = None
  if evaluation is not None:
    def eval_fn(params, step):
      return evaluate_run.evaluate_and_report(
          evaluation, model, params, data, mesh, rules, step=step,
          model_dir=model_dir, writer=writer)
  local_bs = partitioning.local_batch_size(loop.batch_size)

  def batches(start_step):
    return data.train_batches(start_step, local_bs)

  # The trainer adds what the model records (architecture, checkpoint_meta).
  meta = {"data_dir": os.path.abspath(data.data_dir)}
  state = trainer.train_loop(model, optimizer, batches, loop,
                             model_dir=model_dir, mesh=mesh, rules=rules,
                             writer=writer, eval_fn=eval_fn, meta=meta,
                             init_from=init_from)
  writer.flush()
  return state
