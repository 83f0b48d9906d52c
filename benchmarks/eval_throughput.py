r"""Full-ranking evaluation throughput (users/s) through our Evaluator.

  python -m benchmarks.eval_throughput \
      --output=benchmarks/results/eval_throughput_round1.json

Every validation user of Beauty (or synthetic data with 12,101 items) is
scored over all items and the held-out item ranked by
`recsys_jax.evaluation.evaluator.Evaluator` (the jitted `score_fn` + `target_rank`
path; metrics HR/NDCG@{1,5,10,20}). The user's input items are excluded from
the ranking by default, as RecBole's full-sort evaluation does. Modes:

  cached: the project's path as a training run's periodic evaluation and
    `python -m recsys_jax.eval` see it after the first pass over a split:
    `Evaluator.evaluate` (length-bucketed, the default) over
    `SequenceData.eval_batches`, served from its in-memory cache. The
    analogue of RecBole's `evaluate` over its prebuilt DataLoader (whose
    dataset building is not timed either). The headline.
  pipeline: the same with the cache off: every pass reads the SeqIO/TF
    input pipeline (a run's first evaluation of a split).
  staged: batches read first, `Evaluator.evaluate` timed over them
    (length-bucketed): scoring, ranking, metric accumulation only.
  staged_padded: as staged with `EvalConfig.length_buckets=False` (every
    batch at the full length L; the path before bucketing); its metrics
    must equal the bucketed ones.

A warm-up evaluation of two batches compiles first. Parameters are freshly
initialised (throughput does not depend on their values).
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from recsys_jax.evaluation import evaluator as evaluation  # pylint: disable=g-import-not-at-top
from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
from recsys_jax.model_lib import sequence as model_lib  # pylint: disable=g-import-not-at-top
from recsys_jax.core import partitioning  # pylint: disable=g-import-not-at-top
from recsys_jax.core import trainer  # pylint: disable=g-import-not-at-top
from recsys_jax.models import bert4rec as bert4rec_lib  # pylint: disable=g-import-not-at-top

MODES = ("cached", "pipeline", "staged", "staged_padded")
SMOKE_SIZES = dict(hidden=16, num_layers=1, num_heads=2, mlp_dim=32,
                   max_len=12, batch_size=8, mask_prob=0.2, dropout_rate=0.2)


def _numbers(metrics) -> Dict[str, float]:
  return {k: v for k, v in (metrics or {}).items()
          if isinstance(v, (int, float))}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default="/tmp/recsys_jax_bench/beauty")
  p.add_argument("--split", default="validation")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--exclude_history", type=int, default=1,
                 help="1: drop the user's input items (RecBole does)")
  p.add_argument("--profile_dir", default=None,
                 help="trace a staged evaluation of a few batches here")
  p.add_argument("--smoke", action="store_true", help="tiny, seconds")
  p.add_argument("--output", required=True)
  args = p.parse_args(argv)
  args.sizes = dict(SMOKE_SIZES if args.smoke else common.ISSUE_SIZES)
  if args.smoke:
    args.batch_size, args.repeats = 8, 1
  return args


def profile_eval(evaluator, params, batches, mesh, trace_dir: str
                 ) -> Dict[str, Any]:
  """Per-op device time of `Evaluator.evaluate` over `batches`, and wall."""
  local = {k: v for k, v in batches[0].items() if k != "valid"}
  local["negatives"] = np.zeros((len(local["targets"]), 1), np.int32)
  glob = partitioning.host_to_global(local, mesh)
  negs = glob.pop("negatives")
  with partitioning.with_rules(evaluator.rules):
    hlo = evaluator._rank.lower(params, glob, negs).compile().as_text()  # pylint: disable=protected-access
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  t0 = time.perf_counter()
  try:
    evaluator.evaluate(params, batches)
  finally:
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
  out = common.profile_breakdown(trace_dir, hlo, len(batches))
  out["wall_ms_per_batch"] = 1e3 * wall / len(batches)
  return out


def main(argv=None):
  args = parse_args(argv)
  machine = common.machine_info()
  if args.smoke:
    data = common.ensure_synthetic(args.data_dir, num_users=120,
                                   num_items=100)
  else:
    data = common.ensure_beauty_or_synthetic(args.data_dir)
  sizes = args.sizes
  mesh = partitioning.make_mesh(1)
  rules = partitioning.DATA_PARALLEL_RULES
  def sequence_data(name, cache_bytes):
    return input_pipeline.SequenceData(
        name, data["data_dir"], max_len=sizes["max_len"],
        mask_prob=sizes["mask_prob"], eval_cache_bytes=cache_bytes)
  pipe = sequence_data("bench_eval", 1 << 30)
  uncached = sequence_data("bench_eval_uncached", 0)
  config = bert4rec_lib.Bert4RecConfig(
      num_items=pipe.num_items, max_len=sizes["max_len"],
      hidden=sizes["hidden"], num_layers=sizes["num_layers"],
      num_heads=sizes["num_heads"], mlp_dim=sizes["mlp_dim"],
      dropout_rate=sizes["dropout_rate"],
      attention_dropout_rate=sizes["dropout_rate"])
  model = model_lib.Bert4RecModel(config)
  state, _, _ = trainer.init_state(model, optax.identity(),
                                   jax.random.PRNGKey(0), mesh, rules)
  params = state.params
  cfg = evaluation.EvalConfig(batch_size=args.batch_size,
                              exclude_history=bool(args.exclude_history),
                              splits=(args.split,), popularity_baseline=False)
  evaluators = {
      buckets: evaluation.Evaluator(
          model, mesh, rules,
          dataclasses.replace(cfg, length_buckets=buckets))
      for buckets in (True, False)}

  t0 = time.perf_counter()
  staged = list(pipe.eval_batches(args.split, args.batch_size))  # fills cache
  first_pass_s = time.perf_counter() - t0
  users = int(sum(np.asarray(b["valid"]).sum() for b in staged))
  t0 = time.perf_counter()
  evaluators[False].evaluate(params, staged[:2])  # compile
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  evaluators[True].evaluate(params, staged)  # compile every bucket width
  compile_s += time.perf_counter() - t0

  result: Dict[str, Any] = {
      "benchmark": "eval_throughput", "data": data, "sizes": sizes,
      "split": args.split, "users": users, "batch_size": args.batch_size,
      "num_items": pipe.num_items, "padded_vocab": config.padded_vocab,
      "protocol": evaluation.protocol_name(cfg), "compile_s": compile_s,
      "input_first_pass_s": first_pass_s,
      "devices": [str(d) for d in jax.devices()], "modes": {}}
  metrics = None
  for mode in [m for m in args.modes.split(",") if m]:
    if mode not in MODES:
      raise ValueError(f"--modes: unknown mode {mode!r}; expected {MODES}")
    evaluator = evaluators[mode != "staged_padded"]
    times = []
    for _ in range(args.repeats):
      if mode in ("staged", "staged_padded"):
        batches = staged
      else:
        source = pipe if mode == "cached" else uncached
        batches = source.eval_batches(args.split, args.batch_size)
      t0 = time.perf_counter()
      metrics = evaluator.evaluate(params, batches)
      times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    result["modes"][mode] = {"seconds": times, "users_per_s": users / sec,
                             "metrics": _numbers(metrics)}
    if mode == "staged":
      result["modes"][mode]["row_lengths"] = [
          int(b["item_ids"].shape[1]) for b in evaluation.length_bucketed(
              staged, multiple=cfg.bucket_multiple,
              window=cfg.bucket_window)]
    print(f"eval {mode}: {users / sec:.0f} users/s ({sec:.2f}s for {users} "
          "users)", flush=True)
  if args.profile_dir:
    result["profile"] = profile_eval(evaluators[False], params, staged[:4],
                                     mesh, args.profile_dir)
    print(f"profile: {result['profile']['by_category_ms_per_step']} ms per "
          f"batch; wall {result['profile']['wall_ms_per_batch']:.0f} ms per "
          "batch", flush=True)
  # The headline is the project's path as periodic evaluation runs it
  # (RecBole's evaluate reads its prebuilt DataLoader); pipeline mode adds a
  # first pass's SeqIO input cost.
  head = (result["modes"].get("cached") or result["modes"].get("pipeline")
          or result["modes"].get("staged"))
  result["users_per_s"] = head["users_per_s"] if head else None
  result["metrics_untrained"] = _numbers(metrics)
  path = common.write_result(args.output, result, machine)
  print(f"wrote {path}", flush=True)
  return result


if __name__ == "__main__":
  main()
