#!/usr/bin/env bash
# Train psd_jax on a Cloud TPU VM pod slice: create the slice, put the code (git HEAD) on every
# worker, install, run the same command on all workers (their logs stream back), delete the
# slice (also when training fails).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v4-32 --workdir gs://BUCKET/run \
#       [--runtime tpu-ubuntu2204-base] [--spot] [--keep] [--dry-run] \
#       -- --config configs/psd_cc3m_vitb32.py [--config.key=value ...]
#
# --dry-run prints every gcloud command instead of running it. --keep leaves the slice up.
# The workdir should be on GCS (gs://...): every worker writes its part of each checkpoint there
# and process 0 writes metrics; a preempted spot slice resumes from it when relaunched.
# Exit status: the training command's: 0 finished, 143 preempted (the run checkpointed:
# relaunch with the same arguments to resume, e.g. `until launch/tpu_pod.sh ...; do
# [ $? -eq 143 ] || break; done`), 3 diverged, 2 a config error.
set -euo pipefail

name="" zone="" accelerator="" workdir="" runtime="tpu-ubuntu2204-base" spot=0 keep=0 dry=0
repo=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for pair in "name:$name" "zone:$zone" "accelerator:$accelerator" "workdir:$workdir"; do
  if [ -z "${pair#*:}" ]; then echo "tpu_pod.sh: --${pair%%:*} is required" >&2; exit 2; fi
done
if [ $# -eq 0 ]; then echo "tpu_pod.sh: give the training arguments after --" >&2; exit 2; fi

# The training command, each argument quoted for the remote shell.
train_args=""
for arg in "$@"; do train_args+=" $(printf '%q' "$arg")"; done
remote="cd ~/psd_jax && python3 -m psd_jax.main --workdir=$(printf '%q' "$workdir")${train_args}"

run() {
  if [ "$dry" -eq 1 ]; then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

if [ "$dry" -eq 0 ]; then
  command -v gcloud >/dev/null || {
    echo "tpu_pod.sh: gcloud not found; install the Google Cloud CLI and run 'gcloud auth login'" >&2
    exit 1; }
  if [ -z "$(gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null)" ]; then
    echo "tpu_pod.sh: gcloud is not authenticated; run 'gcloud auth login'" >&2
    exit 1
  fi
fi

create=(compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator"
        --version="$runtime")
[ "$spot" -eq 1 ] && create+=(--spot)
run "${create[@]}"

archive=$(mktemp -t psd_jax_XXXXXX.tar.gz)
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run compute tpus tpu-vm scp "$archive" "$name:~/psd_jax.tar.gz" --zone="$zone" --worker=all
run compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
  --command="mkdir -p ~/psd_jax && tar -xzf ~/psd_jax.tar.gz -C ~/psd_jax && cd ~/psd_jax && pip install -q -e '.[tpu]'"
status=0
# every worker runs the same command; their output streams back here
run compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote" || status=$?
if [ "$keep" -eq 0 ]; then
  run compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
fi
rm -f "$archive"
exit "$status"
