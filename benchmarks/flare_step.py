r"""FLARE's training-step cost against the ID-only Bert4Rec, same batch.

  taskset -c 1 python -m benchmarks.flare_step \
      --output=benchmarks/results/flare_step.json

Both models take the sizes of gin/experiments/synthetic_{bert4rec,flare}.gin
(hidden 64, 2 layers, max length 50, 16 predictions per row, dropout 0.3;
FLARE: 4 latents, 1 Perceiver layer, 512 distinct items per pass, critiques
and InfoNCE on) and the same train batches of `--data_dir` (the synthetic
default with its item-text and critique caches). One step = the jitted loss,
gradient and AdamW update, as the trainer runs it (compilation excluded by a
warm-up). Rounds alternate the two models; reported: seconds per step per
model (median over rounds), the ratio, and the token-encoding cache's bytes
per item. Run it alone on a quiet core.
"""

import argparse
import os
import sys

from benchmarks.common import machine
from benchmarks.common import train_step
from recsys_jax.input_pipeline import sequence_data
from recsys_jax.model_lib import builders
from recsys_jax.text import item_text_cache


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data/synthetic")
  parser.add_argument("--item_text_cache", default=None,
                      help="default <data_dir>/item_text_random")
  parser.add_argument("--critique_text_cache", default=None,
                      help="default <data_dir>/critique_text_random")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--max_distinct_items", type=int, default=512)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  items = args.item_text_cache or os.path.join(args.data_dir,
                                               "item_text_random")
  crits = args.critique_text_cache or os.path.join(args.data_dir,
                                                   "critique_text_random")
  info = machine.machine_info()
  data = sequence_data.SequenceData(
      "flare_step_bench", args.data_dir, max_len=50, mask_prob=0.4,
      max_predictions=16, critique_texts=crits)
  stream = data.train_batches(0, args.batch_size)
  batches = [next(stream) for _ in range(8)]
  common = dict(data_dir=args.data_dir, max_len=50, hidden=64, num_layers=2,
                num_heads=2, mlp_dim=256, dropout_rate=0.3,
                attention_dropout_rate=0.2, max_predictions=16,
                positions_from_end=True)
  models = {
      "bert4rec": builders.bert4rec(**common),
      "flare": builders.flare(**common, item_text_cache=items,
                              critique_text_cache=crits,
                              max_distinct_items=args.max_distinct_items),
  }
  times = {name: [] for name in models}
  for r in range(args.rounds):
    for name, model in models.items():
      sec = train_step.seconds_per_step(model, batches, args.reps)
      times[name].append(sec)
      print(f"round {r + 1}: {name} {sec * 1e3:.1f} ms/step", flush=True)
  summary = {name: machine.stats(v) for name, v in times.items()}
  ratio = summary["flare"]["median"] / summary["bert4rec"]["median"]
  cache = item_text_cache.ItemTextCache(items)
  per_item = item_text_cache.bytes_per_item(
      cache.max_text_len, cache.d_model, cache.manifest["dtype"], True)
  print(f"FLARE / ID-only step time: {ratio:.2f}x; token-encoding cache "
        f"{per_item} bytes/item ({cache.max_text_len} tokens x "
        f"{cache.d_model} x {cache.manifest['dtype']})")
  if args.output:
    machine.write_result(args.output, {
        "what": "seconds per training step (loss, gradient, AdamW update)",
        "batch_size": args.batch_size, "reps": args.reps,
        "seconds_per_step": summary, "flare_over_id_only": ratio,
        "cache_bytes_per_item": per_item,
        "cache": {"max_text_len": cache.max_text_len,
                  "d_model": cache.d_model,
                  "dtype": cache.manifest["dtype"]},
        "max_distinct_items": args.max_distinct_items,
    }, info)
  return 0


if __name__ == "__main__":
  sys.exit(main())
