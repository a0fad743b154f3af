# Shared by every tpu_scripts/*.sh: the defaults (one place), flag parsing, and running or
# printing gcloud commands. Source it; do not run it.
#
# Defaults, each overridable by the environment or a flag of the same name:
#   TPU_NAME=flame-v5e-16  ZONE=us-west4-a  ACCELERATOR_TYPE=v5litepod-16
#   RUNTIME_VERSION=v2-alpha-tpuv5-lite  PROJECT=<gcloud's configured project>
#   REMOTE_DIR=flame (the checkout on every worker, relative to the home folder)

TPU_NAME="${TPU_NAME:-flame-v5e-16}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-flame}"
DRY_RUN=0
SECRETS=()   # names of environment variables forwarded to the workers, masked when printed
REST=()      # flags parse_common does not know, for the script itself
CMD=()       # everything after --: the command to run on the workers

usage_common() {
  cat <<USAGE
common flags: --tpu_name=NAME --zone=ZONE --accelerator_type=TYPE --runtime_version=V
              --project=P --remote_dir=DIR --dry_run (print the gcloud commands, run nothing)
USAGE
}

# parse_common "$@": takes the common flags; other flags land in REST (in order), everything
# after -- in CMD.
parse_common() {
  REST=()
  CMD=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --tpu_name=*) TPU_NAME="${1#*=}" ;;
      --zone=*) ZONE="${1#*=}" ;;
      --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
      --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
      --project=*) PROJECT="${1#*=}" ;;
      --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
      --dry_run) DRY_RUN=1 ;;
      --) shift; CMD=("$@"); break ;;
      *) REST+=("$1") ;;
    esac
    shift
  done
}

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# The --zone/--project flags every gcloud tpu command takes.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
}

# quote ARGS...: one string that a remote shell splits back into exactly ARGS (printf %q).
quote() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  printf '%s' "${out% }"
}

# mask TEXT: TEXT with the values of the SECRETS variables replaced by ***.
mask() {
  local text="$1" name value
  for name in "${SECRETS[@]}"; do
    value="${!name:-}"
    if [[ -n "$value" ]]; then text="${text//"$value"/***}"; fi
    value="$(printf '%q' "${!name:-}")"
    if [[ -n "${!name:-}" ]]; then text="${text//"$value"/***}"; fi
  done
  printf '%s' "$text"
}

# run CMD ARGS...: prints the command (secrets masked) and runs it unless --dry_run.
run() {
  echo "+ $(mask "$(quote "$@")")"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

# remote_command COMMAND ARGS...: the shell line a worker runs: cd into the checkout, activate
# its virtual environment, export the forwarded variables, run the command (each argument
# quoted, so gin overrides like --gin.MODEL_DIR="'gs://b/x'" survive ssh).
remote_command() {
  local line="cd ~/$(printf '%q' "$REMOTE_DIR") && source .venv/bin/activate"
  local name
  for name in "${SECRETS[@]}"; do
    line+=" && export $name=$(printf '%q' "${!name:-}")"
  done
  printf '%s && %s' "$line" "$(quote "$@")"
}
