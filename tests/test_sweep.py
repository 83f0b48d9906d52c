"""Tests of `python -m recsys_jax.sweep` (recsys_jax/sweeps/).

The kill-and-rerun test runs its first sweep in this process with a fake
python (a script that writes what the trainer writes, or sleeps until it is
killed) and stops it with SIGTERM once the first point has finished; the
rerun goes through the entry point with the real trainer, so the table's
second row is read from a real tiny training run.
"""

import ast
import dataclasses
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from recsys_jax.sweeps import collect
from recsys_jax.sweeps import driver
from recsys_jax.sweeps import gin_check
from recsys_jax.sweeps import grid
from recsys_jax.sweeps import run_dir
from recsys_jax.sweeps import runner
from tests import helpers


@pytest.fixture(name="tiny_data")
def _tiny_data() -> str:
  return helpers.prepared_dataset()


# Every point: the tiny model of the CLI tests, 2 steps, evaluated at the end
# with one compiled evaluation shape (no length buckets) and no baseline.
SHARED_FLAGS = [f for f in helpers.train_flags("DATA", "MODEL", steps=2)
                if not f.startswith(("--gin.MODEL_DIR=", "--gin.DATA_DIR="))
                ] + ["--gin.EVAL_EVERY=2",
                     "--gin.evaluation.EvalConfig.length_buckets=False",
                     "--gin.evaluation.EvalConfig.frequency_buckets=()",
                     "--gin.evaluation.EvalConfig.popularity_baseline=False"]
# XLA:CPU without LLVM optimisation and with its older fusion emitters:
# compiles (most of a tiny run's time) several times faster (as
# tests/test_flare_e2e.py).
_FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                 "--xla_cpu_use_fusion_emitters=false")


def _bindings(flags):
  """`--gin.X=V` flags as the `X = V` bindings the sweep's flags become."""
  out = []
  for f in flags:
    name, value = f[len("--gin."):].split("=", 1)
    out.append(f"{name} = {value}")
  return out


def _options(sweep_dir, data_dir, grid_text="MASK_PROB=[0.2, 0.4]", **kw):
  files = [f[len("--gin_file="):] for f in SHARED_FLAGS
           if f.startswith("--gin_file=")]
  gin = [f for f in SHARED_FLAGS if f.startswith("--gin.")] + [
      f"--gin.DATA_DIR='{data_dir}'"]
  return driver.Options(grid=grid_text, sweep_dir=str(sweep_dir),
                        gin_files=files, gin_bindings=_bindings(gin), **kw)


# -- the grid ------------------------------------------------------------------


def test_grid_axes_values_and_points():
  axes = grid.parse_grid(
      "MASK_PROB=[0.2, 0.40]; builders.bert4rec.dropout_rate=[0.5];"
      " LOSS=['full', \"sampled\"]; KS=[(1, 5), ()]; FLAG=[True, None];")
  assert [a.name for a in axes] == [
      "MASK_PROB", "builders.bert4rec.dropout_rate", "LOSS", "KS", "FLAG"]
  assert axes[0].values == ("0.2", "0.4")
  assert axes[2].values == ("'full'", "'sampled'")
  assert axes[3].values == ("(1, 5)", "()")
  points = grid.points(axes)
  assert len(points) == 2 * 1 * 2 * 2 * 2
  # The first axis varies slowest; flags carry the gin text.
  assert points[0].flags() == [
      "--gin.MASK_PROB=0.2", "--gin.builders.bert4rec.dropout_rate=0.5",
      "--gin.LOSS='full'", "--gin.KS=(1, 5)", "--gin.FLAG=True"]
  assert points[0].name == ("MASK_PROB=0.2,builders.bert4rec.dropout_rate=0.5"
                            ",LOSS=full,KS=1_5,FLAG=True")
  assert points[-1].name.startswith("MASK_PROB=0.4,")
  assert points[-1].name.endswith("LOSS=sampled,KS=empty,FLAG=None")
  # References pass through as written.
  assert grid.parse_grid("EVALUATION=[%FULL, @evaluation.EvalConfig()]"
                         )[0].values == ("%FULL", "@evaluation.EvalConfig()")


