"""A sweep from start to table: grid -> checked points -> runs -> results.

`run(options)` is what `python -m recsys_jax.sweep` does (docs/SWEEPS.md):
parse the grid, check every point's train configuration, then list the
commands (`dry_run`), print them for a pod or cluster launcher (`launcher=
'print'`), or run the points not yet finished here (`runner.LocalRunner`),
and write the table (`collect`). Records in the sweep dir: `sweep.json` (the
flags every point shares; a rerun must pass the same), `points.json` (the
grid's points) and each point's `point.json`.
"""

import dataclasses
import os
import re
import shlex
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from recsys_jax.sweeps import collect
from recsys_jax.sweeps import gin_check
from recsys_jax.sweeps import grid as grid_lib
from recsys_jax.sweeps import run_dir
from recsys_jax.sweeps import runner

SWEEP_FILE = "sweep.json"
POINTS_FILE = "points.json"
LAUNCHERS = ("local", "print")
_BINDING = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=\s*(\S.*?)\s*$")


class SweepError(ValueError):
  """A sweep that cannot start, explained in one line."""


@dataclasses.dataclass(frozen=True)
class Options:
  """A sweep's settings; the flags of `python -m recsys_jax.sweep`."""
  grid: str
  sweep_dir: str
  gin_files: Sequence[str]
  gin_bindings: Sequence[str] = ()
  gin_search_paths: Sequence[str] = ()
  parallel: int = 1
  dry_run: bool = False
  collect_only: bool = False
  launcher: str = "local"
  launch_command: str = "launch/local.sh"
  python: str = sys.executable
  pin_cores: bool = True
  gpus_per_point: int = 0
  grace_s: float = 60.0
  selection: collect.Selection = collect.Selection()


def binding_flag(binding: str) -> str:
  """`NAME = VALUE` as `--gin.NAME=VALUE` (else `--gin_bindings=...`)."""
  m = _BINDING.match(binding)
  if m and "\n" not in binding:
    return f"--gin.{m.group(1)}={m.group(2)}"
  return f"--gin_bindings={binding}"


@dataclasses.dataclass
class _Plan:
  opts: Options
  axes: List[grid_lib.Axis]
  points: List[grid_lib.Point]
  facts: Dict[str, gin_check.RunFacts]

  def model_dir(self, point: grid_lib.Point) -> str:
    return os.path.join(self.opts.sweep_dir, point.name)

  def train_args(self, point: grid_lib.Point) -> List[str]:
    o = self.opts
    args = [f"--gin_file={f}" for f in o.gin_files]
    if o.gin_search_paths:
      args.append(f"--gin_search_paths={','.join(o.gin_search_paths)}")
    return (args + [binding_flag(b) for b in o.gin_bindings] + point.flags()
            + [f"--gin.MODEL_DIR={self.model_dir(point)!r}"])

  def finished(self, point: grid_lib.Point) -> bool:
    return run_dir.is_finished(self.model_dir(point),
                               self.facts[point.name].train_steps)


def _check_options(opts: Options, axes: Sequence[grid_lib.Axis]):
  if not opts.sweep_dir:
    raise SweepError("--sweep_dir is required, e.g. "
                     "--sweep_dir=runs/sweeps/mask_prob")
  if opts.launcher not in LAUNCHERS:
    raise SweepError(f"--launcher={opts.launcher}: expected one of "
                     f"{', '.join(LAUNCHERS)}")
  if opts.launcher == "print" and (opts.parallel != 1 or opts.gpus_per_point):
    raise SweepError("--parallel and --gpus_per_point apply to "
                     "--launcher=local; the printed commands run one point "
                     "each, on what the launcher gives them")
  if opts.launcher == "print":
    try:
      words = shlex.split(opts.launch_command)
    except ValueError as e:
      raise SweepError(f"--launch_command={opts.launch_command!r}: {e}") from e
    if not words:
      raise SweepError("--launch_command is empty; e.g. "
                       "--launch_command='launch/tpu_pod.sh --tpu=NAME "
                       "--zone=ZONE'")
  swept = {a.name: a for a in axes}
  for b in opts.gin_bindings:
    m = _BINDING.match(b)
    name = m.group(1) if m else ""
    if name.split("/")[-1] == "MODEL_DIR":
      raise SweepError(f"{binding_flag(b)}: the sweep sets MODEL_DIR itself "
                       f"(--sweep_dir/<point>); drop the flag")
    if name in swept:
      raise SweepError(f"{binding_flag(b)}: {name} is also swept by --grid "
                       f"part {swept[name].text!r}; drop one of them")


def _shared_flags(opts: Options) -> Dict[str, List[str]]:
  return {"gin_files": list(opts.gin_files),
          "gin_bindings": list(opts.gin_bindings),
          "gin_search_paths": list(opts.gin_search_paths)}


