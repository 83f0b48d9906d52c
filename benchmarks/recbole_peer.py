r"""The peer: RecBole 1.2.1's BERT4Rec, same sizes, same data, same machine.

Runs in RecBole's OWN virtualenv (see `install_command`; run_all.sh creates
it), never the project's:

  ~/.cache/recsys_jax/recbole-venv/bin/python benchmarks/recbole_peer.py \
      --output=benchmarks/results/recbole_round1.json

What it measures (RecBole's own code paths, 2 torch threads):
  * trainer: `Trainer._train_epoch` over `--batches` batches after
    `--warmup_batches`, fed by RecBole's DataLoader (masking transform and
    collation included), so whole epochs (514 batches, ~130k prefix
    sequences on Beauty) are not needed; sequences/s and real (non-padding)
    interactions/s of the timed batches.
  * staged: the same number of batches collated beforehand, then
    `_train_epoch` over the list (model speed without the DataLoader).
  * eval: `Trainer.evaluate` over the validation split (full ranking over all
    items, history excluded, NDCG@10 / Recall@10): users/s.

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
DEFAULT_CONFIG = os.path.join(common.REPO_ROOT, "benchmarks", "recbole_config",
                              "bert4rec_beauty.yaml")
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
    self.stamps = []

  def __iter__(self):
    it = iter(self.source)
    for _ in range(self.n):
      batch = next(it)
      self.stamps.append(time.perf_counter())
      yield batch
    self.stamps.append(time.perf_counter())

  def __len__(self):
    return self.n


def _batch_counts(batch, seq_len_field: str):
  rows = int(len(batch))
  real = int(batch[seq_len_field].sum())
  return rows, real


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--raw_dir", default=common.BEAUTY_RAW)
  p.add_argument("--work_dir", default="/tmp/recsys_jax_recbole_bench")
  p.add_argument("--config", default=DEFAULT_CONFIG)
  p.add_argument("--warmup_batches", type=int, default=10)
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--skip_eval", action="store_true")
  p.add_argument("--skip_staged", action="store_true")
  p.add_argument("--output", required=True)
  args = p.parse_args(argv)
  machine = common.machine_info()

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  from recbole.config import Config  # pylint: disable=g-import-not-at-top
  from recbole.data import create_dataset, data_preparation  # pylint: disable=g-import-not-at-top,g-multiple-import
  from recbole.model.sequential_recommender import BERT4Rec  # pylint: disable=g-import-not-at-top
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
  config = Config(model="BERT4Rec", dataset=DATASET,
                  config_file_list=[args.config],
                  config_dict={"data_path": args.work_dir,
                               "checkpoint_dir": os.path.join(args.work_dir,
                                                              "saved")})
  init_seed(config["seed"], config["reproducibility"])
  torch.set_num_threads(args.threads)  # init_seed may reset it
  dataset = create_dataset(config)
  train_data, valid_data, _ = data_preparation(config, dataset)
  model = BERT4Rec(config, train_data._dataset).to(config["device"])  # pylint: disable=protected-access
  trainer = Trainer(config, model)
  setup_s = time.perf_counter() - t0
  seq_len_field = config["ITEM_LIST_LENGTH_FIELD"]
  train_sequences = len(train_data._dataset)  # pylint: disable=protected-access
  n_params = sum(x.numel() for x in model.parameters())
  print(f"RecBole setup {setup_s:.1f}s: {train_sequences} training sequences,"
        f" {dataset.item_num - 1} items, {n_params:,} parameters, "
        f"{torch.get_num_threads()} threads", flush=True)

  result = {
      "peer": "RecBole 1.2.1 BERT4Rec",
      "config_file": os.path.relpath(args.config, common.REPO_ROOT),
      "sizes": {k: config[k] for k in (
          "hidden_size", "n_layers", "n_heads", "inner_size",
          "MAX_ITEM_LIST_LENGTH", "train_batch_size", "mask_ratio",
          "hidden_dropout_prob", "attn_dropout_prob", "eval_batch_size")},
      "torch_threads": torch.get_num_threads(),
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
      "epoch_s_estimate": secs / rows * train_sequences,
  }
  print(f"RecBole trainer: {rows / secs:.1f} seq/s, {real / secs:.1f} real "
        f"interactions/s ({secs / args.batches:.3f} s/batch)", flush=True)

  if not args.skip_staged:
    it = iter(train_data)
    staged = [next(it) for _ in range(n)]
    trainer._train_epoch(staged[:args.warmup_batches], 0)  # pylint: disable=protected-access
    timed = staged[args.warmup_batches:]
    t0 = time.perf_counter()
    trainer._train_epoch(timed, 0)  # pylint: disable=protected-access
    secs = time.perf_counter() - t0
    rows = sum(int(len(b)) for b in timed)
    real = sum(int(b[seq_len_field].sum()) for b in timed)
    result["staged"] = {
        "batches": len(timed), "seconds": secs, "sequences": rows,
        "real_interactions": real, "sequences_per_s": rows / secs,
        "interactions_per_s": real / secs}
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
