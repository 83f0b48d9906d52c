r"""REGEN's cost on this machine: training and generation tokens per second.

  taskset -c 1 python -m benchmarks.regen_throughput \
      --output=benchmarks/results/regen_throughput.json

The model of gin/experiments/synthetic_regen.gin (T5 d_model 128, 3 + 3
layers; 20 history soft tokens from ALS + pooled text vectors through the
linear adapter; a 16-token prompt; 64 target tokens) on the synthetic default
(its random-encoder item-text cache, or --item_text_cache), against the same
T5 without soft tokens (the prompt alone): what the fusion costs. Training:
one step = the jitted loss, gradient and AdamW update, rounds alternating
the two models, reported as steps/s and target tokens/s (decoder tokens with
a loss weight). Generation: greedy and 4-beam decoding with the KV cache of
`--decode_len` tokens for one batch, reported as generated tokens/s (batch x
decode length / seconds, EOS not cut). Compilation excluded by a warm-up.
Run it alone on a quiet core.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

from benchmarks.common import machine
from benchmarks.common import train_step
from recsys_jax.input_pipeline import narrative_data
from recsys_jax.input_pipeline import text_data
from recsys_jax.model_lib import builders

T5_SIZES = dict(d_model=128, num_heads=4, d_kv=32, d_ff=512,
                num_encoder_layers=3, num_decoder_layers=3, dropout_rate=0.1)


def _time_generate(model, batch, num_beams, decode_len, reps):
  params = train_step.initial_params(model)
  fn = jax.jit(lambda p, b: model.predict_batch(
      p, b, num_beams=num_beams, max_decode_len=decode_len))
  jax.block_until_ready(fn(params, batch))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(params, batch)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data/synthetic")
  parser.add_argument("--item_text_cache", default=None,
                      help="default <data_dir>/item_text_random")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--decode_len", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  cache = args.item_text_cache or os.path.join(args.data_dir,
                                               "item_text_random")
  info = machine.machine_info()
  data = narrative_data.NarrativeData(
      "regen_bench", args.data_dir, field="user_summary", max_history=20,
      max_input_len=16, max_target_len=64)
  stream = data.train_batches(0, args.batch_size)
  batches = [text_data.model_inputs(next(stream)) for _ in range(4)]
  soft = builders.item_soft_tokens(data_dir=args.data_dir, d_model=128,
                                   item_text_cache=cache)
  models = {
      "t5_prompt_only": builders.t5(data_dir=args.data_dir, **T5_SIZES),
      "regen": builders.t5(
          data_dir=args.data_dir, **T5_SIZES, soft_token_module=soft,
          soft_token_inputs=builders.item_soft_token_inputs(max_history=20)),
  }
  target_tokens = float(np.mean([b["decoder_loss_weights"].sum()
                                 for b in batches]))
  train = {name: [] for name in models}
  for r in range(args.rounds):
    for name, model in models.items():
      sec = train_step.seconds_per_step(model, batches, args.reps)
      train[name].append(sec)
      print(f"round {r + 1}: train {name} {sec * 1e3:.1f} ms/step "
            f"({target_tokens / sec:.0f} target tokens/s)", flush=True)
  generate = {}
  for beams in (1, 4):
    for name, model in models.items():
      sec = _time_generate(model, batches[0], beams, args.decode_len,
                           max(1, args.reps // 5))
      generate[f"{name}_beams{beams}"] = {
          "seconds_per_batch": sec,
          "tokens_per_s": args.batch_size * args.decode_len / sec}
      print(f"generate {name} beams={beams}: {sec:.2f} s/batch "
            f"({args.batch_size * args.decode_len / sec:.0f} tokens/s)",
            flush=True)
  summary = {name: machine.stats(v) for name, v in train.items()}
  ratio = summary["regen"]["median"] / summary["t5_prompt_only"]["median"]
  print(f"REGEN / prompt-only train step: {ratio:.2f}x")
  if args.output:
    machine.write_result(args.output, {
        "what": "REGEN training step (loss, gradient, AdamW) and generation "
                "(KV cache) throughput against the same T5 without soft "
                "tokens",
        "batch_size": args.batch_size, "reps": args.reps,
        "target_tokens_per_batch": target_tokens,
        "train_seconds_per_step": summary,
        "train_target_tokens_per_s": {
            k: target_tokens / v["median"] for k, v in summary.items()},
        "regen_over_prompt_only": ratio,
        "generation": generate, "decode_len": args.decode_len,
        "item_text_cache": cache,
    }, info)
  return 0


if __name__ == "__main__":
  sys.exit(main())