@pytest.mark.parametrize("text, expected", [
    ("MASK_PROB", "'MASK_PROB': expected NAME=[value, ...] (no '=')"),
    ("MASK_PROB=[]", "'MASK_PROB=[]': the value list is empty"),
    ("MASK_PROB=[0.2,,0.4]", "value 2: empty value"),
    ("MASK_PROB=[0.2, 0.4", "'MASK_PROB=[0.2, 0.4': unclosed bracket"),
    ("MASK_PROB=0.2", "expected a bracketed list"),
    ("LOSS=[full]", "'full' is not a gin literal (strings need quotes"),
    ("X=[{1, 2}]", "a set is not a gin literal"),
    ("X=[1e999]", "not a finite number"),
    ("A=[1]; B=[2]; A=[3]", "'A=[3]': A is already swept by 'A=[1]'"),
    ("A=[0.2, 0.20]", "0.2 is listed twice"),
    ("2X=[1]", "'2X' is not a gin name"),
    ("MODEL_DIR=['a', 'b']", "the sweep sets MODEL_DIR itself"),
    ("  ", "--grid is empty"),
])
def test_bad_grids_fail_in_one_line_naming_the_part(text, expected):
  with pytest.raises(grid.GridError) as e:
    grid.parse_grid(text)
  message = str(e.value)
  assert expected in message and "\n" not in message
  if text.strip():
    assert message.startswith("--grid")


def test_point_names_are_stable_and_safe():
  small = grid.points(grid.parse_grid("A=[1, 2]; B=['x']"))
  grown = grid.points(grid.parse_grid("A=[1, 2, 3]; B=['x']"))
  # Adding values keeps the names (and so the run directories) of the others.
  assert {p.name for p in small} < {p.name for p in grown}
  assert grid.point_name([("MODEL/builders.bert4rec.dropout_rate", "0.5")]) == (
      "MODEL_builders.bert4rec.dropout_rate=0.5")
  assert grid.point_name([("LR", "1e-05")]) == "LR=1e-05"
  # Values that differ only in unsafe characters get a digest each.
  clash = grid.points(grid.parse_grid("S=['a b', 'a/b']"))
  assert clash[0].name != clash[1].name
  assert all(p.name.startswith("S=a_b~") for p in clash)
  assert clash == grid.points(grid.parse_grid("S=['a b', 'a/b']"))
  long = grid.point_name([("NAME", repr("x" * 400))])
  assert len(long) <= 150 and "/" not in long


# -- slots and commands ----------------------------------------------------------


def test_slots_split_cores_and_gpus_disjointly():
  slots = runner.make_slots(2, cores=[0, 1, 2, 3, 4], gpus_per_slot=2,
                            gpus=["0", "1", "2", "3"])
  assert [s.cores for s in slots] == [(0, 1, 2), (3, 4)]
  assert [s.gpus for s in slots] == [("0", "1"), ("2", "3")]
  assert slots[1].prefix() == ["taskset", "-c", "3,4"]
  assert slots[1].env() == {"OMP_NUM_THREADS": "2",
                            "TF_NUM_INTRAOP_THREADS": "2",
                            "TF_NUM_INTEROP_THREADS": "2",
                            "CUDA_VISIBLE_DEVICES": "2,3"}
  # One run at a time uses everything; unpinned slots share the cores.
  assert runner.make_slots(1, cores=[0, 1]) == [runner.Slot()]
  assert runner.make_slots(3, pin_cores=False, cores=[0]) == [runner.Slot()] * 3
  with pytest.raises(runner.SlotError, match="--parallel=3 needs as many"):
    runner.make_slots(3, cores=[0, 1])
  with pytest.raises(runner.SlotError, match="needs 4 GPUs; 3 visible"):
    runner.make_slots(2, pin_cores=False, gpus_per_slot=2,
                      gpus=["0", "1", "2"])


