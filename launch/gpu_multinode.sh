#!/usr/bin/env bash
# Runs recsys_jax.train as one process of a multi-node GPU job: start it once
# on EACH node (srun, mpirun, pdsh or by hand). Each process drives all GPUs of
# its node; jax.distributed connects the processes through the coordinator
# (node 0). Under SLURM the flags default to the job's variables.
# See docs/LAUNCH.md.
set -euo pipefail

LAUNCH_NAME="gpu_multinode.sh"
DRY_RUN=0
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_multinode.sh --coordinator=HOST:PORT --num_nodes=N --node_rank=I
         [options] [-- TRAIN_ARGS...]

Runs, on this node, from the repository root:
  [CUDA_VISIBLE_DEVICES=0,..,G-1] PYTHON -m recsys_jax.train --platform=gpu
    --coordinator_address=HOST:PORT --num_processes=N --process_id=I TRAIN_ARGS...

Options (run the same command on every node, only --node_rank differs):
  --coordinator=HOST:PORT  Address of node 0, reachable from every node.
                             Default under SLURM: the first host of
                             SLURM_JOB_NODELIST (via scontrol) and --port.
  --port=PORT              Coordinator port when it comes from SLURM (default
                             20000 + SLURM_JOB_ID % 20000, else 8476).
  --num_nodes=N            Number of nodes = processes. Default: SLURM_NNODES.
  --node_rank=I            This node's index, 0..N-1 (0 hosts the coordinator).
                             Default: SLURM_NODEID.
  --gpus_per_node=G        Use GPUs 0..G-1 of this node (CUDA_VISIBLE_DEVICES).
                             Default: all that are visible.
  --python=PY              Python interpreter. Default: the project virtualenv
                             (`source scripts/env.sh`).
  --dry_run                Print the command(s), shell-quoted, one per line, and
                             run nothing.
  -h, --help               Show this help.

SLURM example (one task per node):
  srun --nodes=4 --ntasks-per-node=1 launch/gpu_multinode.sh -- \
    --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/shared/runs/qs'"
By hand, on node i of 2:
  launch/gpu_multinode.sh --coordinator=10.0.0.1:8476 --num_nodes=2 \
    --node_rank=i -- --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/shared/runs/qs'"
EOF
}

coordinator=""
port=""
num_nodes=""
node_rank=""
gpus_per_node=""
python=""
extra=()

while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --coordinator|--coordinator=*) launch_value "$1"; coordinator="$LAUNCH_VALUE" ;;
    --port|--port=*) launch_value "$1"; port="$LAUNCH_VALUE" ;;
    --num_nodes|--num_nodes=*) launch_value "$1"; num_nodes="$LAUNCH_VALUE" ;;
    --node_rank|--node_rank=*) launch_value "$1"; node_rank="$LAUNCH_VALUE" ;;
    --gpus_per_node|--gpus_per_node=*)
      launch_value "$1"; gpus_per_node="$LAUNCH_VALUE" ;;
    --python|--python=*) launch_value "$1"; python="$LAUNCH_VALUE" ;;
    --) shift; extra=("$@"); break ;;
    -*) launch_die "unknown option '$1' (train arguments go after --)" ;;
    *) launch_die "unexpected argument '$1' (train arguments go after --)" ;;
  esac
  shift
done

[[ -z "$port" ]] || launch_require_int --port "$port"

# Flags win; SLURM variables fill in what is absent.
if [[ -z "$node_rank" && -n "${SLURM_NODEID:-}" ]]; then
  # SLURM_NODEID is the process id only with one task per node.
  if [[ -n "${SLURM_STEP_NUM_TASKS:-}" && -n "${SLURM_STEP_NUM_NODES:-}" &&
        "$SLURM_STEP_NUM_TASKS" != "$SLURM_STEP_NUM_NODES" ]]; then
    launch_die "this job step runs $SLURM_STEP_NUM_TASKS tasks on" \
      "$SLURM_STEP_NUM_NODES nodes; use one task per node (srun" \
      "--ntasks-per-node=1) or pass --node_rank/--num_nodes"
  fi
  node_rank="$SLURM_NODEID"
fi
num_nodes="${num_nodes:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}}"
if [[ -z "$coordinator" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  if command -v scontrol >/dev/null 2>&1; then
    # All names, then the first: `| head -n 1` could kill scontrol with
    # SIGPIPE on long lists, which pipefail would turn into an exit.
    host="$(scontrol show hostnames "$SLURM_JOB_NODELIST")" ||
      launch_die "scontrol could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
    host="${host%%$'\n'*}"
  elif [[ "$SLURM_JOB_NODELIST" != *"["* ]]; then
    host="${SLURM_JOB_NODELIST%%,*}"  # a plain comma list needs no scontrol
  else
    launch_die "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' without" \
      "scontrol; pass --coordinator=HOST:PORT"
  fi
  [[ -n "$host" ]] || launch_die "no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'; pass --coordinator=HOST:PORT"
  if [[ -z "$port" ]]; then
    # Per-job port, so jobs sharing node 0 do not collide.
    if [[ "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]]; then
      port=$((20000 + 10#$SLURM_JOB_ID % 20000))
    else
      port=8476
    fi
  fi
  coordinator="$host:$port"
fi

[[ -n "$coordinator" ]] || launch_die "missing --coordinator=HOST:PORT (or run under SLURM with SLURM_JOB_NODELIST set)"
[[ -n "$num_nodes" ]] || launch_die "missing --num_nodes=N (or SLURM_NNODES)"
[[ -n "$node_rank" ]] || launch_die "missing --node_rank=I (or SLURM_NODEID)"
launch_require_host_port --coordinator "$coordinator"
launch_require_int --num_nodes "$num_nodes"
launch_require_int --node_rank "$node_rank" 0
((10#$node_rank < 10#$num_nodes)) || launch_die "--node_rank=$node_rank must be < --num_nodes=$num_nodes"
[[ -z "$gpus_per_node" ]] || launch_require_int --gpus_per_node "$gpus_per_node"
for arg in "${extra[@]+"${extra[@]}"}"; do
  case "$arg" in
    --coordinator_address*|--num_processes*|--process_id*)
      launch_die "do not pass $arg after --: use --coordinator/--num_nodes/--node_rank" ;;
  esac
done

cd "$LAUNCH_REPO"
((DRY_RUN)) && launch_format 0 cd "$LAUNCH_REPO"
if [[ -z "$python" ]]; then
  if ((DRY_RUN)); then
    echo "source scripts/env.sh"
  else
    source scripts/env.sh
  fi
  python="python"
fi

env_vars=()
if [[ -n "$gpus_per_node" ]]; then
  visible="$(seq -s, 0 $((10#$gpus_per_node - 1)))"
  env_vars+=("CUDA_VISIBLE_DEVICES=$visible")
fi

launch_run "${#env_vars[@]}" "${env_vars[@]+"${env_vars[@]}"}" \
  "$python" -m recsys_jax.train --platform=gpu \
  "--coordinator_address=$coordinator" "--num_processes=$((10#$num_nodes))" \
  "--process_id=$((10#$node_rank))" "${extra[@]+"${extra[@]}"}"
