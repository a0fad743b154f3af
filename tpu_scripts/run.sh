#!/usr/bin/env bash
# Runs one command on every worker at once (JAX's multi-controller runtime: each worker is one
# process; flame's entry points initialise jax.distributed from the TPU environment), each
# worker logging to ~/logs/LOG.<hostname>.log as well as the terminal.
#   tpu_scripts/run.sh [--env=NAME ...] [--log=NAME] [common flags] -- COMMAND ARGS...
#   e.g. tpu_scripts/run.sh --env=HF_TOKEN -- flame-pipeline --gin_file=pipelines/smollm2.gin \
#          --gin.PipelineSettings.vanilla_steps=2000 --work_dir=/tmp/p
# --env forwards a local environment variable (its value is masked in everything printed).
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
LOG=run
for arg in "${REST[@]}"; do
  case "$arg" in
    --env=*) SECRETS+=("${arg#*=}") ;;
    --log=*) LOG="${arg#*=}" ;;
    -h|--help) echo "usage: $0 [--env=NAME ...] [--log=NAME] -- COMMAND ARGS..."; usage_common; exit 0 ;;
    *) die "unknown flag $arg (put the command after --)" ;;
  esac
done
[[ ${#CMD[@]} -gt 0 ]] || die "no command: put it after --"
location_flags
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${LOCATION[@]}" \
  --command="mkdir -p ~/logs && ( $(remote_command "${CMD[@]}") ) 2>&1 | tee ~/logs/$(printf '%q' "$LOG").\$(hostname).log"
