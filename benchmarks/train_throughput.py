r"""Training throughput and MFU of Bert4Rec through our real train step.

  python -m benchmarks.train_throughput \
      --output=benchmarks/results/train_throughput_round1.json

Sizes are the benchmark issue's (hidden 64, 2 layers, 2 heads, MLP 256,
length 50, batch 256, mask 0.2, dropout 0.2) on Beauty (prepared into
--data_dir from ../shared/data/amazon_beauty) or, without it, synthetic data
with Beauty's 12,101 items. The step is `trainer.make_train_step` jitted by
`trainer.jit_train_step` (shardings, donated state) on a `make_mesh()` mesh
with DATA_PARALLEL_RULES. Modes:

  staged_padded / staged_packed: a few real batches put on the device first,
    then only the step is timed (model speed);
  pipeline_padded / pipeline_packed: each step pulls its batch from
    `input_pipeline.SequenceData.train_batches` and fetches the metrics as
    `trainer.train_loop` does (end to end).

Compilation and `--warmup_steps` are excluded; each of `--repeats` windows
times `--steps` steps; figures are medians over windows. MFU = analytic
FLOPs per step (`common.train_flops_per_step`) / step time / the float32
matmul peak measured in the same process.

`--num_microbatches=n` builds the step with gradient accumulation
(`trainer.make_train_step(..., num_microbatches=n)`: the batch runs as n
micro-batches of batch / n rows, one update); it is recorded in the JSON.

`--num_processes=k` runs the modes as data parallelism over k processes on
this machine (the launcher starts them, each pinned with `taskset` to its own
block of the cores (one core each when k = cores) and holding one CPU device, joined by jax.distributed over loopback with
gloo collectives); the global batch stays the issue's 256 rows (256 / k per
process). MFU is then taken against the larger of the launcher's whole-machine
peak and the sum of the processes' peaks measured together.
`--local_accumulation` builds the step of
`TrainLoopConfig.local_accumulation` (each device accumulates its own
micro-batches; one flat all-reduce a step), which is what makes several
processes pay off on this machine (benchmarks/README.md).

`--smoke` runs tiny sizes in seconds.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
from recsys_jax.model_lib import sequence as model_lib  # pylint: disable=g-import-not-at-top
from recsys_jax.core import partitioning  # pylint: disable=g-import-not-at-top
from recsys_jax.core import trainer  # pylint: disable=g-import-not-at-top
from recsys_jax.models import bert4rec as bert4rec_lib  # pylint: disable=g-import-not-at-top
from recsys_jax.seqio_ext import preprocessors  # pylint: disable=g-import-not-at-top

MODES = ("staged_padded", "staged_packed", "pipeline_padded",
         "pipeline_packed")
SMOKE_SIZES = dict(hidden=16, num_layers=1, num_heads=2, mlp_dim=32,
                   max_len=12, batch_size=8, mask_prob=0.2, dropout_rate=0.2)


def _side(args, data: Dict[str, Any], prefix: str, packed: bool, mesh, rules):
  """(pipeline, compiled Setup, batch iterator, staged first batches).

  Packed rows may hold `--packed_max_predictions` masks (the packer fills a
  row only up to the positions the loss gathers).
  """
  sizes = args.sizes
  kind = "packed" if packed else "padded"
  pipe = input_pipeline.SequenceData(
      f"{prefix}_{kind}", data["data_dir"], max_len=sizes["max_len"],
      mask_prob=sizes["mask_prob"], packing=packed, seed=0,
      max_predictions=args.packed_max_predictions if packed else None)
  setup = Setup(args, pipe.num_items, packed, mesh, rules)
  it = pipe.train_batches(
      0, partitioning.local_batch_size(sizes["batch_size"]))
  first = [next(it) for _ in range(max(args.staged_batches, 1))]
  return pipe, setup, it, first


def batch_counts(batch: Dict[str, np.ndarray], max_predictions: int
                 ) -> Dict[str, int]:
  """Rows, users, real (non-padding) interactions and masked targets."""
  ids = np.asarray(batch["item_ids"])
  masked = (np.asarray(batch["loss_weights"]) > 0).sum(axis=1)
  if "segment_ids" in batch:
    users = int(np.asarray(batch["segment_ids"]).max(axis=1).sum())
  else:
    users = int((ids != 0).any(axis=1).sum())
  return {"rows": int(ids.shape[0]), "users": users,
          "interactions": int((ids != 0).sum()),
          "masked": int(masked.sum()),
          "masked_dropped": int(np.maximum(masked - max_predictions, 0).sum())}


def _add(total: Dict[str, int], c: Dict[str, int]) -> None:
  for k, v in c.items():
    total[k] = total.get(k, 0) + v


def _global_counts(counts: Dict[str, int]) -> Dict[str, int]:
  """This process's batch counts summed over all processes."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = sorted(counts)
  every = multihost_utils.process_allgather(
      np.asarray([counts[k] for k in keys], np.int32))
  return dict(zip(keys, (int(v) for v in np.asarray(every).sum(axis=0))))