def test_shell_lines_read_back_as_the_same_words():
  argv = ["python", "-m", "recsys_jax.train", "--gin.MODEL_DIR='runs/a b,c'",
          "--gin.NAME=\"$HOME `x`\"", "--gin.E=''", "", "--gin.L=[1, 'x']"]
  line = runner.shell_line(argv, {"OMP_NUM_THREADS": "2"})
  assert line.startswith("OMP_NUM_THREADS=2 python -m recsys_jax.train "
                         "\"--gin.MODEL_DIR='runs/a b,c'\" ")
  assert shlex.split(line) == ["OMP_NUM_THREADS=2"] + argv


# -- the table -------------------------------------------------------------------


def _write_eval(model_dir, step, validation, test=None):
  os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
  results = {"step": step, "validation": validation}
  if test is not None:
    results["test"] = test
  with open(os.path.join(model_dir, "eval", f"eval_step{step}.json"), "w") as f:
    json.dump(results, f)


def test_table_selects_by_validation_only(tmp_path):
  points = grid.points(grid.parse_grid("A=[1, 2, 3]"))
  d = {p.name: str(tmp_path / p.name) for p in points}
  # A=1: best validation at step 10 (tie with step 30: the earliest wins);
  # its test is lower there than at step 20, and that must not matter.
  _write_eval(d["A=1"], 10, {"NDCG@10": 0.3}, {"NDCG@10": 0.1, "HR@10": 0.2})
  _write_eval(d["A=1"], 20, {"NDCG@10": 0.2}, {"NDCG@10": 0.9, "HR@10": 0.9})
  _write_eval(d["A=1"], 30, {"NDCG@10": 0.3}, {"NDCG@10": 0.8, "HR@10": 0.8})
  os.makedirs(os.path.join(d["A=1"], "checkpoint_30"))
  # A=2: no test split evaluated, its best checkpoint kept; a non-finite
  # value is ignored.
  _write_eval(d["A=2"], 10, {"NDCG@10": float("nan")})
  _write_eval(d["A=2"], 20, {"NDCG@10": 0.5})
  os.makedirs(os.path.join(d["A=2"], "checkpoint_20"))
  sel = collect.Selection()
  rows = [collect.collect_row(p, d[p.name], 30, sel) for p in points]
  best = collect.rank_rows(rows)
  r1, r2, r3 = rows
  assert (r1.status, r1.evals, r1.best_step, r1.val_best) == (
      "finished", 3, 10, 0.3)
  assert (r1.final_step, r1.val_final) == (30, 0.3)
  assert r1.test_at_best == {"NDCG@10": 0.1, "HR@10": 0.2}
  assert (r2.status, r2.best_step, r2.test_at_best) == (
      "partial", 20, {"NDCG@10": None, "HR@10": None})
  assert (r3.status, r3.evals, r3.best_step) == ("not started", 0, None)
  assert best is r2 and (r1.rank, r2.rank, r3.rank) == (2, 1, None)
  notes = collect.test_notes(rows, sel, {"A=2": ["python", "-m",
                                                 "recsys_jax.eval"]})
  assert len(notes) == 1 and "A=2: no test split in eval/eval_step20" in (
      notes[0]) and "--gin.CHECKPOINT_STEP=20" in notes[0]
  os.rmdir(os.path.join(d["A=2"], "checkpoint_20"))
  assert "checkpoint_20 is not kept" in collect.test_notes(rows, sel, {})[0]
  md, csv_path = collect.write_tables(rows, grid.parse_grid("A=[1, 2, 3]"),
                                      sel, str(tmp_path), notes)
  with open(csv_path) as f:
    lines = f.read().splitlines()
  assert lines[0] == ("point,A,status,evals,final step,validation NDCG@10 "
                      "final,best step,validation NDCG@10 best,test NDCG@10 "
                      "at best step,test HR@10 at best step,rank")
  assert lines[1] == "A=1,1,finished,3,30,0.3,10,0.3,0.1,0.2,2"
  assert lines[3] == "A=3,3,not started,0,,,,,,,"
  with open(md) as f:
    text = f.read()
  assert "Best point: **A=2**" in text and "| **A=2** | 2 | partial |" in text


