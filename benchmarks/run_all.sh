#!/usr/bin/env bash
# Regenerates benchmarks/results/*_round*.json and benchmarks/RESULTS.md: ours
# and RecBole 1.2.1's BERT4Rec alternate in one run (see benchmarks/README.md).
#
#   bash benchmarks/run_all.sh         # ~15 min on an idle 2-core machine
#
# Run it on a quiet machine: the figures of a busy one are not comparable
# (torch's OpenMP threads spin under contention; see recbole_peer.py), and a
# warning is printed and recorded when the load average is above LOAD_MAX.
#
# Settings (environment): ROUNDS (A/B rounds, default 2), DATA_DIR (prepared
# Beauty, created on first use), TRAIN_STEPS / TRAIN_REPEATS (steps per timed
# window / windows), RECBOLE_BATCHES / RECBOLE_WARMUP (timed / warm-up RecBole
# batches), THREADS (torch threads of RecBole, default: the usable cores, as
# XLA:CPU uses), QUALITY_EPOCHS (> 0 also runs the packed-vs-padded
# comparison), RECBOLE_QUALITY_BUDGET_S (> 0 also trains RecBole SASRec and
# BERT4Rec for that many training seconds each, test NDCG@10 / HR@10 along
# the way: the RecBole side of the time-to-quality comparison; 2700 takes
# ~1 h 40 min), RECBOLE_VENV (RecBole's own virtualenv, created on first use),
# LOAD_MAX (default 1.0), NUM_MICROBATCHES (the staged modes once more with
# this many gradient-accumulation micro-batches per 256-row step, default 4;
# 1 skips them), PROCESSES (every mode once more as data parallelism over
# this many processes, one pinned per core, with local accumulation of
# NUM_MICROBATCHES micro-batches each; default: the usable cores; 1 skips).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

ROUNDS="${ROUNDS:-2}"
DATA_DIR="${DATA_DIR:-/tmp/recsys_jax_bench/beauty}"
TRAIN_STEPS="${TRAIN_STEPS:-10}"
TRAIN_REPEATS="${TRAIN_REPEATS:-3}"
RECBOLE_BATCHES="${RECBOLE_BATCHES:-100}"
RECBOLE_WARMUP="${RECBOLE_WARMUP:-10}"
THREADS="${THREADS:-$(nproc)}"
QUALITY_EPOCHS="${QUALITY_EPOCHS:-0}"
RECBOLE_QUALITY_BUDGET_S="${RECBOLE_QUALITY_BUDGET_S:-0}"
RECBOLE_VENV="${RECBOLE_VENV:-$HOME/.cache/recsys_jax/recbole-venv}"
LOAD_MAX="${LOAD_MAX:-1.0}"
NUM_MICROBATCHES="${NUM_MICROBATCHES:-4}"
PROCESSES="${PROCESSES:-$(nproc)}"
RESULTS=benchmarks/results
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 CUDA_VISIBLE_DEVICES=""
START=$SECONDS

# RecBole in its own virtualenv (torch 2.13.0 installs from local wheels;
# setuptools >= 77.0.3 for torch, < 81 keeps pkg_resources for ray).
if ! "$RECBOLE_VENV/bin/python" -c "import recbole" 2>/dev/null; then
  python3 -m venv "$RECBOLE_VENV"
  "$RECBOLE_VENV/bin/pip" install torch==2.13.0 recbole==1.2.1 \
    'setuptools>=77.0.3,<81' 'numpy<2' 'pandas<2.2'
fi

check_load() {
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  if awk -v l="$load" -v m="$LOAD_MAX" 'BEGIN { exit !(l > m) }'; then
    echo "WARNING: load average $load > $LOAD_MAX before $1: other jobs" \
      "share the cores; these figures are not comparable" >&2
  fi
}
step() {  # step NAME COMMAND...: runs and times one measurement process
  check_load "$1"
  local t0=$SECONDS
  "${@:2}"
  echo "== $1: $((SECONDS - t0)) s (total $((SECONDS - START)) s)"
}

