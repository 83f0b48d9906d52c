"""FLARE's critiquing evaluation: remove the target's category, then critique.

For each user of a split (one evaluation row: history + [MASK], the target
at the [MASK]) whose target item has a category c:

  1. the history items of category c are removed (the kept items are
     compacted to the left, the [MASK] follows them, the rest is padding);
  2. the model scores that history
       (a) `no_critique`: without a critique (`input_critique_ids` all 0),
       (b) `category_critique`: with c's name as the critique at the [MASK],
       (c) `data_critique` (data built with critique texts, when some user
           of the split has one): with the data's own critique before the
           target (users whose critique is empty are scored without one and
           counted, `data_critique_missing`);
  3. every variant is ranked with the full protocol, excluding the user's
     ORIGINAL history (`exclude_ids`), so the removed items cannot come back
     as recommendations and all variants rank the same candidates.

The lift is metric(b) / metric(a) (`lift_NDCG@K`, `lift_HR@K`, `lift_MRR`;
`data_lift_*` for (c)); None when metric(a) is 0. With `ood_categories`
(category names kept out of training critiques) every number is also
reported for the users whose target category is one of them (`ood`) and for
the others (`in_domain`). Users whose target has no category are skipped and
counted (`skipped_no_category`).

Critique ids are rows of the critique text cache (`texts.json`: row r is id
r + 1), the ids the FLARE model reads from `input_critique_ids`
(model_lib/flare.py). ID-only models ignore that key: for them (a) and (b)
are equal (lift 1), which makes them the reference of the protocol.

Ranking runs through `evaluator.Evaluator` (sharding, several hosts) on the
transformed host batches. The ood / in-domain split rides on its per-target
buckets: the "count" of an item is 1 when its category is out of domain, so
buckets [0, 1) and [1, inf) are the two groups, computed in the same pass.
"""

import dataclasses
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional
from typing import Sequence

import jax
import numpy as np

from recsys_jax.evaluation import evaluator
from recsys_jax.evaluation import metrics
from recsys_jax.model_lib import flare as flare_model
from recsys_jax.model_lib import flare_tables
from recsys_jax.text import critique_texts as critique_texts_lib

INPUT_CRITIQUE_IDS = flare_model.INPUT_CRITIQUE_IDS
CRITIQUE_IDS = flare_model.CRITIQUE_IDS
EXCLUDE_IDS = "exclude_ids"
NO_CRITIQUE, CATEGORY_CRITIQUE, DATA_CRITIQUE = (
    "no_critique", "category_critique", "data_critique")
OOD, IN_DOMAIN = "ood", "in_domain"
SUFFIX = "_critiquing"
# Bucket labels of `evaluator.frequency_labels((1,))`: group 0 / group 1.
_GROUP_LABELS = {IN_DOMAIN: "0", OOD: "1+"}


@dataclasses.dataclass
class CritiquingRows:
  """One evaluation batch after removing each target's category (host numpy).

  Attributes:
    item_ids: `[B, L]` kept history, [MASK] at `mask_pos`, then 0.
    targets: `[B, L]` the target at `mask_pos` (0 elsewhere, and in rows
      without a target).
    exclude_ids: `[B, L]` the original `item_ids` (excluded from ranking).
    valid: `[B]` bool, a real row whose target has a category.
    mask_pos: `[B]` the new [MASK] position (= number of kept items).
    category_critique: `[B]` critique id of the target's category (0: none).
    data_critique: `[B]` the data's critique id at the original [MASK] (0:
      none, or the batch has no `critique_ids`).
    removed: `[B]` history items removed (0 in rows that are not `valid`).
    skipped: `[B]` bool, a real row whose target has no category.
  """
  item_ids: np.ndarray
  targets: np.ndarray
  exclude_ids: np.ndarray
  valid: np.ndarray
  mask_pos: np.ndarray
  category_critique: np.ndarray
  data_critique: np.ndarray
  removed: np.ndarray
  skipped: np.ndarray


