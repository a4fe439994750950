#!/usr/bin/env bash
# Installs the system packages Sidemesh needs, from Debian's archive, when a
# command they provide is missing. Idempotent; quiet when all is present.
#
#   scripts/system-deps.sh            what `make run` and `make test` need
#   scripts/system-deps.sh bench      plus what `make bench` needs
set -euo pipefail

# command -> Debian package
declare -A need=(
  [bwrap]=bubblewrap      # the sidecar sandbox's namespaces
  [setpriv]=util-linux    # parent-death signal for unsandboxed sidecars
)
if [[ "${1:-}" == "bench" ]]; then
  need[nginx]=nginx       # the reference gRPC proxy
  need[h2load]=nghttp2-client
fi

missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("${need[$cmd]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "system-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; then
  $sudo apt-get update >/dev/null
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
