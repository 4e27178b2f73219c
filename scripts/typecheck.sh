#!/usr/bin/env bash
# mypy over the `idealrt` namespace as installed (the link tree of scripts/link-tree.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MYPYPATH="$(bash scripts/link-tree.sh typecheck)" \
  .venv/bin/mypy -p idealrt.core -p idealrt.services -p idealrt.clients "$@"
