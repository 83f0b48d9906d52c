r"""The peer: RecBole 1.2.1's BERT4Rec, same sizes, same data, same machine.

Runs in RecBole's OWN virtualenv (see `install_command`; run_all.sh creates
it), never the project's:

  ~/.cache/recsys_jax/recbole-venv/bin/python benchmarks/recbole_peer.py \
      --output=benchmarks/results/recbole_round1.json

What it measures (RecBole's own code paths, `--threads` torch threads,
default the usable cores):
  * trainer: `Trainer._train_epoch` over `--batches` batches after
    `--warmup_batches`, fed by RecBole's DataLoader (masking transform and
    collation included), so whole epochs (514 batches, ~130k prefix
    sequences on Beauty) are not needed; sequences/s and real (non-padding)
    interactions/s of the timed batches.
  * staged: the same number of batches collated beforehand, then
    `_train_epoch` over the list (model speed without the DataLoader).
  * eval: `Trainer.evaluate` over the validation split (full ranking over all
    items, history excluded, NDCG@10 / Recall@10): users/s.

Each timed figure also records the process CPU seconds per batch: with
`--threads` torch threads on a machine whose other jobs hold the cores,
torch's OpenMP threads spin at their barriers and wall time per batch
balloons (measured here: 2 threads 3-5x slower than 1 at load 10-13 on 2
cores), so a RecBole figure is only meaningful on a quiet machine; the
JSON's `machine.load_average_start` says how quiet it was.

Time to quality (`--quality_model=SASRec|BERT4Rec --budget_s=S`): trains
with `Trainer._train_epoch` over RecBole's DataLoader for S seconds of
training time, evaluating the test split (full ranking, history excluded)
every `--eval_every_s` seconds of training and at the end; reports HR@10 /
NDCG@10 at each point and the training time at which test NDCG@10 first
reached `--target_ndcg` (0.040):

  ~/.cache/recsys_jax/recbole-venv/bin/python benchmarks/recbole_peer.py \
      --quality_model=SASRec --budget_s=2700 \
      --output=benchmarks/results/recbole_quality_sasrec.json

The .inter atomic file is built from Beauty.txt in `--work_dir` (a temporary
directory, never the repository); the timestamp of an interaction is its
position in the user's time-ordered line, which gives RecBole the same
leave-one-out split as ours. BERT4Rec reads no item features, so the
Amazon_Beauty.item file is not loaded.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from benchmarks import common  # pylint: disable=g-import-not-at-top

DEFAULT_VENV = os.path.expanduser("~/.cache/recsys_jax/recbole-venv")
CONFIG_DIR = os.path.join(common.REPO_ROOT, "benchmarks", "recbole_config")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "bert4rec_beauty.yaml")
QUALITY_CONFIGS = {"BERT4Rec": DEFAULT_CONFIG,
                   "SASRec": os.path.join(CONFIG_DIR, "sasrec_beauty.yaml")}
DATASET = "beauty_bench"


def install_command(venv: str = DEFAULT_VENV) -> str:
  """How run_all.sh builds RecBole's virtualenv (torch from local wheels)."""
  # torch 2.13 needs setuptools >= 77.0.3; < 81 keeps pkg_resources for ray.
  return (f"python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 "
          "recbole==1.2.1 'setuptools>=77.0.3,<81' 'numpy<2' 'pandas<2.2'")


def write_inter_file(beauty_txt: str, work_dir: str) -> str:
  """`work_dir/beauty_bench/beauty_bench.inter` from a Beauty.txt file."""
  out_dir = os.path.join(work_dir, DATASET)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{DATASET}.inter")
  tmp = path + ".tmp"
  with open(beauty_txt) as src, open(tmp, "w") as dst:
    dst.write("user_id:token\titem_id:token\ttimestamp:float\n")
    for line_no, line in enumerate(src, start=1):
      parts = line.split()
      if len(parts) < 2:
        raise ValueError(f"{beauty_txt}:{line_no}: expected 'user item1 "
                         f"item2 ...', got {line.strip()!r}")
      user = parts[0]
      for t, item in enumerate(parts[1:]):
        dst.write(f"{user}\t{item}\t{t}\n")
  os.replace(tmp, path)
  return path


