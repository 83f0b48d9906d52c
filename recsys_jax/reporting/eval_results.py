"""Reading an evaluation's results: splits, baselines, metric kinds.

An eval JSON (`evaluator.write_results`) maps entry names to results:
`{split}` is the model on a split, `{split}_{name}` a baseline ranked
through the same protocol (`_popularity` today; any other name is taken the
same way, e.g. `_ease`, `_markov`), and `{split}_critiquing` the critiquing
protocol (evaluation/critiquing.py). Metric names are whatever the entries
hold; they are only sorted into kinds here (accuracy, beyond-accuracy,
counts) for layout, never required.
"""

import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

# evaluation/critiquing.py's SUFFIX and group keys (not imported: that module
# pulls in the FLARE model and JAX, the report needs neither).
CRITIQUING_SUFFIX = "_critiquing"
CRITIQUE_VARIANTS = ("no_critique", "category_critique", "data_critique")
CRITIQUE_GROUPS = ("ood", "in_domain")
BY_FREQUENCY = "by_frequency"
# A baseline's fit description (`{split}_{name}`'s 'baseline' block) and
# the reason a baseline could not be fitted ({'skipped': why}).
BASELINE_INFO = "baseline"
SKIPPED = "skipped"
# Nested blocks that are not metrics; other blocks of numbers (e.g. the
# evaluator's 'beyond_accuracy') are metrics of the entry.
_NOT_METRIC_BLOCKS = (BY_FREQUENCY, BASELINE_INFO)
# The splits in the order a reader expects them; others follow as found.
SPLIT_ORDER = ("train", "validation", "test")
# Headline metrics, in order of preference (ranking, then text).
HEADLINE_PREFERENCE = ("NDCG@10", "HR@10", "bleu", "rougeL")

_BEYOND = re.compile(
    r"coverage|covered|popularity|novelty|diversity|gini|^arp", re.IGNORECASE)
_LOWER_IS_BETTER = re.compile(r"loss|perplexity", re.IGNORECASE)
_COUNT_KEYS = ("skipped_no_category", "data_critique_missing")


@dataclasses.dataclass
class SplitResults:
  """One split of one evaluation: the model, its baselines, critiquing."""
  split: str
  model: Optional[Dict[str, Any]] = None
  baselines: Dict[str, Dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  critiquing: Optional[Dict[str, Any]] = None


def is_number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def is_count(name: str) -> bool:
  return name.startswith("num_") or name in _COUNT_KEYS


def is_beyond_accuracy(name: str) -> bool:
  """Coverage, popularity of what is recommended and the like."""
  return bool(_BEYOND.search(name))


def lower_is_better(name: str) -> bool:
  return bool(_LOWER_IS_BETTER.search(name))


def scalar_metrics(entry: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """The entry's numbers (counts included; ints stay ints), in its order:
  its top-level ones, then those of its nested blocks of numbers (e.g.
  `beyond_accuracy`: coverage@K, popularity@K), named as in the block
  (`block/name` where that would shadow a top-level one)."""
  if not isinstance(entry, Mapping):
    return {}
  out = {k: v for k, v in entry.items() if is_number(v)}
  for block, values in entry.items():
    if (block in _NOT_METRIC_BLOCKS or not isinstance(values, Mapping) or
        any(isinstance(v, Mapping) for v in values.values())):
      continue
    for k, v in values.items():
      if is_number(v):
        out[k if k not in out else f"{block}/{k}"] = v
  return out


def text_fields(entry: Optional[Mapping[str, Any]]) -> Dict[str, str]:
  """The entry's top-level strings (e.g. the ranking `protocol`)."""
  if not isinstance(entry, Mapping):
    return {}
  return {k: v for k, v in entry.items() if isinstance(v, str)}


def organize(results: Mapping[str, Any]) -> Dict[str, SplitResults]:
  """{split: SplitResults} of one eval JSON (entries that are not objects,
  e.g. a stray number, are ignored)."""
  entries = {k: v for k, v in results.items() if isinstance(v, Mapping)}
  critiquing = {k[:-len(CRITIQUING_SUFFIX)]: v for k, v in entries.items()
                if k.endswith(CRITIQUING_SUFFIX)}
  rest = {k: v for k, v in entries.items()
          if not k.endswith(CRITIQUING_SUFFIX)}
  # A split is an entry that is not `{another entry}_{name}` (so no split
  # is a prefix of another, and each baseline has exactly one split).
  splits = [k for k in rest
            if not any(k.startswith(o + "_") for o in rest if o != k)]
  out: Dict[str, SplitResults] = {}
  for key, entry in rest.items():
    if key in splits:
      out.setdefault(key, SplitResults(key)).model = dict(entry)
      continue
    split = next(s for s in splits if key.startswith(s + "_"))
    out.setdefault(split, SplitResults(split)).baselines[
        key[len(split) + 1:]] = dict(entry)
  for split, block in critiquing.items():
    out.setdefault(split, SplitResults(split)).critiquing = dict(block)
  return dict(sorted(out.items(), key=lambda kv: split_rank(kv[0])))


def split_rank(split: str):
  return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER
          else len(SPLIT_ORDER), split)


def report_split(splits: Sequence[str]) -> Optional[str]:
  """The split figures show when there is room for one: test if present."""
  ordered = sorted(splits, key=split_rank)
  if "test" in ordered:
    return "test"
  return ordered[-1] if ordered else None


def headline_metrics(names: Sequence[str], count: int = 2) -> List[str]:
  """Up to `count` metrics to plot: preferred ones first (NDCG@10, HR@10,
  ...), else the first non-count, accuracy ones."""
  names = [n for n in names if not is_count(n)]
  chosen = [n for n in HEADLINE_PREFERENCE if n in names][:count]
  for n in names:
    if len(chosen) >= count:
      break
    if n not in chosen and not is_beyond_accuracy(n):
      chosen.append(n)
  return chosen


def ordered_union(lists: Sequence[Sequence[str]]) -> List[str]:
  """Every name of the lists once, in order of first appearance."""
  seen: Dict[str, None] = {}
  for names in lists:
    for n in names:
      seen.setdefault(n, None)
  return list(seen)


def frequency_buckets(entry: Optional[Mapping[str, Any]]
                      ) -> Dict[str, Dict[str, float]]:
  """{bucket label: numbers} of an entry's `by_frequency` ({} if none)."""
  if not isinstance(entry, Mapping):
    return {}
  buckets = entry.get(BY_FREQUENCY)
  if not isinstance(buckets, Mapping):
    return {}
  return {str(label): scalar_metrics(res) for label, res in buckets.items()
          if isinstance(res, Mapping)}


def critique_groups(block: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
  """{'all': block, 'ood': ..., 'in_domain': ...} (the groups present)."""
  groups = {"all": block}
  for g in CRITIQUE_GROUPS:
    if isinstance(block.get(g), Mapping):
      groups[g] = block[g]
  return groups


def lift_value(block: Mapping[str, Any], key: str) -> Optional[float]:
  """A lift of a critiquing block; None where it is absent or undefined
  (the no-critique metric was 0)."""
  v = block.get(key)
  return float(v) if is_number(v) else None
