#!/usr/bin/env bash
# README command 2: install what the tests need (into .venv) and run every test tier.
#   bash tests/run.sh                 # unit + integration + e2e
#   bash tests/run.sh -m unit         # extra arguments go to pytest
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/cluster/setup-env.sh" test
cd "$here"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
set +e
# Two workers, a test file each at a time (module fixtures and a file's order kept): most of the suite
# waits on service start-ups, Ray polls and subprocesses, one core's worth of it at a time.
# DROPE_TEST_WORKERS=0 runs in one process. Each tier's time and the 45-min ceiling: tests/fixtures/budget.py.
workers="${DROPE_TEST_WORKERS:-2}"
start=$(date +%s)
.venv/bin/python -m pytest tests -n "$workers" --dist loadfile --durations=30 "$@"
rc=$?
set -e
echo "tests/run.sh: pytest took $(( $(date +%s) - start )) s with $workers workers (exit $rc)"
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