def remove_target_category(batch: Mapping[str, np.ndarray],
                           item_critique: np.ndarray,
                           mask_id: int) -> CritiquingRows:
  """Drops the history items of each row's target category (step 1).

  Args:
    batch: an evaluation batch: `item_ids` `[B, L]` (history, one [MASK],
      padding 0), `targets` `[B, L]` (the target at the [MASK]), optional
      `valid` `[B]` and `critique_ids` `[B, L]`.
    item_critique: `[N + 2]` int, the critique id of each item id's category
      name (0: no category; entries 0 and N + 1 are 0).
    mask_id: the [MASK] id, N + 1.

  Returns:
    The rows for the critiquing variants (`critiqued_batch`).
  """
  target_ids, ids, has_target = evaluator.eval_batch_targets(batch)
  b, l = ids.shape
  if len(item_critique) != mask_id + 1:
    raise ValueError(f"item_critique has {len(item_critique)} entries; "
                     f"expected N + 2 = {mask_id + 1} (ids 0..[MASK])")
  valid = has_target.copy()
  if "valid" in batch:
    valid &= np.asarray(batch["valid"]).reshape(-1) > 0
  item_critique = np.asarray(item_critique, np.int32)
  in_vocab = (ids >= 1) & (ids < mask_id)  # history items, not [MASK] / pad
  category = item_critique[np.where(in_vocab, ids, 0)]  # [B, L]
  target_category = item_critique[target_ids]  # [B]; id 0 -> 0
  has_category = target_category > 0
  remove = (in_vocab & (category == target_category[:, None])
            & (valid & has_category)[:, None])
  keep = in_vocab & ~remove
  kept = keep.sum(axis=1)
  # Kept items first, in their order (stable sort of "not kept").
  order = np.argsort(~keep, axis=1, kind="stable")
  cols = np.arange(l)[None, :]
  new_ids = np.where(cols < kept[:, None],
                     np.take_along_axis(ids, order, axis=1), 0).astype(np.int32)
  new_targets = np.zeros((b, l), np.int32)
  rows = np.nonzero(has_target)[0]
  # kept <= original history length < L, so the [MASK] still fits.
  new_ids[rows, kept[rows]] = mask_id
  new_targets[rows, kept[rows]] = target_ids[rows]
  data_critique = np.zeros((b,), np.int32)
  if CRITIQUE_IDS in batch:
    target_pos = np.argmax(np.asarray(batch["targets"]) > 0, axis=1)
    crit = np.asarray(batch[CRITIQUE_IDS], np.int32)
    data_critique = np.where(
        has_target, crit[np.arange(b), target_pos], 0).astype(np.int32)
  ok = valid & has_category
  return CritiquingRows(
      item_ids=new_ids, targets=new_targets,
      exclude_ids=ids.astype(np.int32), valid=ok,
      mask_pos=kept.astype(np.int32),
      category_critique=np.where(ok, target_category, 0).astype(np.int32),
      data_critique=np.where(ok, data_critique, 0).astype(np.int32),
      removed=np.where(ok, remove.sum(axis=1), 0).astype(np.int32),
      skipped=valid & ~has_category)


def critiqued_batch(rows: CritiquingRows, critique: np.ndarray
                    ) -> Dict[str, np.ndarray]:
  """The model batch of one variant: `critique` `[B]` (0: none) at the
  [MASK]; `exclude_ids` = the original history; `valid` float32."""
  b, l = rows.item_ids.shape
  crit = np.zeros((b, l), np.int32)
  crit[np.arange(b), np.minimum(rows.mask_pos, l - 1)] = np.where(
      rows.valid, critique, 0)
  return {"item_ids": rows.item_ids, "targets": rows.targets,
          EXCLUDE_IDS: rows.exclude_ids, INPUT_CRITIQUE_IDS: crit,
          "valid": rows.valid.astype(np.float32)}


def _sum_across_processes(values: np.ndarray) -> np.ndarray:
  """Sum over JAX processes of a float64 vector (bit-exact transport)."""
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(values.view(np.uint32))
  return metrics.sum_bit_vectors(np.asarray(gathered)).reshape(values.shape)


# Per-group counters, summed on the host: users scored, removed items,
# skipped users (no category), users with a data critique.
_COUNTERS = ("users", "removed", "skipped", "with_data_critique")


def _lifts(base: Mapping[str, Any], other: Mapping[str, Any],
           names: Sequence[str], prefix: str) -> Dict[str, Optional[float]]:
  out = {}
  for name in names:
    a, b = base.get(name), other.get(name)
    ok = (isinstance(a, float) and isinstance(b, float) and a > 0
          and np.isfinite(a) and np.isfinite(b))
    out[f"{prefix}{name}"] = float(b / a) if ok else None
  return out