class _CountedBatches:
  """Yields `n` batches of `source`, stamping the time each is handed out."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n
    self.stamps, self.cpu_stamps = [], []

  def _stamp(self):
    self.stamps.append(time.perf_counter())
    self.cpu_stamps.append(time.process_time())

  def __iter__(self):
    it = iter(self.source)
    for _ in range(self.n):
      batch = next(it)
      self._stamp()
      yield batch
    self._stamp()

  def __len__(self):
    return self.n


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _batch_counts(batch, seq_len_field: str):
  rows = int(len(batch))
  real = int(batch[seq_len_field].sum())
  return rows, real


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--raw_dir", default=common.BEAUTY_RAW)
  p.add_argument("--work_dir", default="/tmp/recsys_jax_recbole_bench")
  p.add_argument("--config", default=None,
                 help="RecBole yaml (default: recbole_config/"
                 "bert4rec_beauty.yaml, or the --quality_model's)")
  p.add_argument("--warmup_batches", type=int, default=10)
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--threads", type=int, default=_usable_cores(),
                 help="torch intra-op threads (default: the usable cores)")
  p.add_argument("--quality_model", default=None,
                 choices=sorted(QUALITY_CONFIGS),
                 help="run the time-to-quality mode with this model")
  p.add_argument("--budget_s", type=float, default=2700.0,
                 help="quality mode: training seconds (DataLoader included, "
                 "evaluation excluded)")
  p.add_argument("--eval_every_s", type=float, default=300.0,
                 help="quality mode: test evaluation every this many "
                 "training seconds (and at the end)")
  p.add_argument("--target_ndcg", type=float, default=0.040)
  p.add_argument("--max_batches", type=int, default=0,
                 help="quality mode: stop after this many batches (smoke)")
  p.add_argument("--skip_eval", action="store_true")
  p.add_argument("--skip_staged", action="store_true")
  common.add_duel_flags(p, "train_throughput.py")
  p.add_argument("--output", required=True)
  args = p.parse_args(argv)
  args.output = os.path.abspath(args.output)  # the run chdirs to work_dir
  if args.config is None:
    args.config = QUALITY_CONFIGS[args.quality_model or "BERT4Rec"]
  model_name = args.quality_model or "BERT4Rec"
  machine = common.machine_info()

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  from recbole.config import Config  # pylint: disable=g-import-not-at-top
  from recbole.data import create_dataset, data_preparation  # pylint: disable=g-import-not-at-top,g-multiple-import
  from recbole.model import sequential_recommender  # pylint: disable=g-import-not-at-top
  from recbole.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from recbole.utils import init_seed  # pylint: disable=g-import-not-at-top

  beauty_txt = os.path.join(args.raw_dir, "Beauty.txt")
  if not os.path.exists(beauty_txt):
    raise FileNotFoundError(f"{beauty_txt} not found: the RecBole peer runs "
                            "on the real Beauty data only")
  os.makedirs(args.work_dir, exist_ok=True)
  write_inter_file(beauty_txt, args.work_dir)
  os.chdir(args.work_dir)  # RecBole writes log_tensorboard/ and saved/ here

  t0 = time.perf_counter()
  overrides = {"data_path": args.work_dir,
               "checkpoint_dir": os.path.join(args.work_dir, "saved")}
  if args.quality_model:
    overrides["metrics"] = ["Hit", "NDCG", "Recall"]
  # RecBole's Config also reads `--key=value` flags from sys.argv (over the
  # yaml and config_dict): hide this script's own flags from it.
  saved_argv, sys.argv = sys.argv, sys.argv[:1]
  try:
    config = Config(model=model_name, dataset=DATASET,
                    config_file_list=[args.config], config_dict=overrides)
  finally:
    sys.argv = saved_argv
  init_seed(config["seed"], config["reproducibility"])
  torch.set_num_threads(args.threads)  # after RecBole's setup, to be sure
  dataset = create_dataset(config)
  train_data, valid_data, test_data = data_preparation(config, dataset)
  model_cls = getattr(sequential_recommender, model_name)
  model = model_cls(config, train_data._dataset).to(config["device"])  # pylint: disable=protected-access
  trainer = Trainer(config, model)
  setup_s = time.perf_counter() - t0
  seq_len_field = config["ITEM_LIST_LENGTH_FIELD"]
  train_sequences = len(train_data._dataset)  # pylint: disable=protected-access
  n_params = sum(x.numel() for x in model.parameters())
  print(f"RecBole setup {setup_s:.1f}s: {train_sequences} training sequences,"
        f" {dataset.item_num - 1} items, {n_params:,} parameters, "
        f"{torch.get_num_threads()} threads", flush=True)

  threading = {"torch_threads": torch.get_num_threads(),
               "torch_interop_threads": torch.get_num_interop_threads(),
               "omp_env": {k: v for k, v in os.environ.items()
                           if k.startswith(("OMP_", "MKL_", "GOMP_"))}}
  if args.quality_model:
    result = time_to_quality(args, config, trainer, train_data, test_data)
    result.update(setup_s=setup_s, train_sequences_per_epoch=train_sequences,
                  parameters=n_params, num_items=dataset.item_num - 1,
                  config_file=os.path.relpath(args.config, common.REPO_ROOT),
                  install_command=install_command(), **threading)
    path = common.write_result(args.output, result, machine)
    print(f"wrote {path}", flush=True)
    return

  if args.duel:
    result = duel(args, trainer, train_data, valid_data, seq_len_field)
    result.update(setup_s=setup_s, train_sequences_per_epoch=train_sequences,
                  torch_threads=torch.get_num_threads())
    path = common.write_result(args.output, result, machine)
    print(f"wrote {path}", flush=True)
    return

  result = {
      "peer": "RecBole 1.2.1 BERT4Rec",
      "config_file": os.path.relpath(args.config, common.REPO_ROOT),
      "sizes": {k: config[k] for k in (
          "hidden_size", "n_layers", "n_heads", "inner_size",
          "MAX_ITEM_LIST_LENGTH", "train_batch_size", "mask_ratio",
          "hidden_dropout_prob", "attn_dropout_prob", "eval_batch_size")},
      **threading,
      "setup_s": setup_s,
      "train_sequences_per_epoch": train_sequences,
      "num_items": dataset.item_num - 1,
      "parameters": n_params,
      "install_command": install_command(),
  }

  # Trainer through its DataLoader: warm-up, then the timed batches.
  n = args.warmup_batches + args.batches
  counted = _CountedBatches(_RecordingLoader(train_data, seq_len_field), n)
  trainer._train_epoch(counted, 0)  # pylint: disable=protected-access
  cpu_s = counted.cpu_stamps[n] - counted.cpu_stamps[args.warmup_batches]
  loader = counted.source
  t_start = counted.stamps[args.warmup_batches]
  t_end = counted.stamps[n]
  rows = sum(loader.rows[args.warmup_batches:n])
  real = sum(loader.real[args.warmup_batches:n])
  secs = t_end - t_start
  result["trainer"] = {
      "batches": args.batches, "warmup_batches": args.warmup_batches,
      "seconds": secs, "sequences": rows, "real_interactions": real,
      "sequences_per_s": rows / secs, "interactions_per_s": real / secs,
      "s_per_batch": secs / args.batches,
      "cpu_s_per_batch": cpu_s / args.batches,
      "epoch_s_estimate": secs / rows * train_sequences,
  }
  print(f"RecBole trainer: {rows / secs:.1f} seq/s, {real / secs:.1f} real "
        f"interactions/s ({secs / args.batches:.3f} s/batch)", flush=True)

  if not args.skip_staged:
    it = iter(train_data)
    staged = [next(it) for _ in range(n)]
    trainer._train_epoch(staged[:args.warmup_batches], 0)  # pylint: disable=protected-access
    timed = staged[args.warmup_batches:]
    t0, c0 = time.perf_counter(), time.process_time()
    trainer._train_epoch(timed, 0)  # pylint: disable=protected-access
    secs = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    rows = sum(int(len(b)) for b in timed)
    real = sum(int(b[seq_len_field].sum()) for b in timed)
    result["staged"] = {
        "batches": len(timed), "seconds": secs, "sequences": rows,
        "real_interactions": real, "sequences_per_s": rows / secs,
        "interactions_per_s": real / secs,
        "cpu_s_per_batch": cpu_s / len(timed)}
    print(f"RecBole staged: {rows / secs:.1f} seq/s", flush=True)

  if not args.skip_eval:
    users = len(valid_data._dataset)  # pylint: disable=protected-access
    # One warm-up pass over a few batches is not possible through
    # Trainer.evaluate (it takes the whole loader), so run it twice and keep
    # the second (the first pays one-off allocations).
    times, scores = [], None
    for _ in range(2):
      t0 = time.perf_counter()
      scores = trainer.evaluate(valid_data, load_best_model=False,
                                show_progress=False)
      times.append(time.perf_counter() - t0)
    result["eval"] = {
        "split": "validation", "users": users, "seconds": times,
        "users_per_s": users / times[-1],
        "metrics_untrained": {k: float(v) for k, v in scores.items()},
        "protocol": "full ranking over all items, user history excluded",
    }
    result["users_per_s"] = users / times[-1]
    print(f"RecBole eval: {users / times[-1]:.1f} users/s "
          f"({times[-1]:.1f}s for {users} users)", flush=True)

  path = common.write_result(args.output, result, machine)
  print(f"wrote {path}", flush=True)


def _forever(loader):
  while True:
    yield from loader


def time_to_quality(args, config, trainer, train_data, test_data):
  """Trains for `--budget_s` training seconds; test metrics along the way.

  Training time counts `_train_epoch` over RecBole's DataLoader (masking,
  collation, forward, backward, Adam); the evaluations in between are timed
  apart and excluded. Epoch boundaries are crossed seamlessly (the loader
  reshuffles on each pass).
  """
  per_epoch = len(train_data)
  stream = _forever(train_data)
  state = {"train_s": 0.0, "batches": 0, "sequences": 0}
  points = []
  reached = None
  wall0 = time.perf_counter()

  def chunk(until_s):
    t0 = time.perf_counter()
    while state["train_s"] + time.perf_counter() - t0 < until_s:
      if args.max_batches and state["batches"] >= args.max_batches:
        return
      batch = next(stream)
      state["batches"] += 1
      state["sequences"] += int(len(batch))
      yield batch

  next_eval = min(args.eval_every_s, args.budget_s)
  while True:
    t0 = time.perf_counter()
    trainer._train_epoch(chunk(next_eval), state["batches"] // per_epoch)  # pylint: disable=protected-access
    state["train_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    res = trainer.evaluate(test_data, load_best_model=False,
                           show_progress=False)
    eval_s = time.perf_counter() - t0
    point = {"train_s": state["train_s"],
             "wall_s": time.perf_counter() - wall0,
             "batches": state["batches"],
             "epochs": state["batches"] / per_epoch,
             "sequences": state["sequences"], "eval_s": eval_s,
             "test": {k: float(v) for k, v in res.items()},
             "load_average": common.load_average()[0]}
    points.append(point)
    ndcg = point["test"].get("ndcg@10", 0.0)
    print(f"{args.quality_model} {state['train_s']:.0f}s training "
          f"({point['epochs']:.2f} epochs): test NDCG@10 {ndcg:.4f}, HR@10 "
          f"{point['test'].get('hit@10', float('nan')):.4f} "
          f"(eval {eval_s:.0f}s)", flush=True)
    if reached is None and ndcg >= args.target_ndcg:
      reached = point
    done = (state["train_s"] >= args.budget_s or
            (args.max_batches and state["batches"] >= args.max_batches))
    if done:
      break
    next_eval = min(next_eval + args.eval_every_s, args.budget_s)
  final = points[-1]
  return {
      "peer": f"RecBole 1.2.1 {args.quality_model}",
      "benchmark": "recbole_time_to_quality",
      "model": args.quality_model,
      "sizes": {k: config[k] for k in (
          "hidden_size", "n_layers", "n_heads", "inner_size",
          "MAX_ITEM_LIST_LENGTH", "train_batch_size", "hidden_dropout_prob",
          "attn_dropout_prob", "learning_rate", "loss_type")
                if k in config},
      "budget_s": args.budget_s, "eval_every_s": args.eval_every_s,
      "max_batches": args.max_batches,
      "target_ndcg@10": args.target_ndcg,
      "protocol": ("test split (leave-one-out), full ranking over all items,"
                   " user history excluded; HR@10 = hit@10 (one held-out "
                   "item per user, so = recall@10)"),
      "train_s": final["train_s"], "batches": final["batches"],
      "epochs": final["epochs"],
      "final_test": final["test"],
      "best_test_ndcg@10": max(p["test"].get("ndcg@10", 0.0)
                               for p in points),
      "time_to_target_train_s": reached["train_s"] if reached else None,
      "time_to_target_wall_s": reached["wall_s"] if reached else None,
      "points": points,
  }


def duel(args, trainer, train_data, valid_data, seq_len_field: str):
  """RecBole's side of the alternation with train_throughput.py --duel.

  Phases as `common.Turns.PHASES`: staged_* -> `_train_epoch` over
  `--batches` pre-collated batches; pipeline_* -> `_train_epoch` over the
  next `--batches` batches of the DataLoader; eval -> `Trainer.evaluate`
  over the validation split. One window per turn.
  """
  import time as time_lib  # pylint: disable=g-import-not-at-top
  turns = common.Turns(args.duel, parity=1)
  stream = _forever(train_data)
  staged = [next(stream) for _ in range(args.batches)]
  trainer._train_epoch(staged[:args.warmup_batches] or staged[:1], 0)  # pylint: disable=protected-access
  trainer.evaluate(valid_data, load_best_model=False)  # warm-up pass
  users = len(valid_data._dataset)  # pylint: disable=protected-access
  out = {}
  for phase in common.Turns.PHASES:
    windows = []
    count = args.duel_eval_windows if phase == "eval" else args.duel_windows
    for _ in range(count):
      turns.wait()
      t0 = time_lib.perf_counter()
      if phase == "eval":
        trainer.evaluate(valid_data, load_best_model=False)
        sec = time_lib.perf_counter() - t0
        windows.append({"seconds": sec, "users_per_s": users / sec})
      else:
        if phase.startswith("staged"):
          batches = staged
          trainer._train_epoch(batches, 0)  # pylint: disable=protected-access
        else:
          batches = []

          def take():
            for _ in range(args.batches):
              b = next(stream)
              batches.append(b)
              yield b
          trainer._train_epoch(take(), 0)  # pylint: disable=protected-access
        sec = time_lib.perf_counter() - t0
        rows = sum(int(len(b)) for b in batches)
        real = sum(int(b[seq_len_field].sum()) for b in batches)
        windows.append({"seconds": sec, "sequences_per_s": rows / sec,
                        "interactions_per_s": real / sec})
      windows[-1]["load_average"] = common.load_average()[0]
      turns.done()
    out[phase] = windows
    print(f"duel {phase}: " + ", ".join(
        f"{w.get('interactions_per_s', w.get('users_per_s')):.0f}"
        for w in windows), flush=True)
  return {"peer": "RecBole 1.2.1 BERT4Rec", "benchmark": "recbole_duel",
          "batches_per_window": args.batches, "eval_users": users,
          "duel": out}


class _RecordingLoader:
  """Wraps RecBole's train DataLoader, recording each batch's size."""

  def __init__(self, loader, seq_len_field: str):
    self.loader, self.field = loader, seq_len_field
    self.rows, self.real = [], []
    self.shuffle = getattr(loader, "shuffle", True)

  def __iter__(self):
    for batch in self.loader:
      rows, real = _batch_counts(batch, self.field)
      self.rows.append(rows)
      self.real.append(real)
      yield batch


if __name__ == "__main__":
  main()
