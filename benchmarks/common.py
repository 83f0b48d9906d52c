"""Shared pieces of the benchmarks: machine info, FLOP counts, data, results.

Importable from both the project's virtualenv and RecBole's own (which has no
JAX): the module top level uses only the standard library; JAX, NumPy and the
project are imported inside the functions that need them.

`python -m benchmarks.common summarize` rewrites benchmarks/RESULTS.md from
benchmarks/results/*.json.
"""

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")
BEAUTY_RAW = os.path.join(SHARED_DATA, "amazon_beauty")
BEAUTY_NUM_ITEMS = 12101

# The sizes fixed by the benchmark issue (BERT4Rec on Beauty).
ISSUE_SIZES = dict(hidden=64, num_layers=2, num_heads=2, mlp_dim=256,
                   max_len=50, batch_size=256, mask_prob=0.2,
                   dropout_rate=0.2)

# The issue's targets: figure name -> (minimum ratio ours / RecBole, text).
TARGETS = {
    "train_padded_seq_per_s": (1.5, ">= 1.5x RecBole seq/s, padded"),
    "train_packed_interactions_per_s": (3.0, ">= 3x RecBole real "
                                        "interactions/s, packed"),
    "eval_users_per_s": (3.0, ">= 3x RecBole users/s"),
}
MFU_TARGET = 0.5

_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                     "seqio", "tensorflow", "numpy", "torch", "recbole")


# -- machine and run metadata -------------------------------------------------



def add_duel_flags(parser, other: str) -> None:
  """--duel / --duel_windows / --duel_eval_windows, shared by both sides."""
  parser.add_argument("--duel", default=None,
                      help=f"a turn file shared with {other} --duel: "
                      "alternate timed windows with the other side")
  parser.add_argument("--duel_windows", type=int, default=4)
  parser.add_argument("--duel_eval_windows", type=int, default=2)

