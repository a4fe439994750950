#!/usr/bin/env bash
# Generates the Python code and typed stubs for proto/sidemesh/v1/*.proto.
#
#   scripts/gen-proto.sh [OUT]   write beside the sources (default: proto)
#
# The generator versions are pinned in pyproject.toml, so the output is the
# same on every machine; `make proto-check` relies on that.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
mkdir -p "$out"
rm -f "$out"/sidemesh/v1/*_pb2*.py "$out"/sidemesh/v1/*_pb2*.pyi
python -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/sidemesh/v1/*.proto 2> >(grep -v '^Writing mypy to' >&2)
