"""Sections of the report built from the evaluation results: the metrics
table, beyond-accuracy figures, metrics by target frequency, critiquing and
the other named evaluations. Each returns HTML, with a 'not available' note
in place of whatever the runs lack."""

from typing import List, Optional, Sequence

from recsys_jax.reporting import beyond_accuracy
from recsys_jax.reporting import columns as columns_lib
from recsys_jax.reporting import eval_results as er
from recsys_jax.reporting import figures
from recsys_jax.reporting import gin_config
from recsys_jax.reporting import html
from recsys_jax.reporting import run_data

Cell = html.Cell


def _metric_rows(cols: Sequence[columns_lib.Column], names: Sequence[str]
                 ) -> tuple:
  """(rows, row classes): one row per metric, the best column in bold
  (accuracy metrics only; counts and beyond-accuracy are not ranked)."""
  rows, classes = [], []
  for name in names:
    values = [er.scalar_metrics(c.entry).get(name) for c in cols]
    count = er.is_count(name)
    best = None
    present = [v for v in values if v is not None]
    if len(present) > 1 and not count and not er.is_beyond_accuracy(name):
      best = (min if er.lower_is_better(name) else max)(present)
    row = [Cell(name, "name")]
    for c, v in zip(cols, values):
      row.append(Cell(html.number(v, count), "num",
                      "baseline" if c.baseline else "",
                      "best" if v is not None and v == best else ""))
    rows.append(row)
    classes.append("count" if count else "")
  return rows, classes


def _ordered_metrics(cols: Sequence[columns_lib.Column]) -> List[str]:
  names = er.ordered_union([list(er.scalar_metrics(c.entry)) for c in cols])
  accuracy = [n for n in names
              if not er.is_count(n) and not er.is_beyond_accuracy(n)]
  beyond = [n for n in names if er.is_beyond_accuracy(n)]
  counts = [n for n in names if er.is_count(n)]
  return accuracy + beyond + counts


def _header(cols: Sequence[columns_lib.Column], first: str = "metric"):
  return [Cell(first)] + [
      Cell(f"{c.label} (baseline)" if c.baseline else
           f"{c.label} · step {c.step}", "baseline" if c.baseline else "")
      for c in cols]


def _caption(cols: Sequence[columns_lib.Column]) -> str:
  """The protocols of the columns, skipped baselines and why, and how each
  baseline was fitted."""
  found = er.ordered_union([[f"{k}: {v}" for k, v in
                             er.text_fields(c.entry).items()
                             if k != er.SKIPPED] for c in cols])
  for c in cols:
    if isinstance(c.entry.get(er.SKIPPED), str):
      found.append(f"{c.label} skipped: {c.entry[er.SKIPPED]}")
    info = c.entry.get(er.BASELINE_INFO)
    if isinstance(info, dict) and info:
      found.append(f"{c.label}: " + ", ".join(f"{k}={v}"
                                              for k, v in info.items()))
  return "; ".join(found)


def metrics_section(runs: Sequence[run_data.Run]) -> str:
  parts = [html.paragraph(
      "Each run's latest main evaluation ("
      + "; ".join(f"{r.label}: {r.latest.path}" for r in runs)
      + "). Baselines are ranked through the same protocol; the best value "
      "of each accuracy row is bold (lowest for loss and perplexity).",
      "meta")]
  parts += _split_tables(runs, None)
  if len(parts) == 1:
    parts.append(html.not_available(
        "no split of the evaluations holds metrics of a model or baseline "
        "(only critiquing results?)"))
  return html.section("metrics", "Metrics against the baselines", parts)


# ---------------------------------------------------------------- beyond


# Beyond-accuracy metrics read against the held-out items' value (the
# evaluator's `metrics.BeyondAccuracy`), drawn as a reference line.
_TARGET_REFERENCE = (("popularity_percentile@", "target_popularity_percentile"),
                     ("popularity@", "target_popularity"))


def _beyond_panels(cols, names: Sequence[str], split: str):
  """One bar panel per beyond-accuracy metric (4 at most): coverage@K,
  popularity@K against the targets' popularity, and any other. Counts
  (covered_items@K) and the targets' own values are in the table only."""
  panels = []
  for name in names:
    if name.startswith(("target_", "covered_items")) or len(panels) == 4:
      continue
    ref_key = next((ref for prefix, ref in _TARGET_REFERENCE
                    if name.startswith(prefix)), None)
    ref = next((er.scalar_metrics(c.entry).get(ref_key) for c in cols
                if er.scalar_metrics(c.entry).get(ref_key) is not None),
               None) if ref_key else None
    panels.append(figures.BarPanel(
        title=name, ylabel=name, categories=[split],
        bars=[figures.Bars(c.label, [er.scalar_metrics(c.entry).get(name)],
                           c.color, c.hatch) for c in cols],
        reference=ref, reference_label="held-out items" if ref else ""))
  return panels


