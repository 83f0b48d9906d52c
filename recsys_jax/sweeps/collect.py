"""The sweep's table: per point, final and best validation metric and the test
metrics at the best validation step (Markdown and CSV in the sweep dir).

Numbers come from the evaluation files the trainer writes at every
`EVAL_EVERY` steps and at the end (`run_dir.evaluations`). The best step of a
point is the step of its highest validation value (the earliest of ties);
test metrics are read from that same step's file, so selection never looks
at test. When that file has no test split (EvalConfig.splits without it),
the test cells stay empty and a note says how to evaluate the checkpoint of
that step, if the run kept it.
"""

import csv
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

from recsys_jax.sweeps import grid as grid_lib
from recsys_jax.sweeps import run_dir
from recsys_jax.sweeps import runner

MARKDOWN_FILE = "results.md"
CSV_FILE = "results.csv"


@dataclasses.dataclass(frozen=True)
class Selection:
  """What the table reports: the selection metric, splits, test metrics."""
  metric: str = "NDCG@10"
  validation_split: str = "validation"
  test_split: str = "test"
  test_metrics: Sequence[str] = ("NDCG@10", "HR@10")

  def test_columns(self) -> List[str]:
    """The selection metric first, then the others, each once."""
    return list(dict.fromkeys([self.metric, *self.test_metrics]))


@dataclasses.dataclass
class Row:
  """One point of the table."""
  point: grid_lib.Point
  model_dir: str
  status: str
  evals: int = 0
  final_step: Optional[int] = None
  val_final: Optional[float] = None
  best_step: Optional[int] = None
  val_best: Optional[float] = None
  test_at_best: Dict[str, Optional[float]] = dataclasses.field(
      default_factory=dict)
  rank: Optional[int] = None
  test_split_at_best: bool = False


def _status(model_dir: str, train_steps: Optional[int], evals: int) -> str:
  if train_steps is not None and run_dir.is_finished(model_dir, train_steps):
    return "finished"
  state = run_dir.read_status(model_dir).get("state")
  if state in ("running", "failed", "interrupted"):
    return state
  return "partial" if evals else "not started"


def collect_row(point: grid_lib.Point, model_dir: str,
                train_steps: Optional[int], sel: Selection) -> Row:
  """Reads one point's evaluations."""
  evals = run_dir.evaluations(model_dir)
  row = Row(point, model_dir, _status(model_dir, train_steps, len(evals)),
            evals=len(evals))
  val = {step: run_dir.metric(res, sel.validation_split, sel.metric)
         for step, res in evals.items()}
  val = {s: v for s, v in val.items() if v is not None}
  if not val:
    return row
  row.final_step = max(val)
  row.val_final = val[row.final_step]
  row.best_step = min(val, key=lambda s: (-val[s], s))
  row.val_best = val[row.best_step]
  best = evals[row.best_step]
  row.test_split_at_best = isinstance(best.get(sel.test_split), dict)
  row.test_at_best = {m: run_dir.metric(best, sel.test_split, m)
                      for m in sel.test_columns()}
  return row


def metric_names(rows: Sequence[Row], split: str) -> List[str]:
  """The numeric metrics of `split` in the first evaluation file found."""
  for r in rows:
    for results in run_dir.evaluations(r.model_dir).values():
      res = results.get(split)
      if isinstance(res, dict):
        return sorted(k for k, v in res.items() if isinstance(v, (int, float))
                      and not isinstance(v, bool) and k != "num_users")
  return []


def rank_rows(rows: Sequence[Row]) -> Optional[Row]:
  """Ranks rows by best validation value (1 = best); returns the best row."""
  ranked = sorted((r for r in rows if r.val_best is not None),
                  key=lambda r: -r.val_best)
  for i, r in enumerate(ranked, 1):
    r.rank = i
  return ranked[0] if ranked else None


def columns(axes: Sequence[grid_lib.Axis], sel: Selection) -> List[str]:
  v = f"{sel.validation_split} {sel.metric}"
  return (["point"] + [a.name for a in axes]
          + ["status", "evals", "final step", f"{v} final", "best step",
             f"{v} best"]
          + [f"{sel.test_split} {m} at best step" for m in sel.test_columns()]
          + ["rank"])


