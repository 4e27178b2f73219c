#!/usr/bin/env bash
# mypy over the `idealrt` namespace as installed: a link tree maps core/ services/ clients/
# and gen/idealrt/* into one `idealrt` package, as setuptools' package-dir does.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/typecheck
rm -rf "$tree"; mkdir -p "$tree/idealrt"
for d in gen/idealrt/*; do ln -s "$PWD/$d" "$tree/idealrt/$(basename "$d")"; done
for d in core services clients; do ln -s "$PWD/$d" "$tree/idealrt/$d"; done
MYPYPATH="$tree" .venv/bin/mypy -p idealrt.core -p idealrt.services -p idealrt.clients "$@"