class Setup:
  """Model, sharded state and jitted step for one (packing, P) setting."""

  def __init__(self, args, num_items: int, packed: bool, mesh, rules):
    sizes = args.sizes
    self.max_predictions = (args.packed_max_predictions if packed
                            else args.max_predictions)
    config = bert4rec_lib.Bert4RecConfig(
        num_items=num_items, max_len=sizes["max_len"], hidden=sizes["hidden"],
        num_layers=sizes["num_layers"], num_heads=sizes["num_heads"],
        mlp_dim=sizes["mlp_dim"], dropout_rate=sizes["dropout_rate"],
        attention_dropout_rate=sizes["dropout_rate"])
    self.model = model_lib.Bert4RecModel(
        config, max_predictions=self.max_predictions,
        loss_chunk_rows=args.loss_chunk_rows or None)
    self.num_microbatches = args.num_microbatches  # checked by parse_args
    # The defaults of gin/runs/train.gin (AdamW, warm-up, clipping).
    opt = trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=100,
                                  weight_decay=0.01, clip_norm=5.0)
    tx, schedule = trainer.make_optimizer(opt, 100_000)
    self.state, shardings, _ = trainer.init_state(
        self.model, tx, jax.random.PRNGKey(0), mesh, rules)
    self.step = trainer.jit_train_step(
        trainer.make_train_step(self.model, tx, schedule,
                                num_microbatches=self.num_microbatches,
                                local_accumulation=args.local_accumulation,
                                mesh=mesh),
        shardings, mesh)
    self.mesh, self.rules = mesh, rules
    self.rng = jax.random.PRNGKey(1)
    self.flops = common.train_flops_per_step(
        sizes["batch_size"], length=sizes["max_len"], hidden=sizes["hidden"],
        num_layers=sizes["num_layers"], mlp_dim=sizes["mlp_dim"],
        predictions=self.max_predictions, vocab=config.padded_vocab)
    self.flops_breakdown = common.bert4rec_flops_per_row(
        length=sizes["max_len"], hidden=sizes["hidden"],
        num_layers=sizes["num_layers"], mlp_dim=sizes["mlp_dim"],
        predictions=self.max_predictions, vocab=config.padded_vocab)
    self.padded_vocab = config.padded_vocab
    self.compile_s = None

  def run(self, batch):
    with partitioning.with_rules(self.rules):
      self.state, metrics = self.step(self.state, batch, self.rng)
    return metrics

  def compile_and_warm(self, batch, warmup_steps: int) -> None:
    t0 = time.perf_counter()
    jax.block_until_ready(self.run(batch))
    self.compile_s = time.perf_counter() - t0
    for _ in range(warmup_steps):
      jax.block_until_ready(self.run(batch))


