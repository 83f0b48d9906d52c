"""RESULTS.md sections of the records kept beside the throughput rounds:
the output-layer change (before / after), packed vs padded quality, time to
quality, the exact commands and the million-item run."""

import math
import os
import statistics
from typing import Any, Dict, List, Sequence

from benchmarks.common.results import fmt
from benchmarks.common.results import load

# The record of the output-layer change (profiling-driven; now
# `recsys_jax.model_lib.losses.tied_softmax_cross_entropy`): the runs that timed the
# project model before it against the rewritten head, copied out of their
# round files so that run_all.sh (which clears *_round*.json) keeps them.
HEAD_CHANGE_RECORD = "output_layer_change_before_after.json"


def head_change_record(round_files: Sequence[str]) -> Dict[str, Any]:
  """The before/after parts of train_throughput round files that hold a
  `proposed_head_modes` key (written by the former --compare_proposed_head)."""
  runs = []
  for path in round_files:
    r = load(path)
    if not r or not r.get("proposed_head_modes"):
      continue
    runs.append({
        "source": os.path.basename(path),
        "machine": r.get("machine", {}),
        "sizes": r.get("sizes"), "data": r.get("data"),
        "before": {m: r["modes"][m] for m in r["proposed_head_modes"]
                   if m in r.get("modes", {})},
        "after": r["proposed_head_modes"],
        "max_abs_diff_loss_and_grads": {
            k.rsplit("_", 1)[-1]: v for k, v in r.items()
            if k.startswith("proposed_head_max_abs_diff_")},
        "matmul_peak": r.get("matmul_peak")})
  return {"benchmark": "output_layer_change_before_after",
          "description": (
              "before: the project's Bert4RecModel 'full' loss as it was "
              "(logits [B, P, V] + masked_softmax_cross_entropy + argmax); "
              "after: the rewritten output layer, then an experiment in "
              "benchmarks/train_throughput.py (ProposedHeadBert4RecModel), "
              "now recsys_jax.model_lib.losses.tied_softmax_cross_entropy. Timed in "
              "the same process, alternating one window each."),
          "runs": runs}


def head_change_section(results_dir: str,
                         ours_train: List[Dict[str, Any]]) -> List[str]:
  """RESULTS.md's before/after table of the output-layer change."""
  record = load(os.path.join(results_dir, HEAD_CHANGE_RECORD)) or {}
  runs = list(record.get("runs", []))
  seen = {r.get("machine", {}).get("date_utc") for r in runs}
  for r in ours_train:  # older round files still holding the experiment
    if (r.get("proposed_head_modes")
        and r.get("machine", {}).get("date_utc") not in seen):
      runs.append({"machine": r.get("machine", {}),
                   "before": r.get("modes", {}),
                   "after": r["proposed_head_modes"]})
  rows = []
  for mode in ("staged_padded", "staged_packed"):
    have = [r for r in runs if mode in r.get("after", {})
            and mode in r.get("before", {})]
    if not have:
      continue
    before = statistics.median(r["before"][mode]["step_time_s"] for r in have)
    after = statistics.median(r["after"][mode]["step_time_s"] for r in have)
    speedups = [x for r in have
                for x in r["after"][mode].get("speedup_per_window", [])]
    mfu_b = statistics.median(r["before"][mode]["mfu"] for r in have)
    mfu_a = statistics.median(r["after"][mode]["mfu"] for r in have)
    rows.append(
        f"| {mode} | {fmt(before, 3)} | {fmt(after, 3)} | "
        f"{fmt(statistics.median(speedups), 2) + 'x' if speedups else 'n/a'}"
        f" | {fmt(100 * mfu_b, 1)}% | {fmt(100 * mfu_a, 1)}% | {len(have)} |")
  if not rows:
    return []
  dates = sorted({r.get("machine", {}).get("date_utc", "?") for r in runs})
  loads = [x for r in runs for x in
           (r.get("machine", {}).get("load_average_start", [None])[:1])
           if x is not None]
  return [
      "## Record: the output-layer change, before / after", "",
      "Profiling the training step (`train_throughput.py --profile_dir`) "
      "found its costliest op to be a transposed copy of the `[B*P, V]` "
      "logits gradient in the tied output layer. The rewrite (output bias folded into "
      "the tied matmul as an extra column, table gradient as (q^T g)^T "
      "without a transposed copy of the logits gradient, target logit "
      "gathered, no argmax pass) is now project code, "
      "`recsys_jax.model_lib.losses.tied_softmax_cross_entropy` (same loss and "
      "gradients: tests/test_losses.py). These rows are the measurements "
      "that motivated it, taken before the change with the rewrite as a "
      "benchmark-only experiment, alternating one window each in the same "
      f"process ({', '.join(dates)}; load average at start "
      f"{', '.join(f'{x:.1f}' for x in loads)}, so only the paired ratio is"
      f" meaningful; source: `benchmarks/results/{HEAD_CHANGE_RECORD}`). "
      "The throughput tables above measure the project code at each round"
      " file's date (`machine.date_utc`); rounds after the change include "
      "it.",
      "",
      "| mode | before: s/step | after: s/step | speedup (median of paired "
      "windows) | MFU before | MFU after | runs |",
      "|---|---|---|---|---|---|---|"] + rows + [""]


