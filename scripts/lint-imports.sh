#!/usr/bin/env bash
# Checks the layer contracts of pyproject.toml ([tool.importlinter]) with import-linter, over
# the `idealrt` namespace as installed (the link tree of scripts/link-tree.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="$(bash scripts/link-tree.sh importlint)" \
  .venv/bin/lint-imports --config pyproject.toml --no-cache "$@"
