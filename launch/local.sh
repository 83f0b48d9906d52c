#!/usr/bin/env bash
# Runs a recsys_jax entry point on this host: one process on whatever JAX finds
# (GPU if present), emulated CPU devices, or N local processes on loopback that
# exercise the multi-host code path. See docs/LAUNCH.md.
set -euo pipefail

LAUNCH_NAME="local.sh"
DRY_RUN=0
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- ARGS...]

Runs `python -m recsys_jax.<mode> ARGS...` from the repository root.

Options:
  --mode=MODE         train (default), eval, export, predict, or quickstart:
                        prepare the synthetic default into data/synthetic
                        (skipped when data/synthetic/stats.json exists), train
                        with gin/quickstart.gin into runs/quickstart, evaluate,
                        and export (to runs/quickstart/export). ARGS (gin
                        overrides) go to train, eval and export alike.
  --python=PY         Python interpreter. Default: the project virtualenv
                        (`source scripts/env.sh`, created on first use).
  --devices=N         Emulate N CPU devices (JAX_PLATFORMS=cpu and
                        XLA_FLAGS=--xla_force_host_platform_device_count=N);
                        with --num_processes, N devices per process (default 1).
  --num_processes=N   --mode=train only: start N processes of the train command
                        on loopback (--coordinator_address=127.0.0.1:PORT
                        --num_processes=N --process_id=i, JAX_PLATFORMS=cpu,
                        RECSYS_CPU_COLLECTIVES=gloo), wait for all, stop the rest
                        and exit non-zero as soon as one fails.
  --pin_cores         With --num_processes: pin each process to its own block
                        of the cores this shell may use (`taskset -c`; process
                        i gets cores [i*k, (i+1)*k) of them, k = cores / N,
                        at least 1). On a CPU machine, N single-core processes
                        with TrainLoopConfig.local_accumulation=True train
                        faster than one process on all cores (docs/SCALING.md).
  --port=PORT         Coordinator port for --num_processes (default 8476).
  --log_dir=DIR       Where --num_processes writes process_<i>.log. Default:
                        the --gin.MODEL_DIR in ARGS, else runs/local_logs.
  --dry_run           Print the commands that would run, one per line and
                        shell-quoted, and run nothing.
  -h, --help          Show this help.

Examples:
  launch/local.sh --mode=quickstart
  launch/local.sh --devices=8 -- --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'runs/qs8'"
  launch/local.sh --num_processes=2 --devices=2 -- \
      --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'runs/qs_mp'"
  launch/local.sh --num_processes=2 --pin_cores -- \
      --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'runs/qs_pinned'" \
      --gin.trainer.TrainLoopConfig.local_accumulation=True
EOF
}

mode="train"
python=""
devices=""
num_processes=""
port="8476"
pin_cores=0
log_dir=""
extra=()

while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --mode|--mode=*) launch_value "$1"; mode="$LAUNCH_VALUE" ;;
    --python|--python=*) launch_value "$1"; python="$LAUNCH_VALUE" ;;
    --devices|--devices=*) launch_value "$1"; devices="$LAUNCH_VALUE" ;;
    --num_processes|--num_processes=*)
      launch_value "$1"; num_processes="$LAUNCH_VALUE" ;;
    --port|--port=*) launch_value "$1"; port="$LAUNCH_VALUE" ;;
    --pin_cores) pin_cores=1 ;;
    --log_dir|--log_dir=*) launch_value "$1"; log_dir="$LAUNCH_VALUE" ;;
    --) shift; extra=("$@"); break ;;
    -*) launch_die "unknown option '$1' (entry-point arguments go after --)" ;;
    *) launch_die "unexpected argument '$1' (entry-point arguments go after --)" ;;
  esac
  shift
done

case "$mode" in
  train|eval|export|predict|quickstart) ;;
  *) launch_die "--mode must be one of train, eval, export, predict, quickstart; got '$mode'" ;;
esac
[[ -z "$devices" ]] || launch_require_int --devices "$devices"
if ((pin_cores)) && [[ -z "$num_processes" ]]; then
  launch_die "--pin_cores needs --num_processes"
fi
launch_require_int --port "$port"
if [[ -n "$num_processes" ]]; then
  launch_require_int --num_processes "$num_processes"
  [[ "$mode" == train ]] || launch_die "--num_processes needs --mode=train, got --mode=$mode"
  if ((pin_cores)) && ! command -v taskset >/dev/null; then
    launch_die "--pin_cores needs taskset (util-linux), which is not on PATH"
  fi
  for arg in "${extra[@]+"${extra[@]}"}"; do
    case "$arg" in
      --coordinator_address*|--num_processes*|--process_id*)
        launch_die "do not pass $arg after --: --num_processes sets it" ;;
    esac
  done
fi

# Every command runs from the repository root (relative gin and data paths).
cd "$LAUNCH_REPO"
((DRY_RUN)) && launch_format 0 cd "$LAUNCH_REPO"
if [[ -z "$python" ]]; then
  # env.sh makes/reuses the cached venv and puts it first on PATH.
  if ((DRY_RUN)); then
    echo "source scripts/env.sh"
  else
    source scripts/env.sh
  fi
  python="python"
fi