ours_train() {
  step "ours train, round $1" "$PYTHON" -m benchmarks.train_throughput \
    --data_dir="$DATA_DIR" --steps="$TRAIN_STEPS" --repeats="$TRAIN_REPEATS" \
    --output="$RESULTS/train_throughput_round$1.json"
}
ours_train_mb() {  # the staged modes again with gradient accumulation
  if (( NUM_MICROBATCHES > 1 )); then
    step "ours train, $NUM_MICROBATCHES micro-batches, round $1" \
      "$PYTHON" -m benchmarks.train_throughput --data_dir="$DATA_DIR" \
      --modes=staged_padded,staged_packed \
      --num_microbatches="$NUM_MICROBATCHES" --steps="$TRAIN_STEPS" \
      --repeats="$TRAIN_REPEATS" \
      --output="$RESULTS/train_throughput_mb_round$1.json"
  fi
}
ours_train_mp() {  # every mode over PROCESSES processes, one per core
  if (( PROCESSES > 1 )); then
    step "ours train, $PROCESSES processes, round $1" \
      "$PYTHON" -m benchmarks.train_throughput --data_dir="$DATA_DIR" \
      --num_processes="$PROCESSES" --local_accumulation \
      --num_microbatches="$NUM_MICROBATCHES" --steps="$TRAIN_STEPS" \
      --repeats="$TRAIN_REPEATS" \
      --output="$RESULTS/train_throughput_mp_round$1.json"
  fi
}
ours_eval() {
  step "ours eval, round $1" "$PYTHON" -m benchmarks.eval_throughput \
    --data_dir="$DATA_DIR" --output="$RESULTS/eval_throughput_round$1.json"
}
recbole() {
  step "RecBole, round $1" "$RECBOLE_VENV/bin/python" \
    benchmarks/recbole_peer.py --batches="$RECBOLE_BATCHES" \
    --warmup_batches="$RECBOLE_WARMUP" --threads="$THREADS" \
    --output="$RESULTS/recbole_round$1.json"
}

mkdir -p "$RESULTS"
rm -f "$RESULTS"/*_round*.json
# Prepare the data outside the timed processes (first use only).
"$PYTHON" -c "from benchmarks import common; common.ensure_beauty_or_synthetic('$DATA_DIR')"
for r in $(seq 1 "$ROUNDS"); do
  # Odd rounds: ours, RecBole, ours; even rounds the mirror image, so a
  # drifting machine load falls on both sides alike.
  if (( r % 2 )); then
    ours_train "$r"; ours_train_mb "$r"; recbole "$r"; ours_train_mp "$r"
    ours_eval "$r"
  else
    ours_eval "$r"; ours_train_mp "$r"; recbole "$r"; ours_train_mb "$r"
    ours_train "$r"
  fi
done

if (( QUALITY_EPOCHS > 0 )); then
  step "packed vs padded quality" "$PYTHON" -m benchmarks.train_throughput \
    --data_dir=/tmp/recsys_jax_bench/synthetic_quality \
    --quality_epochs="$QUALITY_EPOCHS" --quality_seeds=2 \
    --output="$RESULTS/packing_quality.json"
fi
if (( RECBOLE_QUALITY_BUDGET_S > 0 )); then
  for model in SASRec BERT4Rec; do
    step "RecBole $model time to quality" "$RECBOLE_VENV/bin/python" \
      benchmarks/recbole_peer.py --quality_model="$model" \
      --budget_s="$RECBOLE_QUALITY_BUDGET_S" --threads="$THREADS" \
      --output="$RESULTS/recbole_quality_${model,,}.json"
  done
fi
"$PYTHON" -m benchmarks.common summarize
echo "== run_all.sh: $((SECONDS - START)) s"
