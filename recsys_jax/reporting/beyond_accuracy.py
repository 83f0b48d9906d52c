"""Beyond-accuracy figures of a run: catalogue coverage and the popularity
of what is recommended.

Where the eval JSON holds such metrics (`coverage@K`, a recommended-
popularity metric: `eval_results.is_beyond_accuracy`) the report shows
those. Otherwise they are computed here from the run's ranking predict
output (`predict/<split>_step<N>.jsonl`, one record per user with its
`top_k` item ids, `history` and `target`):

  coverage@K         distinct items in any user's top K / catalogue size
                     (items.jsonl rows of the run's DATA_DIR);
  mean popularity    mean over every (user, slot) of the recommended item's
                     popularity, where an item's popularity is the number of
                     times it occurs in the histories of the file's users
                     (the evaluated users' inputs: for `test`, the train
                     items plus the validation item);
  target popularity  the same mean over the held-out items, the reference:
                     a recommender whose mean is far above it leans on
                     popular items.
"""

import collections
import dataclasses
import json
import os
from typing import List, Optional, Tuple

import numpy as np

from recsys_jax.reporting import run_data

DEFAULT_K = 10
ITEMS_FILE = "items.jsonl"  # data/prepared.py's ITEMS_FILE
STATS_FILE = "stats.json"


class NotAvailable(Exception):
  """Why a figure cannot be computed (shown as 'not available: <why>')."""


@dataclasses.dataclass
class PredictedBeyondAccuracy:
  """Beyond-accuracy numbers of one predict output (module docstring)."""
  split: str
  step: int
  k: int
  num_users: int
  distinct_items: int
  num_items: Optional[int]
  mean_popularity: float
  target_mean_popularity: Optional[float]
  recommended_popularity: np.ndarray  # [users * k] popularity of each slot
  target_popularity: np.ndarray  # [users with a target]

  @property
  def coverage(self) -> Optional[float]:
    if not self.num_items:
      return None
    return self.distinct_items / self.num_items


def catalogue_size(data_dir: Optional[str]) -> Tuple[Optional[int], str]:
  """(number of items of a prepared dataset, '') or (None, why not)."""
  if data_dir is None:
    return None, "the run's DATA_DIR (config.gin) was not found"
  stats = os.path.join(data_dir, STATS_FILE)
  try:
    with open(stats) as f:
      items = json.load(f).get("items")
    if isinstance(items, int) and items > 0:
      return items, ""
  except (OSError, ValueError, AttributeError):
    pass
  items_path = os.path.join(data_dir, ITEMS_FILE)
  try:
    with open(items_path, "rb") as f:
      count = sum(1 for line in f if line.strip())
  except OSError:
    return None, f"neither {stats} nor {items_path} could be read"
  return count, ""


def _records(output: run_data.PredictOutput):
  for path in output.paths:
    with open(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise NotAvailable(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or "top_k" not in record:
          raise NotAvailable(
              f"{path} holds no ranked items (no 'top_k': a text model's "
              "predictions)")
        yield record


def from_predictions(output: run_data.PredictOutput,
                     num_items: Optional[int], k: int = DEFAULT_K
                     ) -> PredictedBeyondAccuracy:
  """Coverage@k and popularity of one predict output (module docstring);
  k is cut to the records' own top-k length where that is shorter."""
  popularity: collections.Counter = collections.Counter()
  recommended: List[List[int]] = []
  targets: List[int] = []
  for record in _records(output):
    popularity.update(int(i) for i in record.get("history") or [])
    recommended.append([int(i) for i in record["top_k"]])
    if record.get("target"):
      targets.append(int(record["target"]))
  if not recommended:
    raise NotAvailable(f"{', '.join(output.paths)} holds no records")
  k = min(k, min(len(r) for r in recommended))
  if k < 1:
    raise NotAvailable(f"{output.paths[0]}: empty top_k lists")
  slots = [i for r in recommended for i in r[:k]]
  rec_pop = np.asarray([popularity[i] for i in slots], np.float64)
  target_pop = np.asarray([popularity[i] for i in targets], np.float64)
  return PredictedBeyondAccuracy(
      split=output.split, step=output.step, k=k, num_users=len(recommended),
      distinct_items=len(set(slots)), num_items=num_items,
      mean_popularity=float(rec_pop.mean()),
      target_mean_popularity=(float(target_pop.mean()) if len(target_pop)
                              else None),
      recommended_popularity=rec_pop, target_popularity=target_pop)


def pick_prediction(run: run_data.Run, split: Optional[str]
                    ) -> Optional[run_data.PredictOutput]:
  """The run's predict output of `split` (else of any split), latest step."""
  if not run.predictions:
    return None
  same = [p for p in run.predictions if p.split == split]
  return max(same or run.predictions, key=lambda p: p.step)
