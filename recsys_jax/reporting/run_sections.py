"""Sections of the report about the runs themselves: what was read, the
training curves (TensorBoard scalars), validation vs test over the
evaluation steps, and the configuration."""

from typing import List, Sequence

from recsys_jax.reporting import columns as columns_lib
from recsys_jax.reporting import eval_results as er
from recsys_jax.reporting import figures
from recsys_jax.reporting import gin_config
from recsys_jax.reporting import html
from recsys_jax.reporting import run_data

Cell = html.Cell
TRAIN_PREFIX = "train/"
# Throughput last: it says how fast, not how well.
_LAST_TAGS = ("steps_per_sec", "sequences_per_sec")
_SPLIT_STYLES = {"validation": "-", "test": "--"}


def overview_section(runs: Sequence[run_data.Run]) -> str:
  header = [Cell(h) for h in ("run", "directory", "main evaluation",
                              "other evaluations", "event files",
                              "config.gin", "predict output")]
  rows = []
  for run in runs:
    steps = ("step " if len(run.history) == 1 else "steps ") + ", ".join(
        str(e.step) for e in run.history)
    others = "; ".join(
        f"{n} (step {run.latest_of(n).step})" for n in run.evals
        if n != run.main_eval) or "—"
    predict = "; ".join(f"{p.split} · step {p.step}"
                        for p in run.predictions) or "—"
    rows.append([
        Cell(run.label, "name"), Cell(run.model_dir, "name"),
        Cell(f"{run.main_eval} at {steps}"), Cell(others),
        Cell(str(len(run.scalars.files))),
        Cell("yes" if run.config_text is not None else "missing"),
        Cell(predict)])
  parts = [html.table(header, rows)]
  problems = [f"{run.label}: {p}" for run in runs for p in run.problems]
  if problems:
    parts += [html.paragraph("Read with problems:"),
              html.bullet_list(problems, "problems")]
  return html.section("runs", "Runs", parts)


def _train_tags(runs: Sequence[run_data.Run]) -> List[str]:
  tags = er.ordered_union([run.scalars.tags(TRAIN_PREFIX) for run in runs])
  names = [t[len(TRAIN_PREFIX):] for t in tags]
  first = [n for n in ("loss",) if n in names]
  last = [n for n in _LAST_TAGS if n in names]
  middle = [n for n in names if n not in first and n not in last]
  return [TRAIN_PREFIX + n for n in first + middle + last]


def training_section(runs: Sequence[run_data.Run]) -> str:
  title = "Training curves"
  tags = _train_tags(runs)
  notes = []
  for run in runs:
    if not run.scalars.files:
      notes.append(f"{run.label}: no event files "
                   f"({run.model_dir}/{'events.out.tfevents.*'})")
    elif not run.scalars.tags(TRAIN_PREFIX):
      notes.append(f"{run.label}: its event files hold no {TRAIN_PREFIX}* "
                   "scalars (an evaluation-only run?)")
  parts = [html.not_available(n) for n in notes]
  if not tags:
    return html.section("training", title, parts)
  panels = []
  for tag in tags:
    lines = []
    for i, run in enumerate(runs):
      points = run.scalars.series.get(tag)
      if points:
        lines.append(figures.Line(run.label, [s for s, _ in points],
                                  [v for _, v in points],
                                  figures.run_color(i)))
    name = tag[len(TRAIN_PREFIX):]
    panels.append(figures.LinePanel(name, name, lines))
  parts.insert(0, html.paragraph(
      f"Scalars {TRAIN_PREFIX}* of the runs' TensorBoard event files, as the "
      "trainer logs them every log_every steps (a window's mean).", "meta"))
  parts.insert(1, html.image(figures.line_panels(
      panels, title="Training curves", xlabel="training step"),
      "training curves"))
  return html.section("training", title, parts)


def _history_points(run: run_data.Run, split: str, metric: str):
  xs, ys = [], []
  for ev in run.history:
    model = er.organize(ev.results).get(split)
    value = er.scalar_metrics(model.model if model else None).get(metric)
    if value is not None:
      xs.append(ev.step)
      ys.append(value)
  return xs, ys


