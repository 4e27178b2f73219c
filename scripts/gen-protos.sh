#!/usr/bin/env bash
# Regenerates gen/idealrt from protos/ with the pinned grpcio-tools (see pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
find gen/idealrt -name '*_pb2*.py*' -delete
mapfile -t files < <(cd protos && find idealrt -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=gen --pyi_out=gen --grpc_python_out=gen $(printf "protos/%s " "${files[@]}")
# packages for every generated folder
for d in $(cd gen && find idealrt -type d); do
  [ -f "gen/$d/__init__.py" ] || : > "gen/$d/__init__.py"
done