def quality_section(ours: List[Dict[str, Any]],
                     peers: List[Dict[str, Any]]) -> List[str]:
  """Time-to-quality runs: ours (ours_quality_*.json, time_to_quality.py)
  and RecBole's (recbole_quality_*.json, recbole_peer.py --quality_model)."""
  if not ours and not peers:
    return []

  def minutes(t):
    return "not reached" if t is None else fmt(t / 60, 1) + " min"

  def our_name(r):
    date = r.get("machine", {}).get("date_utc", "")[:10]
    name = (f"recsys_jax {os.path.basename(r.get('gin_file', ''))}"
            + (f" ({date})" if date else ""))
    if r.get("num_processes", 1) > 1:
      name += f", {r['num_processes']} pinned processes, local accumulation"
    return name

  rows = []
  for r in ours + peers:
    final = r.get("final_test", {})
    hr = final.get("hr@10", final.get("hit@10"))
    if r.get("system") == "recsys_jax":
      name = our_name(r)
      if r.get("stop_reason") == "target reached":
        name += " (stopped at the target)"
      trained = r.get("points", [{}])[-1].get("train_s")
      epochs = None
    else:
      name, trained, epochs = r.get("peer"), r.get("train_s"), r.get("epochs")
    rows.append(
        f"| {name} | {fmt(r.get('budget_s'))} | {fmt(trained)} | "
        f"{fmt(epochs, 2)} | {fmt(hr, 4)} | {fmt(final.get('ndcg@10'), 4)}"
        f" | {fmt(r.get('best_test_ndcg@10'), 4)} | "
        f"{minutes(r.get('time_to_target_train_s'))} | "
        f"{minutes(r.get('time_to_target_wall_s'))} | "
        f"{fmt(r.get('machine', {}).get('load_average_start', [None])[0], 1)}"
        " |")
  target = (ours + peers)[0].get("target_ndcg@10", 0.040)
  equal = []
  for peer in peers:
    budget = peer.get("budget_s")
    for r in ours:
      within = [p for p in r.get("points", [])
                if budget and p.get("train_s", math.inf) <= budget]
      if not within:
        continue
      p = within[-1]
      stopped = (", stopped at the target" if p is r["points"][-1] and
                 r.get("stop_reason") == "target reached" else "")
      final = peer.get("final_test", {})
      equal.append(
          f"| {fmt(budget)} | {peer.get('peer')}: {fmt(final.get('hit@10'), 4)}"
          f" / {fmt(final.get('ndcg@10'), 4)} | {our_name(r)} (step "
          f"{p.get('step')}, {fmt(p.get('train_s'))} s{stopped}): "
          f"{fmt(p['test'].get('hr@10'), 4)} / "
          f"{fmt(p['test'].get('ndcg@10'), 4)} |")
  if equal:
    equal = ["Equal training budget: RecBole's result at the end of its "
             "budget against our last evaluation within the same number of "
             "training seconds (test HR@10 / NDCG@10).", "",
             "| training s | RecBole | ours |", "|---|---|---|"] + equal + [""]
  return [
      "## Time to quality (Beauty test split)", "",
      f"Time until test NDCG@10 >= {target:.3f} (full ranking over all items,"
      " history excluded). Training s: ours = wall-clock from launching "
      "`python -m recsys_jax.train` less the evaluations (start-up and "
      "compilation included); RecBole = `_train_epoch` time over its "
      "DataLoader (start-up and dataset build excluded). Wall: ours from "
      "launch, evaluations included; RecBole from its first batch. Budgets "
      "are wall seconds (ours) and training seconds (RecBole).", "",
      "| run | budget s | trained s | epochs | final test HR@10 | final "
      "test NDCG@10 | best test NDCG@10 | to target (training) | to target "
      "(wall) | load at start |",
      "|---|---|---|---|---|---|---|---|---|---|"] + rows + [""] + equal


def packing_quality_section(results_dir: str) -> List[str]:
  """Packed vs padded at equal epochs (packing_quality.json), if recorded."""
  quality = load(os.path.join(results_dir, "packing_quality.json"))
  if not quality:
    return []
  qrows = []
  for arm in quality.get("arms", []):
    qrows.append(
        f"| {arm['name']} | {arm['rows_per_batch']} | {arm['steps']} | "
        f"{fmt(arm['masked_accuracy']['mean'], 4)} +- "
        f"{fmt(arm['masked_accuracy']['std'], 4)} | "
        f"{fmt(arm['ndcg@10']['mean'], 4)} +- "
        f"{fmt(arm['ndcg@10']['std'], 4)} | "
        f"{fmt(arm['hr@10']['mean'], 4)} +- {fmt(arm['hr@10']['std'], 4)}"
        f" | {fmt(arm['train_seconds']['mean'], 1)} |")
  return ["## Packed vs padded at equal epochs", "",
          quality.get("description", ""), "",
          "| arm | rows/batch | steps | masked acc (held-out rows) | "
          "val NDCG@10 | val HR@10 | train s |",
          "|---|---|---|---|---|---|---|"] + qrows + [""]


def commands_section(timed: List[Dict[str, Any]]) -> List[str]:
  """The exact commands of the measurement processes, in the order they ran."""
  timed = sorted(timed, key=lambda r: r.get("machine", {}).get("date_utc", ""))
  commands = [r["machine"]["command"] for r in timed
              if r.get("machine", {}).get("command")]
  if not commands:
    return []
  return ["## Exact commands", "",
          "Reproduce with `bash benchmarks/run_all.sh` (settings in its "
          "header, e.g. `ROUNDS=3`; they show as the flags below). The "
          "measurement processes of these results, in the order they "
          "ran:", "", "```"] + commands + ["```", ""]


def million_items_section(results_dir: str) -> List[str]:
  """The million-item run's section (its own run, kept in RESULTS.md)."""
  million = load(os.path.join(results_dir, "million_items.json"))
  if not million:
    return []
  from benchmarks import million_items  # pylint: disable=g-import-not-at-top
  return [million_items.results_section(million), ""]
