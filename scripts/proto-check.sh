#!/usr/bin/env bash
# Fails when regenerating the protobuf code would change a committed file.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/gen-proto.sh "$tmp"
status=0
diff -r -q -x '*.proto' -x '__init__.py' -x 'py.typed' -x '__pycache__' \
  "$tmp/sidemesh/v1" proto/sidemesh/v1 || status=$?
if [[ $status -ne 0 ]]; then
  echo "proto-check: generated code is stale or was edited by hand; run 'make proto' and commit." >&2
  exit 1
fi
echo "proto-check: generated code is up to date."
