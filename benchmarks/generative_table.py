r"""One table of recommenders on the same users: ranking and generative.

  python -m benchmarks.generative_table --data_dir=data/synthetic \
      --entry="SASRec=runs/synthetic_sasrec/predict/test_step2000.jsonl" \
      --entry="LANCER=runs/synthetic_lancer/predict/test_step1000.jsonl" \
      --popularity --output=benchmarks/results/generative_table_synthetic

Every entry is a `python -m recsys_jax.predict` output: ranking models write
`top_k` per user, generative ones (ILM, CoLLM, LANCER) `ranked_items` (their
beams mapped to items). The table keeps the users every entry has (by
`user_id`; the leave-one-out target must agree) and reports Recall@K (= HR@K:
one held-out item) and NDCG@K over the same users, the full catalogue, the
user's history excluded, with each entry's prediction rate (users/s after
the first batch, from the `.timing.json` predict writes beside its output).
`--popularity` adds the most popular items of the training parts (x_1 ..
x_{n-2}), the history excluded. Writes `<output>.md` and `<output>.json`.
"""

import argparse
import collections
import json
import os
import sys
import time
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from recsys_jax.data import bad_input
from recsys_jax.evaluation import metrics as metrics_lib

KS = (5, 10)


def read_entry(path: str) -> Dict[str, Tuple[int, List[int]]]:
  """user_id -> (target item, ranked items) of one predictions file."""
  out = {}
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise bad_input.BadInputError(path, line_no, f"not JSON ({e})")
      user = rec.get("user_id")
      if user is None:
        raise bad_input.BadInputError(
            path, line_no, "no user_id (a generative task's records carry it "
            "when its examples do: history_to_next_title)")
      if "ranked_items" in rec:
        target, ranked = rec.get("target_item"), rec["ranked_items"]
      elif "top_k" in rec:
        target, ranked = rec.get("target"), rec["top_k"]
      else:
        raise bad_input.BadInputError(
            path, line_no, "neither top_k (ranking model) nor ranked_items "
            "(generative model with item mapping)")
      if isinstance(target, list):  # [item] as some records write it
        target = target[0] if len(target) == 1 else None
      if not target:
        continue
      out[str(user)] = (int(target), [int(i) for i in ranked])
  return out


def read_rate(path: str):
  """Steady users/s from predict's timing record (None when absent)."""
  timing = path[:-len(".jsonl")] + ".timing.json"
  if not os.path.exists(timing):
    return None
  with open(timing) as f:
    return json.load(f).get("steady_rows_per_second")


def popularity_entry(data_dir: str, users: Sequence[str]
                     ) -> Tuple[Dict[str, Tuple[int, List[int]]], float]:
  """Popularity's ranked lists for `users` (test: target x_n, history
  x_1..x_{n-1} excluded; counts over every user's x_1..x_{n-2})."""
  # pylint: disable-next=g-import-not-at-top
  from tasks import ilm_tasks
  ids, histories, _ = ilm_tasks.read_users(data_dir)
  counts = collections.Counter()
  for h in histories:
    counts.update(int(i) for i in h[:-2])
  order = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                kv[0]))]
  by_user = {str(u): h for u, h in zip(ids, histories)}
  start = time.perf_counter()
  out = {}
  for user in users:
    h = by_user.get(user)
    if h is None or len(h) < 2:
      continue
    seen = set(int(i) for i in h[:-1])
    ranked = [i for i in order[:max(KS) + len(seen)] if i not in seen]
    out[user] = (int(h[-1]), ranked[:max(KS)])
  seconds = time.perf_counter() - start
  return out, (len(out) / seconds if seconds > 0 else None)


def metrics_of(entry: Mapping[str, Tuple[int, List[int]]],
               users: Sequence[str]) -> Dict[str, float]:
  ranks = []
  for user in users:
    target, ranked = entry[user]
    ranks.append(ranked.index(target) if target in ranked[:max(KS)]
                 else max(KS))
  values = metrics_lib.per_row_metrics(np.asarray(ranks), KS)
  return {name: float(np.mean(values[name]))
          for k in KS for name in (f"HR@{k}", f"NDCG@{k}")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--entry", action="append", default=[],
                      help="NAME=PREDICTIONS_JSONL (repeat)")
  parser.add_argument("--data_dir", help="the prepared dataset (popularity)")
  parser.add_argument("--popularity", action="store_true")
  parser.add_argument("--output", required=True,
                      help="path prefix of the .md / .json written")
  args = parser.parse_args(argv)
  entries, rates = {}, {}
  for spec in args.entry:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      parser.error(f"--entry={spec!r}: expected NAME=PREDICTIONS_JSONL")
    if not os.path.exists(path):
      parser.error(f"--entry {name}: {path} does not exist (run "
                   "python -m recsys_jax.predict first)")
    entries[name] = read_entry(path)
    rates[name] = read_rate(path)
  if not entries:
    parser.error("give at least one --entry")
  users = sorted(set.intersection(*(set(e) for e in entries.values())))
  if args.popularity:
    if not args.data_dir:
      parser.error("--popularity needs --data_dir")
    entries["popularity"], rates["popularity"] = popularity_entry(
        args.data_dir, users)
    users = [u for u in users if u in entries["popularity"]]
  if not users:
    print("no user is in every entry", file=sys.stderr)
    return 1
  for name, entry in entries.items():
    targets = {u: entry[u][0] for u in users}
    ref_name, ref = next(iter(entries.items()))
    bad = [u for u in users if ref[u][0] != targets[u]]
    if bad:
      print(f"{name}: user {bad[0]} has target {targets[bad[0]]}, "
            f"{ref_name} has {ref[bad[0]][0]}: not the same split",
            file=sys.stderr)
      return 1
  rows = {name: dict(metrics_of(entry, users), users_per_second=rates[name])
          for name, entry in entries.items()}
  header = ["model"] + [f"{m}@{k}" for m in ("Recall", "NDCG") for k in KS]
  header.append("users/s")
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for name, row in rows.items():
    rate = row["users_per_second"]
    cells = [name] + [f"{row[f'{m}@{k}']:.4f}" for m in ("HR", "NDCG")
                      for k in KS]
    cells.append("-" if rate is None else f"{rate:,.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  note = (f"{len(users)} users (every entry's), test split, full catalogue, "
          "history excluded; Recall@K = HR@K (one held-out item).")
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output + ".md", "w") as f:
    f.write(table + "\n\n" + note + "\n\nCommand: python -m "
            "benchmarks.generative_table " + " ".join(
                a if " " not in a else repr(a) for a in
                (argv if argv is not None else sys.argv[1:])) + "\n")
  with open(args.output + ".json", "w") as f:
    json.dump({"users": len(users), "rows": rows,
               "entries": dict(arg.partition("=")[::2] for arg in
                               args.entry)}, f, indent=2)
  print(table)
  print(note)
  return 0


if __name__ == "__main__":
  sys.exit(main())
