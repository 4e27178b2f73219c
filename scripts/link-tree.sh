#!/usr/bin/env bash
# Prints the path of a link tree that maps core/ services/ clients/ and gen/idealrt/* into
# one `idealrt` package, as setuptools' package-dir does, for tools that read source files
# (mypy, import-linter). Usage: tree=$(bash scripts/link-tree.sh NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
tree=".cache/${1:?name of the tree}"
rm -rf "$tree"; mkdir -p "$tree/idealrt"
for d in gen/idealrt/*; do ln -s "$PWD/$d" "$tree/idealrt/$(basename "$d")"; done
for d in core services clients; do ln -s "$PWD/$d" "$tree/idealrt/$d"; done
echo "$PWD/$tree"
