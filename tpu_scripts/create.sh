#!/usr/bin/env bash
# Creates the TPU VM (or a queued resource that becomes one when capacity frees up).
#   tpu_scripts/create.sh [--spot] [--queued] [common flags, see common.sh]
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
SPOT=() QUEUED=0
for arg in "${REST[@]}"; do
  case "$arg" in
    --spot) SPOT=(--spot) ;;
    --queued) QUEUED=1 ;;
    -h|--help) echo "usage: $0 [--spot] [--queued]"; usage_common; exit 0 ;;
    *) die "unknown flag $arg" ;;
  esac
done
location_flags
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${SPOT[@]}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${SPOT[@]}"
fi
