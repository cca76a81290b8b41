#!/usr/bin/env bash
# The main job on embedded defaults: install, then `reembed demo` (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/reembed demo "$@"