# Environment assignments shared by every command.
base_env=()
if [[ -n "$devices" || -n "$num_processes" ]]; then
  base_env+=(JAX_PLATFORMS=cpu)
  base_env+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${devices:-1}")
fi

# run_entry MODULE ARGS...: one entry point, in the foreground.
run_entry() {
  local module="$1"
  shift
  launch_run "${#base_env[@]}" "${base_env[@]+"${base_env[@]}"}" \
    "$python" -m "recsys_jax.$module" "$@"
}

# affinity_cores: the cores this shell may run on, one per line ("0-2,5" ->
# 0 1 2 5).
affinity_cores() {
  local list part
  list=$(taskset -cp $$)
  list="${list##*: }"
  IFS=, read -ra parts <<<"$list"
  for part in "${parts[@]}"; do
    if [[ "$part" == *-* ]]; then
      seq "${part%-*}" "${part#*-}"
    else
      echo "$part"
    fi
  done
}

run_multiprocess() {
  local n="$num_processes" i
  local dir="${log_dir:-$(launch_model_dir "${extra[@]+"${extra[@]}"}")}"
  dir="${dir:-runs/local_logs}"
  local env=("${base_env[@]}" RECSYS_CPU_COLLECTIVES=gloo)
  # pin[i]: the core list ("0" or "0,1") of process i, with --pin_cores.
  local pin=() cores=() per first
  if ((pin_cores)); then
    mapfile -t cores < <(affinity_cores)
    per=$(( ${#cores[@]} / n ))
    ((per >= 1)) || per=1
    for ((i = 0; i < n; i++)); do
      first=$(( (i * per) % ${#cores[@]} ))
      pin+=("$(IFS=,; echo "${cores[*]:first:per}")")
    done
  fi
  local cmds=() prefix
  for ((i = 0; i < n; i++)); do
    prefix=()
    ((pin_cores)) && prefix=(taskset -c "${pin[$i]}")
    cmds+=("$(launch_format "${#env[@]}" "${env[@]}" \
      "${prefix[@]+"${prefix[@]}"}" "$python" -m recsys_jax.train \
      "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" \
      "--process_id=$i" "${extra[@]+"${extra[@]}"}")")
  done
  if ((DRY_RUN)); then
    printf '%s\n' "${cmds[@]}"
    launch_note "each runs in the background, logging to $dir/process_<i>.log"
    return 0
  fi

  mkdir -p "$dir"
  local pids=()
  for ((i = 0; i < n; i++)); do
    prefix=()
    ((pin_cores)) && prefix=(taskset -c "${pin[$i]}")
    env "${env[@]}" "${prefix[@]+"${prefix[@]}"}" "$python" -m recsys_jax.train \
      "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" \
      "--process_id=$i" "${extra[@]+"${extra[@]}"}" \
      >"$dir/process_$i.log" 2>&1 &
    pids+=("$!")
    echo "${LAUNCH_NAME}: process $i (pid $!) logs to $dir/process_$i.log" >&2
  done

  # Stops the processes still running (only the ones started here).
  stop_rest() {
    local j
    for j in "${!pids[@]}"; do
      if [[ -n "${pids[$j]}" ]] && kill -0 "${pids[$j]}" 2>/dev/null; then
        kill -TERM "${pids[$j]}" 2>/dev/null || true
      fi
    done
  }
  trap 'stop_rest; exit 130' INT
  trap 'stop_rest; exit 143' TERM

  # Polls rather than `wait -n` so that the failing process is known on any
  # bash >= 4 (bash reaps children itself, so an exited pid fails kill -0).
  local remaining="$n" rc
  while ((remaining > 0)); do
    for i in "${!pids[@]}"; do
      [[ -n "${pids[$i]}" ]] || continue
      kill -0 "${pids[$i]}" 2>/dev/null && continue
      rc=0
      wait "${pids[$i]}" || rc=$?
      pids[$i]=""
      remaining=$((remaining - 1))
      if ((rc != 0)); then
        echo "${LAUNCH_NAME}: process $i exited with status $rc; stopping the" \
          "others. Last lines of $dir/process_$i.log:" >&2
        tail -n 20 "$dir/process_$i.log" >&2 || true
        stop_rest
        wait || true
        exit "$rc"
      fi
    done
    ((remaining == 0)) || sleep 0.2
  done
  trap - INT TERM
  echo "${LAUNCH_NAME}: all $n processes finished; logs in $dir" >&2
}

case "$mode" in
  quickstart)
    gin=(--gin_file=gin/quickstart.gin "--gin.MODEL_DIR='runs/quickstart'")
    if [[ -f data/synthetic/stats.json ]]; then
      launch_note "data/synthetic is already prepared (stats.json exists); skipping prepare"
    else
      run_entry data.prepare --format=synthetic --output_dir=data/synthetic
    fi
    run_entry train "${gin[@]}" "${extra[@]+"${extra[@]}"}"
    run_entry eval "${gin[@]}" "${extra[@]+"${extra[@]}"}"
    # Writes runs/quickstart/export (gin EXPORT_DIR defaults to MODEL_DIR/export).
    run_entry export "${gin[@]}" "${extra[@]+"${extra[@]}"}"
    ;;
  *)
    if [[ -n "$num_processes" ]]; then
      run_multiprocess
    else
      run_entry "$mode" "${extra[@]+"${extra[@]}"}"
    fi
    ;;
esac