def load_average() -> List[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def memory_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def package_versions() -> Dict[str, str]:
  out = {"python": platform.python_version()}
  for name in _VERSION_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


# Environment of every process of a multi-process run on this machine.
PROCESS_ENV = {"JAX_PLATFORMS": "cpu", "RECSYS_CPU_COLLECTIVES": "gloo"}


def pinned_commands(cmd: List[str], num_processes: int,
                    add_num_processes: bool = True) -> List[List[str]]:
  """`cmd` as process i of a data-parallel run on loopback, for each i.

  Process i runs under `taskset -c` on its block of this process's cores
  (cores / num_processes each, at least one; as `launch/local.sh
  --pin_cores`), with `--coordinator_address=127.0.0.1:PORT` (a free port)
  and `--process_id=i` (and `--num_processes=N` if `add_num_processes`)
  appended. Run them with `PROCESS_ENV` added to the environment.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  taskset = shutil.which("taskset")
  if not taskset:
    raise SystemExit(f"{num_processes} pinned processes need `taskset` "
                     "(util-linux), which is not on PATH")
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // num_processes)
  out = []
  for i in range(num_processes):
    first = (i * per) % len(cores)
    pin = ",".join(str(c) for c in cores[first:first + per])
    flags = [f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"]
    if add_num_processes:
      flags.append(f"--num_processes={num_processes}")
    out.append([taskset, "-c", pin, *cmd, *flags])
  return out


def machine_info() -> Dict[str, Any]:
  """CPU, cores, memory, versions, date, load and the exact command."""
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  return {
      "cpu_model": cpu_model(),
      "logical_cores": os.cpu_count(),
      "cores_usable": affinity,
      "memory_gib": memory_gib(),
      "platform": platform.platform(),
      "versions": package_versions(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "load_average_start": load_average(),
      "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
      "cwd": os.getcwd(),
  }


def write_result(path: str, payload: Dict[str, Any],
                 machine: Optional[Dict[str, Any]] = None) -> str:
  """Writes `payload` plus machine info (and the load at the end) as JSON."""
  machine = dict(machine or machine_info())
  machine["load_average_end"] = load_average()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"machine": machine, **payload}, f, indent=2, sort_keys=False)
    f.write("\n")
  return path


def stats(values: Sequence[float]) -> Dict[str, Any]:
  """Median / min / max of repeated measurements, and the values."""
  values = [float(v) for v in values]
  return {"median": statistics.median(values), "min": min(values),
          "max": max(values), "n": len(values), "values": values}


# -- alternation between two processes -------------------------------------------


class Turns:
  """Strict alternation of timed windows between two processes.

  Ours (parity 0) and RecBole (parity 1) share a counter file; a process
  times a window only when `counter % 2 == parity` and then advances it, so
  the other side waits (sleeping) while one measures, and consecutive
  windows of the two sides see nearly the same machine load.
  """

  # The phases both sides walk through, in order; ours does the named mode,
  # RecBole its staged (staged_*), DataLoader (pipeline_*) or eval window.
  PHASES = ("staged_padded", "staged_packed", "pipeline_padded",
            "pipeline_packed", "eval")

  def __init__(self, path: str, parity: int, timeout_s: float = 3600.0):
    self.path, self.parity, self.timeout_s = path, int(parity), timeout_s

  def _read(self) -> int:
    try:
      with open(self.path) as f:
        return int(f.read().strip() or 0)
    except FileNotFoundError:
      return 0

  def wait(self) -> None:
    import time  # pylint: disable=g-import-not-at-top
    deadline = time.monotonic() + self.timeout_s
    while self._read() % 2 != self.parity:
      if time.monotonic() > deadline:
        raise TimeoutError(f"{self.path}: the other side did not finish its "
                           f"window within {self.timeout_s:.0f}s")
      time.sleep(0.05)

  def done(self) -> None:
    tmp = f"{self.path}.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(str(self._read() + 1))
    os.replace(tmp, self.path)


# -- FLOPs ---------------------------------------------------------------------


def bert4rec_flops_per_row(*, length: int, hidden: int, num_layers: int,
                           mlp_dim: int, predictions: int, vocab: int,
                           output_transform: bool = True) -> Dict[str, float]:
  """Forward matmul FLOPs of one Bert4Rec row (2 FLOPs per multiply-add).

  The embedding gather, LayerNorm, softmax, bias adds and other element-wise
  work are not counted (the usual MFU convention; the output bias, which
  `losses.tied_softmax_cross_entropy` folds into the tied matmul as an extra
  table column, is left out too: 2 x V per prediction, 1/E of the output
  layer). Attention is dense over the row
  (padding and packing masks do not save work). The output layer runs only at
  the `predictions` gathered positions, over the padded vocabulary.

  Args:
    length: L, row length.
    hidden: E.
    num_layers: Transformer blocks.
    mlp_dim: F.
    predictions: P, positions per row given logits (max_predictions).
    vocab: V, rows of the (padded) output table.
    output_transform: the Dense E x E head before the tied output.

  Returns:
    {'qkv_out', 'attention', 'mlp', 'output', 'total'} forward FLOPs.
  """
  l, e = length, hidden
  qkv_out = num_layers * 2 * l * e * e * 4          # Q, K, V and O
  attention = num_layers * 2 * 2 * l * l * e        # scores and weighted sum
  mlp = num_layers * 2 * 2 * l * e * mlp_dim        # two Dense layers
  output = 2 * predictions * e * vocab
  if output_transform:
    output += 2 * predictions * e * e
  total = qkv_out + attention + mlp + output
  return {"qkv_out": float(qkv_out), "attention": float(attention),
          "mlp": float(mlp), "output": float(output), "total": float(total)}


def train_flops_per_step(batch_size: int, **kwargs) -> float:
  """Forward + backward FLOPs of one training step (3 x forward)."""
  return 3.0 * batch_size * bert4rec_flops_per_row(**kwargs)["total"]


def measure_matmul_peak(n: int = 4096, repeats: int = 5) -> Dict[str, Any]:
  """Best float32 `jnp.dot` throughput on n x n matrices (GFLOP/s)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n**3
  return {"n": n, "dtype": "float32", "repeats": repeats,
          "best_gflops": flops / min(times) / 1e9,
          "median_gflops": flops / statistics.median(times) / 1e9,
          "times_s": times}


# -- profiles ------------------------------------------------------------------


def _op_category(op_name: str) -> str:
  """A coarse bucket of an HLO op from its JAX op_name metadata."""
  if "Dropout" in op_name or "bernoulli" in op_name or "random" in op_name:
    return "dropout (RNG + masks)"
  if any(k in op_name for k in ("logits", "jvp()/", "transpose(jvp())",
                                "softmax")):
    return "output layer + loss"
  if "attention" in op_name:
    return "attention"
  if "mlp" in op_name:
    return "MLP"
  if "norm" in op_name.lower():
    return "layer norm"
  if "embed" in op_name:
    return "embedding"
  if any(k in op_name for k in ("adam", "clip", "global_norm", "apply_upd",
                                "scale_by", "add_decayed")):
    return "optimizer"
  if "rank_fn" in op_name:
    return "ranking (target rank, history exclusion)"
  return "other"


def profile_breakdown(trace_dir: str, hlo_text: str, steps: int,
                      top: int = 25) -> Dict[str, Any]:
  """Time per step by HLO op and by category from a jax.profiler trace.

  Args:
    trace_dir: the directory given to `jax.profiler.start_trace(...,
      create_perfetto_trace=True)`.
    hlo_text: `compiled.as_text()` of the traced function (maps fusion names
      to the JAX op that produced them).
    steps: how many calls the trace holds.
    top: how many ops to list.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  meta = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?'
                       r'metadata=\{op_name="([^"]*)"', hlo_text, re.M):
    meta[m.group(1)] = m.group(2)
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"),
                           recursive=True))
  if not files:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_op: Dict[str, float] = {}
  by_cat: Dict[str, float] = {}
  for e in events:
    name = e.get("name")
    if e.get("ph") != "X" or name not in meta:
      continue
    if name.startswith(("call", "while", "conditional")):
      continue  # their bodies' ops are traced (and counted) themselves
    us = float(e.get("dur", 0))
    by_op[name] = by_op.get(name, 0.0) + us
    cat = _op_category(meta[name])
    by_cat[cat] = by_cat.get(cat, 0.0) + us
  total = sum(by_cat.values()) or 1.0
  ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
  return {
      "ms_per_step_total_ops": total / 1e3 / steps,
      "by_category_ms_per_step": {
          k: round(v / 1e3 / steps, 2) for k, v in
          sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "by_category_fraction": {k: round(v / total, 3) for k, v in
                               sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": n, "ms_per_step": round(v / 1e3 / steps, 2),
                   "jax_op": meta[n][:160]} for n, v in ops],
  }


# -- data ----------------------------------------------------------------------


def _prepare(args: List[str]) -> None:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cmd = [sys.executable, "-m", "recsys_jax.data.prepare"] + args
  res = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True,
                       text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n"
                       f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def _is_prepared(data_dir: str) -> bool:
  return os.path.exists(os.path.join(data_dir, "stats.json"))


def ensure_beauty_or_synthetic(data_dir: str,
                               raw_dir: str = BEAUTY_RAW) -> Dict[str, Any]:
  """A prepared dataset at `data_dir`: Beauty if its raw files exist, else
  synthetic with Beauty's catalogue size (12,101 items).

  Returns:
    {'data_dir', 'dataset', 'prepare_command'}.
  """
  beauty_txt = os.path.join(raw_dir, "Beauty.txt")
  items = os.path.join(raw_dir, "beauty_items.jsonl")
  if os.path.exists(beauty_txt):
    args = ["--format=sequence_file", f"--input={beauty_txt}",
            f"--item_metadata={items}", f"--output_dir={data_dir}",
            "--text_vocab_size=0"]
    name = "amazon_beauty"
  else:
    args = ["--format=synthetic", f"--output_dir={data_dir}",
            "--num_users=22363", f"--num_items={BEAUTY_NUM_ITEMS}",
            "--seed=0", "--text_vocab_size=0"]
    name = "synthetic_12101_items"
  if not _is_prepared(data_dir):
    _prepare(args)
  return {"data_dir": data_dir, "dataset": name,
          "prepare_command": "python -m recsys_jax.data.prepare " +
                             " ".join(args)}


def ensure_synthetic(data_dir: str, num_users: int, num_items: int,
                     seed: int = 0) -> Dict[str, Any]:
  """A prepared synthetic dataset (smoke runs and quick comparisons)."""
  args = ["--format=synthetic", f"--output_dir={data_dir}",
          f"--num_users={num_users}", f"--num_items={num_items}",
          f"--seed={seed}", "--text_vocab_size=0"]
  if not _is_prepared(data_dir):
    _prepare(args)
  return {"data_dir": data_dir, "dataset": f"synthetic_{num_items}_items",
          "prepare_command": "python -m recsys_jax.data.prepare " +
                             " ".join(args)}


# -- RESULTS.md ------------------------------------------------------------------


def _load(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _fmt(x: Optional[float], digits: int = 0) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if digits == 0:
    return f"{x:,.0f}"
  return f"{x:,.{digits}f}"


def _ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
  if ours is None or not theirs:
    return None
  return ours / theirs


def _median_over_rounds(results: List[Dict[str, Any]], *keys: str
                        ) -> Optional[float]:
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


def _rounds(results_dir: str, prefix: str) -> List[Dict[str, Any]]:
  out = []
  for name in sorted(os.listdir(results_dir)):
    if name.startswith(prefix) and name.endswith(".json"):
      r = _load(os.path.join(results_dir, name))
      if r is not None:
        out.append(r)
  return out


def _met(ratio: Optional[float], target: float) -> str:
  if ratio is None:
    return "not measured"
  return "met" if ratio >= target else "NOT met"


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
    r = _load(path)
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


def _head_change_section(results_dir: str,
                         ours_train: List[Dict[str, Any]]) -> List[str]:
  """RESULTS.md's before/after table of the output-layer change."""
  record = _load(os.path.join(results_dir, HEAD_CHANGE_RECORD)) or {}
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
        f"| {mode} | {_fmt(before, 3)} | {_fmt(after, 3)} | "
        f"{_fmt(statistics.median(speedups), 2) + 'x' if speedups else 'n/a'}"
        f" | {_fmt(100 * mfu_b, 1)}% | {_fmt(100 * mfu_a, 1)}% | {len(have)} |")
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


