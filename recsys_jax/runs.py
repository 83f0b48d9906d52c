"""The three runs (train, evaluate, export) as plain functions.

gin configures them from the entry points (`python -m recsys_jax.train` ...);
tests call them directly with Python objects.
"""

import json
import logging
import os
from typing import Any, Dict, Optional

import jax
import numpy as np

from recsys_jax import checkpoints
from recsys_jax import evaluation as evaluation_lib
from recsys_jax import metric_writer
from recsys_jax import partitioning
from recsys_jax import trainer

EXPORT_SUBDIR = "export"
EXPORT_MANIFEST = "export.json"


def _metric_writer(model_dir: str) -> metric_writer.MetricWriter:
  return metric_writer.MetricWriter(model_dir)


def _run_evaluation(model, params, data, mesh, rules, cfg: evaluation_lib.EvalConfig
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


def _print_results(step: int, results: Dict[str, Any], ks):
  if jax.process_index() != 0:
    return
  for split, res in results.items():
    keys = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    vals = " ".join(f"{k}={res[k]:.4f}" for k in keys if k in res)
    print(f"[eval step {step}] {split} ({res.get('protocol')}, "
          f"{res.get('num_users')} users): {vals}", flush=True)


def train(*, model_dir: str, data, model, optimizer: trainer.OptimizerConfig,
          loop: trainer.TrainLoopConfig,
          mesh_config: partitioning.MeshConfig,
          evaluation: Optional[evaluation_lib.EvalConfig] = None):
  """Trains `model` on `data`, resuming in `model_dir`; evaluates at the end."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  writer = _metric_writer(model_dir)
  eval_fn = None
  if evaluation is not None:
    def eval_fn(params, step):
      res = _run_evaluation(model, params, data, mesh, rules, evaluation)
      _print_results(step, res, evaluation.ks)
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





def _restore_params(model, model_dir, mesh, rules, checkpoint_step=None,
                    exported_dir=None):
  """Params of a training checkpoint (any step) or of an export."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with partitioning.with_rules(rules):
    abstract_boxed = jax.eval_shape(
        lambda r: model.get_initial_variables(r, 2)["params"],
        jax.random.PRNGKey(0))
  shardings = partitioning.abstract_shardings(abstract_boxed, mesh, rules)
  abstract = checkpoints.abstract_with_shardings(nn.meta.unbox(abstract_boxed),
                                                 shardings)
  if exported_dir:
    manifest = read_export_manifest(exported_dir)
    if manifest["num_items"] != model.num_items:
      raise ValueError(
          f"{exported_dir}: exported for {manifest['num_items']} items but "
          f"the dataset has {model.num_items}")
    checkpoints.check_architecture(
        manifest.get(checkpoints.ARCHITECTURE_KEY), model.architecture(),
        f"the export in {exported_dir}")
    params = checkpoints.restore_params(
        os.path.join(exported_dir, "params"), abstract)
    return params, int(manifest["step"])
  ckpt = checkpoints.Checkpointer(model_dir, keep=None)
  step = checkpoint_step if checkpoint_step is not None else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint_<step> in {model_dir}; train "
                            "first or pass --gin.EXPORTED_DIR")
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f"{model_dir}/checkpoint_{step} does not exist; "
                            f"available steps: {sorted(ckpt.all_steps())}")
  checkpoints.check_architecture(
      ckpt.restore_meta(step).get(checkpoints.ARCHITECTURE_KEY),
      model.architecture(), f"{model_dir}/checkpoint_{step}")
  # Only the params of the saved TrainState are read (no optimizer needed).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  target = {"params": abstract}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt.directory, f"{checkpoints.STEP_PREFIX}_{step}",
                   "state"),
      args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  ckpt.close()
  return restored["params"], int(step)


def evaluate(*, model_dir: str, data, model,
             mesh_config: partitioning.MeshConfig,
             evaluation: evaluation_lib.EvalConfig,
             checkpoint_step: Optional[int] = None,
             exported_dir: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint step (latest by default) or an exported model."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = _restore_params(model, model_dir, mesh, rules,
                                 checkpoint_step, exported_dir)
  results = _run_evaluation(model, params, data, mesh, rules, evaluation)
  _print_results(step, results, evaluation.ks)
  writer = _metric_writer(model_dir)
  name = "eval_exported" if exported_dir else "eval"
  path = evaluation_lib.write_results(model_dir, step, results, writer,
                                         name=name)
  writer.flush()
  if path:
    print(f"Wrote {path}", flush=True)
  return results


def read_export_manifest(exported_dir: str) -> dict:
  path = os.path.join(exported_dir, EXPORT_MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{exported_dir}: not an exported model (no "
                            f"{EXPORT_MANIFEST}); run python -m "
                            "recsys_jax.export first")
  with open(path) as f:
    return json.load(f)


def export(*, model_dir: str, model, mesh_config: partitioning.MeshConfig,
           checkpoint_step: Optional[int] = None,
           output_dir: Optional[str] = None) -> str:
  """Writes params-only checkpoint + item embeddings + config for serving."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = _restore_params(model, model_dir, mesh, rules,
                                 checkpoint_step)
  output_dir = output_dir or os.path.join(model_dir, EXPORT_SUBDIR)
  checkpoints.save_params(os.path.join(output_dir, "params"), params)
  if jax.process_index() == 0:
    emb = np.asarray(jax.device_get(model.item_embeddings(params)))
    bias = np.asarray(jax.device_get(model.item_bias(params)))
    np.save(os.path.join(output_dir, "item_embeddings.npy"), emb)
    np.save(os.path.join(output_dir, "item_bias.npy"), bias)
    config_src = os.path.join(model_dir, "config.gin")
    if os.path.exists(config_src):
      with open(config_src) as f, open(
          os.path.join(output_dir, "config.gin"), "w") as g:
        g.write(f.read())
    manifest = {"step": step, "num_items": model.num_items,
                checkpoints.ARCHITECTURE_KEY: model.architecture(),
                "embedding_shape": list(emb.shape),
                "source_model_dir": os.path.abspath(model_dir)}
    with open(os.path.join(output_dir, EXPORT_MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    print(f"Exported step {step} to {output_dir} (item embeddings "
          f"{emb.shape})", flush=True)
  logging.info("export done: %s", output_dir)
  return output_dir
