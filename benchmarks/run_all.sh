#!/usr/bin/env bash
# Regenerates benchmarks/results/*.json and benchmarks/RESULTS.md: ours and
# RecBole 1.2.1's BERT4Rec alternate in one run (see benchmarks/README.md).
#
#   bash benchmarks/run_all.sh
#
# Settings (environment): ROUNDS (A/B rounds, default 2), DATA_DIR (prepared
# Beauty, created on first use), TRAIN_STEPS / TRAIN_REPEATS (steps per timed
# window / windows), RECBOLE_BATCHES / RECBOLE_WARMUP (timed / warm-up RecBole
# batches), QUALITY_EPOCHS (> 0 also runs the packed-vs-padded comparison),
# RECBOLE_VENV (RecBole's own virtualenv, created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

ROUNDS="${ROUNDS:-2}"
DATA_DIR="${DATA_DIR:-/tmp/recsys_jax_bench/beauty}"
TRAIN_STEPS="${TRAIN_STEPS:-10}"
TRAIN_REPEATS="${TRAIN_REPEATS:-3}"
RECBOLE_BATCHES="${RECBOLE_BATCHES:-100}"
RECBOLE_WARMUP="${RECBOLE_WARMUP:-10}"
QUALITY_EPOCHS="${QUALITY_EPOCHS:-0}"
RECBOLE_VENV="${RECBOLE_VENV:-$HOME/.cache/recsys_jax/recbole-venv}"
RESULTS=benchmarks/results
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 CUDA_VISIBLE_DEVICES=""

# RecBole in its own virtualenv (torch 2.13.0 installs from local wheels;
# setuptools >= 77.0.3 for torch, < 81 keeps pkg_resources for ray).
if ! "$RECBOLE_VENV/bin/python" -c "import recbole" 2>/dev/null; then
  python3 -m venv "$RECBOLE_VENV"
  "$RECBOLE_VENV/bin/pip" install torch==2.13.0 recbole==1.2.1 \
    'setuptools>=77.0.3,<81' 'numpy<2' 'pandas<2.2'
fi

ours_train() {
  "$PYTHON" -m benchmarks.train_throughput --data_dir="$DATA_DIR" \
    --steps="$TRAIN_STEPS" --repeats="$TRAIN_REPEATS" \
    --compare_proposed_head=1 --output="$RESULTS/train_throughput_round$1.json"
}
ours_eval() {
  "$PYTHON" -m benchmarks.eval_throughput --data_dir="$DATA_DIR" \
    --output="$RESULTS/eval_throughput_round$1.json"
}
recbole() {
  "$RECBOLE_VENV/bin/python" benchmarks/recbole_peer.py \
    --batches="$RECBOLE_BATCHES" --warmup_batches="$RECBOLE_WARMUP" \
    --threads=2 --output="$RESULTS/recbole_round$1.json"
}

mkdir -p "$RESULTS"
rm -f "$RESULTS"/*_round*.json
for r in $(seq 1 "$ROUNDS"); do
  # Odd rounds: ours, RecBole, ours; even rounds the mirror image, so a
  # drifting machine load falls on both sides alike.
  if (( r % 2 )); then
    ours_train "$r"; recbole "$r"; ours_eval "$r"
  else
    ours_eval "$r"; recbole "$r"; ours_train "$r"
  fi
done

if (( QUALITY_EPOCHS > 0 )); then
  "$PYTHON" -m benchmarks.train_throughput \
    --data_dir=/tmp/recsys_jax_bench/synthetic_quality \
    --quality_epochs="$QUALITY_EPOCHS" --quality_seeds=2 \
    --output="$RESULTS/packing_quality.json"
fi
"$PYTHON" -m benchmarks.common summarize
