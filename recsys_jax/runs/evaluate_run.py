"""The evaluate run: metrics of a checkpoint or an export on each split."""

import re
from typing import Any, Dict, Optional

import jax

from recsys_jax.core import metric_writer
from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator as evaluation_lib
from recsys_jax.runs import restore


def evaluate_and_report(evaluation, model, params, data, mesh, rules, *,
                        step: int, model_dir: str, writer,
                        name: str = "eval") -> Dict[str, Any]:
  """Runs `evaluation` (an evaluator object), prints its lines on process 0,
  writes `MODEL_DIR/eval/<name>_step<step>.json` and TensorBoard scalars."""
  results = evaluation.evaluate(model, params, data, mesh, rules)
  if jax.process_index() == 0:
    for line in evaluation.format_results(step, results):
      print(line, flush=True)
  path = evaluation_lib.write_results(model_dir, step, results, writer,
                                      name=name)
  if path:
    print(f"Wrote {path}", flush=True)
  return results


def evaluate(*, model_dir: str, data, model,
             mesh_config: partitioning.MeshConfig,
             evaluation,
             checkpoint_step: Optional[int] = None,
             exported_dir: Optional[str] = None,
             name: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint step (latest by default) or an exported model.

  `evaluation` is an `EvalConfig` (ranking) or an evaluator object such as
  `generation.GenerationEvaluator` (`evaluator.as_evaluation`). Results go to
  `MODEL_DIR/eval/<name>_step<step>.json`; `name` defaults to 'eval'
  ('eval_exported' for an export), so that another evaluation of the same
  checkpoint (another scoring table, the critiquing protocol) can be kept
  beside the training's own.
  """
  if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise ValueError(f"EVAL_NAME={name!r}: expected a file-name stem "
                     "(letters, digits, '_', '.', '-').")
  evaluation = evaluation_lib.as_evaluation(evaluation)
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = restore.restore_params(model, model_dir, mesh, rules,
                                        checkpoint_step, exported_dir)
  writer = metric_writer.MetricWriter(model_dir)
  results = evaluate_and_report(
      evaluation, model, params, data, mesh, rules, step=step,
      model_dir=model_dir, writer=writer,
      name=name or ("eval_exported" if exported_dir else "eval"))
  writer.flush()
  return results