def time_staged(setup: Setup, local_batches: List[Dict[str, np.ndarray]],
                steps: int, repeats: int) -> Dict[str, Any]:
  """Times `steps` steps over batches already on the device."""
  device_batches = [partitioning.host_to_global(b, setup.mesh)
                    for b in local_batches]
  per = [batch_counts(b, setup.max_predictions) for b in local_batches]
  windows = []
  counts: Dict[str, int] = {}
  for _ in range(repeats):
    t0 = time.perf_counter()
    metrics = None
    for i in range(steps):
      metrics = setup.run(device_batches[i % len(device_batches)])
    jax.block_until_ready((setup.state, metrics))
    windows.append(time.perf_counter() - t0)
    for i in range(steps):
      _add(counts, per[i % len(per)])
  return _summary(setup, windows, steps, counts, repeats)


def time_pipeline(setup: Setup, it: Iterator[Dict[str, np.ndarray]],
                  steps: int, repeats: int) -> Dict[str, Any]:
  """Times steps fed by the input pipeline, as trainer.train_loop feeds them."""
  windows, input_s = [], []
  counts: Dict[str, int] = {}
  for _ in range(repeats):
    t0 = time.perf_counter()
    wait = 0.0
    for _ in range(steps):
      ti = time.perf_counter()
      local = next(it)
      wait += time.perf_counter() - ti
      metrics = setup.run(partitioning.host_to_global(local, setup.mesh))
      jax.device_get(metrics)  # the train loop reads metrics every step
      _add(counts, batch_counts(local, setup.max_predictions))
    windows.append(time.perf_counter() - t0)
    input_s.append(wait)
  out = _summary(setup, windows, steps, counts, repeats)
  out["input_wait_s_per_step"] = float(np.median(input_s)) / steps
  return out


def _summary(setup: Setup, windows: List[float], steps: int,
             counts: Dict[str, int], repeats: int) -> Dict[str, Any]:
  counts = _global_counts(counts)
  step_time = float(np.median(windows)) / steps
  total_steps = steps * repeats
  rows = counts["rows"] / total_steps
  users = counts["users"] / total_steps
  inter = counts["interactions"] / total_steps
  achieved = setup.flops / step_time
  return {
      "step_time_s": step_time,
      "step_time_windows_s": [w / steps for w in windows],
      "sequences_per_s": rows / step_time,
      "users_per_s": users / step_time,
      "interactions_per_s": inter / step_time,
      "tokens_per_s": rows * setup.model.max_len / step_time,
      "rows_per_step": rows, "users_per_row": users / rows,
      "interactions_per_row": inter / rows,
      "masked_per_row": counts["masked"] / counts["rows"],
      "masked_dropped_fraction": counts["masked_dropped"] / max(
          counts["masked"], 1),
      "max_predictions": setup.max_predictions,
      "num_microbatches": setup.num_microbatches,
      "gflop_per_step": setup.flops / 1e9,
      "achieved_gflops": achieved / 1e9,
      "compile_s": setup.compile_s,
  }


