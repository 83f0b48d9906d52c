r"""Time to quality of our trainer on Beauty: wall-clock until test NDCG@10 >= 0.040.

  python -m benchmarks.time_to_quality \
      --gin_file=gin/experiments/beauty_sasrec_packed.gin --budget_s=900 \
      --eval_every=250 --output=benchmarks/results/ours_quality_sasrec.json

Runs the real command (`python -m recsys_jax.train --gin_file=...` with the
run directory, `EVAL_EVERY` and any `--gin` overrides given here) as a
subprocess, timestamps every line it prints, and reads its evaluation lines
(`[eval step N] test (...): HR@10=... NDCG@10=...`, full ranking over all
items, the gin file's protocol). For each evaluation it records

  * wall_s: seconds from launching the process to that test result: the
    interpreter, TensorFlow / SeqIO start-up, compilation and every
    evaluation so far included (what a user waits);
  * train_s: wall_s less the evaluations (each from the step line printed
    right before it, `log_every` is set to divide EVAL_EVERY, to its last
    result line), the figure comparable to
    recbole_peer.py's training seconds (which also leave out RecBole's
    start-up and dataset build, so ours is the stricter count).

The run stops (SIGTERM: the trainer saves a checkpoint and exits) after
`--budget_s` wall seconds, at the end of its TRAIN_STEPS schedule, or, with
`--stop_at_target`, at the first evaluation that reaches `--target_ndcg`.
Pin it to cores as any command (`taskset -c 0 python -m ...`). Needs
`../shared/data/amazon_beauty` (prepared into `--data_dir` on first use);
without it the benchmark exits with a message and writes nothing.
`--num_processes=N` trains with N data-parallel processes pinned to blocks of
the cores, with local gradient accumulation (what `launch/local.sh
--num_processes=N --pin_cores` starts; process 0's lines are read).
`--smoke` runs the synthetic quick-start config for a few steps.
"""

import argparse
import collections
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top

STEP_RE = re.compile(r"^step (\d+)/(\d+) \|")
EVAL_RE = re.compile(
    r"^\[eval step (\d+)\] (\w+) \(([^,]+), (\d+) users\): (.*)$")
SMOKE_GIN = "gin/quickstart.gin"


def parse_metrics(text: str) -> Dict[str, float]:
  """'HR@10=0.1 NDCG@10=0.05 MRR=0.02' -> {'hr@10': 0.1, ...}."""
  out = {}
  for field in text.split():
    name, _, value = field.partition("=")
    if value:
      out[name.lower()] = float(value)
  return out


class RunLog:
  """Timestamped lines of the training process, parsed into eval points."""

  def __init__(self, split: str = "test"):
    self.split = split
    self.t0 = time.perf_counter()
    self.points: List[Dict[str, Any]] = []
    self.eval_s_total = 0.0
    self._step_line_t: Dict[int, float] = {}
    self._eval_end: Dict[int, float] = {}
    self.last_step = 0

  def feed(self, line: str, t: Optional[float] = None) -> Optional[Dict]:
    """Parses one line (at time t); returns a new test point if it is one."""
    t = (time.perf_counter() if t is None else t) - self.t0
    line = line.rstrip("\n")
    m = STEP_RE.match(line)
    if m:
      self.last_step = int(m.group(1))
      self._step_line_t[self.last_step] = t
      return None
    m = EVAL_RE.match(line)
    if not m:
      return None
    step, split = int(m.group(1)), m.group(2)
    # This split's share of the evaluation: since the previous split's
    # result, or for the first split since the step line printed before it.
    prev_end = self._eval_end.get(step, self._step_line_t.get(step, t))
    self.eval_s_total += t - prev_end
    self._eval_end[step] = t
    if split != self.split:
      return None
    point = {"step": step, "wall_s": t, "train_s": t - self.eval_s_total,
             "protocol": m.group(3), "users": int(m.group(4)),
             "test": parse_metrics(m.group(5))}
    self.points.append(point)
    return point


def _start(cmd: List[str], env: Dict[str, str], num_processes: int,
           model_dir: str) -> List[subprocess.Popen]:
  """The training process(es); process 0's output is piped.

  Several processes form one data-parallel run over jax.distributed on
  loopback (gloo), process i pinned with `taskset` to its block of this
  process's cores, as `launch/local.sh --num_processes=N --pin_cores` runs
  them; processes 1.. log to MODEL_DIR/process_<i>.log.
  """
  if num_processes == 1:
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=common.REPO_ROOT)]
  env = dict(env, **common.PROCESS_ENV)
  os.makedirs(model_dir, exist_ok=True)
  procs = []
  for i, full in enumerate(common.pinned_commands(cmd, num_processes)):
    if i == 0:
      procs.append(subprocess.Popen(full, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    env=env, cwd=common.REPO_ROOT))
      continue
    with open(os.path.join(model_dir, f"process_{i}.log"), "w") as out:
      procs.append(subprocess.Popen(full, stdout=out,
                                    stderr=subprocess.STDOUT, env=env,
                                    cwd=common.REPO_ROOT))
  return procs


