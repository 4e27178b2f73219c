#!/usr/bin/env bash
# Runs the test suite. The store's PostgreSQL tests start a throwaway server
# (scripts/pg-test-server.sh); install the server package when its binaries are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! bash scripts/pg-test-server.sh find >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing postgresql for the store tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "warning: could not install postgresql; its tests will be skipped"
  fi
fi
# kubectl's built-in kustomize renders k8s/overlays for tests/unit/k8s/test_overlays.py
if ! command -v kubectl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing kubectl for the kustomize overlay tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null) \
    || echo "warning: could not install kubectl; the overlay render tests will be skipped"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# everything, the fault suite (real kills, tests/e2e/test_faults.py) included; `make fuzz`
# and `make faults` select with -m
.venv/bin/pytest "$@"