def _quality_section(ours: List[Dict[str, Any]],
                     peers: List[Dict[str, Any]]) -> List[str]:
  """Time-to-quality runs: ours (ours_quality_*.json, time_to_quality.py)
  and RecBole's (recbole_quality_*.json, recbole_peer.py --quality_model)."""
  if not ours and not peers:
    return []

  def minutes(t):
    return "not reached" if t is None else _fmt(t / 60, 1) + " min"

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
        f"| {name} | {_fmt(r.get('budget_s'))} | {_fmt(trained)} | "
        f"{_fmt(epochs, 2)} | {_fmt(hr, 4)} | {_fmt(final.get('ndcg@10'), 4)}"
        f" | {_fmt(r.get('best_test_ndcg@10'), 4)} | "
        f"{minutes(r.get('time_to_target_train_s'))} | "
        f"{minutes(r.get('time_to_target_wall_s'))} | "
        f"{_fmt(r.get('machine', {}).get('load_average_start', [None])[0], 1)}"
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
          f"| {_fmt(budget)} | {peer.get('peer')}: {_fmt(final.get('hit@10'), 4)}"
          f" / {_fmt(final.get('ndcg@10'), 4)} | {our_name(r)} (step "
          f"{p.get('step')}, {_fmt(p.get('train_s'))} s{stopped}): "
          f"{_fmt(p['test'].get('hr@10'), 4)} / "
          f"{_fmt(p['test'].get('ndcg@10'), 4)} |")
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


