#!/usr/bin/env bash
# Checks the layer contracts of pyproject.toml ([tool.importlinter]) with import-linter.
# The folders map into one namespace `idealrt` (package-dir); import-linter reads source
# files, so it gets the same link tree as mypy (scripts/typecheck.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/importlint
rm -rf "$tree"; mkdir -p "$tree/idealrt"
for d in gen/idealrt/*; do ln -s "$PWD/$d" "$tree/idealrt/$(basename "$d")"; done
for d in core services clients; do ln -s "$PWD/$d" "$tree/idealrt/$d"; done
PYTHONPATH="$PWD/$tree" .venv/bin/lint-imports --config pyproject.toml --no-cache "$@"
