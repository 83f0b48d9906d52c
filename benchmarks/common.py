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


# -- FLOPs ---------------------------------------------------------------------


def bert4rec_flops_per_row(*, length: int, hidden: int, num_layers: int,
                           mlp_dim: int, predictions: int, vocab: int,
                           output_transform: bool = True) -> Dict[str, float]:
  """Forward matmul FLOPs of one Bert4Rec row (2 FLOPs per multiply-add).

  The embedding gather, LayerNorm, softmax and other element-wise work are
  not counted (the usual MFU convention). Attention is dense over the row
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


def summarize(results_dir: str = RESULTS_DIR,
              out_path: Optional[str] = None) -> str:
  """Builds RESULTS.md from the round files train_*/eval_*/recbole_*.json."""
  ours_train = _rounds(results_dir, "train_throughput_round")
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
    lines += [f"Machine: {machine.get('cpu_model')}, "
              f"{machine.get('cores_usable')} usable cores, "
              f"{machine.get('memory_gib')} GiB; {machine.get('date_utc')}. "
              f"jax {v.get('jax')}, flax {v.get('flax')}, tensorflow "
              f"{v.get('tensorflow')}. Load average (1 min) at the start of "
              f"each measurement: {', '.join(f'{x:.1f}' for x in loads)} "
              "(other jobs share the cores, so absolute figures are noisy; "
              "the A/B alternation keeps the ratios fair).", ""]

  def ours(mode, key):
    return _median_over_rounds(ours_train, "modes", mode, key)

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
  row("evaluation, full ranking of all users: users/s", our_eval_ups,
      rb_eval_ups, "eval_users_per_s")
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
    for mode in ("staged_padded", "staged_packed", "pipeline_padded",
                 "pipeline_packed"):
      if ours(mode, "step_time_s") is None:
        continue
      mfu = ours(mode, "mfu")
      mrows.append(
          f"| {mode} | {_fmt(ours(mode, 'step_time_s'), 3)} | "
          f"{_fmt(ours(mode, 'sequences_per_s'))} | "
          f"{_fmt(ours(mode, 'users_per_s'))} | "
          f"{_fmt(ours(mode, 'interactions_per_s'))} | "
          f"{_fmt(ours(mode, 'tokens_per_s'))} | "
          f"{_fmt(ours(mode, 'gflop_per_step'), 1)} | "
          f"{_fmt(ours(mode, 'achieved_gflops'), 1)} | "
          f"{_fmt(None if mfu is None else 100 * mfu, 1)}% |")
    lines += ["## Our training throughput and MFU", "",
              f"Matmul peak measured in the same run (float32 `jnp.dot`, "
              f"4096 x 4096, best of several): {_fmt(peak, 1)} GFLOP/s. MFU "
              f"target: >= {int(MFU_TARGET * 100)}% of it.", "",
              "| mode | s/step | rows/s | users/s | real interactions/s | "
              "tokens/s (rows x L) | GFLOP/step | GFLOP/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|"] + mrows + [""]
    best_mfu = max((ours(m, "mfu") or 0.0) for m in
                   ("staged_padded", "staged_packed"))
    lines += [f"MFU target (>= {int(MFU_TARGET * 100)}% of the matmul peak):"
              f" {'met' if best_mfu >= MFU_TARGET else 'NOT met'} (best "
              f"{100 * best_mfu:.1f}%).", ""]
  prop = [r for r in ours_train if r.get("proposed_head_modes")]
  if prop:
    prows = []
    for mode in ("staged_padded", "staged_packed"):
      before = _median_over_rounds(prop, "modes", mode, "step_time_s")
      after = _median_over_rounds(prop, "proposed_head_modes", mode,
                                  "step_time_s")
      speedups = [x for r in prop for x in r["proposed_head_modes"].get(
          mode, {}).get("speedup_per_window", [])]
      if before is None or after is None:
        continue
      mfu = _median_over_rounds(prop, "proposed_head_modes", mode, "mfu")
      prows.append(
          f"| {mode} | {_fmt(before, 3)} | {_fmt(after, 3)} | "
          f"{_fmt(statistics.median(speedups), 2)}x | "
          f"{_fmt(None if mfu is None else 100 * mfu, 1)}% |")
    lines += ["## Proposed output-layer change (experiment, not yet in "
              "recsys_jax)", "",
              "`ProposedHeadBert4RecModel` in benchmarks/train_throughput.py: "
              "the same loss and gradients (checked in "
              "tests/test_benchmarks_smoke.py) with the output bias folded "
              "into the tied matmul, the table gradient computed as "
              "(q^T g)^T, the target logit gathered, and no argmax pass. "
              "Timed in the same process, alternating windows with the "
              "project's model.", "",
              "| mode | project s/step | proposed s/step | speedup (median of "
              "paired windows) | MFU proposed |",
              "|---|---|---|---|---|"] + prows + [""]
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
  commands = []
  for r in ours_train[:1] + rb_train[:1] + ours_eval[:1]:
    c = r.get("machine", {}).get("command")
    if c:
      commands.append(c)
  if commands:
    lines += ["## Exact commands (first round; see run_all.sh)", "", "```"]
    lines += commands + ["```", ""]
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
