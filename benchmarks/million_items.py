"""A 10^6-item catalogue on emulated devices: memory and step time.

Generates (or reuses) a synthetic prepared dataset with 10^6 items, then for
each loss trains Bert4Rec (hidden 64) a few dozen steps with the item table,
output bias and their Adam state sharded along `vocab` over the `model` mesh
axis ('vocab_parallel' rules), and runs a few full-ranking evaluation batches
(scores stay [batch, items / model] per device). Records the step time, the
peak host RSS and the per-device bytes of parameters and optimizer state read
from the arrays' addressable shards, next to the arithmetic
(padded rows x hidden x 4 B / model-axis size).

  python -m benchmarks.million_items                  # defaults below
  python -m benchmarks.million_items --losses=full --steps=10

Writes benchmarks/results/million_items.json and the '## 10^6-item catalogue'
section at the end of benchmarks/RESULTS.md (replacing an older copy of that
section only; `python -m benchmarks.common summarize` rebuilds it from the
JSON). Emulated CPU devices share the host's memory and cores, so the
times say little about accelerators; the byte counts are exact.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

if __name__ == "__main__" and "jax" not in sys.modules:
  # Must precede the first `import jax`: the number of emulated devices.
  _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith(
      "--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # pylint: disable=g-import-not-at-top

SECTION = "## 10^6-item catalogue"
DEFAULT_OUTPUT = os.path.join(common.RESULTS_DIR, "million_items.json")


def _status_mib(field: str) -> float:
  """A memory line of /proc/self/status (VmRSS, VmHWM = peak RSS) in MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _reset_peak_rss():
  """Restarts VmHWM from the current RSS (Linux), so each loss gets its own."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
  return resource.getrusage(who).ru_maxrss / 1024


def generate(data_dir: str, num_users: int, num_items: int) -> dict:
  """Makes the dataset in a child process (its own time and peak RSS)."""
  import json  # pylint: disable=g-import-not-at-top
  stats_path = os.path.join(data_dir, "stats.json")
  # The first run's generation time and RSS, reported again on reuse.
  record_path = os.path.join(data_dir, "million_items_generation.json")
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      stats = json.load(f)
    if stats["items"] != num_items or stats["users"] != num_users:
      raise ValueError(f"{data_dir} holds {stats['users']} users x "
                       f"{stats['items']} items; expected {num_users} x "
                       f"{num_items} (pick another --data_dir)")
    record = {}
    if os.path.exists(record_path):
      with open(record_path) as f:
        record = json.load(f)
    return {**record, "reused": True, "path": data_dir}
  code = ("import sys; from recsys_jax.data import synthetic; "
          "synthetic.generate(sys.argv[1], num_users=int(sys.argv[2]), "
          "num_items=int(sys.argv[3]), text_vocab_size=None)")
  start = time.time()
  subprocess.run([sys.executable, "-c", code, data_dir, str(num_users),
                  str(num_items)], check=True, cwd=common.REPO_ROOT)
  record = {"seconds": round(time.time() - start, 1),
            "peak_rss_mib": round(_peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
            "load_average": common.load_average(), "text_vocab": None}
  with open(record_path, "w") as f:
    json.dump(record, f)
  return {**record, "reused": False, "path": data_dir}


def device_bytes(tree, device) -> int:
  """Bytes of `tree`'s arrays that live on `device`."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def run_loss(args, data, loss: str, steps: int) -> dict:
  """Trains `steps` steps with `loss`; returns timings and bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recsys_jax.model_lib import builders  # pylint: disable=g-import-not-at-top
  from recsys_jax.evaluation import evaluator as evaluation  # pylint: disable=g-import-not-at-top
  from recsys_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  from recsys_jax.core import trainer  # pylint: disable=g-import-not-at-top

  model = builders.bert4rec(
      data_dir=args.data_dir, max_len=args.max_len, hidden=args.hidden,
      num_layers=2, num_heads=2, mlp_dim=4 * args.hidden, loss=loss,
      num_negatives=args.num_negatives if loss.startswith("sampled") else 0,
      mask_prob=0.2)
  mesh = partitioning.make_mesh(args.model_parallelism)
  rules = partitioning.get_rules("vocab_parallel")
  tx, schedule = trainer.make_optimizer(
      trainer.OptimizerConfig(warmup_steps=0, decay="constant"), steps)
  _reset_peak_rss()
  rss_before = _status_mib("VmRSS")
  t0 = time.time()
  state, shardings, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0),
                                           mesh, rules)
  jax.block_until_ready(state)
  init_s = time.time() - t0
  dev0 = jax.devices()[0]
  model_size = mesh.shape["model"]
  vocab, hidden = model.padded_vocab, args.hidden
  table = state.params["item_embed"]["embedding"]
  table_dev0 = [s.data.shape for s in table.addressable_shards
                if s.device == dev0][0]
  expected_table = vocab * hidden * 4 // model_size
  expected_bias = vocab * 4 // model_size
  params_dev0 = device_bytes(state.params, dev0)
  opt_dev0 = device_bytes(state.opt_state, dev0)
  other_params = device_bytes(
      {k: v for k, v in state.params.items()
       if k not in ("item_embed", "output_bias")}, dev0)

  step_fn = trainer.jit_train_step(trainer.make_train_step(model, tx,
                                                           schedule),
                                   shardings, mesh)
  local_bs = partitioning.local_batch_size(args.batch_size)
  it = data.train_batches(0, local_bs)
  rng = jax.random.PRNGKey(1)
  times, losses = [], []
  compile_s = None
  for i in range(steps):
    batch = partitioning.host_to_global(next(it), mesh)
    t0 = time.time()
    with partitioning.with_rules(rules, mesh):
      if i == 0:
        step_fn = step_fn.lower(state, batch, rng).compile()
        compile_s = time.time() - t0
        t0 = time.time()
      state, metrics = step_fn(state, batch, rng)
    losses.append(float(metrics["loss"]))  # waits for the step
    times.append(time.time() - t0)
  # Full-ranking evaluation over all 10^6 items, scores sharded by item.
  ev = evaluation.Evaluator(model, mesh, rules, evaluation.EvalConfig(
      batch_size=args.eval_batch_size, protocol="full"))
  batches = data.eval_batches("test", args.eval_batch_size)
  eval_batches = [next(batches) for _ in range(args.eval_batches + 1)]
  ev.evaluate(state.params, eval_batches[:1])  # compile
  t0 = time.time()
  res = ev.evaluate(state.params, eval_batches[1:])
  eval_s = time.time() - t0
  return {
      "loss": loss,
      "num_negatives": model.num_negatives,
      "max_predictions": model.max_predictions,
      "loss_chunk_rows": model.loss_chunk_rows,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "padded_vocab": vocab,
      "init_s": round(init_s, 2),
      "compile_s": round(compile_s, 2),
      "step_s": common.stats(times[1:] or times),
      "sequences_per_s": round(args.batch_size / float(np.median(
          times[1:] or times)), 2),
      "losses_first_last": [losses[0], losses[-1]],
      "table_shard_shape_device0": list(table_dev0),
      "per_device_bytes": {
          "params": params_dev0,
          "opt_state": opt_dev0,
          "params_excluding_table_and_bias": other_params,
          "expected_table": expected_table,
          "expected_bias": expected_bias,
          "expected_params": expected_table + expected_bias + other_params,
          "expected_opt_state_adam_mu_nu": 2 * (expected_table + expected_bias
                                                + other_params),
          "replicated_table_would_be": vocab * hidden * 4,
      },
      "eval": {"users": int(res["num_users"]), "seconds": round(eval_s, 2),
               "users_per_s": round(res["num_users"] / max(eval_s, 1e-9), 1),
               "HR@10": res["HR@10"]},
      "steps": steps,
      "rss_mib_before": round(rss_before, 1),
      "peak_rss_mib": round(_status_mib("VmHWM"), 1),
  }


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


def _command(machine: dict) -> str:
  """The recorded command as `python -m benchmarks.million_items ARGS`."""
  import shlex  # pylint: disable=g-import-not-at-top
  argv = shlex.split(machine.get("command", ""))
  if len(argv) >= 2 and argv[1].endswith(os.path.join("benchmarks",
                                                      "million_items.py")):
    return shlex.join(["python", "-m", "benchmarks.million_items"] + argv[2:])
  return machine.get("command", "")


def results_section(payload: dict) -> str:
  """The RESULTS.md section (markdown) of one run."""
  m, gen = payload["machine"], payload["dataset"]
  lines = [SECTION, "",
           f"`{_command(m)}` on {m.get('cpu_model')} "
           f"({m.get('cores_usable')} usable cores, shared; load average "
           f"{m.get('load_average_start')} at start, "
           f"{m.get('load_average_end')} at the end), "
           f"{m.get('date_utc')}. {payload['devices']} emulated CPU devices; "
           "times are CPU times of a loaded machine, the bytes are exact.", ""]
  if "seconds" not in gen:
    lines += [f"Dataset: reused `{gen['path']}` ({payload['num_users']:,} "
              f"users x {payload['num_items']:,} items).", ""]
  else:
    lines += [f"Dataset: {payload['num_users']:,} users x "
              f"{payload['num_items']:,} items generated in "
              f"{gen['seconds']:.0f} s, peak RSS {gen['peak_rss_mib']:.0f} MiB "
              "(synthetic.generate, no SentencePiece"
              + (", by an earlier run" if gen.get("reused") else "") + ").",
              ""]
  lines += ["| loss | mesh | step s (median) | seq/s | compile s | "
            "table shard / device | params / device (expected) | "
            "Adam state / device (expected) | eval users/s | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for r in payload["runs"]:
    b = r["per_device_bytes"]
    mesh = "x".join(str(v) for v in r["mesh"].values())
    lines.append(
        f"| {r['loss']}"
        + (f" (K={r['num_negatives']})" if r["num_negatives"] else "")
        + f" | {mesh} | {r['step_s']['median']:.2f} ({r['steps']} steps) | "
        f"{r['sequences_per_s']:.1f} | {r['compile_s']:.0f} | "
        f"{r['table_shard_shape_device0']} | {_mb(b['params'])} "
        f"({_mb(b['expected_params'])}) | {_mb(b['opt_state'])} "
        f"({_mb(b['expected_opt_state_adam_mu_nu'])}) | "
        f"{r['eval']['users_per_s']:.0f} | "
        f"{r['peak_rss_mib'] / 1024:.1f} GiB |")
  r0 = payload["runs"][0]
  v, e, m = r0["padded_vocab"], payload["hidden"], r0["mesh"]["model"]
  b = r0["per_device_bytes"]
  measured = [(r["per_device_bytes"]["params"],
               r["per_device_bytes"]["opt_state"]) for r in payload["runs"]]
  names = [r["loss"] for r in payload["runs"]]
  params_match = all(p == b["expected_params"] for p, _ in measured)
  # The optimizer's only other leaves: two int32 step counters (Adam's and
  # the learning-rate schedule's), replicated.
  opt_match = all(o == b["expected_opt_state_adam_mu_nu"] + 8
                  for _, o in measured)
  lines += ["", "Per-device bytes against the arithmetic (device 0; every "
            f"device holds the same): item table {v:,} padded rows x {e} x "
            f"4 B / {m} (model axis) = {b['expected_table']:,} B, output bias "
            f"{v:,} x 4 B / {m} = {b['expected_bias']:,} B, the rest of the "
            f"model replicated {b['params_excluding_table_and_bias']:,} B: "
            f"{b['expected_params']:,} B expected, "
            + ", ".join(f"{p:,} B ({n})" for n, (p, _) in
                   zip(names, measured)) + " measured ("
            + ("equal to the byte" if params_match else "NOT equal") +
            "). Adam's mu and nu are 2 x that = "
            f"{b['expected_opt_state_adam_mu_nu']:,} B expected, "
            + ", ".join(f"{o:,} B ({n})" for n, (_, o) in
                   zip(names, measured)) + " measured ("
            + ("equal up to the 8 B of the optimizer's two int32 step "
               "counters" if opt_match else "NOT equal") + "). A replicated "
            f"table would be {b['replicated_table_would_be']:,} B on every "
            f"device ({m}x).", ""]
  runs = {r["loss"]: r for r in payload["runs"]}
  state_all = sum(measured[0]) * payload["devices"]
  rss = ("Peak RSS is the whole process during that loss's init, steps "
         f"and evaluation; the {payload['devices']} emulated devices share "
         f"the host's memory, so it includes all devices' parameters and "
         f"Adam state ({payload['devices']} x {_mb(sum(measured[0]))} = "
         f"{_mb(state_all)}), the dense table gradient ({_mb(v * e * 4)}) "
         f"and the evaluation scores ([{payload.get('eval_batch_size', 128)}"
         f", items] float32).")
  if "full" in runs and len(runs) > 1:
    other = next(r for k, r in runs.items() if k != "full")
    p = runs["full"]["max_predictions"]
    logits = payload["batch_size"] * p * v * 4
    diff = (runs["full"]["peak_rss_mib"] - other["peak_rss_mib"]) * 2**20
    if "loss_chunk_rows" not in runs["full"]:  # before the fused loss
      rss += (f" The full softmax's logits at the masked positions are "
              f"[{payload['batch_size']}, {p}, {v:,}] float32 = "
              f"{_mb(logits)} per step (plus their gradient, unless XLA "
              "fuses it away);")
    else:
      from recsys_jax.model_lib import losses  # pylint: disable=g-import-not-at-top
      chunk_rows = runs["full"]["loss_chunk_rows"]
      rows = payload["batch_size"] * p
      chunk = rows // losses.loss_chunks(rows, chunk_rows)
      rss += (f" The full softmax's logits at the masked positions would be"
              f" [{payload['batch_size']}, {p}, {v:,}] float32 = "
              f"{_mb(logits)}; the fused loss "
              "(`losses.tied_softmax_cross_entropy`, `loss_chunk_rows`="
              f"{chunk_rows}) holds [{chunk}, {v:,}] = "
              f"{_mb(chunk * v * 4)} at a time (split over the model axis) "
              "and keeps none for the backward pass;")
    rss += f" its peak is {diff / 1e9:.1f} GB above {other['loss']}'s."
  lines += [rss, ""]
  if payload["num_users"] < payload["num_items"]:
    lines += [f"Users: {payload['num_users']:,} rather than "
              f"{payload['num_items']:,}, to keep the generation short (one "
              "core simulates ~1,000 users/s here); the number of users "
              "enters neither the model, nor the step, nor the bytes above.",
              ""]
  return "\n".join(lines)


def update_results_md(section: str, path: str):
  """Replaces (or appends) our section at the end of RESULTS.md."""
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if SECTION in text:
    start = text.index(SECTION)
    rest = text[start + len(SECTION):]
    nxt = rest.find("\n## ")
    tail = rest[nxt + 1:] if nxt >= 0 else ""
    text = text[:start].rstrip("\n") + "\n\n" + (
        tail.rstrip("\n") + "\n\n" if tail else "")
  text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
  with open(path, "w") as f:
    f.write(text.rstrip("\n") + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/recsys_jax_million_items")
  parser.add_argument("--num_users", type=int, default=20_000)
  parser.add_argument("--num_items", type=int, default=1_000_000)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--model_parallelism", type=int, default=8)
  parser.add_argument("--losses", default="sampled_uniform,full:12",
                      help="comma-separated LOSS[:STEPS] (default --steps)")
  parser.add_argument("--num_negatives", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_len", type=int, default=50)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--eval_batch_size", type=int, default=128)
  parser.add_argument("--eval_batches", type=int, default=4)
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--results_md", default=os.path.join(
      common.REPO_ROOT, "benchmarks", "RESULTS.md"),
                      help="'' to leave RESULTS.md alone")
  args = parser.parse_args(argv)
  machine = common.machine_info()
  dataset = generate(args.data_dir, args.num_users, args.num_items)
  print(f"dataset: {dataset}", flush=True)

  import jax  # pylint: disable=g-import-not-at-top
  from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
  if jax.device_count() != args.devices:
    raise RuntimeError(f"expected {args.devices} devices, JAX has "
                       f"{jax.device_count()} (run as a script so XLA_FLAGS "
                       "is set before jax is imported)")
  data = input_pipeline.SequenceData("million_items", args.data_dir,
                                     max_len=args.max_len, mask_prob=0.2)
  runs = []
  for spec in args.losses.split(","):
    loss, _, steps = spec.partition(":")
    print(f"training with loss={loss} ...", flush=True)
    runs.append(run_loss(args, data, loss, int(steps or args.steps)))
    print(runs[-1], flush=True)
  payload = {"benchmark": "million_items", "devices": args.devices,
             "num_users": args.num_users, "num_items": args.num_items,
             "hidden": args.hidden, "batch_size": args.batch_size,
             "max_len": args.max_len,
             "eval_batch_size": args.eval_batch_size, "dataset": dataset,
             "runs": runs}
  path = common.write_result(args.output, payload, machine)
  print(f"wrote {path}", flush=True)
  if args.results_md:
    import json  # pylint: disable=g-import-not-at-top
    with open(path) as f:
      update_results_md(results_section(json.load(f)), args.results_md)
    print(f"updated {args.results_md}", flush=True)


if __name__ == "__main__":
  main()
