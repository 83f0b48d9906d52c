"""The predict run: what a trained model recommends (or writes), as JSONL.

Ranking models: for every user of a leave-one-out split, the top-k items
with titles and scores, the user's history and the held-out item (and
whether it was hit). Text models (with `predict_batch`): for every example
of the split, the generated text beside its reference and input, through
the run's evaluator (`GenerationEvaluator.records`). Each process writes the
rows of its own input shard to
`MODEL_DIR/predict/<split>_step<step>[.process<i>].jsonl`, and beside it
`<...>.timing.json`: rows written, seconds of the prediction loop and the
steady rate (rows per second after the first batch, which carries the jit
compilation) — what the generative-recommender table reports as users/s.
"""

import itertools
import json
import os
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.core import partitioning
from recsys_jax.evaluation import ranking
from recsys_jax.runs import restore
from recsys_jax.text import item_texts

PREDICT_SUBDIR = "predict"
USER_ID = "user_id"


def output_path(model_dir: str, split: str, step: int) -> str:
  suffix = (f".process{jax.process_index()}" if jax.process_count() > 1
            else "")
  return os.path.join(model_dir, PREDICT_SUBDIR,
                      f"{split}_step{step}{suffix}.jsonl")


def _item_titles(data_dir: str) -> List[str]:
  """Titles by vocabulary index (0, padding, is ''); the item id where an
  item has no title."""
  return [""] + [str(row.get(item_texts.TITLE) or row.get("item_id") or "")
                 for row in item_texts.read_rows(data_dir)]


def make_top_k_fn(model, k: int, exclude_history: bool, mesh):
  """Jitted `(params, batch) -> (scores [B, k], item ids [B, k])`."""
  if not 1 <= k <= model.num_items:
    raise ValueError(f"predict top_k={k}: expected 1..{model.num_items} "
                     "(the number of items)")

  def top_k(params, batch):
    scores = model.score_fn(params, batch)  # [B, N], column j = item j + 1
    if exclude_history:
      excluded = ranking.exclusion_mask(scores.shape, batch["item_ids"])
      scores = jnp.where(excluded, -jnp.inf, scores)
    return ranking.top_k_items(scores, k)

  rows = partitioning.batch_sharding(mesh)
  return jax.jit(top_k, out_shardings=(rows, rows))


def ranking_records(model, params, batches: Iterator[Mapping[str, np.ndarray]],
                    *, titles: Sequence[str], top_k: int,
                    exclude_history: bool, mesh, rules
                    ) -> Iterator[Dict[str, Any]]:
  """One JSON record per valid row of the (host-local) eval batches."""
  fn = make_top_k_fn(model, top_k, exclude_history, mesh)
  for local in batches:
    valid = np.asarray(local["valid"]) > 0
    users = local.get(USER_ID)
    model_batch = {k: v for k, v in local.items()
                   if k not in ("valid", USER_ID)}
    global_batch = partitioning.host_to_global(model_batch, mesh)
    with partitioning.with_rules(rules, mesh):
      scores, items = fn(params, global_batch)
    scores = partitioning.process_local_rows(scores)
    items = partitioning.process_local_rows(items)
    for r in np.flatnonzero(valid):
      history = [int(i) for i in local["item_ids"][r]
                 if 1 <= i <= model.num_items]
      target = int(np.max(local["targets"][r]))
      recs = [int(i) for i in items[r]]
      record = {
          "user_id": (users[r].decode() if isinstance(users[r], bytes)
                      else str(users[r])) if users is not None else None,
          "history": history,
          "history_titles": [titles[i] for i in history],
          "top_k": recs,
          "top_k_titles": [titles[i] for i in recs],
          "scores": [round(float(s), 6) for s in scores[r]],
      }
      if target > 0:
        record.update(target=target, target_title=titles[target],
                      target_rank_in_top_k=(recs.index(target)
                                            if target in recs else None))
      yield record