def _check_records(opts: Options):
  """A rerun must share the flags of the runs already in the sweep dir."""
  recorded = run_dir.read_json(os.path.join(opts.sweep_dir, SWEEP_FILE))
  if not isinstance(recorded, dict):
    return
  now = _shared_flags(opts)
  for key, value in now.items():
    before = recorded.get(key, [])
    if before != value:
      raise SweepError(
          f"--sweep_dir={opts.sweep_dir} holds a sweep made with "
          f"{key.replace('_', ' ')} {before}, not {value}; rerun with the "
          "same flags (its finished points would not be comparable), or "
          "use a new --sweep_dir")


def _write_records(plan: _Plan):
  o = plan.opts
  os.makedirs(o.sweep_dir, exist_ok=True)
  path = os.path.join(o.sweep_dir, SWEEP_FILE)
  recorded = run_dir.read_json(path)
  created = (recorded or {}).get("created") if isinstance(
      recorded, dict) else None
  run_dir.write_json(path, {
      **_shared_flags(o), "grid": o.grid,
      "axes": [{"name": a.name, "values": list(a.values)} for a in plan.axes],
      "created": created or time.strftime("%Y-%m-%dT%H:%M:%S")})
  run_dir.write_json(os.path.join(o.sweep_dir, POINTS_FILE), [
      {"name": p.name, "bindings": dict(p.bindings),
       "model_dir": plan.model_dir(p),
       "train_steps": plan.facts[p.name].train_steps} for p in plan.points])


def _write_point(plan: _Plan, point: grid_lib.Point, argv: List[str],
                 env: Dict[str, str], launcher: str):
  d = plan.model_dir(point)
  os.makedirs(d, exist_ok=True)
  run_dir.write_json(os.path.join(d, run_dir.POINT_FILE), {
      "name": point.name, "bindings": dict(point.bindings),
      "launcher": launcher, "command": argv, "env": env,
      "shell": runner.shell_line(argv, env),
      "train_steps": plan.facts[point.name].train_steps})


def plan_sweep(opts: Options) -> _Plan:
  """Parses the grid and checks every point; raises one-line errors."""
  axes = grid_lib.parse_grid(opts.grid)
  _check_options(opts, axes)
  if not opts.gin_files:
    raise SweepError("no --gin_file given; e.g. --gin_file=gin/quickstart.gin")
  _check_records(opts)
  points = grid_lib.points(axes)
  dirs = {p.name: os.path.join(opts.sweep_dir, p.name) for p in points}
  facts = gin_check.check_points(points, dirs, opts.gin_files,
                                 opts.gin_bindings, opts.gin_search_paths,
                                 axes)
  return _Plan(opts, axes, points, facts)


def _warnings(plan: _Plan) -> List[str]:
  out = []
  facts = list(plan.facts.values())
  if all(f.eval_every >= f.train_steps for f in facts):
    out.append("EVAL_EVERY >= TRAIN_STEPS: points are evaluated at their last "
               "step only, so best = final")
  test = plan.opts.selection.test_split
  if any(f.eval_splits is not None and test not in f.eval_splits
         for f in facts):
    out.append(f"EvalConfig.splits has no '{test}': the table's {test} "
               "columns stay empty; its notes say how to evaluate the best "
               "step's checkpoint")
  return out


def _eval_command(plan: _Plan, point: grid_lib.Point) -> List[str]:
  return ["python", "-m", "recsys_jax.eval"] + plan.train_args(point)


def collect_table(plan: _Plan, out: Callable[[str], None]) -> Optional[
    collect.Row]:
  """Writes results.md / results.csv; prints them; returns the best row."""
  sel = plan.opts.selection
  rows = [collect.collect_row(p, plan.model_dir(p),
                              plan.facts[p.name].train_steps, sel)
          for p in plan.points]
  best = collect.rank_rows(rows)
  notes = collect.test_notes(rows, sel, {
      p.name: _eval_command(plan, p) for p in plan.points})
  if any(r.evals for r in rows) and best is None:
    names = collect.metric_names(rows, sel.validation_split)
    notes.append(f"no evaluation has {sel.validation_split} {sel.metric}; "
                 f"it has: {', '.join(names) or 'nothing'} (see --metric, "
                 "--validation_split)")
  known = {p.name for p in plan.points}
  strays = sorted(n for n in _listdir(plan.opts.sweep_dir)
                  if n not in known and os.path.isfile(
                      os.path.join(plan.opts.sweep_dir, n, run_dir.POINT_FILE)))
  if strays:
    notes.append(f"{len(strays)} point directories are not points of this "
                 f"grid (kept, not in the table): {', '.join(strays)}")
  paths = collect.write_tables(rows, plan.axes, sel, plan.opts.sweep_dir,
                               notes)
  with open(paths[0]) as f:
    out(f.read().rstrip())
  out(f"Wrote {paths[0]} and {paths[1]}")
  return best


