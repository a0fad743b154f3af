#!/usr/bin/env bash
# Deletes the TPU VM (or the queued resource and its VM). Outputs on the mounted bucket stay.
#   tpu_scripts/teardown.sh [--queued] [common flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
QUEUED=0
for arg in "${REST[@]}"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    -h|--help) echo "usage: $0 [--queued]"; usage_common; exit 0 ;;
    *) die "unknown flag $arg" ;;
  esac
done
location_flags
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
