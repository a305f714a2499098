#!/usr/bin/env bash
# Run a psd_jax job as N processes on this machine, each with D CPU devices, joined by the JAX
# distributed runtime on 127.0.0.1 (gloo collectives): the way to exercise multi-host code
# without a pod.
#
#   launch/local_multihost.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-m MODULE] -- ARGS...
#   launch/local_multihost.sh -n 2 -d 2 -- --config configs/tiny_test.py --workdir /tmp/mh
#
# Logs go to <workdir>/logs/process_<i>.log (or $LOG_DIR); the exit status is the first
# failure's, and the other processes are stopped when one fails. The processes run
# $PSD_JAX_PYTHON (default: python on PATH), e.g. PSD_JAX_PYTHON=venv/bin/python.
set -euo pipefail
python=${PSD_JAX_PYTHON:-python}

processes=2
devices=2
module=psd_jax.main
while getopts "n:d:m:h" opt; do
  case "$opt" in
    n) processes=$OPTARG ;;
    d) devices=$OPTARG ;;
    m) module=$OPTARG ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
prev=""
for arg in "$@"; do
  [ "$prev" = "--workdir" ] && workdir=$arg
  prev=$arg
done
log_dir=${LOG_DIR:-${workdir:-.}/logs}
mkdir -p "$log_dir"

port=${COORDINATOR_PORT:-$("$python" - <<'PY'
import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])
s.close()
PY
)}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${EXTRA_XLA_FLAGS:-}" \
  JAX_PLATFORMS=cpu \
    "$python" -m "$module" "$@" --coordinator_address="127.0.0.1:${port}" \
      --num_processes="$processes" --process_id="$i" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    # a preempted process (143) has checkpointed with the others: let them finish too
    [ "$code" -eq 143 ] || cleanup
  fi
done
if [ "$status" -eq 143 ]; then
  echo "preempted (exit 143): checkpointed; run the same command again to resume" >&2
elif [ "$status" -ne 0 ]; then
  echo "a process failed (exit $status); logs in $log_dir" >&2
  tail -n 20 "$log_dir"/process_*.log >&2 || true
fi
exit "$status"
