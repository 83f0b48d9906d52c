"""One history -> the model's inference row -> its top-k items, jitted.

The row is the evaluation's (seqio_ext/preprocessors.py: `truncate_or_window`
keeps the last L - 1 items of an evaluation history, `eval_batch` appends
[MASK], `pad_batch` pads on the right), so the model sees a served history
exactly as it sees a test user's; a causal (SASRec-mode) model scores from
the item before the [MASK] and a bidirectional one at the [MASK], both
inside the model's own `score_fn`. The scores are `score_fn`'s, the
exclusion `ranking.exclusion_mask`'s and the top-k `ranking.top_k_items`'s,
as in `runs/predict_run.py`.
"""

import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.core import partitioning
from recsys_jax.evaluation import ranking

ITEM_IDS = "item_ids"
# Excluded ids are padded to a multiple of this, and k is rounded up to a
# power of two from MIN_K, so that similar requests share one compiled
# function.
EXCLUDE_BUCKET = 64
MIN_K = 16


def inference_row(history: Sequence[int], max_len: int, mask_id: int
                  ) -> Tuple[np.ndarray, int]:
  """(`[1, max_len]` int32 row, position of its [MASK]).

  The last `max_len - 1` items of `history`, [MASK], then padding 0.
  """
  kept = [int(i) for i in history][max(len(history) - (max_len - 1), 0):]
  row = np.zeros((1, max_len), np.int32)
  row[0, :len(kept)] = kept
  row[0, len(kept)] = mask_id
  return row, len(kept)


def exclude_row(item_ids: Sequence[int]) -> np.ndarray:
  """`[1, M]` int32 ids to exclude, 0-padded to a multiple of EXCLUDE_BUCKET."""
  size = max(-(-len(item_ids) // EXCLUDE_BUCKET), 1) * EXCLUDE_BUCKET
  row = np.zeros((1, size), np.int32)
  row[0, :len(item_ids)] = list(item_ids)
  return row


class TopK:
  """Jitted `(params, batch, exclude_ids[, critique table]) -> top k`.

  Args:
    model: a ranking wrapper (`score_fn`, `num_items`).
    mesh, rules: the device mesh and logical rules the params live on.
    with_tables: `fn(model, tokens, mask) -> model` giving a view of the
      model whose critique table is the passed one (FLARE with free-text
      critiques); the table then is an argument of the jitted function,
      so a new critique text needs no recompilation.
    compiler_options: XLA options of its compilation (e.g. a faster,
      less optimised CPU compile); None: XLA's defaults.
  """

  def __init__(self, model, mesh, rules,
               with_tables: Optional[Callable] = None,
               compiler_options: Optional[dict] = None):
    self.model = model
    self.mesh = mesh
    self.rules = rules
    self._with_tables = with_tables
    self._fn = jax.jit(self._top_k, static_argnames=("k",),
                       compiler_options=compiler_options)

  def _top_k(self, params, batch, exclude_ids, tables, *, k: int):
    model = self.model
    if tables is not None:
      model = self._with_tables(model, *tables)
    scores = model.score_fn(params, batch)  # [1, N], column j = item j + 1
    excluded = ranking.exclusion_mask(scores.shape, exclude_ids)
    scores = jnp.where(excluded, -jnp.inf, scores)
    return ranking.top_k_items(scores, k)

  def __call__(self, params, batch, exclude_ids: np.ndarray, k: int,
               tables=None) -> Tuple[np.ndarray, np.ndarray]:
    """(scores `[k]`, item ids `[k]`) of the batch's single row; excluded
    items score -inf (callers drop them)."""
    if not 1 <= k <= self.model.num_items:
      raise ValueError(f"top_k={k}: expected 1..{self.model.num_items} (the "
                       "number of items)")
    bucket = min(max(MIN_K, 1 << (k - 1).bit_length()), self.model.num_items)
    with partitioning.with_rules(self.rules, self.mesh):
      scores, items = self._fn(params, batch, exclude_ids, tables, k=bucket)
    return np.asarray(scores)[0, :k], np.asarray(items)[0, :k]


@functools.lru_cache(maxsize=None)
def single_device_mesh():
  """A (1, 1) mesh on the first local device: one request is one row."""
  return partitioning.make_mesh(1, jax.local_devices()[:1])