def _beyond_from_eval(runs, split) -> List[str]:
  cols = columns_lib.split_columns(runs, split)
  names = [n for n in _ordered_metrics(cols) if er.is_beyond_accuracy(n)]
  panels = _beyond_panels(cols, names, split)
  if not panels:
    return []
  rows, classes = _metric_rows(cols, names)
  return [html.heading(f"From the evaluation ({split})"),
          html.paragraph(
              "coverage@K: share of the catalogue in any user's top K; "
              "popularity@K: mean training count of the recommended items "
              "(popularity_percentile@K: their mean popularity percentile), "
              "the dashed line the held-out items' own; far above it, a "
              "model leans on popular items.", "meta"),
          html.image(figures.bar_panels(
              panels, title=f"Beyond accuracy on {split} (eval JSON)"),
              f"beyond-accuracy metrics on {split}"),
          html.table(_header(cols), rows, classes)]


def _beyond_from_predictions(runs, split, skip=()) -> List[str]:
  """Figures and a table from the runs' predict outputs (runs labelled in
  `skip`, whose evaluation has its own numbers, are left out)."""
  results, notes = [], []
  for i, run in enumerate(runs):
    if run.label in skip:
      continue
    output = beyond_accuracy.pick_prediction(run, split)
    if output is None:
      notes.append(f"{run.label}: no predict output in "
                   f"{run.model_dir}/predict/ (python -m recsys_jax.predict "
                   "writes it)")
      continue
    num_items, why = beyond_accuracy.catalogue_size(
        gin_config.data_dir(run.config_text, run.model_dir))
    try:
      b = beyond_accuracy.from_predictions(output, num_items)
    except (beyond_accuracy.NotAvailable, OSError) as e:
      notes.append(f"{run.label}: {e}")
      continue
    if num_items is None:
      notes.append(f"{run.label}: coverage needs the catalogue size: {why}")
    results.append((i, run, b))
  parts = [html.not_available(n) for n in notes]
  if not results:
    return parts
  k = min(b.k for _, _, b in results)
  header = [Cell(h) for h in (
      "run", "split · step", "users", f"distinct items in top {k}",
      "catalogue", f"coverage@{k}", "mean popularity (recommended)",
      "mean popularity (held-out items)")]
  rows = [[Cell(run.label, "name"), Cell(f"{b.split} · {b.step}"),
           Cell(html.number(b.num_users, True), "num"),
           Cell(html.number(b.distinct_items, True), "num"),
           Cell(html.number(b.num_items, True), "num"),
           Cell(html.number(b.coverage), "num"),
           Cell(html.number(b.mean_popularity), "num"),
           Cell(html.number(b.target_mean_popularity), "num")]
          for _, run, b in results]
  bars_cov = [figures.Bars(run.label, [b.coverage], figures.run_color(i))
              for i, run, b in results]
  bars_pop = [figures.Bars(run.label, [b.mean_popularity],
                           figures.run_color(i)) for i, run, b in results]
  ref = results[0][2]
  if ref.target_mean_popularity is not None:
    bars_pop.append(figures.Bars("held-out items", [
        ref.target_mean_popularity], "#333333", "//"))
  panels = [
      figures.BarPanel(f"catalogue coverage@{k}", f"coverage@{k}",
                       [f"top {k}"], bars_cov),
      figures.BarPanel("mean popularity", "history count of the item",
                       [f"top {k}"], bars_pop)]
  hist = [figures.Line(run.label, [], b.recommended_popularity,
                       figures.run_color(i)) for i, run, b in results]
  if len(ref.target_popularity):
    hist.append(figures.Line("held-out items", [], ref.target_popularity,
                             "#333333", "--"))
  parts += [
      html.heading("From the predict output"),
      html.paragraph(
          "Coverage@K: distinct items in any user's top K over the catalogue "
          "(items of the run's DATA_DIR). Popularity of an item: how often "
          "it occurs in the histories of the predict file's users. "
          "Recommending far more popular items than the held-out ones shows "
          "a popularity bias.", "meta"),
      html.image(figures.bar_panels(
          panels, title="Coverage and popularity of the top-k (predict)"),
          "coverage and mean popularity of recommended items"),
      html.image(figures.popularity_histograms(
          hist, title="Popularity of what is recommended",
          xlabel="item popularity + 1 (history count, log scale)",
          ylabel="share of slots / items"),
          "popularity distribution of recommended items"),
      html.table(header, rows)]
  return parts


