r"""Greedy generation throughput: ours (JAX) against transformers (torch), CPU.

  nice -n 0 python -m benchmarks.generation_throughput \
      --output=benchmarks/results/generation_throughput.json

A t5-small-shaped model (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048,
vocabulary 32,128, ReLU, tied output; random weights) generates exactly
`--new_tokens` tokens greedily for a batch of `--batch` sources of
`--source_len` tokens, with a KV cache on both sides:

  ours: `recsys_jax.text.generation.generate` (jitted; compilation excluded
    by a warm-up call), EOS unreachable (`eos_id` = vocabulary size);
  transformers: `T5ForConditionalGeneration.generate` on torch, eval mode
    under `torch.inference_mode`, `min_new_tokens = max_new_tokens`.

Both sides use the same weights (the HF model's, saved and read through
`checkpoint_import.t5`), float32, and `--threads` CPU threads (torch
`set_num_threads`; the process is pinned to that many cores when the machine
has more, which XLA then uses). Rounds alternate ours and theirs; each round
times `--reps` calls per side. Reported: generated tokens/s (batch x
new_tokens / wall time of one generate call, encoder included) per side, the
ratio of the medians over rounds, and the fraction of generated tokens on
which the two sides agree.
"""

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# t5-small (v1.0) as in transformers' T5Config / our T5Config.small().
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                num_layers=6, num_decoder_layers=6, num_heads=8,
                feed_forward_proj="relu")
SMOKE = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
             num_decoder_layers=2, num_heads=4, feed_forward_proj="relu")
TARGET_RATIO = 2.0


def _pin_cores(threads: int) -> None:
  """Restricts the process to `threads` cores (before XLA starts)."""
  try:
    cores = sorted(os.sched_getaffinity(0))
  except AttributeError:
    return
  if len(cores) > threads:
    os.sched_setaffinity(0, cores[:threads])


def _build_models(sizes: Dict[str, Any], seed: int):
  """(HF model, our T5 module, our params) with the same random weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from recsys_jax.checkpoint_import import t5 as t5_import  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import t5  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hf_config = transformers.T5Config(
      **sizes, dropout_rate=0.0, tie_word_embeddings=True,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf = transformers.T5ForConditionalGeneration(hf_config).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    config, params = t5_import.load_hf_t5(tmp)
  return hf, t5.T5(config), params


def _time_calls(fn, reps: int) -> List[float]:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=None,
                      help="result JSON (default benchmarks/results/"
                      "generation_throughput.json; smoke runs write none)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--source_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=3,
                      help="generate calls per side per round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny model, one round, one call (CI)")
  args = parser.parse_args(argv)
  for name in ("batch", "source_len", "new_tokens", "threads", "rounds",
               "reps"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)}: expected >= 1")
  if args.smoke:
    args.rounds, args.reps = 1, 1
  _pin_cores(args.threads)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from recsys_jax.text import generation  # pylint: disable=g-import-not-at-top

  machine = common.machine_info()
  torch.set_num_threads(args.threads)
  sizes = SMOKE if args.smoke else T5_SMALL
  hf, model, params = _build_models(sizes, args.seed)
  params = jax.device_put(params)
  vocab = sizes["vocab_size"]
  rng = np.random.RandomState(args.seed)
  # Real tokens only (ids 2.., no padding) so no row is shorter than another.
  source = rng.randint(2, vocab, (args.batch, args.source_len)).astype(
      np.int32)
  source_jax = jax.device_put(source)
  source_torch = torch.tensor(source, dtype=torch.long)
  mask_torch = torch.ones_like(source_torch)
  n = args.new_tokens

  def ours():
    out = generation.generate(model, params, source_jax, max_decode_len=n,
                              eos_id=vocab)  # unreachable: never stops early
    return np.asarray(jax.block_until_ready(out.tokens))[:, 0]

  def theirs():
    with torch.inference_mode():
      out = hf.generate(input_ids=source_torch, attention_mask=mask_torch,
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        num_beams=1, use_cache=True)
    return out[:, 1:].numpy()  # drop the decoder start token

  start = time.perf_counter()
  ours_tokens = ours()  # compiles
  compile_s = time.perf_counter() - start
  theirs_tokens = theirs()  # warm-up
  if ours_tokens.shape != (args.batch, n) or theirs_tokens.shape != (
      args.batch, n):
    raise RuntimeError(f"generated shapes {ours_tokens.shape} (ours), "
                       f"{theirs_tokens.shape} (transformers); expected "
                       f"{(args.batch, n)}")
  agreement = float(np.mean(ours_tokens == theirs_tokens))
  # Rows agree up to their first differing token (a near-tie flips argmax,
  # then the prefixes differ): the first step must agree everywhere.
  first_step_agreement = float(np.mean(ours_tokens[:, 0] ==
                                       theirs_tokens[:, 0]))

  rounds = []
  for r in range(args.rounds):
    t_ours = _time_calls(ours, args.reps)
    t_theirs = _time_calls(theirs, args.reps)
    rounds.append({
        "round": r,
        "ours_seconds": t_ours, "transformers_seconds": t_theirs,
        "ours_tokens_per_s": args.batch * n / float(np.median(t_ours)),
        "transformers_tokens_per_s": args.batch * n / float(
            np.median(t_theirs)),
    })
    print(f"round {r}: ours {rounds[-1]['ours_tokens_per_s']:,.0f} tok/s, "
          f"transformers {rounds[-1]['transformers_tokens_per_s']:,.0f} "
          "tok/s", flush=True)
  ours_tps = common.stats([x["ours_tokens_per_s"] for x in rounds])
  theirs_tps = common.stats([x["transformers_tokens_per_s"] for x in rounds])
  ratio = ours_tps["median"] / theirs_tps["median"]
  print(f"median: ours {ours_tps['median']:,.0f} tok/s, transformers "
        f"{theirs_tps['median']:,.0f} tok/s, ratio {ratio:.2f} "
        f"(target >= {TARGET_RATIO}); token agreement {agreement:.3f}")
  payload = {
      "benchmark": "generation_throughput",
      "smoke": args.smoke,
      "model": dict(sizes, tie_word_embeddings=True, dtype="float32"),
      "batch": args.batch, "source_len": args.source_len,
      "new_tokens": n, "threads": args.threads, "rounds_requested":
      args.rounds, "reps": args.reps,
      "transformers_version": transformers.__version__,
      "ours_compile_seconds": compile_s,
      "ours_tokens_per_s": ours_tps,
      "transformers_tokens_per_s": theirs_tps,
      "ratio_of_medians": ratio,
      "target_ratio": TARGET_RATIO,
      "token_agreement": agreement,
      "first_token_agreement": first_step_agreement,
      "rounds": rounds,
  }
  output = args.output
  if output is None and not args.smoke:
    output = os.path.join(common.RESULTS_DIR, "generation_throughput.json")
  if output:
    print("wrote", common.write_result(output, payload, machine))
  return 0


if __name__ == "__main__":
  sys.exit(main())