class CritiquingEvaluation:
  """FLARE's critiquing protocol (module docstring), plus the ordinary
  ranking evaluation when `ranking` is set.

  Same interface as `evaluator.RankingEvaluation`; in gin:
  `EVALUATION = @critiquing.CritiquingEvaluation()`.
  """

  def __init__(self, config: evaluator.EvalConfig, critique_texts: str,
               ood_categories: Sequence[str] = (),
               splits: Sequence[str] = ("test",),
               data_critiques: bool = True, ranking: bool = True):
    """Configures the evaluation (nothing is read until `evaluate`).

    Args:
      config: the ranking protocol (ks, batch size). The critiquing passes
        force the full protocol with the history excluded and no length
        buckets; with `ranking` the ordinary evaluation runs `config` as
        given (its own splits).
      critique_texts: the critique text cache directory (its texts.json),
        the one the model's critique table was built from.
      ood_categories: category names reported separately (out of domain).
      splits: the splits of the critiquing protocol.
      data_critiques: also score with the data's own critique (when the
        batches carry `critique_ids` and some user of the split has one).
      ranking: run `evaluator.RankingEvaluation(config)` first and include
        its results.
    """
    if not isinstance(config, evaluator.EvalConfig):
      raise TypeError(f"CritiquingEvaluation.config={config!r}: expected an "
                      "EvalConfig (e.g. @evaluation.EvalConfig())")
    if isinstance(ood_categories, str):
      raise TypeError(f"CritiquingEvaluation.ood_categories="
                      f"{ood_categories!r}: expected a list of category "
                      "names, not one string")
    self.config = config
    self.critique_texts = critique_texts
    self.ood_categories = tuple(ood_categories)
    self.splits = tuple(splits)
    self.data_critiques = bool(data_critiques)
    self.ranking = bool(ranking)
    self.pass_config = dataclasses.replace(
        config, protocol="full", exclude_history=True, length_buckets=False,
        splits=self.splits, popularity_baseline=False,
        frequency_buckets=(1,) if self.ood_categories else ())

  # -- tables ----------------------------------------------------------------

  def tables(self, data_dir: str, num_items: int, model=None):
    """`(item_critique [N + 2], item_ood [N] 0/1)` for the dataset.

    Raises:
      ValueError: the dataset's N differs from the model's; an ood category
        is not a category name; a category name is not in the cache; the
        model's own critique table differs from the cache's.
    """
    names = flare_tables.item_category_names(data_dir)
    if len(names) != num_items:
      raise ValueError(f"{data_dir}: {len(names)} items, the model has "
                       f"{num_items}")
    real = sorted({c for c in names if c})
    unknown = [c for c in self.ood_categories if c not in set(real)]
    if unknown:
      raise ValueError(
          f"CritiquingEvaluation.ood_categories: {unknown} are not category "
          f"names of {data_dir} (items.jsonl, most specific category); "
          f"e.g. {real[:5]} ({len(real)} in all)")
    texts = flare_tables.critique_texts(self.critique_texts)
    item_critique = critique_texts_lib.category_critique_ids(names, texts,
                                          where=self.critique_texts)
    host = getattr(model, "host_tables", None)
    if host is not None:
      theirs = np.asarray(host.item_category)[1:num_items + 1]
      if (host.num_critiques != len(texts) or
          not np.array_equal(theirs, item_critique[1:-1])):
        raise ValueError(
            f"CritiquingEvaluation.critique_texts={self.critique_texts!r}: "
            f"its {len(texts)} texts do not match the model's critique table "
            f"({host.num_critiques} texts, other category ids); give the "
            "cache the model was built with")
    ood = set(self.ood_categories)
    item_ood = np.array([1 if c in ood else 0 for c in names], np.int64)
    return item_critique, item_ood

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, model, params, data, mesh, rules) -> Dict[str, Any]:
    item_critique, item_ood = self.tables(data.data_dir, model.num_items,
                                          model)
    results = {}
    if self.ranking:
      results.update(evaluator.RankingEvaluation(self.config).evaluate(
          model, params, data, mesh, rules))
    ev = evaluator.Evaluator(model, mesh, rules, self.pass_config)
    for split in self.splits:
      results[split + SUFFIX] = self._evaluate_split(
          ev, params, data, split, item_critique, item_ood, model.num_items)
    return results

  def _rows(self, data, split: str, item_critique: np.ndarray,
            mask_id: int) -> Iterator[CritiquingRows]:
    for batch in data.eval_batches(split, self.config.batch_size):
      yield remove_target_category(batch, item_critique, mask_id)

  def _evaluate_split(self, ev: evaluator.Evaluator, params, data,
                      split: str, item_critique: np.ndarray,
                      item_ood: np.ndarray, num_items: int
                      ) -> Dict[str, Any]:
    """The split's block (`_group_result`), with `ood` / `in_domain`."""
    mask_id = num_items + 1
    groups = ["all"] + ([OOD, IN_DOMAIN] if self.ood_categories else [])
    counters = np.zeros((len(groups), len(_COUNTERS)), np.float64)
    ood_of_id = np.concatenate([[0], item_ood, [0]]) > 0  # by item id

    def counted(rows_iter: Iterable[CritiquingRows]):
      """Adds each batch's counters (host side of the first pass)."""
      for rows in rows_iter:
        is_ood = ood_of_id[rows.targets.max(axis=1)]
        masks = {"all": np.ones_like(is_ood), OOD: is_ood,
                 IN_DOMAIN: ~is_ood}
        for g, name in enumerate(groups):
          scored = rows.valid & masks[name]
          counters[g] += [scored.sum(), rows.removed[scored].sum(),
                          (rows.skipped & masks[name]).sum(),
                          (scored & (rows.data_critique > 0)).sum()]
        yield rows

    counts = item_ood if self.ood_categories else None

    def run(critique_of, with_counters=False):
      rows_iter = self._rows(data, split, item_critique, mask_id)
      if with_counters:
        rows_iter = counted(rows_iter)
      return ev.evaluate(params, (critiqued_batch(r, critique_of(r))
                                  for r in rows_iter), counts)

    raw = {NO_CRITIQUE: run(lambda r: np.zeros_like(r.category_critique),
                            with_counters=True),
           CATEGORY_CRITIQUE: run(lambda r: r.category_critique)}
    counters = _sum_across_processes(counters)
    # Every process sees the same total, so all take the same branch.
    if self.data_critiques and counters[0, _COUNTERS.index(
        "with_data_critique")] > 0:
      raw[DATA_CRITIQUE] = run(lambda r: r.data_critique)
    out = self._group_result(raw, None, counters[0])
    for g, name in enumerate(groups[1:], start=1):
      out[name] = self._group_result(raw, _GROUP_LABELS[name], counters[g])
    return out

  def _group_result(self, raw: Mapping[str, Mapping[str, Any]],
                    label: Optional[str], counts: np.ndarray
                    ) -> Dict[str, Any]:
    """One group's block: the variants' metrics, lifts and counters."""
    out: Dict[str, Any] = {}
    for variant, res in raw.items():
      if label is not None:
        res = res.get("by_frequency", {}).get(label, {"num_users": 0})
      res = {k: v for k, v in res.items()
             if k not in ("by_frequency", "frequency_buckets")}
      out[variant] = res
    names = metrics.metric_names(self.config.ks)
    out.update(_lifts(out[NO_CRITIQUE], out[CATEGORY_CRITIQUE], names,
                      "lift_"))
    if DATA_CRITIQUE in out:
      out.update(_lifts(out[NO_CRITIQUE], out[DATA_CRITIQUE], names,
                        "data_lift_"))
    users, removed, skipped, with_data = (
        counts[_COUNTERS.index(c)] for c in _COUNTERS)
    out["num_users"] = int(users)
    out["removed_items_mean"] = float(removed / users) if users else None
    out["skipped_no_category"] = int(skipped)
    if DATA_CRITIQUE in out:
      out["data_critique_missing"] = int(users - with_data)
    return out

  # -- report ----------------------------------------------------------------

  def format_results(self, step: int, results: Mapping[str, Any]
                     ) -> List[str]:
    """The ranking lines, then per critiquing split and group one line per
    variant and one with the lifts and counters."""
    ranking = {k: v for k, v in results.items() if not k.endswith(SUFFIX)}
    lines = (evaluator.RankingEvaluation(self.config).format_results(
        step, ranking) if ranking else [])
    ks = self.config.ks
    keys = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    for split, res in results.items():
      if not split.endswith(SUFFIX):
        continue
      blocks = [(split, res)] + [(f"{split} {g}", res[g])
                                 for g in (OOD, IN_DOMAIN) if g in res]
      for name, block in blocks:
        variants = {f"{name} {v}": block[v] for v in
                    (NO_CRITIQUE, CATEGORY_CRITIQUE, DATA_CRITIQUE)
                    if v in block}
        lines += evaluator.result_lines(
            step, variants, keys, lambda r: f"{r.get('num_users')} users")
        lines.append(f"[eval step {step}] {name}: " + _summary(block, ks))
    return lines


def _summary(block: Mapping[str, Any], ks: Sequence[int]) -> str:
  def fmt(v):
    return "n/a" if v is None else f"x{v:.3f}"
  k = 10 if 10 in ks else ks[-1]
  parts = [f"lift NDCG@{k} {fmt(block.get(f'lift_NDCG@{k}'))}",
           f"HR@{k} {fmt(block.get(f'lift_HR@{k}'))}"]
  if f"data_lift_NDCG@{k}" in block:
    parts.append(f"data critique lift NDCG@{k} "
                 f"{fmt(block.get(f'data_lift_NDCG@{k}'))}")
  removed = block.get("removed_items_mean")
  parts.append("removed " + ("n/a" if removed is None else f"{removed:.2f}")
               + " items/user")
  parts.append(f"{block.get('num_users')} users, "
               f"{block.get('skipped_no_category')} skipped (no category)")
  if "data_critique_missing" in block:
    parts.append(f"{block['data_critique_missing']} without a data critique")
  return "; ".join(parts)