def _cells(row: Row, axes: Sequence[grid_lib.Axis], sel: Selection,
           fmt) -> List[str]:
  values = dict(row.point.bindings)
  return ([row.point.name] + [values.get(a.name, "") for a in axes]
          + [row.status, str(row.evals), fmt(row.final_step),
             fmt(row.val_final), fmt(row.best_step), fmt(row.val_best)]
          + [fmt(row.test_at_best.get(m)) for m in sel.test_columns()]
          + [fmt(row.rank)])


def _short(value) -> str:
  if value is None:
    return "–"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def _full(value) -> str:
  return "" if value is None else repr(value) if isinstance(
      value, float) else str(value)


def _md_escape(text: str) -> str:
  return text.replace("|", "\\|")


def test_notes(rows: Sequence[Row], sel: Selection,
               eval_commands: Dict[str, List[str]]) -> List[str]:
  """How to get test numbers where the best step's file has none."""
  notes = []
  for r in rows:
    if r.best_step is None or r.test_split_at_best:
      continue
    where = (f"{r.point.name}: no {sel.test_split} split in "
             f"eval/eval_step{r.best_step}.json")
    if run_dir.has_checkpoint(r.model_dir, r.best_step):
      command = eval_commands.get(r.point.name)
      notes.append(f"{where}; evaluate its checkpoint: "
                   + (runner.shell_line(command + [
                       f"--gin.CHECKPOINT_STEP={r.best_step}",
                       "--gin.evaluation.EvalConfig.splits="
                       f"{(sel.validation_split, sel.test_split)!r}"], {})
                      if command else f"CHECKPOINT_STEP={r.best_step}"))
    else:
      notes.append(f"{where}, and checkpoint_{r.best_step} is not kept; "
                   "rerun with test in EvalConfig.splits, or with "
                   "checkpoint_every = EVAL_EVERY and enough keep_checkpoints")
  return notes


def write_tables(rows: Sequence[Row], axes: Sequence[grid_lib.Axis],
                 sel: Selection, sweep_dir: str,
                 notes: Sequence[str] = ()) -> List[str]:
  """Writes results.md and results.csv into the sweep dir; their paths."""
  header = columns(axes, sel)
  best = min((r for r in rows if r.rank is not None), key=lambda r: r.rank,
             default=None)
  md = [f"# Sweep {os.path.basename(os.path.normpath(sweep_dir))}", "",
        f"Selected by {sel.validation_split} {sel.metric} only: each point's "
        f"best step is where its {sel.validation_split} {sel.metric} is "
        f"highest, its {sel.test_split} columns are read at that step, and "
        "rank orders the points by that best value.", ""]
  if best is not None:
    md += [f"Best point: **{best.point.name}** ({sel.validation_split} "
           f"{sel.metric} {best.val_best:.4f} at step {best.best_step}).", ""]
  md += ["| " + " | ".join(map(_md_escape, header)) + " |",
         "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    cells = [_md_escape(c) for c in _cells(r, axes, sel, _short)]
    if r is best:
      cells[0] = f"**{cells[0]}**"
    md.append("| " + " | ".join(cells) + " |")
  if notes:
    md += ["", "Notes:", ""] + [f"- {_md_escape(n)}" for n in notes]
  md_path = os.path.join(sweep_dir, MARKDOWN_FILE)
  csv_path = os.path.join(sweep_dir, CSV_FILE)
  for path, write in ((md_path, lambda f: f.write("\n".join(md) + "\n")),
                      (csv_path, lambda f: _write_csv(f, header, rows, axes,
                                                      sel))):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
      write(f)
    os.replace(tmp, path)
  return [md_path, csv_path]


def _write_csv(f, header, rows, axes, sel):
  w = csv.writer(f)
  w.writerow(header)
  for r in rows:
    w.writerow(_cells(r, axes, sel, _full))


def summary(row: Row, sel: Selection) -> str:
  """One line: best and final validation, test at best."""
  if row.val_best is None:
    return f"no {sel.validation_split} {sel.metric} found"
  tests = ", ".join(f"{m} {_short(v)}" for m, v in row.test_at_best.items())
  return (f"{sel.validation_split} {sel.metric} best {row.val_best:.4f} "
          f"(step {row.best_step}), final {row.val_final:.4f} (step "
          f"{row.final_step}); {sel.test_split} at best: {tests}")