def profile_steps(setup: Setup, local_batch: Dict[str, np.ndarray],
                  trace_dir: str, steps: int = 3) -> Dict[str, Any]:
  """Traces `steps` staged steps; time by HLO op and category per step."""
  batch = partitioning.host_to_global(local_batch, setup.mesh)
  with partitioning.with_rules(setup.rules):
    hlo = setup.step.lower(setup.state, batch, setup.rng).compile().as_text()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    metrics = None
    for _ in range(steps):
      metrics = setup.run(batch)
    jax.block_until_ready((setup.state, metrics))
  finally:
    jax.profiler.stop_trace()
  return common.profile_breakdown(trace_dir, hlo, steps)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default="/tmp/recsys_jax_bench/beauty",
                 help="prepared dataset (created from Beauty, or synthetic)")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--steps", type=int, default=10, help="steps per window")
  p.add_argument("--repeats", type=int, default=3, help="timed windows")
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--staged_batches", type=int, default=4,
                 help="distinct pre-staged batches cycled through")
  p.add_argument("--max_predictions", type=int, default=None,
                 help="padded rows (default ceil(0.2 * L) + 1 = 11)")
  p.add_argument("--packed_max_predictions", type=int, default=None,
                 help="packed rows hold several users' masks (default 2x)")
  p.add_argument("--loss_chunk_rows", type=int,
                 default=model_lib.DEFAULT_LOSS_CHUNK_ROWS,
                 help="rows per chunk of the fused full-softmax loss (0: one "
                 "chunk)")
  p.add_argument("--num_microbatches", type=int, default=1,
                 help="gradient accumulation: micro-batches per step (must "
                 "divide the batch size; 1 = none)")
  p.add_argument("--profile_dir", default=None,
                 help="trace 3 staged steps here and add a per-op breakdown")
  common.add_duel_flags(p, "recbole_peer.py")
  p.add_argument("--quality_epochs", type=int, default=0,
                 help="> 0: run the packed-vs-padded equal-epoch comparison "
                 "instead of the throughput modes")
  p.add_argument("--quality_seeds", type=int, default=2)
  p.add_argument("--quality_users", type=int, default=6000,
                 help="synthetic users of the quality comparison")
  p.add_argument("--quality_items", type=int, default=2000)
  p.add_argument("--matmul_n", type=int, default=4096)
  p.add_argument("--num_processes", type=int, default=1,
                 help="> 1: data parallel over this many processes on this "
                 "machine, each pinned to its block of the cores and holding "
                 "one CPU device, over jax.distributed on loopback (gloo); "
                 "the global batch stays --batch_size (issue sizes)")
  p.add_argument("--local_accumulation", action="store_true",
                 help="the step of TrainLoopConfig.local_accumulation: each "
                 "device runs its rows' micro-batches and the gradients are "
                 "all-reduced once per step as one buffer (without it XLA "
                 "all-reduces every parameter in every micro-batch)")
  p.add_argument("--process_id", type=int, default=None,
                 help=argparse.SUPPRESS)  # set by the launcher
  p.add_argument("--coordinator_address", default=None,
                 help=argparse.SUPPRESS)
  p.add_argument("--machine_peak_gflops", type=float, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument("--smoke", action="store_true", help="tiny, seconds")
  p.add_argument("--output", required=True)
  args = p.parse_args(argv)
  if args.num_microbatches < 1:
    p.error(f"--num_microbatches={args.num_microbatches}: expected >= 1")
  if args.num_processes < 1:
    p.error(f"--num_processes={args.num_processes}: expected >= 1")
  if args.num_processes > 1 and (args.quality_epochs or args.duel or
                                 args.profile_dir):
    p.error("--num_processes > 1 times the throughput modes only (not "
            "--quality_epochs, --duel or --profile_dir)")
  args.sizes = dict(SMOKE_SIZES if args.smoke else common.ISSUE_SIZES)
  local_rows = args.sizes["batch_size"] // args.num_processes
  if local_rows * args.num_processes != args.sizes["batch_size"]:
    p.error(f"--num_processes={args.num_processes} must divide the batch "
            f"size {args.sizes['batch_size']}")
  if local_rows % args.num_microbatches:
    p.error(f"--num_microbatches={args.num_microbatches} must divide the "
            f"rows per process {local_rows}")
  mp = args.max_predictions or preprocessors.default_max_predictions(
      args.sizes["mask_prob"], args.sizes["max_len"])
  args.max_predictions = mp
  args.packed_max_predictions = args.packed_max_predictions or min(
      2 * mp, args.sizes["max_len"])
  if args.smoke:
    args.steps, args.repeats, args.warmup_steps = 2, 1, 1
    args.staged_batches, args.matmul_n = 2, 256
  return args


def packing_quality(args, data: Dict[str, Any]) -> Dict[str, Any]:
  """Equal-epoch training of padded and packed arms; validation metrics.

  Arms: padded rows (batch B); packed rows (batch B, so ~users-per-row
  times fewer steps); packed rows with batch B / users-per-row (about the
  padded arm's users per step and number of steps). Each arm trains
  `--quality_epochs` epochs (linear warm-up over 10% of its steps, then
  linear decay) with each of `--quality_seeds` seeds, then ranks every
  validation user over all items with `evaluation.Evaluator`.
  """
  from recsys_jax.evaluation import evaluator as evaluation  # pylint: disable=g-import-not-at-top
  sizes = args.sizes
  bs = sizes["batch_size"]
  mesh = partitioning.make_mesh(1)
  rules = partitioning.DATA_PARALLEL_RULES
  packed_probe = input_pipeline.SequenceData(
      "bench_quality_packed", data["data_dir"], max_len=sizes["max_len"],
      mask_prob=sizes["mask_prob"], packing=True,
      max_predictions=args.packed_max_predictions)
  # Users per packed row, from one epoch of the packed stream.
  rows = segs = 0
  for b in _one_epoch(packed_probe, 32):
    rows += len(b["item_ids"])
    segs += int(np.asarray(b["segment_ids"]).max(axis=1).sum())
  per_row = segs / max(rows, 1)
  small = max(1, int(round(bs / per_row)))
  arms = [("padded", False, bs), ("packed", True, bs),
          ("packed_equal_users_per_step", True, small)]
  out_arms = []
  for name, packed, batch in arms:
    runs = []
    for seed in range(args.quality_seeds):
      pipe = input_pipeline.SequenceData(
          f"bench_quality_{name}_{seed}", data["data_dir"],
          max_len=sizes["max_len"], mask_prob=sizes["mask_prob"],
          packing=packed, seed=seed,
          max_predictions=args.packed_max_predictions if packed else None)
      steps_per_epoch = sum(1 for _ in _one_epoch(pipe, batch))
      total = max(1, steps_per_epoch * args.quality_epochs)
      args_copy = argparse.Namespace(**vars(args))
      args_copy.sizes = dict(sizes, batch_size=batch)
      setup = Setup(args_copy, pipe.num_items, packed, mesh, rules)
      opt = trainer.OptimizerConfig(learning_rate=1e-3,
                                    warmup_steps=max(1, total // 10),
                                    weight_decay=0.01, clip_norm=5.0)
      tx, schedule = trainer.make_optimizer(opt, total)
      setup.state, shardings, _ = trainer.init_state(
          setup.model, tx, jax.random.PRNGKey(seed), mesh, rules)
      setup.step = trainer.jit_train_step(
          trainer.make_train_step(setup.model, tx, schedule,
                                  num_microbatches=setup.num_microbatches),
          shardings, mesh)
      setup.rng = jax.random.PRNGKey(1000 + seed)
      it = pipe.train_batches(0, batch)
      correct = weight = 0.0
      t0 = time.perf_counter()
      for step in range(total):
        m = jax.device_get(setup.run(
            partitioning.host_to_global(next(it), mesh)))
        if step >= total - steps_per_epoch:  # the last epoch
          correct += float(m["correct_sum"])
          weight += float(m["weight_sum"])
      train_s = time.perf_counter() - t0
      evaluator = evaluation.Evaluator(
          setup.model, mesh, rules,
          evaluation.EvalConfig(batch_size=256, splits=("validation",),
                                popularity_baseline=False))
      res = evaluator.evaluate(setup.state.params,
                               pipe.eval_batches("validation", 256))
      runs.append({"seed": seed, "steps": total, "train_seconds": train_s,
                   "masked_accuracy": correct / max(weight, 1.0),
                   "ndcg@10": res["NDCG@10"], "hr@10": res["HR@10"]})
      print(f"quality {name} seed {seed}: {total} steps, masked acc "
            f"{runs[-1]['masked_accuracy']:.4f}, NDCG@10 "
            f"{res['NDCG@10']:.4f}, HR@10 {res['HR@10']:.4f} "
            f"({train_s:.0f}s)", flush=True)
    summary = {"name": name, "packed": packed, "rows_per_batch": batch,
               "steps": runs[0]["steps"], "runs": runs}
    for key in ("masked_accuracy", "ndcg@10", "hr@10", "train_seconds"):
      vals = np.array([r[key] for r in runs], np.float64)
      summary[key] = {"mean": float(vals.mean()),
                      "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    out_arms.append(summary)
  return {
      "benchmark": "packing_quality", "data": data, "sizes": sizes,
      "epochs": args.quality_epochs, "seeds": args.quality_seeds,
      "num_microbatches": args.num_microbatches,
      "users_per_packed_row": per_row, "arms": out_arms,
      "description": (
          f"{args.quality_epochs} epochs on {data['dataset']}, "
          f"{args.quality_seeds} seeds per arm (mean +- std). Masked "
          "accuracy: training masked-item accuracy over the last epoch "
          "(with dropout). Validation: full ranking over all items "
          "(leave-one-out, history not excluded).")}


def _one_epoch(pipe, batch_size: int):
  from recsys_jax.seqio_ext import batching  # pylint: disable=g-import-not-at-top
  features = list(input_pipeline.TRAIN_FEATURES + (
      input_pipeline.PACKED_EXTRA if pipe.packing else ()))
  return batching.train_batches(
      pipe.name, batch_size, seed=pipe.seed, num_epochs=1,
      features=features)


def duel(args, data: Dict[str, Any]) -> Dict[str, Any]:
  """Our side of the window-by-window alternation with recbole_peer.py.

  For each phase of `common.Turns.PHASES`, `--duel_windows` windows (eval:
  `--duel_eval_windows` full validation passes through the pipeline and the
  Evaluator), each taken only on our turn. Per-window figures are returned;
  RESULTS.md pairs each with RecBole's adjacent window.
  """
  from recsys_jax.evaluation import evaluator as evaluation  # pylint: disable=g-import-not-at-top
  turns = common.Turns(args.duel, parity=0)
  sizes = args.sizes
  bs = sizes["batch_size"]
  mesh = partitioning.make_mesh(1)
  rules = partitioning.DATA_PARALLEL_RULES
  sides = {}
  for packed in (False, True):
    kind = "packed" if packed else "padded"
    pipe, setup, it, first = _side(args, data, "bench_duel", packed, mesh,
                                   rules)
    setup.compile_and_warm(partitioning.host_to_global(first[0], mesh),
                           args.warmup_steps)
    for _ in range(args.warmup_steps):
      jax.device_get(setup.run(partitioning.host_to_global(next(it), mesh)))
    sides[kind] = (pipe, setup, it, first)
  pipe, setup = sides["padded"][:2]
  evaluator = evaluation.Evaluator(
      setup.model, mesh, rules,
      evaluation.EvalConfig(batch_size=256, exclude_history=True,
                            splits=("validation",), popularity_baseline=False))
  eval_batches = list(pipe.eval_batches("validation", 256))
  users = int(sum(np.asarray(b["valid"]).sum() for b in eval_batches))
  evaluator.evaluate(setup.state.params, eval_batches[:2])  # compile
  out: Dict[str, Any] = {}
  for phase in common.Turns.PHASES:
    windows = []
    count = args.duel_eval_windows if phase == "eval" else args.duel_windows
    for _ in range(count):
      turns.wait()
      if phase == "eval":
        t0 = time.perf_counter()
        evaluator.evaluate(setup.state.params,
                           pipe.eval_batches("validation", 256))
        sec = time.perf_counter() - t0
        windows.append({"seconds": sec, "users_per_s": users / sec})
      else:
        kind = phase.split("_")[1]
        _, s, it, first = sides[kind]
        if phase.startswith("staged"):
          r = time_staged(s, first, args.steps, 1)
        else:
          r = time_pipeline(s, it, args.steps, 1)
        windows.append({k: r[k] for k in (
            "step_time_s", "sequences_per_s", "users_per_s",
            "interactions_per_s")})
      windows[-1]["load_average"] = common.load_average()[0]
      turns.done()
    out[phase] = windows
    print(f"duel {phase}: " + ", ".join(
        f"{w.get('interactions_per_s', w.get('users_per_s')):.0f}"
        for w in windows), flush=True)
  return {"benchmark": "train_throughput_duel", "data": data,
          "sizes": sizes, "steps_per_window": args.steps,
          "num_microbatches": args.num_microbatches,
          "eval_users": users, "duel": out}


def _print(mode: str, res: Dict[str, Any]) -> None:
  print(f"{mode}: {res['step_time_s']:.3f} s/step, "
        f"{res['sequences_per_s']:.0f} rows/s, "
        f"{res['users_per_s']:.0f} users/s, "
        f"{res['interactions_per_s']:.0f} interactions/s, "
        f"MFU {100 * res['mfu']:.1f}%"
        + (f", {res['num_microbatches']} micro-batches"
           if res.get("num_microbatches", 1) > 1 else ""), flush=True)


def launch_processes(args, argv) -> Dict[str, Any]:
  """Runs this script as `--num_processes` pinned processes; merges output.

  The launcher (unpinned) first measures the whole machine's matmul peak as
  the one-process modes do; process i runs on its block of the usable cores
  (`common.pinned_commands`) and the processes measure their cores' peaks
  together again. MFU is taken against the larger of the two, so splitting
  the machine cannot flatter it.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  machine = common.machine_info()
  common.ensure_beauty_or_synthetic(args.data_dir)  # once, not racing
  peak = common.measure_matmul_peak(args.matmul_n)
  argv = list(sys.argv[1:] if argv is None else argv)
  cmds = common.pinned_commands(
      [sys.executable, os.path.abspath(__file__), *argv,
       f"--machine_peak_gflops={peak['best_gflops']}"],
      args.num_processes, add_num_processes=False)
  procs = [subprocess.Popen(cmd, env=dict(os.environ, **common.PROCESS_ENV))
           for cmd in cmds]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"--num_processes={args.num_processes}: process exit "
                     f"codes {codes}")
  with open(args.output) as f:
    result = json.load(f)
  result["process_machine"] = result.pop("machine")
  result["launcher_matmul_peak"] = peak
  path = common.write_result(args.output, result, machine)
  print(f"wrote {path}", flush=True)
  return result


def _measure_peak(args) -> Dict[str, Any]:
  """The matmul peak now: this process's (`best_gflops`), or with several
  processes all of theirs measured at once (`per_process_best_gflops`,
  `sum_best_gflops`)."""
  if jax.process_count() == 1:
    return common.measure_matmul_peak(args.matmul_n)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from recsys_jax.core import distributed  # pylint: disable=g-import-not-at-top
  distributed.barrier("matmul_peak")
  mine = common.measure_matmul_peak(args.matmul_n)
  every = np.asarray(multihost_utils.process_allgather(
      np.asarray([mine["best_gflops"]], np.float32))).reshape(-1)
  return {"per_process_best_gflops": [float(v) for v in every],
          "sum_best_gflops": float(every.sum())}


def main(argv=None):
  args = parse_args(argv)
  if args.num_processes > 1 and args.process_id is None:
    return launch_processes(args, argv)
  if args.num_processes > 1:
    from recsys_jax.core import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(args.coordinator_address, args.num_processes,
                           args.process_id, platform="cpu")
  machine = common.machine_info()
  if args.smoke:
    data = common.ensure_synthetic(args.data_dir, num_users=120,
                                   num_items=100)
  elif args.quality_epochs:
    data = common.ensure_synthetic(args.data_dir, args.quality_users,
                                   args.quality_items)
  else:
    data = common.ensure_beauty_or_synthetic(args.data_dir)
  if args.quality_epochs or args.duel:
    result = (packing_quality(args, data) if args.quality_epochs
              else duel(args, data))
    path = common.write_result(args.output, result, machine)
    print(f"wrote {path}", flush=True)
    return result
  sizes = args.sizes
  bs = sizes["batch_size"]
  mesh = partitioning.make_mesh(1)
  rules = partitioning.DATA_PARALLEL_RULES
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      raise ValueError(f"--modes: unknown mode {m!r}; expected {MODES}")
  result: Dict[str, Any] = {
      "benchmark": "train_throughput",
      "prng_impl": str(jax.config.jax_default_prng_impl),
      "data": data, "sizes": sizes, "devices": [str(d) for d in jax.devices()],
      "steps_per_window": args.steps, "repeats": args.repeats,
      "warmup_steps": args.warmup_steps,
      "num_microbatches": args.num_microbatches,
      "loss_chunk_rows": args.loss_chunk_rows,
      "num_processes": jax.process_count(),
      "local_accumulation": args.local_accumulation, "modes": {}}
  peaks = [_measure_peak(args)]

  for packed in (False, True):
    kind = "packed" if packed else "padded"
    wanted = [m for m in modes if m.endswith(kind)]
    if not wanted:
      continue
    pipe, setup, it, first = _side(args, data, "bench_train", packed, mesh,
                                   rules)
    masked = np.concatenate([(b["loss_weights"] > 0).sum(axis=1)
                             for b in first])
    # What the padded default cap would drop from these rows.
    result[f"masked_per_row_{kind}"] = {
        "mean": float(masked.mean()), "max": int(masked.max()),
        "dropped_fraction_at_default_cap": float(
            np.maximum(masked - args.max_predictions, 0).sum()
            / max(masked.sum(), 1)),
        "default_cap": args.max_predictions}
    setup.compile_and_warm(partitioning.host_to_global(first[0], mesh),
                           args.warmup_steps)
    for mode in wanted:
      if mode.startswith("staged"):
        res = time_staged(setup, first, args.steps, args.repeats)
      else:
        for _ in range(args.warmup_steps):  # warm the pipeline's buffers
          jax.device_get(setup.run(partitioning.host_to_global(next(it),
                                                               mesh)))
        res = time_pipeline(setup, it, args.steps, args.repeats)
      if args.profile_dir and mode.startswith("staged"):
        res["profile"] = profile_steps(
            setup, first[0], os.path.join(args.profile_dir, mode))
        print(f"{mode} profile (ms/step): "
              f"{res['profile']['by_category_ms_per_step']}", flush=True)
      res["flops_per_row_forward"] = setup.flops_breakdown
      res["padded_vocab"] = setup.padded_vocab
      result["modes"][mode] = res
    peaks.append(_measure_peak(args))

  if jax.process_count() > 1:
    # The machine's peak: the launcher's whole-machine measurement or all
    # processes' cores together, whichever is larger.
    together = max(p["sum_best_gflops"] for p in peaks)
    best_gflops = max(together, args.machine_peak_gflops or 0.0)
    result["matmul_peak"] = {
        "best_gflops": best_gflops,
        "launcher_best_gflops": args.machine_peak_gflops,
        "processes_together": peaks}
  else:
    # The peak: best over the measurements taken around the step timings.
    best = max(peaks, key=lambda p: p["best_gflops"])
    result["matmul_peak"] = dict(best, all_best_gflops=[
        p["best_gflops"] for p in peaks])
    best_gflops = best["best_gflops"]
  peak = best_gflops * 1e9
  if jax.process_index() == 0:
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
  for mode, res in result["modes"].items():
    res["mfu"] = res["achieved_gflops"] * 1e9 / peak
    res["mfu_best_window"] = (setup_flops(res) /
                              min(res["step_time_windows_s"]) / peak)
    if jax.process_index() == 0:
      _print(mode, res)
  if jax.process_index() == 0:
    path = common.write_result(args.output, result, machine)
    print(f"wrote {path}", flush=True)
  return result


def setup_flops(res: Dict[str, Any]) -> float:
  return res["gflop_per_step"] * 1e9


if __name__ == "__main__":
  main()