def _best_validation_rows(runs, metric: str) -> List[List[Cell]]:
  rows = []
  lower = er.lower_is_better(metric)
  for run in runs:
    val = dict(zip(*_history_points(run, "validation", metric)))
    test = dict(zip(*_history_points(run, "test", metric)))
    if not val:
      continue
    best = (min if lower else max)(val, key=val.get)
    last = max(test) if test else None
    rows.append([Cell(run.label, "name"), Cell(str(len(run.history))),
                 Cell(str(best)), Cell(html.number(val[best]), "num"),
                 Cell(html.number(test.get(best)), "num"),
                 Cell(str(last) if last is not None else "—"),
                 Cell(html.number(test.get(last)), "num")])
  return rows


def validation_test_section(runs: Sequence[run_data.Run]) -> str:
  title = "Validation vs test over steps"
  splits = columns_lib.all_splits(runs)
  names = er.ordered_union([
      list(er.scalar_metrics(b.model))
      for run in runs for b in er.organize(run.latest.results).values()])
  headline = er.headline_metrics(names)
  if not headline:
    return html.section("validation_test", title, [html.not_available(
        "the main evaluation holds no model metrics to follow over steps")])
  multi = len(runs) > 1
  panels = []
  for metric in headline:
    lines, hlines = [], []
    for i, run in enumerate(runs):
      for split in splits:
        xs, ys = _history_points(run, split, metric)
        if xs:
          label = f"{run.label} · {split}" if multi else split
          lines.append(figures.Line(label, xs, ys, figures.run_color(i),
                                    _SPLIT_STYLES.get(split, "-.")))
    ref_split = er.report_split(splits)
    for c in columns_lib.split_columns(runs, ref_split):
      value = er.scalar_metrics(c.entry).get(metric)
      if c.baseline and value is not None:
        hlines.append(figures.HLine(f"{c.label} ({ref_split})", value,
                                    c.color))
    panels.append(figures.LinePanel(metric, metric, lines, hlines))
  one_step = [r.label for r in runs if len(r.history) == 1]
  parts = [html.paragraph(
      "The main evaluation at every step it ran (eval/<name>_step<N>.json): "
      "validation solid, test dashed; baselines dotted. Select on "
      "validation, report test at that step.", "meta"),
      html.image(figures.line_panels(
          panels, title="Validation vs test", xlabel="training step"),
          "validation vs test over steps")]
  if one_step:
    parts.append(html.paragraph(
        f"{', '.join(one_step)}: evaluated at one step only (set "
        "EVAL_EVERY below TRAIN_STEPS for a curve).", "caption"))
  rows = _best_validation_rows(runs, headline[0])
  if rows:
    parts.append(html.table(
        [Cell(h) for h in ("run", "evaluations", "best validation step",
                           f"validation {headline[0]}",
                           f"test {headline[0]} there", "last step",
                           f"test {headline[0]} last")], rows))
  return html.section("validation_test", title, parts)


def config_section(runs: Sequence[run_data.Run]) -> str:
  parts = []
  with_config = [r for r in runs if r.config_text is not None]
  diffs = gin_config.differences([r.config_text for r in with_config])
  if diffs:
    header = [Cell("binding")] + [Cell(r.label) for r in with_config]
    rows = [[Cell(name, "name")] + [Cell("—" if v is None else v, "name")
                                     for v in values]
            for name, values in diffs]
    parts += [html.heading("Differences"), html.table(header, rows)]
  elif len(with_config) > 1:
    parts.append(html.paragraph("The configs are identical.", "meta"))
  for run in runs:
    if run.config_text is None:
      parts.append(html.not_available(
          f"{run.label}: no {run_data.CONFIG_FILE} in {run.model_dir}"))
      continue
    n = len(run.config_text.splitlines())
    parts.append(html.details(
        f"{run.label}: {run_data.CONFIG_FILE} ({n} lines)",
        html.preformatted(run.config_text)))
  return html.section("config", "Configuration", parts)

