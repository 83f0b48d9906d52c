"""Time per step by HLO op and op category, from a jax.profiler trace."""

import glob
import gzip
import json
import os
import re
from typing import Any, Dict

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