def summarize(results_dir: str = RESULTS_DIR,
              out_path: Optional[str] = None) -> str:
  """Builds RESULTS.md from the round files train_*/eval_*/recbole_*.json."""
  ours_train = _rounds(results_dir, "train_throughput_round")
  # Gradient accumulation (--num_microbatches > 1), staged modes only.
  ours_train_mb = _rounds(results_dir, "train_throughput_mb_round")
  # Pinned to one core (taskset), peak measured there too: one file each.
  ours_train_1core = _rounds(results_dir, "train_throughput_1core_")
  # Data parallel over processes (one per core), local accumulation.
  ours_train_mp = _rounds(results_dir, "train_throughput_mp_round")
  ours_eval = _rounds(results_dir, "eval_throughput_round")
  rb_train = _rounds(results_dir, "recbole_round")
  rb_eval = [r for r in rb_train if "users_per_s" in r]
  lines = ["# Benchmark results", "",
           "Generated by `bash benchmarks/run_all.sh` (`python -m "
           "benchmarks.common summarize`); do not edit by hand. Each figure is"
           " the median over the A/B rounds (ours and RecBole alternate in one"
           " run); per-round values, machine info and exact commands are in "
           "`benchmarks/results/*.json`.", ""]
  any_run = ours_train or ours_eval or rb_train
  if not any_run:
    lines += ["No results yet: run `bash benchmarks/run_all.sh`.", ""]
  machine = (ours_train or ours_eval or rb_train or [{}])[0].get(
      "machine", {})
  if machine:
    v = machine.get("versions", {})
    loads = [r.get("machine", {}).get("load_average_start", [None])[0]
             for r in ours_train + ours_eval + rb_train]
    loads = [x for x in loads if x is not None]
    dates = sorted(r.get("machine", {}).get("date_utc", "")
                   for r in ours_train + ours_eval + rb_train)
    dates = [d for d in dates if d]
    when = (f"{dates[0]} to {dates[-1]} (the round files were not all "
            "written by one run; each file's date and command are in it and "
            "under Exact commands)" if dates and dates[0][:13] != dates[-1][:13]
            else machine.get("date_utc"))
    lines += [f"Machine: {machine.get('cpu_model')}, "
              f"{machine.get('cores_usable')} usable cores, "
              f"{machine.get('memory_gib')} GiB; {when}. "
              f"jax {v.get('jax')}, flax {v.get('flax')}, tensorflow "
              f"{v.get('tensorflow')}. Load average (1 min) at the start of "
              f"each measurement: {', '.join(f'{x:.1f}' for x in loads)} "
              "(measurements run back to back, so the 1-minute average "
              "includes the previous step's own load, near the number of "
              "cores; the A/B alternation keeps the ratios fair).", ""]
    cores = machine.get("cores_usable") or 1
    busy = [x for x in loads if x > 1.5 * cores]
    if busy:
      lines += [f"**Warning: {len(busy)} of {len(loads)} measurements started"
                f" at a load average above {1.5 * cores:g} (1.5x the usable "
                "cores, more than the previous step explains): other jobs "
                "shared the machine, and those figures are not valid as a "
                "comparison. Under "
                "contention torch's OpenMP threads spin at their barriers, so "
                "RecBole with 2 threads slows far more than the load alone "
                "explains (measured: 3-5x slower than 1 thread at load 10-13 "
                "on 2 cores). Rerun `bash benchmarks/run_all.sh` on a quiet "
                "machine.**", ""]

  def ours(mode, key, results=None):
    return _median_over_rounds(ours_train if results is None else results,
                               "modes", mode, key)

  n_mb = (ours_train_mb or [{}])[0].get("num_microbatches")
  mp = (ours_train_mp or [{}])[0]
  mp_label = (f"{mp.get('num_processes')} processes (one per core), local "
              f"accumulation of {mp.get('num_microbatches')} micro-batches")

  peak = _median_over_rounds(ours_train, "matmul_peak", "best_gflops")
  rb_seq = _median_over_rounds(rb_train, "trainer", "sequences_per_s")
  rb_inter = _median_over_rounds(rb_train, "trainer",
                                 "interactions_per_s")
  rb_staged_seq = _median_over_rounds(rb_train, "staged", "sequences_per_s")
  rb_eval_ups = _median_over_rounds(rb_eval, "users_per_s")
  our_eval_ups = _median_over_rounds(ours_eval, "users_per_s")

  rows = []

  def row(figure, o, t, target_key=None, digits=0, note=""):
    r = _ratio(o, t)
    target = ""
    if target_key:
      tval, ttext = TARGETS[target_key]
      target = f"{ttext}: {_met(r, tval)}"
    rows.append(f"| {figure} | {_fmt(o, digits)} | {_fmt(t, digits)} | "
                f"{_fmt(r, 2) + 'x' if r is not None else 'n/a'} | {target}"
                f"{note} |")

  row("train, padded, pre-staged batches: sequences/s",
      ours("staged_padded", "sequences_per_s"), rb_staged_seq,
      "train_padded_seq_per_s")
  if ours_train_mb:
    row(f"train, padded, pre-staged, {n_mb} micro-batches of the same "
        "256-row batch (one update): sequences/s",
        ours("staged_padded", "sequences_per_s", ours_train_mb),
        rb_staged_seq, "train_padded_seq_per_s")
  if ours_train_mp:
    row(f"train, padded, pre-staged, {mp_label}: sequences/s",
        ours("staged_padded", "sequences_per_s", ours_train_mp),
        rb_staged_seq, "train_padded_seq_per_s")
  row("train, padded, through the input pipeline: sequences/s",
      ours("pipeline_padded", "sequences_per_s"), rb_seq,
      "train_padded_seq_per_s")
  row("train, padded, through the input pipeline: real interactions/s",
      ours("pipeline_padded", "interactions_per_s"), rb_inter)
  row("train, packed, pre-staged: real interactions/s",
      ours("staged_packed", "interactions_per_s"), rb_inter,
      "train_packed_interactions_per_s")
  row("train, packed, through the input pipeline: real interactions/s",
      ours("pipeline_packed", "interactions_per_s"), rb_inter,
      "train_packed_interactions_per_s")
  if ours_train_mp:
    row(f"train, packed, through the input pipeline, {mp_label}: real "
        "interactions/s",
        ours("pipeline_packed", "interactions_per_s", ours_train_mp),
        rb_inter, "train_packed_interactions_per_s")
  row("evaluation, full ranking of all users (input cached after the first "
      "pass, as periodic evaluation runs): users/s", our_eval_ups,
      rb_eval_ups, "eval_users_per_s")
  first_pass = _median_over_rounds(ours_eval, "modes", "pipeline",
                                   "users_per_s")
  if first_pass is not None:
    row("evaluation, first pass (through the SeqIO/TF input pipeline): "
        "users/s", first_pass, rb_eval_ups)
  if rows:
    lines += ["## Ours vs RecBole 1.2.1 BERT4Rec (same sizes, same data)", "",
              "| figure | ours | RecBole | ratio | target |",
              "|---|---|---|---|---|"] + rows + [""]
    lines += [
        "RecBole's sequences are its prefix-augmented training sequences "
        "(one per training interaction, padded to 50); ours are one row per "
        "user (padded) or several users per row (packed). \"Real "
        "interactions\" counts non-padding input positions. RecBole figures"
        " come from its own `Trainer._train_epoch` over a fixed number of "
        "batches after warm-up (\"through the input pipeline\" = its "
        "DataLoader with masking; \"pre-staged\" = batches collated before "
        "timing).", ""]

  if ours_train:
    mrows = []
    arms = [(m, m, ours_train) for m in (
        "staged_padded", "staged_packed", "pipeline_padded",
        "pipeline_packed")]
    arms += [(m, f"{m}, {n_mb} micro-batches", ours_train_mb)
             for m in ("staged_padded", "staged_packed") if ours_train_mb]
    arms += [(m, f"{m}, {mp_label}", ours_train_mp) for m in (
        "staged_padded", "staged_packed", "pipeline_padded",
        "pipeline_packed") if ours_train_mp]
    for r in ours_train_1core:
      n = r.get("num_microbatches", 1)
      arms += [(m, f"{m}, one core (taskset), "
                f"{n} micro-batch{'es' if n > 1 else ''}", [r])
               for m in ("staged_padded", "staged_packed")]
    # The most conservative denominator: the highest whole-machine peak
    # measured in any of these runs (one-core runs excluded).
    top_peak = max((r.get("matmul_peak", {}).get("best_gflops") or 0.0
                    for r in ours_train + ours_train_mb + ours_train_mp),
                   default=0.0) or None

    def mfu_top(mode, label, res):
      gflops = ours(mode, "achieved_gflops", res)
      if "one core" in label or gflops is None or not top_peak:
        return None
      return gflops / top_peak

    for mode, label, res in arms:
      if ours(mode, "step_time_s", res) is None:
        continue
      mfu = ours(mode, "mfu", res)
      top = mfu_top(mode, label, res)
      mrows.append(
          f"| {label} | {_fmt(ours(mode, 'step_time_s', res), 3)} | "
          f"{_fmt(ours(mode, 'sequences_per_s', res))} | "
          f"{_fmt(ours(mode, 'users_per_s', res))} | "
          f"{_fmt(ours(mode, 'interactions_per_s', res))} | "
          f"{_fmt(ours(mode, 'tokens_per_s', res))} | "
          f"{_fmt(ours(mode, 'gflop_per_step', res), 1)} | "
          f"{_fmt(ours(mode, 'achieved_gflops', res), 1)} | "
          f"{_fmt(None if mfu is None else 100 * mfu, 1)}% | "
          f"{'n/a' if top is None else _fmt(100 * top, 1) + '%'} |")
    lines += ["## Our training throughput and MFU", "",
              f"Matmul peak measured in the same run (float32 `jnp.dot`, "
              f"4096 x 4096, best of several): {_fmt(peak, 1)} GFLOP/s. MFU "
              f"target: >= {int(MFU_TARGET * 100)}% of it."
              + (f" The {mp_label} rows: data parallelism over "
                 "jax.distributed (gloo on loopback), 256 / "
                 f"{mp.get('num_processes')} rows per process, one flat "
                 "gradient all-reduce a step "
                 "(`TrainLoopConfig.local_accumulation`); their MFU is "
                 "against the larger of the whole machine's peak and the "
                 "sum of the processes' peaks measured together, in their "
                 "own run." if ours_train_mp else "")
              + (" The last column divides by the highest whole-machine peak"
                 f" measured in any of these runs ({_fmt(top_peak, 1)} "
                 "GFLOP/s): the peak itself drifts between runs, and this "
                 "denominator is the most conservative." if top_peak
                 else ""), "",
              "| mode | s/step | rows/s | users/s | real interactions/s | "
              "tokens/s (rows x L) | GFLOP/step | GFLOP/s | MFU | MFU vs "
              "the highest peak |",
              "|---|---|---|---|---|---|---|---|---|---|"] + mrows + [""]
    verdicts = []
    for one_core in (False, True):
      best_mfu, best_arm = max(
          ((ours(m, "mfu", res) or 0.0, label) for m, label, res in arms
           if m.startswith("staged") and ("one core" in label) == one_core),
          default=(None, ""))
      if best_mfu is not None:
        verdicts.append(
            f"{'met' if best_mfu >= MFU_TARGET else 'NOT met'} "
            f"{'pinned to one core' if one_core else 'on all cores'} (best "
            f"{100 * best_mfu:.1f}%, {best_arm})")
    best_top = max(((mfu_top(m, label, res) or 0.0, label)
                    for m, label, res in arms if m.startswith("staged")),
                   default=(0.0, ""))
    caveat = (f" Against the highest peak of any run ({_fmt(top_peak, 1)} "
              f"GFLOP/s) the best on all cores is {100 * best_top[0]:.1f}% "
              f"({best_top[1]})." if top_peak and best_top[0] else "")
    lines += [f"MFU target (>= {int(MFU_TARGET * 100)}% of the matmul peak):"
              f" {'; '.join(verdicts)}.{caveat}", ""]
  eval_modes = [m for m in ("cached", "pipeline", "staged", "staged_padded")
                if _median_over_rounds(ours_eval, "modes", m, "users_per_s")
                is not None]
  if eval_modes:
    lines += ["## Our evaluation throughput by input path", "",
              "Every validation user ranked over all items (history "
              "excluded). cached: `SequenceData` serves the split from memory"
              " after its first pass (what a run's periodic evaluations and "
              "the popularity baseline see); pipeline: every pass through the"
              " SeqIO/TF input pipeline; staged: batches read before timing;"
              " *_padded: `EvalConfig.length_buckets=False` (every batch at "
              "the full length, the path before length bucketing).", "",
              "| mode | users/s | s per pass |", "|---|---|---|"]
    for m in eval_modes:
      ups = _median_over_rounds(ours_eval, "modes", m, "users_per_s")
      users = _median_over_rounds(ours_eval, "users")
      lines.append(f"| {m} | {_fmt(ups)} | "
                   f"{_fmt(users / ups if users and ups else None, 2)} |")
    lines.append("")
  lines += _head_change_section(results_dir, ours_train)
  quality = _load(os.path.join(results_dir, "packing_quality.json"))
  if quality:
    qrows = []
    for arm in quality.get("arms", []):
      qrows.append(
          f"| {arm['name']} | {arm['rows_per_batch']} | {arm['steps']} | "
          f"{_fmt(arm['masked_accuracy']['mean'], 4)} +- "
          f"{_fmt(arm['masked_accuracy']['std'], 4)} | "
          f"{_fmt(arm['ndcg@10']['mean'], 4)} +- "
          f"{_fmt(arm['ndcg@10']['std'], 4)} | "
          f"{_fmt(arm['hr@10']['mean'], 4)} +- {_fmt(arm['hr@10']['std'], 4)}"
          f" | {_fmt(arm['train_seconds']['mean'], 1)} |")
    lines += ["## Packed vs padded at equal epochs", "",
              quality.get("description", ""), "",
              "| arm | rows/batch | steps | masked acc (held-out rows) | "
              "val NDCG@10 | val HR@10 | train s |",
              "|---|---|---|---|---|---|---|"] + qrows + [""]
  ours_quality = _rounds(results_dir, "ours_quality_")
  rb_quality = _rounds(results_dir, "recbole_quality_")
  lines += _quality_section(ours_quality, rb_quality)
  timed = sorted(ours_train + ours_train_mb + ours_train_1core + rb_train
                 + ours_eval
                 + ours_quality + rb_quality,
                 key=lambda r: r.get("machine", {}).get("date_utc", ""))
  commands = [r["machine"]["command"] for r in timed
              if r.get("machine", {}).get("command")]
  if commands:
    lines += ["## Exact commands", "",
              "Reproduce with `bash benchmarks/run_all.sh` (settings in its "
              "header, e.g. `ROUNDS=3`; they show as the flags below). The "
              "measurement processes of these results, in the order they "
              "ran:", "", "```"]
    lines += commands + ["```", ""]
  million = _load(os.path.join(results_dir, "million_items.json"))
  if million:  # its own run (python -m benchmarks.million_items), kept here
    from benchmarks import million_items  # pylint: disable=g-import-not-at-top
    lines += [million_items.results_section(million), ""]
  text = "\n".join(lines)
  out_path = out_path or os.path.join(os.path.dirname(results_dir),
                                      "RESULTS.md")
  with open(out_path, "w") as f:
    f.write(text)
  return out_path


if __name__ == "__main__":
  if len(sys.argv) >= 2 and sys.argv[1] == "summarize":
    print(summarize(*(sys.argv[2:3] or [RESULTS_DIR])))
  else:
    print("usage: python -m benchmarks.common summarize [RESULTS_DIR]")
    sys.exit(2)