def test_a_rerun_sets_aside_evaluations_after_the_newest_checkpoint(tmp_path):
  d = str(tmp_path)
  for step in (2, 4, 6):
    _write_eval(d, step, {"NDCG@10": 0.1})
  os.makedirs(os.path.join(d, "checkpoint_4"))
  os.makedirs(os.path.join(d, "checkpoint_6.orbax-checkpoint-tmp-1"))
  assert run_dir.set_aside_evals_after_resume_point(d) == [6]
  assert run_dir.eval_steps(d) == [2, 4]
  assert os.path.isfile(os.path.join(d, "eval", "superseded",
                                     "eval_step6.json"))
  assert not run_dir.is_finished(d, 6)


# -- gin checks, dry run, print launcher -------------------------------------------


def test_mistyped_or_wrongly_typed_grid_names_fail_before_anything_runs(
    tmp_path, tiny_data):
  for text, expected in [
      ("MASK_PROBB=[0.2]", "--grid part 'MASK_PROBB=[0.2]': point "
       "MASK_PROBB=0.2: gin configuration error: --gin.MASK_PROBB=0.2 is not "
       "used by anything; did you mean MASK_PROB"),
      # The first point is fine, the second is not: every point is checked.
      ("MASK_PROB=[0.2, 'x']", "--grid part \"MASK_PROB=[0.2, 'x']\": point "
       "MASK_PROB=x: gin configuration error: --gin.MASK_PROB='x': MASK_PROB "
       "is read by builders.bert4rec.mask_prob, which expects a float or "
       "None")]:
    with pytest.raises(gin_check.PointConfigError) as e:
      driver.run(_options(tmp_path / "s", tiny_data, text),
                 out=lambda line: None)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)
  # Without EVAL_EVERY the trainer writes no evaluation: refused.
  opts = _options(tmp_path / "s", tiny_data)
  opts = dataclasses.replace(opts, gin_bindings=[
      b for b in opts.gin_bindings if not b.startswith("EVAL_EVERY")])
  with pytest.raises(gin_check.PointConfigError,
                     match=r"^point MASK_PROB=0.2: trainer.TrainLoopConfig."
                     r"eval_every is None; .* set --gin.EVAL_EVERY=N"):
    driver.run(opts, out=lambda line: None)
  assert not os.path.exists(tmp_path / "s")  # nothing written, nothing run
  with pytest.raises(driver.SweepError, match="sets MODEL_DIR itself"):
    driver.run(driver.Options(grid="A=[1]", sweep_dir="s", gin_files=["x"],
                              gin_bindings=["MODEL_DIR = 'x'"]))


