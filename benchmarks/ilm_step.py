r"""ILM's training-step cost: phase 1, phase 2, CoLLM's adapter, ID-only.

  taskset -c 1 python -m benchmarks.ilm_step \
      --output=benchmarks/results/ilm_step.json

Each model is built from its gin file as `python -m recsys_jax.train` builds
it (gin/runs/train.gin + the experiment; nothing is initialised from other
runs: the cost does not depend on trained values), on the synthetic default:

* `ilm_phase1`: gin/experiments/synthetic_ilm_phase1.gin (the Q-Former of
  gin/models/qformer.gin, all five losses on), one step per batch kind:
  item-text (ITC + ITG + ITM), item-item and user-item; also their mean
  weighted by the gin's mixture rates (2:1:1).
* `ilm_phase2`: gin/experiments/synthetic_ilm_phase2.gin: Q-Former item
  tokens and projection into the T5 of gin/models/ilm.gin, frozen as
  training freezes it (the gin's `OptimizerConfig.frozen`: no gradient, no
  optimizer state), on item -> title and history -> next title batches (the
  phase-2 tasks with a nonzero rate), and their rate-weighted mean.
* `collm_phase2`: gin/experiments/synthetic_collm_phase2.gin: CoLLM's MLP
  adapter (one token per item) through the same path and frozen T5, on the
  same tasks (its own batches: one slot token per item).
* `sasrec`: gin/experiments/synthetic_sasrec.gin, the SASRec-mode Bert4Rec
  whose exported item table is ILM's CF table: the ID-only reference.

The CF table is `--cf_export` (default runs/synthetic_sasrec/export when it
exists), else a random table of the gin's CF_DIM in a temporary directory.
One step = the trainer's own step (`trainer.make_train_step` with the gin's
`OptimizerConfig`: loss, gradient of the trainable parameters, clipped AdamW
update), jitted with the state donated and compiled ahead of time (excluded,
with one untimed step per round) at `--batch_size` rows. Rounds alternate the
models; reported: seconds per step (median over rounds) and steps/s per model
and batch kind, parameter counts (total / trainable / frozen) and XLA's
memory analysis of each compiled step (arguments + outputs + temporaries -
donated; the process's peak RSS would mix all the models). Run it alone on a
quiet core.
"""

import argparse
import itertools
import os
import sys
import tempfile

from benchmarks.common import machine
from benchmarks.common import train_step

# (name, experiment gin file under gin/), in the order rounds run them.
EXPERIMENTS = (
    ("ilm_phase1", "experiments/synthetic_ilm_phase1.gin"),
    ("ilm_phase2", "experiments/synthetic_ilm_phase2.gin"),
    ("collm_phase2", "experiments/synthetic_collm_phase2.gin"),
    ("sasrec", "experiments/synthetic_sasrec.gin"),
)
DEFAULT_CF_EXPORT = "runs/synthetic_sasrec/export"
BATCHES_PER_KIND = 4


def _from_gin(experiment, bindings):
  """{model, data, optimizer, loop} of runs.train as the train command
  builds them from gin/runs/train.gin + `experiment` + `bindings`."""
  import gin  # pylint: disable=g-import-not-at-top
  from recsys_jax.cli import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse_gin(["runs/train.gin", experiment], bindings)
  try:
    built = {}
    for name in ("model", "data", "optimizer", "loop"):
      value = gin.query_parameter(f"runs.train.{name}")
      if isinstance(value, gin.config.ConfigurableReference):
        fn = value.scoped_configurable_fn
        value = fn() if value.evaluate else fn
      built[name] = value
    return built
  finally:
    gin.clear_config()


