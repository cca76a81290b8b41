#!/usr/bin/env bash
# The test command (README and .ci/run): install, make sure Redis runs on 127.0.0.1:6379, run pytest.
# Unit tests need nothing; integration tests use Redis databases 10-13 (flushed), start their own
# `chroma run` servers and Celery workers, and the shared/ folder beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "test: starting Redis on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  # The secured-Chroma tests put a real reverse proxy (TLS + bearer token) in front of `chroma run`.
  echo "test: installing nginx (Debian's nginx-light)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends nginx-light >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends nginx-light >/dev/null; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Static types first (strict, exceptions named in pyproject.toml): seconds, and a type error fails the run.
.venv/bin/python -m mypy
# Two test processes (pytest-xdist), each module whole on one of them, each with its own Redis
# databases (tests/conftest.py); REEMBED_TEST_PROCESSES=0 runs in this process alone.
processes="${REEMBED_TEST_PROCESSES:-2}"
parallel=()
if [ "$processes" != "0" ]; then parallel=(-n "$processes" --dist loadfile); fi
exec .venv/bin/python -m pytest "${parallel[@]}" --durations=25 "$@"
