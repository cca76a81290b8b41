#!/usr/bin/env bash
# The long run of the stateful lifecycle test: `bash scripts/stateful.sh [EXAMPLES] [STEPS]`
# (default 100 examples of up to 30 steps; the test command runs 3 of 24). Real Redis, `chroma run`,
# worker processes and the static models, like the test command; prints every step it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export REEMBED_STATEFUL_EXAMPLES="${1:-100}" REEMBED_STATEFUL_STEPS="${2:-30}"
exec .venv/bin/python -m pytest tests/integration/test_lifecycle_stateful.py -q -s -p no:cacheprovider
