"""The columns of a comparison: each run's model, then each baseline once.

Baselines are ranked on the run's data, so runs on the same data carry the
same baseline numbers: a baseline is shown once when every run has the same
numbers for it, else once per run ("popularity (run)").
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

from recsys_jax.reporting import eval_results
from recsys_jax.reporting import figures
from recsys_jax.reporting import run_data


@dataclasses.dataclass
class Column:
  label: str
  entry: Dict[str, Any]
  color: str
  baseline: bool
  run_label: str
  step: int

  @property
  def hatch(self) -> Optional[str]:
    return "//" if self.baseline else None


def _fingerprint(entry: Dict[str, Any]) -> str:
  return json.dumps({"m": eval_results.scalar_metrics(entry),
                     "f": eval_results.frequency_buckets(entry)},
                    sort_keys=True)


def split_columns(runs: Sequence[run_data.Run], split: str,
                  eval_name: Optional[str] = None) -> List[Column]:
  """Columns of `split` in each run's latest `eval_name` evaluation (the
  main one by default)."""
  models: List[Column] = []
  found: Dict[str, List[tuple]] = {}  # baseline -> [(run, entry, step)]
  for i, run in enumerate(runs):
    ev = run.latest_of(eval_name) if eval_name else run.latest
    if ev is None:
      continue
    block = eval_results.organize(ev.results).get(split)
    if block is None:
      continue
    if block.model is not None:
      models.append(Column(run.label, block.model, figures.run_color(i),
                           False, run.label, ev.step))
    for name, entry in block.baselines.items():
      found.setdefault(name, []).append((run, entry, ev.step))
  baselines: List[Column] = []
  for j, (name, versions) in enumerate(found.items()):
    color = figures.baseline_color(j)
    distinct = {_fingerprint(e) for _, e, _ in versions}
    if len(distinct) == 1:
      run, entry, step = versions[0]
      baselines.append(Column(name, entry, color, True, run.label, step))
      continue
    for run, entry, step in versions:
      baselines.append(Column(f"{name} ({run.label})", entry, color, True,
                              run.label, step))
  return models + baselines


def all_splits(runs: Sequence[run_data.Run],
               eval_name: Optional[str] = None) -> List[str]:
  splits: List[List[str]] = []
  for run in runs:
    ev = run.latest_of(eval_name) if eval_name else run.latest
    if ev is not None:
      splits.append(list(eval_results.organize(ev.results)))
  return sorted(eval_results.ordered_union(splits),
                key=eval_results.split_rank)
