"""REGEN's soft-token contribution analysis as an evaluation of a checkpoint.

For a model whose soft tokens come from `models/item_soft_tokens.ItemSoftTokens`
with the linear adapter, every history item of a split's examples (each
occurrence counted, as the LM reads them) is split into the norms of its CF
part `x_cf W_cf` and its semantic part `x_sem W_sem`; the share of the CF part
is summarised (mean, quartiles, 20-bin histogram) in
`<output_dir>/contributions/<split>/contributions.json` with a histogram PNG
when matplotlib is installed (`pip install matplotlib`). Run it through the
eval entry point:

  python -m recsys_jax.eval --gin_file=gin/experiments/synthetic_regen.gin \
    --gin_file=gin/runs/soft_token_contributions.gin --gin.EVAL_NAME="'contributions'"

The eval JSON gets the summary numbers per split.
"""

import os
from typing import Any, Dict, List, Mapping, Sequence

import jax
import numpy as np

from recsys_jax.evaluation import evaluator
from recsys_jax.model_lib import encoder_decoder
from recsys_jax.models import item_soft_tokens

SUBDIR = "contributions"
_KEYS = ("cf_share_mean", "cf_share_median", "cf_share_q25", "cf_share_q75",
         "cf_norm_mean", "semantic_norm_mean")


class SoftTokenContributions:
  """CF vs semantic share of each history item's soft token (linear adapter).

  Args:
    output_dir: where `contributions/<split>/` goes (the run's MODEL_DIR).
    splits: data splits whose examples' history items are analysed.
    batch_size: evaluation batch size used to read the examples.
  """

  def __init__(self, output_dir: str, splits: Sequence[str] = ("test",),
               batch_size: int = 256):
    self.output_dir = output_dir
    self.splits = tuple(splits)
    self.batch_size = int(batch_size)

  def _module(self, model):
    soft = getattr(model, "soft_token_module", None)
    if not isinstance(soft, item_soft_tokens.ItemSoftTokens):
      raise ValueError(
          "SoftTokenContributions needs a model whose soft tokens come from "
          "ItemSoftTokens (gin/models/regen.gin); got soft_token_module="
          f"{type(soft).__name__}")
    return soft

  def evaluate(self, model, params, data, mesh=None, rules=None
               ) -> Dict[str, Dict[str, Any]]:
    del mesh, rules
    soft = self._module(model)
    soft_params = jax.device_get(
        params[encoder_decoder.SOFT_TOKENS_KEY])
    tables = jax.device_get(soft.tables)
    results = {}
    for split in self.splits:
      items: List[np.ndarray] = []
      for batch in data.eval_batches(split, self.batch_size):
        hist = np.asarray(batch[item_soft_tokens.HISTORY_ITEMS])
        valid = np.asarray(batch.get("valid", np.ones(len(hist)))) > 0
        hist = hist[valid]
        items.append(hist[hist > 0])
      ids = np.concatenate(items) if items else np.zeros((0,), np.int64)
      res = item_soft_tokens.contributions(soft_params, soft.config, tables,
                                           ids)
      out_dir = os.path.join(self.output_dir, SUBDIR, split)
      paths = item_soft_tokens.write_contribution_report(res, out_dir)
      share = np.asarray(res["cf_share"], np.float64).reshape(-1)
      share = share[np.isfinite(share)]
      summary: Dict[str, Any] = {"num_soft_tokens": int(share.size),
                                 "report": paths["json"],
                                 "png": paths["png"]}
      if share.size:
        q25, med, q75 = np.percentile(share, [25, 50, 75])
        summary.update(
            cf_share_mean=float(share.mean()), cf_share_median=float(med),
            cf_share_q25=float(q25), cf_share_q75=float(q75),
            cf_norm_mean=float(np.mean(res["cf_norm"])),
            semantic_norm_mean=float(np.mean(res["semantic_norm"])))
      results[split] = summary
    return results

  def format_results(self, step: int,
                     results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    lines = evaluator.result_lines(
        step, results, _KEYS,
        lambda res: f"{res.get('num_soft_tokens')} history soft tokens")
    for split, res in results.items():
      lines.append(f"[eval step {step}] {split}: report {res.get('report')}"
                   + (f", histogram {res['png']}" if res.get("png") else
                      " (no PNG: matplotlib is not installed)"))
    return lines
