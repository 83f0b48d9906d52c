r"""Turns a raw dataset into the prepared form (see data/prepared.py).

  python -m recsys_jax.data.prepare --format=sequence_file \
      --input=Beauty.txt --item_metadata=beauty_items.jsonl \
      --output_dir=/tmp/beauty

Formats: synthetic, sequence_file, movielens, amazon, regen (docs/DATASETS.md).
Bad input stops with exit code 2 and one line naming file:line and what was
expected; --on_bad_line=skip counts such records in stats.json instead.
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from recsys_jax.data import bad_input
from recsys_jax.data import prepared

FORMATS = ("synthetic", "sequence_file", "movielens", "amazon", "regen")
EXIT_BAD_INPUT = 2
DEFAULT_TEXT_VOCAB_SIZE = 8000


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m recsys_jax.data.prepare",
      description="Prepare a raw recommendation dataset for training.")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--input", help="raw file, or directory for movielens")
  p.add_argument("--item_metadata", "--metadata", dest="item_metadata",
                 help="item metadata file (sequence_file: JSONL keyed by "
                 "item_id; amazon: metadata keyed by asin)")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--on_bad_line", default="error",
                 choices=bad_input.ON_BAD_LINE_CHOICES)
  p.add_argument("--min_interactions", type=int,
                 default=prepared.MIN_INTERACTIONS)
  p.add_argument("--kcore", type=int, default=5,
                 help="amazon: k-core filter; 0 or 1 disables it")
  p.add_argument("--num_shards", type=int, default=1)
  p.add_argument("--text_vocab_size", type=int, default=None,
                 help="SentencePiece vocabulary size; 0 to skip (default "
                 f"{DEFAULT_TEXT_VOCAB_SIZE}; synthetic: the generator's)")
  p.add_argument("--num_users", type=int, help="synthetic (generator default)")
  p.add_argument("--num_items", type=int, help="synthetic (generator default)")
  p.add_argument("--seed", type=int, help="synthetic (generator default)")
  return p


def _read(args, policy):
  """Dispatches to the reader of args.format; returns (users, items, source)."""
  # Imported here so `--help` and synthetic runs do not pay for every reader.
  from recsys_jax.data import readers  # pylint: disable=g-import-not-at-top
  if args.format == "sequence_file":
    return readers.read_sequence_file(
        args.input, item_metadata_path=args.item_metadata, policy=policy)
  if args.format == "movielens":
    return readers.read_movielens(args.input, policy=policy)
  if args.format == "amazon":
    return readers.read_amazon(args.input, metadata_path=args.item_metadata,
                               kcore=args.kcore, policy=policy)
  if args.format == "regen":
    return readers.read_regen(args.input, policy=policy)
  raise ValueError(f"unknown format {args.format!r}")


def prepare(args) -> dict:
  """Reads, validates and writes one dataset; returns its stats."""
  if args.format == "synthetic":
    from recsys_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    kwargs = {k: getattr(args, k) for k in ("num_users", "num_items", "seed")
              if getattr(args, k) is not None}
    if args.text_vocab_size is not None:
      kwargs["text_vocab_size"] = args.text_vocab_size or None
    return synthetic.generate(args.output_dir, num_shards=args.num_shards,
                              **kwargs)
  text_vocab_size = (DEFAULT_TEXT_VOCAB_SIZE if args.text_vocab_size is None
                     else args.text_vocab_size or None)
  if not args.input:
    raise bad_input.BadInputError(
        "--input", None, f"missing; --format={args.format} needs an input "
        "path")
  if args.item_metadata and args.format in ("movielens", "regen"):
    raise bad_input.BadInputError(
        "--item_metadata", None, f"not used by --format={args.format} "
        "(its metadata comes from the input itself)")
  policy = bad_input.BadInputPolicy(args.on_bad_line)
  users, items, source = _read(args, policy)
  extra_stats = source.pop("extra_stats", None)
  return prepared.write_prepared(
      args.output_dir, users, items, policy=policy, source=source,
      min_interactions=args.min_interactions, num_shards=args.num_shards,
      text_vocab_size=text_vocab_size, extra_stats=extra_stats)


def format_stats(stats: dict) -> str:
  """A short human-readable summary of stats.json."""
  lines = [f"users:        {stats.get('users', 0):,}",
           f"items:        {stats.get('items', 0):,}",
           f"interactions: {stats.get('interactions', 0):,}"]
  lengths = stats.get("sequence_length") or {}
  if lengths:
    keys = ["min", "p25", "p50", "p75", "p90", "p95", "p99", "max", "mean"]
    lines.append("length:       " + "  ".join(
        f"{k}={lengths[k]:g}" for k in keys if k in lengths))
  lines.append(f"skipped:      {json.dumps(stats.get('skipped') or {})}")
  for key in ("kcore", "duplicate_reviews_removed"):
    if key in stats:
      lines.append(f"{key}: {json.dumps(stats[key])}")
  if stats.get("narrative_fields"):
    lines.append(f"narratives:   {', '.join(stats['narrative_fields'])}")
  if stats.get("text_vocab"):
    lines.append(f"text vocab:   {stats['text_vocab']}")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported
  start = time.time()
  try:
    stats = prepare(args)
  except (bad_input.BadInputError, FileNotFoundError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"prepared {args.format} -> {args.output_dir} in "
        f"{time.time() - start:.1f}s")
  print(format_stats(stats or {}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
