#!/usr/bin/env bash
# Installs the npm packages of bundled plugins: every directory under
# examples/plugins, tests/plugins, tests/tools and clients that has a package-lock.json gets
# `npm ci` (exact versions from the lock file), once per lock file change.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
for lock in examples/plugins/*/package-lock.json tests/plugins/*/package-lock.json tests/tools/*/package-lock.json clients/*/package-lock.json; do
  dir=$(dirname "$lock")
  stamp="$dir/node_modules/.sidemesh-stamp"
  if [[ -f "$stamp" && "$stamp" -nt "$lock" ]]; then
    continue
  fi
  command -v npm >/dev/null 2>&1 || {
    echo "node-deps: npm is needed for $dir: install nodejs and npm" >&2; exit 1; }
  echo "node-deps: npm ci in $dir" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  touch "$stamp"
done
