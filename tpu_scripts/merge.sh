#!/usr/bin/env bash
# Runs flame-merge on worker 0 (the streaming merge is one process: it reads each parameter
# batch from every checkpoint and writes the output, never the whole model in memory).
#   tpu_scripts/merge.sh [--env=NAME ...] [common flags] -- --config=merge.yml --output_dir=DIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
for arg in "${REST[@]}"; do
  case "$arg" in
    --env=*) SECRETS+=("${arg#*=}") ;;
    -h|--help) echo "usage: $0 -- FLAME_MERGE_ARGS..."; usage_common; exit 0 ;;
    *) die "unknown flag $arg (put flame-merge's flags after --)" ;;
  esac
done
[[ ${#CMD[@]} -gt 0 ]] || die "no flame-merge flags: put them after --"
location_flags
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=0 "${LOCATION[@]}" \
  --command="mkdir -p ~/logs && ( $(remote_command flame-merge "${CMD[@]}") ) 2>&1 | tee ~/logs/merge.log"
