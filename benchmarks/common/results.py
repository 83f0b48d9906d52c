"""Reading round files (benchmarks/results/*.json) and formatting figures."""

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional


def load(path: str) -> Optional[Dict[str, Any]]:
  """A result file's JSON, or None if there is none."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def fmt(x: Optional[float], digits: int = 0) -> str:
  """'1,234' / '0.0346' / 'n/a' (None or NaN)."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if digits == 0:
    return f"{x:,.0f}"
  return f"{x:,.{digits}f}"


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
  if ours is None or not theirs:
    return None
  return ours / theirs


def met(value: Optional[float], target: float) -> str:
  if value is None:
    return "not measured"
  return "met" if value >= target else "NOT met"


def median_over_rounds(results: List[Dict[str, Any]], *keys: str
                       ) -> Optional[float]:
  """Median of results[i][keys[0]][keys[1]]... over the rounds that have it."""
  vals = []
  for r in results:
    x: Any = r
    for k in keys:
      if not isinstance(x, dict) or k not in x:
        x = None
        break
      x = x[k]
    if x is not None:
      vals.append(float(x))
  return statistics.median(vals) if vals else None


def rounds(results_dir: str, prefix: str) -> List[Dict[str, Any]]:
  """The result files named `<prefix>*.json`, in name order."""
  out = []
  for name in sorted(os.listdir(results_dir)):
    if name.startswith(prefix) and name.endswith(".json"):
      r = load(os.path.join(results_dir, name))
      if r is not None:
        out.append(r)
  return out


@dataclasses.dataclass
class Rounds:
  """The throughput round files of one results directory."""
  train: List[Dict[str, Any]]        # train_throughput.py, all cores
  train_mb: List[Dict[str, Any]]     # gradient accumulation, staged modes
  train_1core: List[Dict[str, Any]]  # pinned to one core, peak measured there
  train_mp: List[Dict[str, Any]]     # data parallel over processes
  eval: List[Dict[str, Any]]         # eval_throughput.py
  recbole: List[Dict[str, Any]]      # recbole_peer.py

  @classmethod
  def read(cls, results_dir: str) -> "Rounds":
    return cls(train=rounds(results_dir, "train_throughput_round"),
               train_mb=rounds(results_dir, "train_throughput_mb_round"),
               train_1core=rounds(results_dir, "train_throughput_1core_"),
               train_mp=rounds(results_dir, "train_throughput_mp_round"),
               eval=rounds(results_dir, "eval_throughput_round"),
               recbole=rounds(results_dir, "recbole_round"))

  @property
  def recbole_eval(self) -> List[Dict[str, Any]]:
    return [r for r in self.recbole if "users_per_s" in r]

  def mode(self, mode: str, key: str,
           results: Optional[List[Dict[str, Any]]] = None) -> Optional[float]:
    """Median of `modes.<mode>.<key>` over `results` (default: `train`)."""
    return median_over_rounds(self.train if results is None else results,
                              "modes", mode, key)

  @property
  def num_microbatches(self):
    return (self.train_mb or [{}])[0].get("num_microbatches")

  @property
  def mp_label(self) -> str:
    mp = (self.train_mp or [{}])[0]
    return (f"{mp.get('num_processes')} processes (one per core), local "
            f"accumulation of {mp.get('num_microbatches')} micro-batches")