def _random_cf_export(data_dir, cf_dim, directory):
  """A `[num_items, cf_dim]` item_embeddings.npy of random values in
  `directory` (what an export holds; the step cost does not depend on it)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recsys_jax.data import prepared  # pylint: disable=g-import-not-at-top
  num_items = prepared.PreparedDataset(data_dir).num_items
  path = os.path.join(directory, "item_embeddings.npy")
  rng = np.random.default_rng(0)
  np.save(path, rng.normal(0.0, cf_dim ** -0.5, (num_items, cf_dim))
          .astype(np.float32))
  return directory


def _cf_dim(data_dir):
  """CF_DIM as gin/models/qformer.gin sets it (the CF export's width)."""
  import gin  # pylint: disable=g-import-not-at-top
  from recsys_jax.cli import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse_gin(
      ["runs/train.gin", "experiments/synthetic_ilm_phase1.gin"],
      [f"DATA_DIR = '{data_dir}'"], finalize=False)
  try:
    return int(gin.query_parameter("CF_DIM/macro.value"))
  finally:
    gin.clear_config()


def _kind(source):
  """A mixture entry's task: phase 1's ILM*Data.TASK or ILMData.task."""
  return getattr(source, "TASK", "") or str(getattr(source, "task", source))


def _kind_batches(data, batch_size, count):
  """{kind: (rate, [batches])} of each entry with a nonzero rate (a
  mixture's, with `task_index` as MixtureData adds it), else {'train': ...}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recsys_jax.input_pipeline import mixture  # pylint: disable=g-import-not-at-top
  entries = (list(enumerate(zip(data.sources, data.rates)))
             if isinstance(data, mixture.MixtureData) else [(None, (data, 1.0))])
  out = {}
  for index, (source, rate) in entries:
    if rate <= 0:
      continue
    stream = source.train_batches(0, batch_size)
    batches = list(itertools.islice(stream, count))
    close = getattr(stream, "close", None)
    if close is not None:
      close()
    if index is not None:
      batches = [dict(b, **{mixture.TASK_INDEX: np.full(
          (batch_size,), index, np.int32)}) for b in batches]
    out[_kind(source) if index is not None else "train"] = (float(rate),
                                                            batches)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data/synthetic")
  parser.add_argument("--cf_export", default=None,
                      help=f"default {DEFAULT_CF_EXPORT} if it exists, else "
                      "a random table")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  info = machine.machine_info()
  with tempfile.TemporaryDirectory(prefix="ilm_step_") as tmp:
    cf = args.cf_export
    if cf is None and os.path.exists(
        os.path.join(DEFAULT_CF_EXPORT, "item_embeddings.npy")):
      cf = DEFAULT_CF_EXPORT
    cf_source = cf or "random"
    if cf is None:
      cf = _random_cf_export(args.data_dir, _cf_dim(args.data_dir), tmp)
    bindings = [f"DATA_DIR = '{args.data_dir}'",
                f"MODEL_DIR = '{os.path.join(tmp, 'model_dir')}'",
                f"CF_EXPORT = '{cf}'"]
    steps, rates, batches = {}, {}, {}
    for name, experiment in EXPERIMENTS:
      print(f"building {name} ({experiment}) and compiling its steps",
            flush=True)
      built = _from_gin(experiment, bindings)
      kinds = _kind_batches(built["data"], args.batch_size, BATCHES_PER_KIND)
      rates[name] = {k: r for k, (r, _) in kinds.items()}
      batches[name] = {k: b for k, (_, b) in kinds.items()}
      steps[name] = {k: train_step.TrainerStep(
          built["model"], b[0], built["optimizer"],
          built["loop"].train_steps) for k, b in batches[name].items()}
  times = {name: {k: [] for k in kinds} for name, kinds in steps.items()}
  for r in range(args.rounds):
    for name, kinds in steps.items():
      for kind, step in kinds.items():
        sec = step.seconds(batches[name][kind], args.reps)
        times[name][kind].append(sec)
        print(f"round {r + 1}: {name} {kind} {sec * 1e3:.1f} ms/step",
              flush=True)
  models = {}
  for name, kinds in steps.items():
    per_kind = {k: machine.stats(v) for k, v in times[name].items()}
    total = sum(rates[name].values())
    mean = sum(rates[name][k] * per_kind[k]["median"]
               for k in per_kind) / total
    first = next(iter(kinds.values()))
    models[name] = {
        "gin_file": f"gin/{dict(EXPERIMENTS)[name]}",
        "seconds_per_step": per_kind,
        "steps_per_s": {k: 1.0 / v["median"] for k, v in per_kind.items()},
        "rates": rates[name],
        "rate_weighted_seconds_per_step": mean,
        "rate_weighted_steps_per_s": 1.0 / mean,
        "parameters": first.param_counts(),
        "frozen_patterns": list(first.frozen),
        "memory_analysis": {k: s.memory() for k, s in kinds.items()},
    }
  ref = models["sasrec"]["rate_weighted_seconds_per_step"]
  for name, m in models.items():
    p = m["parameters"]
    mem = [v["total_bytes"] for v in m["memory_analysis"].values() if v]
    mem_text = (f"{max(mem) / 2**20:.1f} MiB compiled (max over kinds)"
                if mem else "no memory analysis")
    m["over_sasrec"] = m["rate_weighted_seconds_per_step"] / ref
    print(f"{name}: {m['rate_weighted_steps_per_s']:.2f} steps/s "
          f"(rate-weighted; {m['over_sasrec']:.2f}x SASRec's step time); "
          f"parameters {p['total']:,} ({p['trainable']:,} trainable, "
          f"{p['frozen']:,} frozen); {mem_text}")
  if args.output:
    machine.write_result(args.output, {
        "what": "seconds per training step (the trainer's step: loss, "
                "gradient of the trainable parameters, AdamW update with the "
                "gin's OptimizerConfig) of ILM phase 1 and 2, CoLLM's adapter "
                "and the ID-only SASRec",
        "data_dir": args.data_dir, "batch_size": args.batch_size,
        "rounds": args.rounds, "reps": args.reps, "cf_export": cf_source,
        "memory_note": "XLA's compiled memory analysis per step: total_bytes"
                       " = arguments + outputs + temporaries - aliased "
                       "(donated state)",
        "models": models,
    }, info)
  return 0


if __name__ == "__main__":
  sys.exit(main())
