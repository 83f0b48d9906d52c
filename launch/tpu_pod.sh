#!/usr/bin/env bash
# Runs recsys_jax.train on every worker of a Cloud TPU VM pod slice at once via
# `gcloud compute tpus tpu-vm ssh --worker=all`. Each worker runs the same
# command; jax.distributed.initialize() finds the coordinator, process count and
# process id from the TPU metadata (--multihost). See docs/LAUNCH.md.
set -euo pipefail

LAUNCH_NAME="tpu_pod.sh"
DRY_RUN=0
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] [-- TRAIN_ARGS...]

Runs, on all workers of the TPU VM NAME:
  cd REPO_DIR && PYTHON -m recsys_jax.train --multihost TRAIN_ARGS...

Options:
  --tpu=NAME            TPU VM name (required).
  --zone=ZONE           Its zone, e.g. us-central2-b (required).
  --project=PROJECT     Google Cloud project (default: gcloud's configured one).
  --repo_dir=DIR        The checkout on the workers (default ~/recsys_jax); it
                          must already be there (git clone, or
                          `gcloud compute tpus tpu-vm scp --recurse --worker=all`).
  --python=PY           Python on the workers (default python3).
  --setup               First run the install command on all workers:
                          cd REPO_DIR && PY -m pip install -r requirements.txt
                          'jax[tpu]==<jax version in requirements.txt>'
  --install_command=CMD Use CMD (run on every worker) instead for --setup.
  --dry_run             Print the gcloud command(s), shell-quoted, one per line,
                          and run nothing.
  -h, --help            Show this help.

Gin values keep their quotes, e.g.
  launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b -- \
    --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/mnt/disks/runs/qs'"
MODEL_DIR must be a path every worker can write to (the same path on each;
only process 0 writes logs and TensorBoard summaries).
EOF
}

tpu=""
zone=""
project=""
repo_dir="~/recsys_jax"
python="python3"
setup=0
install_command=""
extra=()

while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --setup) setup=1 ;;
    --tpu|--tpu=*) launch_value "$1"; tpu="$LAUNCH_VALUE" ;;
    --zone|--zone=*) launch_value "$1"; zone="$LAUNCH_VALUE" ;;
    --project|--project=*) launch_value "$1"; project="$LAUNCH_VALUE" ;;
    --repo_dir|--repo_dir=*) launch_value "$1"; repo_dir="$LAUNCH_VALUE" ;;
    --python|--python=*) launch_value "$1"; python="$LAUNCH_VALUE" ;;
    --install_command|--install_command=*)
      launch_value "$1"; install_command="$LAUNCH_VALUE" ;;
    --) shift; extra=("$@"); break ;;
    -*) launch_die "unknown option '$1' (train arguments go after --)" ;;
    *) launch_die "unexpected argument '$1' (train arguments go after --)" ;;
  esac
  shift
done

[[ -n "$tpu" ]] || launch_die "missing required --tpu=NAME"
[[ -n "$zone" ]] || launch_die "missing required --zone=ZONE"
[[ -n "$repo_dir" ]] || launch_die "--repo_dir must not be empty"
[[ -n "$python" ]] || launch_die "--python must not be empty"
for arg in "${extra[@]+"${extra[@]}"}"; do
  case "$arg" in
    --coordinator_address*|--num_processes*|--process_id*)
      launch_die "do not pass $arg on a TPU pod: jax.distributed finds it" ;;
  esac
done

# Quotes the remote checkout path but leaves a leading ~ for the remote shell.
remote_dir() {
  case "$repo_dir" in
    "~") printf '~' ;;
    "~/"*) printf '~/%s' "$(launch_quote "${repo_dir#\~/}")" ;;
    *) launch_quote "$repo_dir" ;;
  esac
}

# Quotes each word of a remote command (the ssh --command is one shell line).
quote_words() {
  local word out=""
  for word in "$@"; do
    out+="$(launch_quote "$word") "
  done
  printf '%s' "${out% }"
}

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z "$project" ]] || gcloud_ssh+=("--project=$project")
gcloud_ssh+=(--worker=all)

cd_repo="cd $(remote_dir)"
if ((setup)); then
  if [[ -z "$install_command" ]]; then
    # The workers get the same jax as requirements.txt pins, with libtpu.
    jax_version="$(awk '/^jax==/ { sub(/^jax==/, ""); print $1; exit }' \
      "$LAUNCH_REPO/requirements.txt" 2>/dev/null || true)"
    install_command="$cd_repo && $(quote_words "$python" -m pip install \
      -r requirements.txt "jax[tpu]${jax_version:+==$jax_version}")"
  fi
  launch_run 0 "${gcloud_ssh[@]}" "--command=$install_command"
fi

train_command="$cd_repo && $(quote_words "$python" -m recsys_jax.train \
  --multihost "${extra[@]+"${extra[@]}"}")"
launch_run 0 "${gcloud_ssh[@]}" "--command=$train_command"