def beyond_section(runs: Sequence[run_data.Run]) -> str:
  split = er.report_split(columns_lib.all_splits(runs))
  parts = _beyond_from_eval(runs, split) if split else []
  evaluated = {c.run_label for c in columns_lib.split_columns(runs, split)
               if not c.baseline and any(
                   er.is_beyond_accuracy(n)
                   for n in er.scalar_metrics(c.entry))} if split else set()
  predicted = _beyond_from_predictions(runs, split, evaluated)
  computed = any("<img" in p for p in predicted)
  if parts:  # the eval's own metrics; predict notes would only be noise
    parts += predicted if computed else []
  elif computed:
    parts = predicted
  else:
    parts = [html.not_available(
        "the eval JSON has no coverage/popularity metrics and no run has a "
        "ranking predict output", lead="not evaluated")] + predicted
  return html.section("beyond", "Beyond accuracy: coverage and popularity",
                      parts)


# ------------------------------------------------------------- frequency


def frequency_section(runs: Sequence[run_data.Run]) -> str:
  split = er.report_split(columns_lib.all_splits(runs))
  cols = [c for c in (columns_lib.split_columns(runs, split) if split else [])
          if er.frequency_buckets(c.entry)]
  if not cols:
    return html.section("frequency", "Metrics by target frequency", [
        html.not_available(
            "the evaluations have no by_frequency results (ranking "
            "evaluation with EvalConfig.frequency_buckets, the default "
            "(1, 5, 20); text evaluations have none)")])
  buckets = {c.label: er.frequency_buckets(c.entry) for c in cols}
  labels = er.ordered_union([list(b) for b in buckets.values()])
  metric_names = er.ordered_union(
      [list(m) for b in buckets.values() for m in b.values()])
  headline = er.headline_metrics(metric_names)
  if not headline:
    return html.section("frequency", "Metrics by target frequency", [
        html.not_available("the by_frequency buckets hold user counts only")])
  users = {}
  for label in labels:
    counts = {b[label].get("num_users") for b in buckets.values()
              if label in b}
    users[label] = counts.pop() if len(counts) == 1 else None
  categories = [f"{label}\n({html.number(users[label], True)} users)"
                if users[label] is not None else label for label in labels]
  panels = [figures.BarPanel(
      title=f"{m} by target train count", ylabel=m, categories=categories,
      xlabel="target item's train interactions",
      bars=[figures.Bars(c.label, [buckets[c.label].get(lb, {}).get(m)
                                   for lb in labels], c.color, c.hatch)
            for c in cols]) for m in headline]
  header = [Cell("bucket"), Cell("users")] + [
      Cell(f"{c.label} · {m}", "baseline" if c.baseline else "")
      for m in headline for c in cols]
  rows = []
  for label in labels:
    row = [Cell(label, "name"), Cell(html.number(users[label], True), "num")]
    for m in headline:
      for c in cols:
        row.append(Cell(html.number(buckets[c.label].get(label, {}).get(m)),
                        "num", "baseline" if c.baseline else ""))
    rows.append(row)
  parts = [
      html.paragraph(
          f"{split}: users grouped by how often their held-out item occurs "
          "in the train split (EvalConfig.frequency_buckets). Cold and rare "
          "targets are where a model must beat popularity.", "meta"),
      html.image(figures.bar_panels(
          panels, title=f"Metrics by target frequency ({split})"),
          f"metrics by target frequency on {split}"),
      html.table(header, rows,
                 caption=None if all(u is not None for u in users.values())
                 else "users differ between runs where shown as —")]
  return html.section("frequency", "Metrics by target frequency", parts)


# ------------------------------------------------------------ critiquing


def _critique_blocks(runs) -> List[tuple]:
  """[(run index, run, eval name, step, split, block)] of the latest file of
  every evaluation name that holds critiquing results."""
  found = []
  for i, run in enumerate(runs):
    for name in sorted(run.evals, key=lambda n: n != run.main_eval):
      ev = run.latest_of(name)
      for split, block in er.organize(ev.results).items():
        if block.critiquing is not None:
          found.append((i, run, name, ev.step, split, block.critiquing))
  return found