def test_dry_run_lists_points_and_exact_commands(tmp_path, tiny_data,
                                                 monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  python = tmp_path / "py"
  python.write_text("#!/bin/sh\n")
  python.chmod(0o755)
  lines = []
  opts = _options(tmp_path / "sweep", tiny_data,
                  "MASK_PROB=[0.2, 0.4]; builders.bert4rec.dropout_rate=[0.1]",
                  parallel=2, dry_run=True, python=str(python))
  assert driver.run(opts, out=lines.append) == 0
  assert not os.path.exists(tmp_path / "sweep")
  assert lines[0].startswith(f"# sweep {tmp_path / 'sweep'}: 2 points "
                             "(MASK_PROB: 2 x builders.bert4rec.dropout_rate:"
                             " 1); 0 finished, 2 to run, 2 at a time")
  commands = [l for l in lines if not l.startswith("#")]
  assert len(commands) == 2
  words = shlex.split(commands[1])
  point_dir = str(tmp_path / "sweep" / "MASK_PROB=0.4,builders.bert4rec."
                  "dropout_rate=0.1")
  assert words[:9] == ["OMP_NUM_THREADS=2", "TF_NUM_INTRAOP_THREADS=2",
                       "TF_NUM_INTEROP_THREADS=2", "taskset", "-c", "2,3",
                       str(python), "-m", "recsys_jax.train"]
  assert words[-6:] == [
      "--gin.MASK_PROB=0.4", "--gin.builders.bert4rec.dropout_rate=0.1",
      f"--gin.MODEL_DIR={point_dir!r}", ">>",
      os.path.join(point_dir, "train.log"), "2>&1"]
  assert "--gin.EVAL_EVERY=2" in words and "--gin.TRAIN_STEPS=2" in words
  assert shlex.split(commands[0])[3:6] == ["taskset", "-c", "0,1"]


def test_print_launcher_prints_launch_commands(tmp_path, tiny_data):
  lines = []
  opts = _options(tmp_path / "sweep", tiny_data, launcher="print",
                  launch_command="launch/tpu_pod.sh --tpu=t --zone=z")
  assert driver.run(opts, out=lines.append) == 0
  commands = [l for l in lines if not l.startswith("#")]
  assert len(commands) == 2
  words = shlex.split(commands[0])
  assert words[:4] == ["launch/tpu_pod.sh", "--tpu=t", "--zone=z", "--"]
  # What the pod launcher makes of it (its dry run): one gcloud command.
  proc = subprocess.run(["bash", os.path.join(helpers.REPO_ROOT, words[0]),
                         "--dry_run", *words[1:]], capture_output=True,
                        text=True, timeout=30, check=True)
  assert "recsys_jax.train --multihost" in proc.stdout
  assert "--gin.MASK_PROB=0.2" in proc.stdout
  with open(tmp_path / "sweep" / "MASK_PROB=0.2" / "point.json") as f:
    assert json.load(f)["command"] == words
  assert not os.path.exists(tmp_path / "sweep" / "MASK_PROB=0.2" / "eval")


def test_cli_bad_grid_is_one_line():
  res = helpers.run_entry("recsys_jax.sweep", [
      "--gin_file=gin/quickstart.gin", "--grid=MASK_PROB=[0.2,];LR",
      "--sweep_dir=/nonexistent/s"], timeout=120)
  assert res.rc == 1
  assert res.stderr.strip().splitlines()[-1] == (
      "sweep error: --grid part 'LR': expected NAME=[value, ...] (no '=')")


# -- a sweep killed after its first point, then rerun ---------------------------


_FAKE_PYTHON = """#!{python}
# Stands in for `python -m recsys_jax.train`: MASK_PROB=0.2 writes a finished
# run (evaluations at steps 1 and 2, the final checkpoint); any other point
# writes an evaluation at step 1 and sleeps until it is killed.
import ast, json, os, sys, time
args = sys.argv[1:]
assert args[:2] == ["-m", "recsys_jax.train"], args
gin = dict(a[len("--gin."):].split("=", 1) for a in args if a.startswith("--gin."))
model_dir = ast.literal_eval(gin["MODEL_DIR"])
with open({calls!r}, "a") as f:
  f.write(json.dumps({{"point": gin["MASK_PROB"], "pid": os.getpid()}}) + "\\n")
os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
def write(step, val, test):
  with open(os.path.join(model_dir, "eval", f"eval_step{{step}}.json"), "w") as f:
    json.dump({{"step": step, "validation": {{"NDCG@10": val, "HR@10": val}},
               "test": {{"NDCG@10": test, "HR@10": 2 * test}}}}, f)
if gin["MASK_PROB"] == "0.2":
  write(1, 0.3, 0.11)
  write(2, 0.2, 0.5)
  os.makedirs(os.path.join(model_dir, "checkpoint_2"))
  print("fake training done", flush=True)
else:
  write(1, 0.1, 0.9)
  print("fake training sleeps", flush=True)
  time.sleep(300)
"""


def _calls(path):
  try:
    with open(path) as f:
      return [json.loads(l) for l in f]
  except FileNotFoundError:
    return []


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_killed_sweep_reruns_only_unfinished_points(tmp_path, tiny_data):
  calls = tmp_path / "calls.jsonl"
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_PYTHON.format(python=sys.executable, calls=str(calls)))
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  sweep_dir = tmp_path / "sweep"
  first, second = (str(sweep_dir / n) for n in ("MASK_PROB=0.2",
                                                "MASK_PROB=0.4"))
  opts = _options(sweep_dir, tiny_data, python=str(fake))

  def stop_when_second_point_started():
    deadline = time.time() + 120
    while time.time() < deadline:
      if len(_calls(calls)) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)
  killer = threading.Thread(target=stop_when_second_point_started,
                            daemon=True)
  killer.start()
  lines = []
  with pytest.raises(runner.Interrupted):
    driver.run(opts, out=lines.append, base_env=helpers.subprocess_env())
  killer.join()
  out = "\n".join(lines)
  assert "finished MASK_PROB=0.2" in out and "stopping 1 running" in out
  first_call, second_call = _calls(calls)
  assert not _alive(second_call["pid"])  # the sweep's child went with it
  assert os.path.isfile(os.path.join(first, "DONE.json"))
  assert not os.path.exists(os.path.join(second, "DONE.json"))
  assert run_dir.read_status(second)["state"] == "interrupted"
  with open(os.path.join(first, "point.json")) as f:
    record = json.load(f)
  assert record["bindings"] == {"MASK_PROB": "0.2"}
  assert record["command"][:3] == [str(fake), "-m", "recsys_jax.train"]

  # The dry run now skips the finished point.
  dry = []
  driver.run(_options(sweep_dir, tiny_data, dry_run=True), out=dry.append)
  assert "# 1/2 MASK_PROB=0.2: finished, skipped" in dry
  assert sum(not l.startswith("#") for l in dry) == 1

  # The rerun, through the entry point and with the real trainer: only the
  # second point runs.
  shared = [f"--gin_file={f}" for f in opts.gin_files] + [
      driver.binding_flag(b) for b in opts.gin_bindings]
  res = helpers.run_entry("recsys_jax.sweep", shared + [
      "--grid=MASK_PROB=[0.2, 0.4]", f"--sweep_dir={sweep_dir}",
      f"--python={sys.executable}"],
                          env=helpers.subprocess_env(
                              extra={"XLA_FLAGS": _FAST_COMPILE})).check()
  assert "1 of 2 points already finished, skipped: MASK_PROB=0.2" in (
      res.stdout)
  assert len(_calls(calls)) == 2  # the fake ran no more
  assert run_dir.is_finished(second, 2)
  with open(os.path.join(second, "train.log")) as f:
    log = f.read()
  assert log.count("=== sweep: start") == 2  # the fake's attempt, the real one
  assert "Trained steps 0..2" in log
  with open(os.path.join(first, "train.log")) as f:
    assert f.read().count("=== sweep: start") == 1

  # The table: the fake point selected at step 1 (test read there, not at
  # step 2), the real one at its best validation step.
  with open(sweep_dir / "results.csv") as f:
    header, row1, row2 = [line.split(",") for line in f.read().splitlines()]
  assert header[:8] == ["point", "MASK_PROB", "status", "evals", "final step",
                        "validation NDCG@10 final", "best step",
                        "validation NDCG@10 best"]
  assert header[8:] == ["test NDCG@10 at best step", "test HR@10 at best step",
                        "rank"]
  assert row1[:8] == ["MASK_PROB=0.2", "0.2", "finished", "2", "2", "0.2", "1",
                      "0.3"]
  assert row1[8:10] == ["0.11", "0.22"]
  # The killed attempt's evaluation of step 1 was set aside (no checkpoint:
  # the rerun started over); the real run evaluated step 2.
  assert run_dir.eval_steps(second) == [2]
  assert os.path.isfile(os.path.join(second, "eval", "superseded",
                                     "eval_step1.json"))
  final = run_dir.read_eval(second, 2)
  assert row2[:7] == ["MASK_PROB=0.4", "0.4", "finished", "1", "2",
                      repr(final["validation"]["NDCG@10"]), "2"]
  assert [ast.literal_eval(x) for x in row2[7:10]] == [
      final["validation"]["NDCG@10"], final["test"]["NDCG@10"],
      final["test"]["HR@10"]]
  assert os.path.isfile(sweep_dir / "results.md")
