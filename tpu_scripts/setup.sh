#!/usr/bin/env bash
# Copies this checkout (git archive of HEAD) to every worker and installs it exactly as the
# README says, in ~/REMOTE_DIR/.venv.
#   tpu_scripts/setup.sh [common flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common "$@"
for arg in "${REST[@]}"; do
  case "$arg" in
    -h|--help) echo "usage: $0 [common flags]"; usage_common; exit 0 ;;
    *) die "unknown flag $arg" ;;
  esac
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# The README's install line (its first code block), read so the two never drift apart.
INSTALL="$(awk '/^```bash/{f=1;next} f&&/^```/{exit} f' "$REPO/README.md" | grep '^pip install' \
  | sed 's/ && FLAME_DATA_MIRROR=.*//')"
[[ -n "$INSTALL" ]] || die "cannot find the install line in $REPO/README.md"
ARCHIVE="/tmp/flame-src-$(git -C "$REPO" rev-parse --short HEAD).tar.gz"
location_flags
run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:~/flame-src.tar.gz" --worker=all \
  "${LOCATION[@]}"
DIR="$(printf '%q' "$REMOTE_DIR")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${LOCATION[@]}" \
  --command="mkdir -p ~/$DIR && tar -xzf ~/flame-src.tar.gz -C ~/$DIR && cd ~/$DIR && python3 -m venv .venv && source .venv/bin/activate && python -m pip install -q --upgrade pip && $INSTALL"
