"""Prepared datasets of the benchmarks (Beauty, else synthetic), made once."""

import os
import subprocess
import sys
from typing import Any, Dict, List

from benchmarks.common.constants import BEAUTY_NUM_ITEMS
from benchmarks.common.constants import BEAUTY_RAW
from benchmarks.common.constants import REPO_ROOT

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
