#!/usr/bin/env bash
# Tail-patch tasks as a grid: task index i runs on TPU VM i mod (number of VMs), one job per
# index (--task_index=i appended to the command), the VMs in parallel, each VM's jobs in turn.
#   tpu_scripts/grid.sh --tasks=N [--tpu_names=a,b,...] [--env=NAME ...] [common flags] \
#     -- flame-tailpatch --gin_file=... --init=... --out_dir=gs://bucket/tailpatch
# (`flame-tailpatch ... --list` prints the N tasks.) Default VMs: --tpu_name.
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
TASKS="" NAMES=""
for arg in "${REST[@]}"; do
  case "$arg" in
    --tasks=*) TASKS="${arg#*=}" ;;
    --tpu_names=*) NAMES="${arg#*=}" ;;
    --env=*) SECRETS+=("${arg#*=}") ;;
    -h|--help) echo "usage: $0 --tasks=N [--tpu_names=a,b] -- COMMAND ARGS..."; usage_common; exit 0 ;;
    *) die "unknown flag $arg (put the command after --)" ;;
  esac
done
[[ "$TASKS" =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive number of tasks, got '$TASKS'"
[[ ${#CMD[@]} -gt 0 ]] || die "no command: put it after --"
for arg in "${CMD[@]}"; do
  [[ "$arg" != --task_index* && "$arg" != --all && "$arg" != --task=* ]] \
    || die "the command must not choose tasks ($arg): grid.sh appends --task_index"
done
IFS=, read -r -a VMS <<< "${NAMES:-$TPU_NAME}"
location_flags
job() {  # job VM INDEX
  run gcloud compute tpus tpu-vm ssh "$1" --worker=all "${LOCATION[@]}" \
    --command="mkdir -p ~/logs && ( $(remote_command "${CMD[@]}" "--task_index=$2") ) > ~/logs/task_$2.\$(hostname).log 2>&1"
}
for v in "${!VMS[@]}"; do
  (
    for ((i = v; i < TASKS; i += ${#VMS[@]})); do job "${VMS[$v]}" "$i"; done
  ) &
  if [[ "$DRY_RUN" == 1 ]]; then wait; fi  # Printed in a stable order.
done
wait