def _listdir(path: str) -> List[str]:
  try:
    return sorted(os.listdir(path))
  except OSError:
    return []


def _print_commands(plan: _Plan, out, slots: Optional[List[runner.Slot]]):
  """The dry run (slots: local commands) or the print launcher's lines."""
  o = plan.opts
  todo = [p for p in plan.points if not plan.finished(p)]
  shape = " x ".join(f"{a.name}: {len(a.values)}" for a in plan.axes)
  out(f"# sweep {o.sweep_dir}: {len(plan.points)} points ({shape}); "
      f"{len(plan.points) - len(todo)} finished, {len(todo)} to run"
      + (f", {o.parallel} at a time (a point takes the first free slot; "
         "listed round-robin)" if slots and o.parallel > 1 else ""))
  out(f"# run from {os.getcwd()}")
  for w in _warnings(plan):
    out(f"# warning: {w}")
  k = 0
  for i, p in enumerate(plan.points, 1):
    log = os.path.join(plan.model_dir(p), run_dir.LOG_FILE)
    if plan.finished(p):
      out(f"# {i}/{len(plan.points)} {p.name}: finished, skipped")
      continue
    out(f"# {i}/{len(plan.points)} {p.name}")
    if slots is not None:
      slot = slots[k % len(slots)]
      k += 1
      argv = runner.train_command(o.python, plan.train_args(p), slot)
      out(runner.shell_line(argv, slot.env(), log))
    else:
      argv = shlex.split(o.launch_command) + ["--"] + plan.train_args(p)
      out(runner.shell_line(argv, {}))
      if not o.dry_run:
        _write_point(plan, p, argv, {}, "print")


def run(opts: Options, out: Callable[[str], None] = print,
        base_env: Optional[Dict[str, str]] = None) -> int:
  """Runs the sweep; returns the exit status (1 if a point failed).

  Args:
    opts: the sweep's settings.
    out: where lines go.
    base_env: the environment of the runs (default: this process's).

  Raises:
    grid_lib.GridError, SweepError, gin_check.PointConfigError,
    runner.SlotError: one line each.
    runner.Interrupted: a stop signal (running points were stopped, the
      table written).
  """
  base_env = dict(os.environ if base_env is None else base_env)
  slots = None
  if opts.launcher == "local" and not opts.collect_only:
    if shutil.which(opts.python) is None:
      raise SweepError(f"--python={opts.python}: no such executable")
    # Before the (slower) gin check: a machine that cannot serve --parallel
    # fails at once.
    slots = runner.make_slots(opts.parallel, opts.pin_cores,
                              opts.gpus_per_point, gpus=(
                                  runner.visible_gpus(base_env)
                                  if opts.gpus_per_point else None))
  plan = plan_sweep(opts)
  if opts.collect_only:
    collect_table(plan, out)
    return 0
  if opts.dry_run:
    _print_commands(plan, out, slots)
    return 0
  _write_records(plan)
  if slots is None:
    _print_commands(plan, out, None)
    out("# when they have run, the same flags with --collect_only write "
        "the table")
    return 0
  for w in _warnings(plan):
    out(f"warning: {w}")
  jobs, skipped = [], []
  for p in plan.points:
    if plan.finished(p):
      skipped.append(p.name)
    else:
      jobs.append(runner.Job(p.name, plan.model_dir(p),
                             tuple(plan.train_args(p)),
                             plan.facts[p.name].train_steps))
  if skipped:
    out(f"{len(skipped)} of {len(plan.points)} points already finished, "
        f"skipped: {', '.join(skipped)}")
  sel = opts.selection
  env = {**base_env, "PYTHONPATH": os.pathsep.join(
      [_REPO] + [p for p in base_env.get("PYTHONPATH", "").split(os.pathsep)
                 if p and p != _REPO])}
  local = runner.LocalRunner(
      slots, opts.python, env, grace_s=opts.grace_s, out=out,
      on_start=lambda job, argv, slot_env: _write_point(
          plan, _point(plan, job.name), argv, slot_env, "local"),
      describe=lambda job: collect.summary(collect.collect_row(
          _point(plan, job.name), job.model_dir, job.train_steps, sel), sel))
  try:
    outcomes = local.run(jobs)
  except runner.Interrupted:
    collect_table(plan, out)
    raise
  collect_table(plan, out)
  failed = [o.name for o in outcomes if o.state != "finished"]
  if failed:
    out(f"{len(failed)} point(s) failed: {', '.join(failed)} (their "
        "train.log says why; a rerun retries them, resuming from their "
        "checkpoints)")
    return 1
  return 0


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _point(plan: _Plan, name: str) -> grid_lib.Point:
  return next(p for p in plan.points if p.name == name)