def run(args) -> Dict[str, Any]:
  model_dir = args.model_dir or tempfile.mkdtemp(prefix="ttq_")
  # A step line right before every evaluation times the evaluation from it.
  log_every = math.gcd(args.eval_every, args.log_every)
  cmd = [sys.executable, "-m", "recsys_jax.train",
         f"--gin_file={args.gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.EVAL_EVERY={args.eval_every}",
         f"--gin.trainer.TrainLoopConfig.log_every={log_every}"]
  if args.data_dir:
    cmd.append(f"--gin.DATA_DIR='{args.data_dir}'")
  cmd += [f"--gin.{g}" for g in args.gin]
  if args.num_processes > 1:
    cmd.append("--gin.trainer.TrainLoopConfig.local_accumulation=True")
  print("running:", " ".join(cmd), flush=True)
  log = RunLog()
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  procs = _start(cmd, env, args.num_processes, model_dir)
  proc = procs[0]  # process 0 prints the progress and evaluation lines

  def stop():
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  reached = None
  stop_reason = "schedule end"
  timer = threading.Timer(args.budget_s, stop)
  timer.start()
  tail = collections.deque(maxlen=40)
  try:
    for line in proc.stdout:
      tail.append(line)
      point = log.feed(line)
      if args.verbose or point or STEP_RE.match(line):
        print(line, end="", flush=True)
      if point is None:
        continue
      ndcg = point["test"].get("ndcg@10", 0.0)
      if reached is None and ndcg >= args.target_ndcg:
        reached = point
        if args.stop_at_target:
          stop_reason = "target reached"
          stop()
  finally:
    timer.cancel()
    rc = proc.wait()
    others = [p.wait() for p in procs[1:]]
  if any(others):
    rc = rc or next(c for c in others if c)
  wall = time.perf_counter() - log.t0
  if wall >= args.budget_s and stop_reason != "target reached":
    stop_reason = "budget"
  if rc not in (0, -signal.SIGTERM) and not log.points:
    raise SystemExit(f"training failed (exit {rc}); last lines:\n"
                     + "".join(tail))
  if not args.model_dir:
    shutil.rmtree(model_dir, ignore_errors=True)
  if not log.points:
    raise SystemExit("no test evaluation finished within the budget: raise "
                     "--budget_s or lower --eval_every")
  final = log.points[-1]
  return {
      "system": "recsys_jax",
      "benchmark": "time_to_quality",
      "gin_file": args.gin_file, "gin_overrides": args.gin,
      "train_command": " ".join(cmd), "num_processes": args.num_processes,
      "budget_s": args.budget_s, "eval_every_steps": args.eval_every,
      "target_ndcg@10": args.target_ndcg, "stop_reason": stop_reason,
      "exit_code": rc, "protocol": final["protocol"],
      "total_wall_s": wall, "eval_s_total": log.eval_s_total,
      "last_logged_step": log.last_step,
      "final_test": final["test"], "final_step": final["step"],
      "best_test_ndcg@10": max(p["test"].get("ndcg@10", 0.0)
                               for p in log.points),
      "time_to_target_wall_s": reached["wall_s"] if reached else None,
      "time_to_target_train_s": reached["train_s"] if reached else None,
      "step_at_target": reached["step"] if reached else None,
      "points": log.points,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gin_file", default="gin/experiments/beauty_sasrec_packed.gin")
  p.add_argument("--gin", action="append", default=[],
                 help="extra override NAME=VALUE (repeatable), passed as "
                      "--gin.NAME=VALUE")
  p.add_argument("--data_dir", default=None,
                 help="prepared Beauty (default: data/beauty in the "
                      "repository, prepared there on first use)")
  p.add_argument("--model_dir", default=None,
                 help="keep the run here (default: a temporary directory, "
                      "removed at the end)")
  p.add_argument("--budget_s", type=float, default=900.0,
                 help="wall-clock budget from launch (SIGTERM after it)")
  p.add_argument("--eval_every", type=int, default=250,
                 help="EVAL_EVERY in steps (test metrics at each)")
  p.add_argument("--log_every", type=int, default=100,
                 help="progress lines every gcd(this, --eval_every) steps")
  p.add_argument("--num_processes", type=int, default=1,
                 help="> 1: data parallel over this many training processes "
                 "on this machine, each pinned to its block of the cores, "
                 "with TrainLoopConfig.local_accumulation=True "
                 "(launch/local.sh --pin_cores runs them so)")
  p.add_argument("--target_ndcg", type=float, default=0.040)
  p.add_argument("--stop_at_target", action="store_true")
  p.add_argument("--verbose", action="store_true",
                 help="echo every line of the training process")
  p.add_argument("--smoke", action="store_true",
                 help="synthetic quick-start config, a few steps")
  p.add_argument("--output", default=None)
  args = p.parse_args(argv)
  if args.num_processes < 1:
    p.error(f"--num_processes={args.num_processes}: expected >= 1")
  machine = common.machine_info()
  if args.smoke:
    args.gin_file = SMOKE_GIN
    args.gin = args.gin + ["TRAIN_STEPS=20"]
    args.eval_every = 10
  else:
    data_dir = args.data_dir or os.path.join(common.REPO_ROOT, "data",
                                             "beauty")
    if not os.path.exists(os.path.join(common.BEAUTY_RAW, "Beauty.txt")) \
        and not os.path.exists(os.path.join(data_dir, "stats.json")):
      print(f"SKIP: Beauty is absent ({common.BEAUTY_RAW}/Beauty.txt); the "
            "time-to-quality benchmark needs it.")
      return None
    args.data_dir = common.ensure_beauty_or_synthetic(data_dir)["data_dir"]
  result = run(args)
  t = result["time_to_target_wall_s"]
  print(f"time to test NDCG@10 >= {args.target_ndcg}: "
        f"{'not reached' if t is None else f'{t:.0f} s wall'}; final (step "
        f"{result['final_step']}) HR@10 {result['final_test'].get('hr@10')}"
        f" NDCG@10 {result['final_test'].get('ndcg@10')}", flush=True)
  if args.output:
    print("wrote", common.write_result(args.output, result, machine))
  return result


if __name__ == "__main__":
  main()