def _limit(batches, max_rows: Optional[int], batch_size: int):
  """The first ceil(max_rows / batch_size) batches (all when None): whole
  batches, the same number on every process."""
  if max_rows is None:
    return batches
  return itertools.islice(batches, -(-int(max_rows) // batch_size))


def predict(*, model_dir: str, data, model,
            mesh_config: partitioning.MeshConfig,
            evaluation=None,
            split: str = "test", top_k: int = 10,
            exclude_history: bool = True, batch_size: int = 256,
            max_users: Optional[int] = None,
            checkpoint_step: Optional[int] = None,
            exported_dir: Optional[str] = None) -> str:
  """Writes the model's predictions on `split` as JSONL (module docstring).

  Args:
    model_dir: the run directory (MODEL_DIR); output under `predict/`.
    data: the run's data (`eval_batches(split, batch_size, extra_features)`).
    model: a ranking model wrapper (`score_fn`, `num_items`) or a text model
      (`predict_batch`).
    mesh_config: partitioning.
    evaluation: the run's evaluation; text models need an evaluator with
      `records` (gin/models/t5.gin binds `GenerationEvaluator`).
    split: 'validation' or 'test' (ranking: leave-one-out, the history is
      all items before the held-out one, recorded as the target).
    top_k: items per user (ranking models).
    exclude_history: never recommend an item of the user's history.
    batch_size: global batch size.
    max_users: about this many users / examples (whole batches, the same
      number on every process; None: all).
    checkpoint_step, exported_dir: which parameters (as `evaluate`).

  Returns:
    The path written by this process.
  """
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = restore.restore_params(model, model_dir, mesh, rules,
                                        checkpoint_step, exported_dir)
  path = output_path(model_dir, split, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if hasattr(model, "predict_batch"):
    if not callable(getattr(evaluation, "records", None)):
      raise ValueError(
          f"predicting with {type(model).__name__} needs an evaluation with "
          f"records() (e.g. generation.GenerationEvaluator); got "
          f"EVALUATION={evaluation!r}")
    batches = _limit(data.eval_batches(split, batch_size), max_users,
                     batch_size)
    if getattr(getattr(evaluation, "config", None), "item_mapping", False):
      evaluation.item_mapper(data.data_dir)  # titles -> items in records
    records = evaluation.records(model, params, batches, mesh=mesh,
                                 rules=rules)
    what = "generations"
  else:
    batches = _limit(data.eval_batches(split, batch_size,
                                       extra_features=(USER_ID,)),
                     max_users, batch_size)
    records = ranking_records(model, params, batches,
                              titles=_item_titles(data.data_dir), top_k=top_k,
                              exclude_history=exclude_history, mesh=mesh,
                              rules=rules)
    what = f"users' top-{top_k}"
  written = 0
  start = time.perf_counter()
  first_batch_end = None
  with open(path + ".tmp", "w") as f:
    for record in records:
      if first_batch_end is None:
        first_batch_end = time.perf_counter()
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      written += 1
  os.replace(path + ".tmp", path)
  timing = prediction_timing(written, start, first_batch_end,
                             time.perf_counter(),
                             batch_size // jax.process_count())
  with open(timing_path(path), "w") as f:
    json.dump(timing, f, indent=2)
  rate = timing["steady_rows_per_second"]
  print(f"Wrote {written} {what} to {path} in {timing['seconds']:.1f} s"
        + (f" ({rate:.1f} per second after the first batch)" if rate else ""),
        flush=True)
  return path


def timing_path(path: str) -> str:
  """The timing record beside a predictions file."""
  return path[:-len(".jsonl")] + ".timing.json"


def prediction_timing(rows: int, start: float, first_batch_end: Optional[
    float], end: float, local_batch_size: int) -> Dict[str, Any]:
  """Rows, loop seconds and the rate after the first batch (None when
  there was only one batch: its time includes the compilation)."""
  rest = rows - min(rows, int(local_batch_size))
  steady = None
  if first_batch_end is not None and rest > 0 and end > first_batch_end:
    steady = rest / (end - first_batch_end)
  return {"rows": int(rows), "seconds": round(end - start, 3),
          "first_batch_seconds": (None if first_batch_end is None else
                                  round(first_batch_end - start, 3)),
          "steady_rows_per_second": steady}
