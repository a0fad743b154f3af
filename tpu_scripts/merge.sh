#!/usr/bin/env bash
# Runs flame-merge on worker 0 (one process reads each parameter batch of every checkpoint and
# writes the output, never the whole model in memory), or with --all_workers on every worker
# as one multi-process job (`flame-merge --multihost`: each process reads and writes only its
# shards of each parameter; the output folder must be on a filesystem every worker mounts at
# the same path, e.g. a Filestore share or a gcsfuse mount).
#   tpu_scripts/merge.sh [--all_workers] [--env=NAME ...] [common flags] -- --config=merge.yml --output_dir=DIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
WORKER=0
for arg in "${REST[@]}"; do
  case "$arg" in
    --env=*) SECRETS+=("${arg#*=}") ;;
    --all_workers) WORKER=all ;;
    -h|--help) echo "usage: $0 [--all_workers] -- FLAME_MERGE_ARGS..."; usage_common; exit 0 ;;
    *) die "unknown flag $arg (put flame-merge's flags after --)" ;;
  esac
done
[[ ${#CMD[@]} -gt 0 ]] || die "no flame-merge flags: put them after --"
if [[ $WORKER == all ]]; then
  CMD+=(--multihost)
fi
location_flags
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" "${LOCATION[@]}" \
  --command="mkdir -p ~/logs && ( $(remote_command flame-merge "${CMD[@]}") ) 2>&1 | tee ~/logs/merge.\$(hostname).log"