def critique_section(runs: Sequence[run_data.Run]) -> str:
  found = _critique_blocks(runs)
  title = "Critiquing: lift from a critique"
  if not found:
    return html.section("critiquing", title, [html.not_available(
        "no run has critiquing results (a <split>_critiquing entry: the "
        "FLARE critiquing evaluation, docs/FLARE.md)")])
  multi = len(found) > 1
  lift_keys = er.ordered_union([[k for k in blk if k.startswith("lift_")]
                                for *_, blk in found])
  metric_labels = [k[len("lift_"):] for k in lift_keys]
  bars, group_bars = [], []
  group_names = er.ordered_union([list(er.critique_groups(blk))
                                  for *_, blk in found])
  focus = next((k for k in ("lift_NDCG@10", "lift_HR@10") if k in lift_keys),
               lift_keys[0] if lift_keys else None)
  for i, run, name, step, split, blk in found:
    base = f"{run.label} · {split}" if multi else split
    for prefix, kind, hatch in (("lift_", "category", None),
                                ("data_lift_", "data", "//")):
      if not any(k.startswith(prefix) for k in blk):
        continue
      color = figures.run_color(i)
      bars.append(figures.Bars(
          f"{base}: {kind} critique", [er.lift_value(blk, prefix + m)
                                       for m in metric_labels], color, hatch))
      groups = er.critique_groups(blk)
      if focus and len(group_names) > 1:
        key = prefix + focus[len("lift_"):]
        group_bars.append(figures.Bars(
            f"{base}: {kind} critique",
            [er.lift_value(groups[g], key) if g in groups else None
             for g in group_names], color, hatch))
  panels = [figures.BarPanel("lift by metric", "critique / no critique",
                             metric_labels, bars, reference=1.0)]
  if group_bars:
    panels.append(figures.BarPanel(
        f"{focus} by group", "critique / no critique", group_names,
        group_bars, reference=1.0))
  parts = [html.paragraph(
      "Lift = metric with the critique / metric without it, after the "
      "target's category is removed from the history (1 = no effect, the "
      "dashed line). ood: users whose target category was kept out of "
      "training critiques.", "meta")]
  if bars and metric_labels:
    labels = er.ordered_union([[run.label for _, run, *_ in found]])
    parts.append(html.image(figures.bar_panels(
        panels, title="Critique lift: " + ", ".join(labels), ncols=1),
        "critique lift"))
  variant_metrics = er.ordered_union(
      [list(er.scalar_metrics(blk.get(v))) for *_, blk in found
       for v in er.CRITIQUE_VARIANTS])
  headline = er.headline_metrics(variant_metrics)
  headline += [m for m in ("MRR",) if m in variant_metrics]
  header = [Cell(h) for h in ("run · split", "group", "variant",
                              *headline, "users")]
  rows, classes = [], []
  for _, run, name, step, split, blk in found:
    for group, gblk in er.critique_groups(blk).items():
      where = [Cell(f"{run.label} · {split}", "name"), Cell(group)]
      for variant in er.CRITIQUE_VARIANTS:
        m = er.scalar_metrics(gblk.get(variant))
        if m:
          rows.append(where + [Cell(variant)] + [
              Cell(html.number(m.get(h)), "num") for h in headline] + [
                  Cell(html.number(m.get("num_users"), True), "num")])
          classes.append("")
      for prefix, label in (("lift_", "lift: category"),
                            ("data_lift_", "lift: data")):
        if any(k.startswith(prefix) for k in gblk):
          rows.append(where + [Cell(label)] + [
              Cell(html.number(er.lift_value(gblk, prefix + h)), "num",
                   "best") for h in headline] + [Cell("")])
          classes.append("")
  sources = "; ".join(f"{run.label}: {run.latest_of(name).path}"
                      for _, run, name, *_ in found)
  parts.append(html.table(header, rows, classes,
                          caption=f"Lift rows in bold. From {sources}."))
  return html.section("critiquing", title, parts)


# ------------------------------------------------------- other evaluations


def _split_tables(runs, eval_name: Optional[str]) -> List[str]:
  """One metrics table per split of each run's latest `eval_name`."""
  parts = []
  for split in columns_lib.all_splits(runs, eval_name):
    cols = columns_lib.split_columns(runs, split, eval_name)
    rows, classes = _metric_rows(cols, _ordered_metrics(cols))
    if rows:
      parts += [html.heading(split if eval_name is None
                             else f"{eval_name}: {split}"),
                html.table(_header(cols), rows, classes,
                           caption=_caption(cols) or None)]
  return parts


def other_evaluations_section(runs: Sequence[run_data.Run]) -> str:
  """Named evaluations beside the main one (EVAL_NAME: an export, another
  scoring table, a control such as shuffled histories)."""
  names = er.ordered_union([[n for n in r.evals if n != r.main_eval]
                            for r in runs])
  title = "Other evaluations"
  if not names:
    return html.section("other", title, [html.paragraph(
        "No other named evaluations (eval/<EVAL_NAME>_step<N>.json).",
        "meta")])
  parts = []
  for name in names:
    have = [r for r in runs if name in r.evals]
    tables = _split_tables(have, name)
    if not tables:
      tables = [html.heading(name), html.not_available(
          f"{name}: no metrics outside the critiquing section")]
    parts += tables
  return html.section("other", title, parts)
