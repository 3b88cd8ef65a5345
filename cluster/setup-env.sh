#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install drope into it.
#   bash cluster/setup-env.sh          # runtime: drope + Ray + DeepSpeed + MLflow
#   bash cluster/setup-env.sh test     # plus what the tests need (moto server, pytest)
# VENV (default .venv next to this repo) can be pointed elsewhere.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$here/.venv}"
extra="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, from the CPU wheel this machine kind carries; the constraints keep it there.
quiet() {  # pip's find-links warnings about absent local mirrors are noise here
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# torch first, from the CPU wheel this machine kind carries; the constraints keep it there.
quiet $pip install torch==2.13.0
target="$here"
[ "$extra" = "test" ] && target="$here[test]"
quiet $pip install -c "$here/cluster/constraints.txt" -e "$target"
echo "drope environment ready: $venv"
